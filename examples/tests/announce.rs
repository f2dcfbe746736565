//! End to end (root only): floating addresses added and removed with `lb_examples::netlink`,
//! announced with `lb_examples::announce`, and what a Linux neighbour's cache does with the
//! announcements under the default sysctls.
//!
//! # Topology (what [`takeover_lab`] builds)
//! ```text
//!   A (new holder)            O (old holder)            P (peer)
//!   e0 192.0.2.1/24           e0 192.0.2.3/24           e0 192.0.2.2/24
//!      2001:db8:a::1/64          2001:db8:a::3/64          2001:db8:a::2/64
//!      02:00:00:00:0a:01         02:00:00:00:0a:03         02:00:00:00:0a:02
//!          \________________________|_________________________/
//!                        br0 in namespace S (ports pa, po, pp)
//! ```
//! The floating address X (192.0.2.100/32, 2001:db8:a::100/128) starts on O; P pings it, so
//! P's neighbour entry for X is `REACHABLE` at O's MAC. X then moves to A (`del_addr` on O,
//! `add_addr` on A: a takeover after O failed) and A announces it.
//!
//! Commands, in order: `ip netns add S|A|O|P` (lo up, DAD off); for each host H in A, O, P:
//! `ip -n S link add pH type veth peer name e0 netns H; ip -n S link set pH master br0 up`,
//! `ip -n H link set e0 address MAC up`, `ip -n H addr add ADDR dev e0 [nodad]`.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use common::{in_ns, need_root, Lab};
use lb_examples::announce::{gratuitous_arp, unsolicited_na, Announcer};
use lb_examples::netlink::{add_addr, del_addr, ifindex, mac_of};

const MAC_A: &str = "02:00:00:00:0a:01";
const MAC_P: &str = "02:00:00:00:0a:02";
const MAC_O: &str = "02:00:00:00:0a:03";
const X4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
const X6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xa, 0, 0, 0, 0, 0x100);
/// An address nobody has talked to: P has no neighbour entry for it.
const Y4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 101);
const Y6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xa, 0, 0, 0, 0, 0x101);
/// How soon the peer's cache must show the new holder.
const ANNOUNCE_DEADLINE: Duration = Duration::from_millis(200);

struct Takeover {
    a: String,
    o: String,
    p: String,
}

fn takeover_lab(lab: &mut Lab) -> Takeover {
    let s = lab.ns("s");
    lab.ip(&s, "link add br0 type bridge");
    lab.ip(&s, "link set br0 up");
    let mut names = Vec::new();
    for (role, n, mac) in [("a", 1, MAC_A), ("p", 2, MAC_P), ("o", 3, MAC_O)] {
        let ns = lab.ns(role);
        let port = format!("p{role}");
        lab.veth(&s, &port, &ns, "e0");
        lab.ip(&s, &format!("link set {port} master br0"));
        lab.ip(&ns, &format!("link set e0 address {mac}"));
        lab.addr(&ns, "e0", &format!("192.0.2.{n}/24"));
        lab.addr(&ns, "e0", &format!("2001:db8:a::{n}/64"));
        names.push(ns);
    }
    Takeover {
        a: names[0].clone(),
        p: names[1].clone(),
        o: names[2].clone(),
    }
}

fn prefix_of(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

/// `add_addr` run inside namespace `ns`.
fn add_in(ns: &str, dev: &'static str, addr: IpAddr, prefix: u8) -> bool {
    in_ns(ns, move || add_addr(dev, addr, prefix))
        .unwrap_or_else(|e| panic!("add {addr}/{prefix} in {ns}: {e}"))
}

/// `del_addr` run inside namespace `ns`.
fn del_in(ns: &str, dev: &'static str, addr: IpAddr, prefix: u8) -> bool {
    in_ns(ns, move || del_addr(dev, addr, prefix))
        .unwrap_or_else(|e| panic!("del {addr}/{prefix} in {ns}: {e}"))
}

/// P's neighbour entry for `addr` on e0, e.g. `192.0.2.100 lladdr 02:.. REACHABLE` ("" when
/// there is none).
fn neigh(lab: &Lab, ns: &str, addr: IpAddr) -> String {
    let fam = if addr.is_ipv4() { "-4" } else { "-6" };
    lab.sh(ns, &format!("ip {fam} neigh show {addr} dev e0"))
        .trim()
        .to_owned()
}

/// Polls P's entry for `addr` until it names `mac` or `within` passes; the entry and the time
/// it took.
fn wait_neigh_mac(
    lab: &Lab,
    ns: &str,
    addr: IpAddr,
    mac: &str,
    start: Instant,
    within: Duration,
) -> (String, Option<Duration>) {
    loop {
        let e = neigh(lab, ns, addr);
        if e.contains(mac) {
            return (e, Some(start.elapsed()));
        }
        if start.elapsed() > within {
            return (e, None);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Echo replies sent by namespace `ns` so far (`OutEchoReps` / `Icmp6OutEchoReplies`).
fn echo_replies_sent(lab: &Lab, ns: &str, v6: bool) -> u64 {
    if v6 {
        let t = lab.sh(ns, "cat /proc/net/snmp6");
        t.lines()
            .find_map(|l| l.strip_prefix("Icmp6OutEchoReplies"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no Icmp6OutEchoReplies in {t}"))
    } else {
        let t = lab.sh(ns, "cat /proc/net/snmp");
        let rows: Vec<&str> = t.lines().filter(|l| l.starts_with("Icmp:")).collect();
        let (Some(names), Some(values)) = (rows.first(), rows.get(1)) else {
            panic!("no Icmp rows in {t}");
        };
        let i = names
            .split_whitespace()
            .position(|n| n == "OutEchoReps")
            .unwrap_or_else(|| panic!("no OutEchoReps in {names}"));
        values
            .split_whitespace()
            .nth(i)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("bad Icmp values {values}"))
    }
}

/// One ICMP echo to `dst` from inside namespace `ns` (raw socket; `ping` is not installed
/// everywhere); whether a matching reply came from `dst` within `timeout`.
fn ping_in(ns: &str, dst: IpAddr, timeout: Duration) -> bool {
    in_ns(ns, move || ping(dst, timeout)).unwrap_or_else(|e| panic!("ping {dst} from {ns}: {e}"))
}

#[allow(unsafe_code)]
fn ping(dst: IpAddr, timeout: Duration) -> std::io::Result<bool> {
    use std::io::Error;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let (family, proto, request, reply) = match dst {
        IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP, 8u8, 0u8),
        IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6, 128, 129),
    };
    // SAFETY: plain socket(2) call; the result is checked and owned at once.
    let fd = unsafe { libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let ident = (std::process::id() as u16) ^ 0x5a5a;
    let mut msg = [0u8; 16];
    msg[0] = request;
    msg[4..6].copy_from_slice(&ident.to_be_bytes());
    msg[6..8].copy_from_slice(&1u16.to_be_bytes());
    msg[8..].copy_from_slice(b"lb-annce");
    if dst.is_ipv4() {
        // The kernel fills in the ICMPv6 checksum itself; ICMPv4's is ours.
        let c = lb_packet::checksum::checksum(&msg);
        msg[2..4].copy_from_slice(&c.to_be_bytes());
    }
    // SAFETY: all-zero bytes are a valid (unspecified) sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match dst {
        IpAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
            let sin = unsafe { &mut *(&raw mut ss).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_addr.s_addr = u32::from(a).to_be();
            std::mem::size_of::<libc::sockaddr_in>()
        }
        IpAddr::V6(a) => {
            // SAFETY: as above.
            let sin6 = unsafe { &mut *(&raw mut ss).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_addr.s6_addr = a.octets();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    // SAFETY: `msg` and `ss` are live for the call with the lengths passed.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&raw const ss).cast(),
            len as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(Error::last_os_error());
    }
    let end = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    while Instant::now() < end {
        let left = end.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
        if rc <= 0 {
            continue;
        }
        // SAFETY: as above.
        let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut flen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: `buf` and `from` are writable for the lengths passed.
        let n = unsafe {
            libc::recvfrom(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&raw mut from).cast(),
                &mut flen,
            )
        };
        if n <= 0 {
            continue;
        }
        let pkt = &buf[..n as usize];
        // IPv4 raw sockets return the IP header too; IPv6 ones only the ICMPv6 message.
        let (src, icmp): (IpAddr, &[u8]) = match dst {
            IpAddr::V4(_) => {
                let Some(h) = pkt.get(..20) else { continue };
                let ihl = usize::from(h[0] & 0x0f) * 4;
                let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
                (src.into(), pkt.get(ihl..).unwrap_or(&[]))
            }
            IpAddr::V6(_) => {
                // SAFETY: the kernel wrote a sockaddr_in6 for an AF_INET6 socket.
                let sin6 = unsafe { &*(&raw const from).cast::<libc::sockaddr_in6>() };
                (Ipv6Addr::from(sin6.sin6_addr.s6_addr).into(), pkt)
            }
        };
        if src == dst
            && icmp.len() >= 8
            && icmp[0] == reply
            && icmp[4..6] == ident.to_be_bytes()
            && icmp[6..8] == 1u16.to_be_bytes()
        {
            return Ok(true);
        }
    }
    Ok(false)
}

#[test]
fn add_and_del_addresses_in_a_namespace() {
    if !need_root() {
        return;
    }
    let mut lab = Lab::new("annaddr");
    let a = lab.ns("a");
    lab.veth(&a, "e0", &a, "e1");
    lab.ip(&a, &format!("link set e0 address {MAC_A}"));
    let show = |lab: &Lab| lab.sh(&a, "ip -o addr show dev e0");

    // Lookups agree with `ip link`.
    let (index, mac) = in_ns(&a, || (ifindex("e0"), mac_of("e0")));
    let link = lab.sh(&a, "ip -o link show dev e0");
    assert!(
        link.starts_with(&format!("{}: e0", index.as_ref().unwrap())),
        "{link}"
    );
    assert_eq!(mac.unwrap(), [2, 0, 0, 0, 0x0a, 1]);
    let (missing, lo_mac) = in_ns(&a, || (ifindex("nosuch0"), mac_of("lo")));
    assert_eq!(missing.unwrap_err().kind(), std::io::ErrorKind::NotFound);
    assert_eq!(lo_mac.unwrap_err().kind(), std::io::ErrorKind::InvalidInput);

    let v4 = IpAddr::V4(X4);
    let v6 = IpAddr::V6(X6);
    // Add: true, then false (already there); `ip` sees each once.
    assert!(add_in(&a, "e0", v4, 24));
    assert!(!add_in(&a, "e0", v4, 24));
    assert!(add_in(&a, "e0", v6, 64));
    assert!(!add_in(&a, "e0", v6, 64));
    let s = show(&lab);
    println!("{s}");
    assert_eq!(s.matches("inet 192.0.2.100/24").count(), 1, "{s}");
    assert_eq!(s.matches("inet6 2001:db8:a::100/64").count(), 1, "{s}");
    // IPv6 without DAD: usable at once, never tentative.
    assert!(s.contains("nodad") && !s.contains("tentative"), "{s}");

    // Delete with another prefix: not that address, nothing removed.
    assert!(!del_in(&a, "e0", v4, 32));
    assert!(!del_in(&a, "e0", v6, 128));
    assert!(show(&lab).contains("192.0.2.100/24"));
    // Delete: true, then false (already gone).
    assert!(del_in(&a, "e0", v4, 24));
    assert!(!del_in(&a, "e0", v4, 24));
    assert!(del_in(&a, "e0", v6, 64));
    assert!(!del_in(&a, "e0", v6, 64));
    let s = show(&lab);
    assert!(
        !s.contains("192.0.2.100") && !s.contains("2001:db8:a::100"),
        "{s}"
    );

    // Errors are typed, with the kernel's extended-ack message where it gives one.
    let (no_dev, bad_prefix, multicast) = in_ns(&a, move || {
        (
            add_addr("nosuch0", v4, 32),
            add_addr("e0", v4, 33),
            add_addr("e0", "ff02::1234".parse().unwrap(), 128),
        )
    });
    assert_eq!(no_dev.unwrap_err().kind(), std::io::ErrorKind::NotFound);
    assert_eq!(
        bad_prefix.unwrap_err().kind(),
        std::io::ErrorKind::InvalidInput
    );
    let e = multicast.unwrap_err();
    println!("multicast address refused: {e}");
    assert!(
        e.to_string().contains("RTM_NEWADDR ff02::1234/128 dev e0"),
        "{e}"
    );
}

#[test]
fn gratuitous_arp_moves_a_reachable_entry() {
    if !need_root() {
        return;
    }
    let mut lab = Lab::new("anngarp");
    let t = takeover_lab(&mut lab);
    let x = IpAddr::V4(X4);

    // X on O; P talks to it: P's entry is REACHABLE at O's MAC.
    assert!(add_in(&t.o, "e0", x, 32));
    assert!(
        ping_in(&t.p, x, Duration::from_secs(3)),
        "O does not answer"
    );
    let before = neigh(&lab, &t.p, x);
    println!("P before: {before}");
    assert!(
        before.contains(MAC_O) && before.contains("REACHABLE"),
        "{before}"
    );

    // Takeover: X leaves O and lands on A. Adding an address announces nothing by itself
    // (arp_notify is 0 and concerns device events anyway): P still points at O.
    assert!(del_in(&t.o, "e0", x, 32));
    assert!(add_in(&t.a, "e0", x, 32));
    std::thread::sleep(Duration::from_millis(300));
    let unannounced = neigh(&lab, &t.p, x);
    assert!(unannounced.contains(MAC_O), "{unannounced}");

    // A announces: P's entry moves to A's MAC (state STALE: an ARP request does not prove
    // reachability; P's next packet goes to A and confirms it).
    let start = Instant::now();
    in_ns(&t.a, || gratuitous_arp("e0", X4)).expect("gratuitous ARP");
    let (after, took) = wait_neigh_mac(&lab, &t.p, x, MAC_A, start, ANNOUNCE_DEADLINE);
    println!("P after gratuitous ARP ({took:?}): {after}");
    assert!(
        took.is_some(),
        "P still has {after:?} after {ANNOUNCE_DEADLINE:?}"
    );
    assert!(after.contains("STALE"), "{after}");

    // P's ping to X is answered, by A.
    let (a0, o0) = (
        echo_replies_sent(&lab, &t.a, false),
        echo_replies_sent(&lab, &t.o, false),
    );
    assert!(
        ping_in(&t.p, x, Duration::from_secs(3)),
        "no answer from X after the move"
    );
    assert_eq!(echo_replies_sent(&lab, &t.a, false), a0 + 1);
    assert_eq!(echo_replies_sent(&lab, &t.o, false), o0);

    // An entry that had given up (FAILED, as after O stopped answering) is updated too.
    lab.ip(
        &t.p,
        &format!("neigh replace {x} dev e0 lladdr {MAC_O} nud failed"),
    );
    assert!(neigh(&lab, &t.p, x).contains("FAILED"));
    in_ns(&t.a, || gratuitous_arp("e0", X4)).expect("gratuitous ARP");
    let (after, took) = wait_neigh_mac(&lab, &t.p, x, MAC_A, Instant::now(), ANNOUNCE_DEADLINE);
    println!("P's FAILED entry after gratuitous ARP ({took:?}): {after}");
    assert!(took.is_some(), "{after:?}");

    // What the code does NOT rely on: with the default arp_accept = 0, a gratuitous ARP for
    // an address P has no entry for creates none...
    let y = IpAddr::V4(Y4);
    assert!(add_in(&t.a, "e0", y, 32));
    in_ns(&t.a, || gratuitous_arp("e0", Y4)).expect("gratuitous ARP");
    std::thread::sleep(ANNOUNCE_DEADLINE);
    assert_eq!(
        lab.sh(&t.p, "sysctl -n net.ipv4.conf.e0.arp_accept").trim(),
        "0"
    );
    assert_eq!(neigh(&lab, &t.p, y), "", "arp_accept=0 created an entry");
    // ...while arp_accept = 1 makes P create one.
    lab.sh(&t.p, "sysctl -qw net.ipv4.conf.e0.arp_accept=1");
    in_ns(&t.a, || gratuitous_arp("e0", Y4)).expect("gratuitous ARP");
    let (created, took) = wait_neigh_mac(&lab, &t.p, y, MAC_A, Instant::now(), ANNOUNCE_DEADLINE);
    println!("P with arp_accept=1 ({took:?}): {created}");
    assert!(took.is_some(), "{created:?}");

    // An Announcer reads the device's MAC at each announcement: after A's MAC changes (which
    // the kernel announces to nobody, arp_notify being 0), its open socket sends the new one.
    let (mut an, first) = in_ns(&t.a, move || {
        let mut an = Announcer::new();
        let r = an.announce("e0", x);
        (an, r)
    });
    first.expect("announcement");
    let new_mac = "02:00:00:00:0a:09";
    lab.ip(&t.a, &format!("link set e0 address {new_mac}"));
    let start = Instant::now();
    let still_open = in_ns(&t.a, move || an.announce("e0", x).map(|_| an.is_open("e0")));
    assert!(still_open.expect("announcement after the MAC change"));
    let (after, took) = wait_neigh_mac(&lab, &t.p, x, new_mac, start, ANNOUNCE_DEADLINE);
    println!("P after A's MAC changed ({took:?}): {after}");
    assert!(took.is_some(), "{after:?}");
}

#[test]
fn unsolicited_na_moves_a_reachable_entry() {
    if !need_root() {
        return;
    }
    let mut lab = Lab::new("annna");
    let t = takeover_lab(&mut lab);
    let x = IpAddr::V6(X6);

    assert!(add_in(&t.o, "e0", x, prefix_of(x)));
    assert!(
        ping_in(&t.p, x, Duration::from_secs(3)),
        "O does not answer"
    );
    let before = neigh(&lab, &t.p, x);
    println!("P before: {before}");
    assert!(
        before.contains(MAC_O) && before.contains("REACHABLE"),
        "{before}"
    );

    assert!(del_in(&t.o, "e0", x, prefix_of(x)));
    assert!(add_in(&t.a, "e0", x, prefix_of(x)));
    // With DAD off (nodad) and ndisc_notify = 0 the kernel sends no advertisement itself.
    std::thread::sleep(Duration::from_millis(300));
    let unannounced = neigh(&lab, &t.p, x);
    assert!(unannounced.contains(MAC_O), "{unannounced}");

    // An Announcer keeps its socket: announce twice through the same one.
    let a_ns = t.a.clone();
    let start = Instant::now();
    let (first, second, open) = in_ns(&a_ns, || {
        let mut an = Announcer::new();
        let first = an.announce("e0", IpAddr::V6(X6));
        let second = an.announce("e0", IpAddr::V6(X6));
        (first, second, an.is_open("e0"))
    });
    first.expect("unsolicited NA");
    second.expect("unsolicited NA, again");
    assert!(open);
    let (after, took) = wait_neigh_mac(&lab, &t.p, x, MAC_A, start, ANNOUNCE_DEADLINE);
    println!("P after unsolicited NA ({took:?}): {after}");
    assert!(
        took.is_some(),
        "P still has {after:?} after {ANNOUNCE_DEADLINE:?}"
    );
    assert!(after.contains("STALE"), "{after}");
    // Router flag clear (A does not forward): P does not take X for a router.
    assert!(!after.contains("router"), "{after}");

    let (a0, o0) = (
        echo_replies_sent(&lab, &t.a, true),
        echo_replies_sent(&lab, &t.o, true),
    );
    assert!(
        ping_in(&t.p, x, Duration::from_secs(3)),
        "no answer from X after the move"
    );
    assert_eq!(echo_replies_sent(&lab, &t.a, true), a0 + 1);
    assert_eq!(echo_replies_sent(&lab, &t.o, true), o0);

    // Unlike ARP, an entry in state FAILED ignores the advertisement (ndisc_recv_na skips
    // it)... but P re-resolves it with a multicast solicitation on its next packet, which A
    // answers: the ping still reaches A.
    lab.ip(
        &t.p,
        &format!("-6 neigh replace {x} dev e0 lladdr {MAC_O} nud failed"),
    );
    in_ns(&t.a, || unsolicited_na("e0", X6)).expect("unsolicited NA");
    std::thread::sleep(ANNOUNCE_DEADLINE);
    let failed = neigh(&lab, &t.p, x);
    println!("P's FAILED entry after unsolicited NA: {failed}");
    assert!(failed.contains("FAILED"), "{failed}");
    assert!(
        ping_in(&t.p, x, Duration::from_secs(3)),
        "no answer after re-resolving"
    );
    assert_eq!(echo_replies_sent(&lab, &t.a, true), a0 + 2);
    let resolved = neigh(&lab, &t.p, x);
    assert!(resolved.contains(MAC_A), "{resolved}");

    // Not relied on: a host (not a router) creates no entry from an unsolicited NA.
    let y = IpAddr::V6(Y6);
    assert!(add_in(&t.a, "e0", y, prefix_of(y)));
    in_ns(&t.a, || unsolicited_na("e0", Y6)).expect("unsolicited NA");
    std::thread::sleep(ANNOUNCE_DEADLINE);
    assert_eq!(
        neigh(&lab, &t.p, y),
        "",
        "an unsolicited NA created an entry"
    );
}

#[test]
fn announcer_follows_a_recreated_device() {
    if !need_root() {
        return;
    }
    let mut lab = Lab::new("annre");
    let a = lab.ns("a");
    lab.veth(&a, "e0", &a, "e1");
    let a_ns = a.clone();
    let outcome = in_ns(&a_ns, || {
        let mut an = Announcer::new();
        let x = IpAddr::V4(X4);
        let first = an.announce("e0", x).map(|_| an.is_open("e0"));
        // The device goes away: the announcement fails, the socket is dropped.
        let del = std::process::Command::new("ip")
            .args(["link", "del", "e0"])
            .status();
        let gone = an.announce("e0", x);
        let open_after_gone = an.is_open("e0");
        // It comes back under the same name (another index): a fresh socket is used.
        let add = std::process::Command::new("ip")
            .args(["link", "add", "e0", "type", "veth", "peer", "name", "e1"])
            .status()
            .and_then(|_| {
                std::process::Command::new("ip")
                    .args(["link", "set", "e0", "up"])
                    .status()
            });
        let again = an.announce("e0", x);
        // Not Ethernet: refused.
        let lo = an.announce("lo", x);
        (first, del, gone, open_after_gone, add, again, lo)
    });
    let (first, del, gone, open_after_gone, add, again, lo) = outcome;
    assert!(first.expect("first announcement"));
    assert!(del.expect("ip link del").success());
    let e = gone.unwrap_err();
    println!("after deletion: {e}");
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
    assert!(!open_after_gone);
    assert!(add.expect("ip link add").success());
    again.expect("announcement on the recreated device");
    assert_eq!(lo.unwrap_err().kind(), std::io::ErrorKind::InvalidInput);
}
