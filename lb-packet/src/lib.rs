//! # lb-packet
//!
//! In-place packet parsing and rewriting for the four forwarding modes (full NAT, DNAT, IP
//! tunnelling, direct routing), incremental checksums, ICMP errors, TCP splicing and SIP Call-ID
//! extraction. Not built yet.
#![forbid(unsafe_code)]
