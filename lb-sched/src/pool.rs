//! A pool of backends with live state, read by the policies.
