//! Differential test against the Linux kernel's own NAT: real packets captured with tshark on both
//! sides of an nftables full NAT (`dnat` + `snat`) in a router namespace (see
//! `tests/data/README.md` and `tests/data/kernel-capture.sh`). For each pair, lb-packet's
//! `nat::rewrite` of the packet as it reached the kernel must give the bytes the kernel sent on,
//! byte for byte, once the one thing a forwarding router does that a NAT does not is applied: the
//! IPv4 TTL / IPv6 hop limit decrement (with, for IPv4, its header-checksum update). That
//! normalisation is done explicitly with [`tunnel::decrement_ttl`] (an RFC 1624 update, as the
//! kernel's `ip_decrease_ttl`); every checksum of both packets is also verified from scratch.

use std::net::SocketAddr;

use lb_packet::tunnel::decrement_ttl;
use lb_packet::{nat, parse, Family, Link};

macro_rules! kernel {
    ($name:literal) => {
        (
            $name,
            &include_bytes!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/data/kernel-",
                $name,
                ".before.bin"
            ))[..],
            &include_bytes!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/data/kernel-",
                $name,
                ".after.bin"
            ))[..],
        )
    };
}

/// One capture pair: the flow as the kernel received it, and the endpoints it rewrote it to
/// (read off the "after" packet: the IPv4 SNAT rule forces source port 50000, the IPv6 one keeps
/// the client's port).
struct Case {
    name: &'static str,
    before: &'static [u8],
    after: &'static [u8],
    key_before: &'static str,
    src: &'static str,
    dst: &'static str,
}

fn cases() -> Vec<Case> {
    // (fixture, flow before, new source, new destination)
    let table = [
        // IPv4, client 192.0.2.2 -> VIP 203.0.113.10, backend 198.51.100.11, SNAT 198.51.100.1.
        (
            kernel!("v4-tcp-syn"),
            "tcp 192.0.2.2:33368 -> 203.0.113.10:80",
            "198.51.100.1:50000",
            "198.51.100.11:8080",
        ),
        (
            kernel!("v4-tcp-data"),
            "tcp 192.0.2.2:33368 -> 203.0.113.10:80",
            "198.51.100.1:50000",
            "198.51.100.11:8080",
        ),
        (
            kernel!("v4-tcp-synack"),
            "tcp 198.51.100.11:8080 -> 198.51.100.1:50000",
            "203.0.113.10:80",
            "192.0.2.2:33368",
        ),
        (
            kernel!("v4-udp"),
            "udp 192.0.2.2:36300 -> 203.0.113.10:53",
            "198.51.100.1:50000",
            "198.51.100.11:5353",
        ),
        (
            kernel!("v4-udp-reply"),
            "udp 198.51.100.11:5353 -> 198.51.100.1:50000",
            "203.0.113.10:53",
            "192.0.2.2:36300",
        ),
        // IPv6, client 2001:db8:c::2 -> VIP 2001:db8:f::10, backend 2001:db8:b::11,
        // SNAT 2001:db8:b::1 (port kept).
        (
            kernel!("v6-tcp-syn"),
            "tcp [2001:db8:c::2]:53436 -> [2001:db8:f::10]:80",
            "[2001:db8:b::1]:53436",
            "[2001:db8:b::11]:8080",
        ),
        (
            kernel!("v6-tcp-data"),
            "tcp [2001:db8:c::2]:53436 -> [2001:db8:f::10]:80",
            "[2001:db8:b::1]:53436",
            "[2001:db8:b::11]:8080",
        ),
        (
            kernel!("v6-tcp-synack"),
            "tcp [2001:db8:b::11]:8080 -> [2001:db8:b::1]:53436",
            "[2001:db8:f::10]:80",
            "[2001:db8:c::2]:53436",
        ),
        (
            kernel!("v6-udp"),
            "udp [2001:db8:c::2]:43002 -> [2001:db8:f::10]:53",
            "[2001:db8:b::1]:43002",
            "[2001:db8:b::11]:5353",
        ),
        (
            kernel!("v6-udp-reply"),
            "udp [2001:db8:b::11]:5353 -> [2001:db8:b::1]:43002",
            "[2001:db8:f::10]:53",
            "[2001:db8:c::2]:43002",
        ),
    ];
    table
        .into_iter()
        .map(|((name, before, after), key_before, src, dst)| Case {
            name,
            before,
            after,
            key_before,
            src,
            dst,
        })
        .collect()
}

/// RFC 1071 sum, folded, written here from scratch (independent of lb-packet's helpers).
fn fold_sum(data: &[u8], mut acc: u32) -> u16 {
    for c in data.chunks(2) {
        acc += u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0));
    }
    while acc > 0xFFFF {
        acc = (acc & 0xFFFF) + (acc >> 16);
    }
    acc as u16
}

/// Checks every checksum of an IPv4 or IPv6 TCP / UDP packet in full.
fn assert_checksums_valid(what: &str, ip: &[u8]) {
    let (l4, pseudo) = if ip[0] >> 4 == 4 {
        let hl = usize::from(ip[0] & 15) * 4;
        assert_eq!(
            fold_sum(&ip[..hl], 0),
            0xFFFF,
            "{what}: IPv4 header checksum"
        );
        let mut ph = Vec::from(&ip[12..20]);
        ph.extend_from_slice(&[0, ip[9]]);
        ph.extend_from_slice(&u16::try_from(ip.len() - hl).unwrap().to_be_bytes());
        (hl, ph)
    } else {
        let mut ph = Vec::from(&ip[8..40]);
        ph.extend_from_slice(&u32::try_from(ip.len() - 40).unwrap().to_be_bytes());
        ph.extend_from_slice(&[0, 0, 0, ip[6]]);
        (40, ph)
    };
    let acc = u32::from(fold_sum(&pseudo, 0));
    assert_eq!(
        fold_sum(&ip[l4..], acc),
        0xFFFF,
        "{what}: transport checksum"
    );
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn kernel_fixtures_have_valid_checksums() {
    for c in cases() {
        assert_checksums_valid(&format!("{} before", c.name), c.before);
        assert_checksums_valid(&format!("{} after", c.name), c.after);
    }
}

/// lb-packet's full NAT of each packet, plus the router's TTL decrement, is the kernel's packet.
#[test]
fn full_nat_matches_kernel_byte_for_byte() {
    for c in cases() {
        let mut pkt = c.before.to_vec();
        let p = parse(&pkt, Link::Ip).unwrap();
        assert_eq!(p.key.to_string(), c.key_before, "{}", c.name);
        let src: SocketAddr = c.src.parse().unwrap();
        let dst: SocketAddr = c.dst.parse().unwrap();
        nat::rewrite(&mut pkt, &p, Some(src), Some(dst)).unwrap();
        assert_checksums_valid(c.name, &pkt);
        // The kernel forwarded the packet: TTL / hop limit one less (and, for IPv4, the header
        // checksum updated for it). lb-packet's NAT leaves them alone, so apply the same router
        // step here; nothing else is masked.
        let (ttl_at, family) = if p.family == Family::V4 {
            (8, Family::V4)
        } else {
            (7, Family::V6)
        };
        assert_eq!(c.after[ttl_at] + 1, c.before[ttl_at], "{}: TTL", c.name);
        decrement_ttl(&mut pkt, family).unwrap();
        assert_eq!(
            hex(&pkt),
            hex(c.after),
            "{}: lb-packet (left) vs kernel (right)",
            c.name
        );
        // And the packet parses back to the flow the kernel made of it.
        let q = parse(&pkt, Link::Ip).unwrap();
        let proto = &c.key_before[..3];
        assert_eq!(
            q.key.to_string(),
            format!("{proto} {src} -> {dst}"),
            "{}",
            c.name
        );
    }
}
