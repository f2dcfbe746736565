//! # lb-packet
//!
//! In-place packet parsing and rewriting for the four layer-4 forwarding modes of a load
//! balancer, plus its layer-5 helpers. No I/O, no allocation per packet, no panics on any input.
//!
//! - [`parse`]: validate an IP packet (TUN) or Ethernet frame (TAP) in place and get its offsets,
//!   fragment status and [`lb_core::FlowKey`]; ICMP errors report the quoted packet's key reversed
//!   so they follow their flow.
//! - [`fragment_info`]: a fragment's datagram identity (source, destination, protocol,
//!   identification) and place, to tie non-first fragments (no ports) to their first.
//! - [`nat`]: destination / source / full NAT with RFC 1624 incremental checksums, ICMP errors
//!   included; each rewrite's reverse is the same call with the original endpoints.
//! - [`tunnel`]: IPIP, IP6IP6, IPv4-in-IPv6 and GUE encapsulation into the headroom of a
//!   [`PacketBuf`], decapsulation, TTL handling and the path-MTU check.
//! - [`icmp`]: "fragmentation needed" / "packet too big" replies.
//! - [`dr`]: direct routing (MAC rewrite).
//! - [`splice`]: TCP sequence / acknowledgement (and SACK) translation.
//! - [`sip`]: SIP Call-ID extraction, the layer-5 affinity key.
//! - [`offload`]: the virtio-net header of a TUN/TAP device with offloads (GSO super-packets,
//!   partial checksums) and the segmentation the kernel would do; [`gro`]: runs of one flow's UDP
//!   datagrams merged into UDP GSO super-packets on the way out.
//! - [`checksum`]: the RFC 1071 / 1624 arithmetic, usable on its own.
//!
//! The drive loop of a balancer: `parse` → look up / choose the backend by `parsed.key` →
//! rewrite (`nat::rewrite`, `tunnel::encap_*`, `dr::set_macs`) → send the bytes.
//!
//! ```
//! use lb_packet::{nat, parse, Link};
//! use lb_core::IpProto;
//!
//! // An IPv4/UDP packet 192.0.2.1:5000 -> 203.0.113.10:53 with payload "hi" (checksums valid).
//! let mut pkt = [
//!     0x45, 0, 0, 30, 0, 0, 0x40, 0, 64, 17, 0, 0, 192, 0, 2, 1, 203, 0, 113, 10, // IPv4
//!     0x13, 0x88, 0, 53, 0, 10, 0, 0, b'h', b'i', // UDP
//! ];
//! let p = parse(&pkt, Link::Ip).unwrap();
//! lb_packet::checksum::recompute(&mut pkt, &p).unwrap(); // fill in the checksums
//! let original = pkt;
//! assert_eq!(p.key.proto(), IpProto::Udp);
//! assert_eq!(p.key.dst_port(), 53);
//!
//! // Full NAT towards a backend, from a balancer address.
//! nat::rewrite(&mut pkt, &p, Some("10.0.0.1:40000".parse().unwrap()), Some("10.0.0.7:5353".parse().unwrap())).unwrap();
//! let q = parse(&pkt, Link::Ip).unwrap();
//! assert_eq!(q.key.to_string(), "udp 10.0.0.1:40000 -> 10.0.0.7:5353");
//!
//! // The reverse restores the original bytes, checksums included.
//! nat::rewrite(&mut pkt, &q, Some("192.0.2.1:5000".parse().unwrap()), Some("203.0.113.10:53".parse().unwrap())).unwrap();
//! assert_eq!(pkt, original);
//! ```
#![forbid(unsafe_code)]

mod buf;
pub mod checksum;
pub mod dr;
mod error;
mod frag;
pub mod gro;
pub mod icmp;
pub mod l5head;
pub mod nat;
pub mod offload;
mod parse;
pub mod sip;
pub mod splice;
pub mod syncookie;
pub mod tcpseg;
pub mod tunnel;

#[cfg(test)]
mod testutil;

pub use buf::PacketBuf;
pub use error::{Layer, PacketError};
pub use frag::{fragment_info, FragmentInfo};
pub use parse::{parse, Embedded, Family, Fragment, Link, Parsed, MAX_EXT_HEADERS};
