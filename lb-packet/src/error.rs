//! The one error type of lb-packet.

/// The protocol layer an error refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Layer {
    /// Ethernet II header (with up to two VLAN tags).
    Ethernet,
    /// IPv4 header.
    Ipv4,
    /// IPv6 fixed header.
    Ipv6,
    /// An IPv6 extension header.
    Ipv6Ext,
    /// TCP header.
    Tcp,
    /// UDP header.
    Udp,
    /// SCTP common header.
    Sctp,
    /// ICMP (v4) header.
    Icmp,
    /// ICMPv6 header.
    Icmpv6,
    /// The IP header quoted inside an ICMP error.
    InnerIp,
    /// The transport header quoted inside an ICMP error.
    InnerL4,
    /// A GUE header.
    Gue,
    /// A SIP message.
    Sip,
    /// The caller-supplied output buffer or headroom.
    Buffer,
}

/// What was wrong with a packet or a request on it. Cheap to copy; never carries packet bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PacketError {
    /// Fewer bytes than the header (or the claimed length) needs.
    #[error("{layer:?} truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Layer being read.
        layer: Layer,
        /// Bytes needed from the start of that layer.
        need: usize,
        /// Bytes available from the start of that layer.
        have: usize,
    },
    /// The IP version nibble was not the one expected (4 or 6).
    #[error("{layer:?}: bad IP version {version}")]
    BadVersion {
        /// Layer being read.
        layer: Layer,
        /// The version nibble found.
        version: u8,
    },
    /// IPv4 internet header length below 5 words.
    #[error("{layer:?}: bad IPv4 header length {ihl} (words)")]
    BadIhl {
        /// Layer being read.
        layer: Layer,
        /// The IHL field.
        ihl: u8,
    },
    /// A length field disagrees with the header or the buffer.
    #[error("{layer:?}: length field {claimed} inconsistent (header {header}, available {have})")]
    LengthMismatch {
        /// Layer being read.
        layer: Layer,
        /// The length the header claims.
        claimed: usize,
        /// The minimum the header itself occupies.
        header: usize,
        /// Bytes available.
        have: usize,
    },
    /// TCP data offset below 5 words or beyond the packet.
    #[error("{layer:?}: bad TCP data offset {offset} (words)")]
    BadDataOffset {
        /// Layer being read.
        layer: Layer,
        /// The data offset field.
        offset: u8,
    },
    /// More IPv6 extension headers than the parser walks.
    #[error("more than {limit} IPv6 extension headers")]
    TooManyExtensionHeaders {
        /// The bound ([`crate::MAX_EXT_HEADERS`]).
        limit: usize,
    },
    /// The Ethernet frame carries neither IPv4 nor IPv6.
    #[error("unsupported EtherType {0:#06x}")]
    UnsupportedEtherType(u16),
    /// An ICMP error quoted a packet of the other IP family.
    #[error("ICMP error quotes a packet of the wrong IP family")]
    InnerFamilyMismatch,
    /// An address given for a rewrite is not of the packet's family.
    #[error("address family does not match the packet")]
    FamilyMismatch,
    /// A virtio-net offload header that does not describe the packet it came with (unknown
    /// GSO type, a GSO type of another protocol or family, a zero segment size, a checksum
    /// start outside the packet).
    #[error("bad offload header: {0}")]
    BadOffload(&'static str),
    /// The operation needs a different kind of packet (e.g. TCP for splicing, a tunnel for decap).
    #[error("operation not applicable: {0}")]
    NotApplicable(&'static str),
    /// Not enough headroom (or output space) for the bytes to write.
    #[error("no room: need {need} bytes, have {have}")]
    NoRoom {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// The TTL / hop limit would reach zero when forwarding.
    #[error("TTL / hop limit exhausted")]
    TtlExpired,
}
