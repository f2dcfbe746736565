//! Scheduling policies over a live [`crate::pool`].
