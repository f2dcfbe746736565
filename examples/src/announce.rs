//! Telling a link that this host now holds an address: a gratuitous ARP request (IPv4) or an
//! unsolicited neighbour advertisement (IPv6), sent as a whole Ethernet frame on an `AF_PACKET`
//! socket bound to the device. This is the second half of taking over a floating address (the
//! first is [`crate::netlink::add_addr`]), as keepalived does for its `virtual_ipaddress`.
//!
//! # What a Linux neighbour does with them
//! Read from `net/ipv4/arp.c` (`arp_process`, `arp_is_garp`) and `net/ipv6/ndisc.c`
//! (`ndisc_recv_na`); the points marked *(tested)* are checked end to end, under the default
//! sysctls, by `tests/announce.rs`.
//!
//! - **Gratuitous ARP** (sender IP = target IP = the address, sender MAC = ours, broadcast):
//!   - a neighbour that already has an entry for the address moves it to our MAC at once and
//!     marks it `STALE` (a broadcast request does not prove reachability), whether the entry
//!     was `REACHABLE` *(tested)* or `FAILED` *(tested)*; its next packet goes to us.
//!   - a neighbour with **no** entry creates none with the default
//!     `net.ipv4.conf.*.arp_accept = 0` *(tested)*, one with `arp_accept = 1` *(tested)*
//!     (2: only for an address in one of its own subnets). Nothing is lost: it resolves the
//!     address by broadcast when it first needs it, and the new holder answers that.
//!   - a *request* counts as gratuitous whatever its target hardware address, which is why
//!     it overrides even an entry updated within `locktime` (1 s) — right after a failover.
//!     A *reply* counts only when its target hardware address equals the sender's (the
//!     `arping -A` form); any other unsolicited reply is ignored for `locktime` after the
//!     entry last changed. *(From the source, not tested here.)*
//!   - `net.ipv4.conf.*.drop_gratuitous_arp = 1` on the neighbour ignores them all.
//!
//!   So the request form alone is enough for Linux neighbours, and it is what keepalived and
//!   `arping -U` send; this module sends only that.
//! - **Unsolicited neighbour advertisement** (to ff02::1, Override set, Solicited clear,
//!   target link-layer address option):
//!   - an existing `REACHABLE` entry takes our MAC at once and becomes `STALE` *(tested)*.
//!   - an entry in state `FAILED` is left alone *(tested)*: `ndisc_recv_na` skips it. The
//!     neighbour re-resolves it with a multicast solicitation on its next packet, which the
//!     new holder answers *(tested)*, so this costs one resolution, not reachability.
//!   - with no entry nothing is created on a host *(tested)*; a router with
//!     `accept_untracked_na` creates a `STALE` one (RFC 9131).
//!   - `net.ipv6.conf.*.drop_unsolicited_na = 1` on the neighbour ignores them all.
//! - The kernel announces nothing itself when an address is added: `arp_notify` concerns
//!   device events (up, MAC change), and `ndisc_notify`, which would advertise an IPv6
//!   address once usable, defaults to 0 *(tested: the peer's entry still names the old holder
//!   300 ms after the move)*.
//!
//! Neither protocol is acknowledged and a frame can be lost: callers repeat an announcement a
//! few times (keepalived by default sends a burst of 5 at a failover, `garp_master_repeat`,
//! and another `garp_master_delay` = 5 s later).
//!
//! Frames are built by pure functions ([`gratuitous_arp_frame`], [`unsolicited_na_frame`]);
//! [`Announcer`] holds one socket per device and sends them. Like [`crate::sys`], this module
//! makes system calls (`socket`, `bind`, `getsockname`, `sendto`) with `repr(C)` arguments built
//! here, hence its `unsafe` blocks.
#![allow(unsafe_code)]

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use lb_packet::checksum;

use crate::netlink;

/// Length of a gratuitous ARP frame: Ethernet header (14) + ARP for IPv4 over Ethernet (28).
/// Shorter than Ethernet's 60-byte minimum: the NIC pads it.
pub const ARP_FRAME_LEN: usize = 14 + 28;

/// Length of an unsolicited NA frame: Ethernet (14) + IPv6 (40) + NA (24) + target link-layer
/// address option (8).
pub const NA_FRAME_LEN: usize = 14 + 40 + 24 + 8;

const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const BROADCAST: [u8; 6] = [0xff; 6];
/// ff02::1, the all-nodes multicast address.
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// Its Ethernet address: 33:33 and the low 32 bits of the IPv6 address (RFC 2464 §7).
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];
const ICMPV6: u8 = 58;
const ND_NEIGHBOR_ADVERT: u8 = 136;
const ND_OPT_TARGET_LLADDR: u8 = 2;
const NA_FLAG_ROUTER: u8 = 0x80;
const NA_FLAG_OVERRIDE: u8 = 0x20;

/// Writes the Ethernet header.
fn ethernet(frame: &mut [u8], dst: [u8; 6], src: [u8; 6], ethertype: u16) {
    frame[0..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
    frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
}

/// The gratuitous ARP request announcing that `mac` holds `addr`: broadcast, opcode 1, sender
/// and target protocol address both `addr`, sender hardware address `mac`, target hardware
/// address zero.
///
/// RFC 5227 §3 calls this an ARP Announcement: "identical to the ARP Probe ... except that now
/// the sender and target IP address fields contain the host's newly selected IPv4 address",
/// and of the probe (§2.1.1): "The 'target hardware address' field is ignored and SHOULD be
/// set to all zeroes."
pub fn gratuitous_arp_frame(mac: [u8; 6], addr: Ipv4Addr) -> [u8; ARP_FRAME_LEN] {
    let mut f = [0u8; ARP_FRAME_LEN];
    ethernet(&mut f, BROADCAST, mac, ETHERTYPE_ARP);
    let a = &mut f[14..];
    a[0..2].copy_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    a[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol type: IPv4
    a[4] = 6; // hardware address length
    a[5] = 4; // protocol address length
    a[6..8].copy_from_slice(&1u16.to_be_bytes()); // opcode: request
    a[8..14].copy_from_slice(&mac); // sender hardware address
    a[14..18].copy_from_slice(&addr.octets()); // sender protocol address
                                               // target hardware address: zero (a[18..24])
    a[24..28].copy_from_slice(&addr.octets()); // target protocol address
    f
}

/// The unsolicited neighbour advertisement announcing that `mac` holds `addr` (RFC 4861
/// §7.2.6), in an Ethernet frame from `mac` to 33:33:00:00:00:01.
///
/// IPv6: source `addr`, destination ff02::1 (all nodes), hop limit 255 (receivers drop
/// neighbour discovery with any other: §7.1.2). ICMPv6 type 136 code 0 with its checksum over
/// the IPv6 pseudo-header, flags Override set and Solicited clear ("The Solicited flag MUST be
/// set to zero, in order to avoid confusing the Neighbor Unreachability Detection algorithm"),
/// Router as `router` ("If the node is a router, it MUST set the Router flag to one;
/// otherwise, it MUST set it to zero" — a neighbour that sees it go from one to zero drops us
/// from its default routers), target `addr`, and one Target Link-Layer Address option
/// carrying `mac` ("If the Override flag is set to one, neighboring nodes will install the new
/// link-layer address in their caches").
pub fn unsolicited_na_frame(mac: [u8; 6], addr: Ipv6Addr, router: bool) -> [u8; NA_FRAME_LEN] {
    const ICMP_LEN: usize = 24 + 8;
    let mut f = [0u8; NA_FRAME_LEN];
    ethernet(&mut f, ALL_NODES_MAC, mac, ETHERTYPE_IPV6);
    let ip = &mut f[14..54];
    ip[0] = 0x60; // version 6, traffic class 0, flow label 0
    ip[4..6].copy_from_slice(&(ICMP_LEN as u16).to_be_bytes()); // payload length
    ip[6] = ICMPV6; // next header
    ip[7] = 255; // hop limit
    ip[8..24].copy_from_slice(&addr.octets());
    ip[24..40].copy_from_slice(&ALL_NODES.octets());
    let m = &mut f[54..];
    m[0] = ND_NEIGHBOR_ADVERT;
    m[1] = 0; // code
              // m[2..4]: checksum, below
    m[4] = NA_FLAG_OVERRIDE | if router { NA_FLAG_ROUTER } else { 0 };
    // m[5..8]: reserved
    m[8..24].copy_from_slice(&addr.octets());
    m[24] = ND_OPT_TARGET_LLADDR;
    m[25] = 1; // option length in units of 8 octets
    m[26..32].copy_from_slice(&mac);
    // RFC 4443 §2.3: the checksum covers the message and the IPv6 pseudo-header (RFC 8200
    // §8.1), computed with the checksum field zero.
    let pseudo = checksum::pseudo_v6(addr.octets(), ALL_NODES.octets(), ICMPV6, ICMP_LEN as u32);
    let sum = checksum::finish(checksum::sum(m, pseudo));
    m[2..4].copy_from_slice(&sum.to_be_bytes());
    f
}

/// Broadcasts a gratuitous ARP request for `addr` on `dev` (see the module docs for what
/// receivers do). Opens and closes a socket: keep an [`Announcer`] to send more than once.
///
/// # Errors
/// As [`Announcer::announce`].
pub fn gratuitous_arp(dev: &str, addr: Ipv4Addr) -> io::Result<()> {
    Announcer::new().announce(dev, IpAddr::V4(addr))
}

/// Sends an unsolicited neighbour advertisement for `addr` to all nodes on `dev` (see the
/// module docs). Opens and closes a socket: keep an [`Announcer`] to send more than once.
///
/// # Errors
/// As [`Announcer::announce`].
pub fn unsolicited_na(dev: &str, addr: Ipv6Addr) -> io::Result<()> {
    Announcer::new().announce(dev, IpAddr::V6(addr))
}

/// Sends address announcements, holding one `AF_PACKET` socket per device, opened on first use
/// and reused.
///
/// Before each announcement the socket reports the device's current hardware address
/// (`getsockname`), so a changed MAC is announced correctly; a device that was removed (and
/// perhaps created again under the same name) gets a fresh socket. Device names resolve, and
/// sockets are opened, in the network namespace of the thread that first announces on them;
/// the sockets stay there.
///
/// The sockets are opened with protocol 0: they send but never receive, so nothing queues on
/// them between announcements.
#[derive(Debug, Default)]
pub struct Announcer {
    links: Vec<Link>,
}

/// One device's socket.
#[derive(Debug)]
struct Link {
    dev: String,
    ifindex: i32,
    fd: OwnedFd,
}

/// What the socket says about its device now.
enum LinkState {
    Ethernet([u8; 6]),
    /// Another hardware type (`ARPHRD_*`).
    Other(u16),
    /// The device is gone.
    Gone,
}

impl Announcer {
    /// An announcer with no socket open yet.
    pub fn new() -> Announcer {
        Announcer::default()
    }

    /// Announces on `dev` that this host holds `addr`: [`gratuitous_arp_frame`] for IPv4,
    /// [`unsolicited_na_frame`] for IPv6 (with the Router flag set when
    /// `net.ipv6.conf.DEV.forwarding` is 1, as keepalived does). The address should already be
    /// on the device ([`netlink::add_addr`]); this does not check.
    ///
    /// # Errors
    /// `InvalidInput` for a bad name or a device that is not Ethernet (TUN, loopback, tunnels:
    /// nothing to announce there); `NotFound` for no such device; `PermissionDenied` without
    /// `CAP_NET_RAW`; the `sendto` error otherwise (`ENETDOWN` when the device is down).
    pub fn announce(&mut self, dev: &str, addr: IpAddr) -> io::Result<()> {
        let (i, mac) = self.link(dev)?;
        let Some(link) = self.links.get(i) else {
            return Err(io::Error::other("announcer lost its socket"));
        };
        let sent = match addr {
            IpAddr::V4(a) => link.send(&gratuitous_arp_frame(mac, a), ETHERTYPE_ARP, BROADCAST),
            IpAddr::V6(a) => link.send(
                &unsolicited_na_frame(mac, a, ipv6_forwarding(dev)),
                ETHERTYPE_IPV6,
                ALL_NODES_MAC,
            ),
        };
        sent.map_err(|e| {
            if matches!(e.raw_os_error(), Some(libc::ENXIO | libc::ENODEV)) {
                // The device went away between the check and the send: reopen next time.
                self.links.swap_remove(i);
            }
            io::Error::new(e.kind(), format!("announce {addr} on {dev}: {e}"))
        })
    }

    /// Whether a socket for `dev` is open.
    pub fn is_open(&self, dev: &str) -> bool {
        self.links.iter().any(|l| l.dev == dev)
    }

    /// Closes the socket for `dev`, if open; returns whether one was.
    pub fn forget(&mut self, dev: &str) -> bool {
        let before = self.links.len();
        self.links.retain(|l| l.dev != dev);
        self.links.len() != before
    }

    /// The index of `dev`'s usable socket in `links` and the device's MAC, opening (or
    /// reopening) the socket when needed.
    fn link(&mut self, dev: &str) -> io::Result<(usize, [u8; 6])> {
        if let Some(i) = self.links.iter().position(|l| l.dev == dev) {
            if let Some(LinkState::Ethernet(mac)) = self.links.get(i).map(Link::state) {
                return Ok((i, mac));
            }
            self.links.swap_remove(i);
        }
        let link = Link::open(dev)?;
        match link.state() {
            LinkState::Ethernet(mac) => {
                self.links.push(link);
                Ok((self.links.len() - 1, mac))
            }
            LinkState::Other(hatype) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{dev} is not an Ethernet device (hardware type {hatype})"),
            )),
            LinkState::Gone => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{dev} disappeared"),
            )),
        }
    }
}

/// Whether `net.ipv6.conf.DEV.forwarding` is 1 (read in the calling thread's namespace);
/// false when unreadable (no IPv6 on the device).
fn ipv6_forwarding(dev: &str) -> bool {
    std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{dev}/forwarding"))
        .is_ok_and(|s| s.trim() == "1")
}

fn sockaddr_ll(ifindex: i32, ethertype: u16, dst: [u8; 6]) -> libc::sockaddr_ll {
    let mut addr = [0u8; 8];
    addr[..6].copy_from_slice(&dst);
    libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: ethertype.to_be(),
        sll_ifindex: ifindex,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr: addr,
    }
}

const SOCKADDR_LL_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_ll>() as _;

impl Link {
    /// A send-only packet socket bound to `dev`.
    fn open(dev: &str) -> io::Result<Link> {
        let index = netlink::ifindex(dev)?;
        let ifindex = i32::try_from(index)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "ifindex out of range"))?;
        // SAFETY: plain socket(2) call; the result is checked and owned immediately.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let sll = sockaddr_ll(ifindex, 0, [0; 6]);
        // SAFETY: `sll` is a live `sockaddr_ll` of the length passed.
        if unsafe { libc::bind(fd.as_raw_fd(), (&raw const sll).cast(), SOCKADDR_LL_LEN) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Link {
            dev: dev.to_owned(),
            ifindex,
            fd,
        })
    }

    /// The device's hardware type and address now (`getsockname` on a bound packet socket
    /// reports them; a device that was unregistered leaves the socket bound to nothing).
    fn state(&self) -> LinkState {
        let mut sll = sockaddr_ll(0, 0, [0; 6]);
        let mut len = SOCKADDR_LL_LEN;
        // SAFETY: `sll` is writable for `len` bytes, and `len` is a live socklen_t.
        let rc =
            unsafe { libc::getsockname(self.fd.as_raw_fd(), (&raw mut sll).cast(), &raw mut len) };
        if rc < 0 || sll.sll_ifindex != self.ifindex || sll.sll_halen == 0 {
            return LinkState::Gone;
        }
        if sll.sll_hatype != libc::ARPHRD_ETHER || sll.sll_halen != 6 {
            return LinkState::Other(sll.sll_hatype);
        }
        let mut mac = [0; 6];
        mac.copy_from_slice(&sll.sll_addr[..6]);
        LinkState::Ethernet(mac)
    }

    /// Sends one whole Ethernet frame.
    fn send(&self, frame: &[u8], ethertype: u16, dst: [u8; 6]) -> io::Result<()> {
        let to = sockaddr_ll(self.ifindex, ethertype, dst);
        // SAFETY: `frame` and `to` are live for the call, with the lengths passed.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const to).cast(),
                SOCKADDR_LL_LEN,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != frame.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short frame sent"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A documentation MAC (RFC 7042 §2.1.2: 00-00-5E-00-53-00 to -FF).
    const MAC: [u8; 6] = [0x00, 0x00, 0x5e, 0x00, 0x53, 0x01];

    /// RFC 1071 written out independently of `lb_packet::checksum`: 32-bit sum of big-endian
    /// words, carries folded at the end.
    fn naive_checksum(data: &[u8]) -> u16 {
        let mut s: u32 = 0;
        let mut i = 0;
        while i + 1 < data.len() {
            s += (u32::from(data[i]) << 8) | u32::from(data[i + 1]);
            i += 2;
        }
        if i < data.len() {
            s += u32::from(data[i]) << 8;
        }
        while s > 0xffff {
            s = (s >> 16) + (s & 0xffff);
        }
        !(s as u16)
    }

    /// The IPv6 pseudo-header (RFC 8200 §8.1) followed by the upper-layer message.
    fn with_pseudo(src: &[u8], dst: &[u8], next: u8, msg: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(src);
        v.extend_from_slice(dst);
        v.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        v.extend_from_slice(&[0, 0, 0, next]);
        v.extend_from_slice(msg);
        v
    }

    #[test]
    fn gratuitous_arp_bytes() {
        let f = gratuitous_arp_frame(MAC, Ipv4Addr::new(192, 0, 2, 100));
        #[rustfmt::skip]
        let want: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff,   // destination: broadcast
            0x00, 0x00, 0x5e, 0x00, 0x53, 0x01,   // source
            0x08, 0x06,                           // ARP
            0x00, 0x01, 0x08, 0x00, 6, 4,         // Ethernet, IPv4, lengths
            0x00, 0x01,                           // request
            0x00, 0x00, 0x5e, 0x00, 0x53, 0x01,   // sender MAC
            192, 0, 2, 100,                       // sender IP
            0, 0, 0, 0, 0, 0,                     // target MAC: zero
            192, 0, 2, 100,                       // target IP = sender IP
        ];
        assert_eq!(f, want);
    }

    #[test]
    fn unsolicited_na_bytes() {
        let addr: Ipv6Addr = "2001:db8::100".parse().unwrap();
        let f = unsolicited_na_frame(MAC, addr, false);
        #[rustfmt::skip]
        let want: [u8; 86] = [
            0x33, 0x33, 0x00, 0x00, 0x00, 0x01,   // destination: all-nodes multicast MAC
            0x00, 0x00, 0x5e, 0x00, 0x53, 0x01,   // source
            0x86, 0xdd,                           // IPv6
            0x60, 0, 0, 0, 0x00, 0x20, 58, 255,   // version 6, payload 32, ICMPv6, hop limit 255
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x00, // source: the address
            0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,          // ff02::1
            136, 0, 0x48, 0x2c,                   // NA, code 0, checksum (computed separately)
            0x20, 0, 0, 0,                        // flags: Override only
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x00, // target
            2, 1, 0x00, 0x00, 0x5e, 0x00, 0x53, 0x01, // target link-layer address option
        ];
        assert_eq!(f, want);
    }

    #[test]
    fn na_checksum_matches_an_independent_computation() {
        for (addr, router) in [
            ("2001:db8::100", false),
            ("2001:db8::100", true),
            ("fe80::1", false),
            ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", true),
        ] {
            let addr: Ipv6Addr = addr.parse().unwrap();
            let f = unsolicited_na_frame(MAC, addr, router);
            let (ip, msg) = f[14..].split_at(40);
            assert_eq!(msg.len(), 32);
            // Verifying: the sum over pseudo-header and message, checksum included, is 0.
            let whole = with_pseudo(&ip[8..24], &ip[24..40], 58, msg);
            assert_eq!(naive_checksum(&whole), 0, "{addr}");
            // Computing: with the field zeroed, the naive sum gives the stored value.
            let mut zeroed = msg.to_vec();
            zeroed[2] = 0;
            zeroed[3] = 0;
            let want = naive_checksum(&with_pseudo(&ip[8..24], &ip[24..40], 58, &zeroed));
            assert_eq!(u16::from_be_bytes([msg[2], msg[3]]), want, "{addr}");
            assert_eq!(msg[4], if router { 0xa0 } else { 0x20 });
        }
        // The Router flag also changes the checksum (value from the same separate computation
        // as the literal frame above).
        let f = unsolicited_na_frame(MAC, "2001:db8::100".parse().unwrap(), true);
        assert_eq!(&f[56..58], &[0xc8, 0x2b]);
    }

    #[test]
    fn frames_carry_the_mac_where_receivers_look() {
        let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
        let arp = gratuitous_arp_frame(mac, Ipv4Addr::new(10, 1, 2, 3));
        assert_eq!(&arp[6..12], &mac); // Ethernet source
        assert_eq!(&arp[22..28], &mac); // sender hardware address
        let na = unsolicited_na_frame(mac, "2001:db8::1".parse().unwrap(), false);
        assert_eq!(&na[6..12], &mac);
        assert_eq!(&na[80..86], &mac);
    }

    #[test]
    fn announcer_starts_empty() {
        let mut a = Announcer::new();
        assert!(!a.is_open("eth0"));
        assert!(!a.forget("eth0"));
        // Bad names fail before any socket is opened.
        let e = a.announce("", IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
