//! The pure parts of `lb-decap` (the binary does the I/O): which balancers may send tunnel
//! packets ([`AllowList`]), and where the inner packet of a GUE payload starts ([`gue_inner`]).
//!
//! Why an allow list: a decapsulating backend writes whatever inner packet arrives into its own
//! kernel, as if it had come from the client. Without a filter anyone who can reach it with IPIP,
//! IPv6-in-IPv6 or a GUE datagram can inject packets with any source address (spoofed clients,
//! addresses behind the backend's own firewall). Only the balancers' outer source addresses (in
//! `tun-balancer`, `balancer.snat_addrs`) need to get through.

use std::net::IpAddr;

use ipnet::IpNet;

/// The outer source addresses allowed to send tunnel packets: a list of prefixes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    nets: Vec<IpNet>,
}

impl AllowList {
    /// A list of the given prefixes (empty: nothing is allowed).
    pub fn new(nets: Vec<IpNet>) -> AllowList {
        AllowList { nets }
    }

    /// Parses a prefix (`203.0.113.0/24`, `2001:db8::/32`) or a single address (`/32` or
    /// `/128`), as `--allow` takes them.
    ///
    /// # Errors
    /// Neither a prefix nor an address.
    pub fn parse_prefix(s: &str) -> Result<IpNet, String> {
        s.parse::<IpNet>()
            .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
            .map(|n| n.trunc())
            .map_err(|_| format!("`{s}` is not an address or prefix (e.g. 203.0.113.0/24)"))
    }

    /// Whether `src` may send tunnel packets. An IPv4-mapped IPv6 address (what a dual-stack
    /// socket reports for an IPv4 sender) is checked as the IPv4 address it maps.
    pub fn allows(&self, src: IpAddr) -> bool {
        let src = src.to_canonical();
        self.nets.iter().any(|n| n.contains(&src))
    }

    /// The prefixes.
    pub fn nets(&self) -> &[IpNet] {
        &self.nets
    }
}

/// The outer source address of an IPv4 packet (`packet` starts at the IPv4 header, as an IPv4
/// raw socket returns it); `None` when it is too short or not IPv4.
pub fn ipv4_source(packet: &[u8]) -> Option<IpAddr> {
    let src: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
    (packet.first()? >> 4 == 4).then(|| IpAddr::from(src))
}

/// Offset of the inner packet in a GUE payload (variant 0 data message, or variant 1 = bare IP);
/// `None` for a control message or another variant. The offset may lie beyond the payload: the
/// caller slices with `get`.
pub fn gue_inner(payload: &[u8]) -> Option<usize> {
    let b0 = *payload.first()?;
    match b0 >> 6 {
        0 if b0 & 0x20 == 0 => Some(4 + usize::from(b0 & 0x1f) * 4),
        1 => Some(0),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(s: &[&str]) -> AllowList {
        AllowList::new(
            s.iter()
                .map(|p| AllowList::parse_prefix(p).unwrap())
                .collect(),
        )
    }

    #[test]
    fn allows_only_listed_sources() {
        let a = list(&["203.0.113.0/24", "2001:db8:100::100", "198.51.100.7"]);
        for ok in [
            "203.0.113.1",
            "203.0.113.255",
            "2001:db8:100::100",
            "198.51.100.7",
        ] {
            assert!(a.allows(ok.parse().unwrap()), "{ok}");
        }
        for no in [
            "203.0.114.1",
            "2001:db8:100::101",
            "198.51.100.8",
            "::",
            "0.0.0.0",
        ] {
            assert!(!a.allows(no.parse().unwrap()), "{no}");
        }
        // A dual-stack socket's view of an IPv4 sender.
        assert!(a.allows("::ffff:203.0.113.9".parse().unwrap()));
        assert!(!a.allows("::ffff:192.0.2.9".parse().unwrap()));
        assert!(!AllowList::default().allows("203.0.113.1".parse().unwrap()));
    }

    #[test]
    fn prefixes_parse_or_say_why() {
        assert_eq!(
            AllowList::parse_prefix("203.0.113.7/24")
                .unwrap()
                .to_string(),
            "203.0.113.0/24"
        );
        assert_eq!(
            AllowList::parse_prefix("2001:db8::1").unwrap().to_string(),
            "2001:db8::1/128"
        );
        for bad in ["", "203.0.113.0/33", "balancer", "2001:db8::/129"] {
            let e = AllowList::parse_prefix(bad).unwrap_err();
            assert!(e.contains("not an address or prefix"), "{bad}: {e}");
        }
    }

    #[test]
    fn ipv4_source_and_gue_offsets() {
        let mut p = [0u8; 20];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&[203, 0, 113, 100]);
        assert_eq!(ipv4_source(&p), Some("203.0.113.100".parse().unwrap()));
        assert_eq!(ipv4_source(&p[..15]), None);
        p[0] = 0x60;
        assert_eq!(ipv4_source(&p), None);
        assert_eq!(gue_inner(&[]), None);
        assert_eq!(gue_inner(&[0x00, 0, 0, 0]), Some(4));
        assert_eq!(gue_inner(&[0x02, 0, 0, 0]), Some(12));
        assert_eq!(gue_inner(&[0x20, 0, 0, 0]), None, "control message");
        assert_eq!(gue_inner(&[0x45]), Some(0), "variant 1: bare IPv4");
        assert_eq!(gue_inner(&[0x80]), None);
    }
}
