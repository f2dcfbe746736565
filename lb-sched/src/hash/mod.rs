//! Consistent hashing: a flow hash in, a backend out.
