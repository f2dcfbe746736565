//! A minimal rtnetlink client: interface lookups and adding or removing one interface address,
//! as `ip addr add|del ADDR/PREFIX dev DEV` does, over a `NETLINK_ROUTE` socket and without any
//! external tool.
//!
//! Each address call opens its own socket, sends one `RTM_NEWADDR` or `RTM_DELADDR` request with
//! `NLM_F_ACK` and reads the kernel's answer: an `NLMSG_ERROR` message (`struct nlmsgerr`)
//! whose error field is 0 for success and a negated `errno` otherwise. Reading waits at most
//! `ACK_TIMEOUT` (2 s; rtnetlink handles the request while `sendto` runs, so the answer is
//! normally queued before the wait begins). With `NETLINK_EXT_ACK` the kernel adds a message
//! to its errors (e.g. "Invalid prefix length"), which the returned [`io::Error`] carries.
//!
//! Interface names resolve in the network namespace of the calling thread, and the addresses
//! are added there: run these on a thread that has entered the namespace to act on another.
//!
//! Like [`crate::sys`], this module makes system calls (`socket`, `setsockopt`, `sendto`,
//! `recv`, `ioctl`, `if_nametoindex`) with plain `repr(C)` arguments built here, hence its
//! `unsafe` blocks; the messages themselves are built and parsed as bytes by safe functions
//! with unit tests.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long to wait for the kernel's acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);

const IFNAMSIZ: usize = 16;

/// Netlink and rtnetlink wire constants (`linux/netlink.h`, `linux/rtnetlink.h`,
/// `linux/if_addr.h`). Netlink headers are in host byte order; addresses in network order.
mod wire {
    /// `sizeof(struct nlmsghdr)`: len u32, type u16, flags u16, seq u32, pid u32.
    pub(super) const NLMSG_HDRLEN: usize = 16;
    /// `sizeof(struct ifaddrmsg)`: family u8, prefixlen u8, flags u8, scope u8, index u32.
    pub(super) const IFADDRMSG_LEN: usize = 8;
    /// `sizeof(struct rtattr)` / `struct nlattr`: len u16, type u16.
    pub(super) const RTA_HDRLEN: usize = 4;

    pub(super) const NLMSG_ERROR: u16 = 2;
    pub(super) const RTM_NEWADDR: u16 = 20;
    pub(super) const RTM_DELADDR: u16 = 21;

    pub(super) const NLM_F_REQUEST: u16 = 0x01;
    pub(super) const NLM_F_ACK: u16 = 0x04;
    pub(super) const NLM_F_EXCL: u16 = 0x200;
    pub(super) const NLM_F_CREATE: u16 = 0x400;
    /// On an `NLMSG_ERROR`: the echoed request was cut to its header (`NETLINK_CAP_ACK`).
    pub(super) const NLM_F_CAPPED: u16 = 0x100;
    /// On an `NLMSG_ERROR`: extended-ack attributes follow the echoed request.
    pub(super) const NLM_F_ACK_TLVS: u16 = 0x200;

    pub(super) const IFA_ADDRESS: u16 = 1;
    pub(super) const IFA_LOCAL: u16 = 2;
    pub(super) const IFA_F_NODAD: u8 = 0x02;

    /// `NLMSGERR_ATTR_MSG`: a NUL-terminated error message.
    pub(super) const NLMSGERR_ATTR_MSG: u16 = 1;
    /// `nla_type` bits that are flags, not the type (`NLA_F_NESTED`, `NLA_F_NET_BYTEORDER`).
    pub(super) const NLA_TYPE_MASK: u16 = 0x3fff;

    pub(super) const SOL_NETLINK: i32 = 270;
    pub(super) const NETLINK_EXT_ACK: i32 = 11;
    pub(super) const NETLINK_CAP_ACK: i32 = 10;

    /// The largest request built here: header, ifaddrmsg, two 16-byte address attributes.
    pub(super) const MAX_REQUEST: usize = NLMSG_HDRLEN + IFADDRMSG_LEN + 2 * (RTA_HDRLEN + 16);
}

/// Rounds up to the 4-byte alignment of netlink messages and attributes (`NLMSG_ALIGN`).
const fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

/// Sequence numbers, unique within the process (each request also has its own socket).
static SEQ: AtomicU32 = AtomicU32::new(1);

/// The index of interface `dev` (`if_nametoindex`).
///
/// # Errors
/// `InvalidInput` for a name that cannot be an interface name (empty, 16 bytes or longer, or
/// containing NUL); `NotFound` when no such interface exists in this thread's namespace.
pub fn ifindex(dev: &str) -> io::Result<u32> {
    check_name(dev)?;
    let name = CString::new(dev).map_err(|_| bad_name(dev))?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        let e = io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::ENODEV) {
            io::Error::new(io::ErrorKind::NotFound, format!("no interface {dev:?}"))
        } else {
            e
        });
    }
    Ok(index)
}

/// `struct ifreq` with the `ifr_hwaddr` member (a `struct sockaddr`) of its union: 40 bytes.
#[repr(C)]
struct IfReqHwaddr {
    name: [u8; IFNAMSIZ],
    family: u16,
    data: [u8; 14],
    _pad: [u8; 8],
}

/// The Ethernet (MAC) address of interface `dev` (the `SIOCGIFHWADDR` ioctl).
///
/// # Errors
/// As [`ifindex`] for a bad name; the ioctl's error (`ENODEV`) when the interface does not
/// exist; `InvalidInput` when it is not an Ethernet device (a TUN device, loopback, a tunnel).
pub fn mac_of(dev: &str) -> io::Result<[u8; 6]> {
    check_name(dev)?;
    let mut req = IfReqHwaddr {
        name: [0; IFNAMSIZ],
        family: 0,
        data: [0; 14],
        _pad: [0; 8],
    };
    req.name[..dev.len()].copy_from_slice(dev.as_bytes());
    // SAFETY: plain socket(2) call; the result is checked and owned immediately.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `req` is a valid, initialised 40-byte `struct ifreq` that outlives the call;
    // SIOCGIFHWADDR writes only its `ifr_hwaddr` member.
    let rc = unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCGIFHWADDR as _,
            &mut req as *mut IfReqHwaddr,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if req.family != libc::ARPHRD_ETHER {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{dev} is not an Ethernet device (hardware type {})",
                req.family
            ),
        ));
    }
    let mut mac = [0; 6];
    mac.copy_from_slice(&req.data[..6]);
    Ok(mac)
}

/// Adds `addr/prefix` to interface `dev`, as `ip addr add ADDR/PREFIX dev DEV` does (IPv6 with
/// `nodad`). Returns `Ok(true)` when added, `Ok(false)` when the kernel already had it
/// (`EEXIST`: for IPv4 the same address with the same prefix; for IPv6 the same address with
/// any prefix).
///
/// The request is `RTM_NEWADDR` with `NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK`, attributes
/// `IFA_LOCAL` and `IFA_ADDRESS` both `addr`, scope global (the kernel narrows it for loopback
/// and link-local addresses). IPv6 addresses carry `IFA_F_NODAD`: duplicate address detection
/// would keep a new address *tentative* (unusable as a source, not answering neighbour
/// solicitations) for about a second, which is what a floating address taken over after a
/// failure cannot afford; the announcement (see [`crate::announce`]) takes its place.
///
/// # Errors
/// `InvalidInput` for a bad interface name or a prefix longer than the address (32 or 128);
/// `NotFound` when the interface does not exist; the kernel's refusal otherwise (`EPERM`
/// without `CAP_NET_ADMIN`, `EACCES`/`EINVAL` e.g. for IPv6 disabled on the device), with its
/// extended-ack message when it gave one; `TimedOut` when no answer came within 2 s.
pub fn add_addr(dev: &str, addr: IpAddr, prefix: u8) -> io::Result<bool> {
    check_prefix(addr, prefix)?;
    let index = ifindex(dev)?;
    match transact(Op::Add, index, addr, prefix) {
        Ok(()) => Ok(true),
        Err(Failure::Nack { errno, .. }) if errno == libc::EEXIST => Ok(false),
        Err(f) => Err(f.into_io(Op::Add, dev, addr, prefix)),
    }
}

/// Removes `addr/prefix` from interface `dev`, as `ip addr del ADDR/PREFIX dev DEV` does.
/// Returns `Ok(true)` when removed, `Ok(false)` when it was not there (`EADDRNOTAVAIL`, or
/// `ENOENT`; an IPv4 address held with another prefix counts as not there and stays).
///
/// Removing an IPv4 *primary* address also removes the secondary addresses of its subnet
/// unless `net.ipv4.conf.DEV.promote_secondaries` is 1: floating addresses are best added as
/// `/32` (or in a subnet of their own) so that they never become someone's primary.
///
/// # Errors
/// As [`add_addr`].
pub fn del_addr(dev: &str, addr: IpAddr, prefix: u8) -> io::Result<bool> {
    check_prefix(addr, prefix)?;
    let index = ifindex(dev)?;
    match transact(Op::Del, index, addr, prefix) {
        Ok(()) => Ok(true),
        Err(Failure::Nack { errno, .. })
            if errno == libc::EADDRNOTAVAIL || errno == libc::ENOENT =>
        {
            Ok(false)
        }
        Err(f) => Err(f.into_io(Op::Del, dev, addr, prefix)),
    }
}

/// Which address request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Add,
    Del,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Add => "RTM_NEWADDR",
            Op::Del => "RTM_DELADDR",
        }
    }
}

/// Why a request failed.
#[derive(Debug)]
enum Failure {
    /// A system call failed (or the answer was malformed, or none came).
    Io(io::Error),
    /// The kernel answered with an error.
    Nack { errno: i32, msg: Option<String> },
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Io(e)
    }
}

impl Failure {
    fn into_io(self, op: Op, dev: &str, addr: IpAddr, prefix: u8) -> io::Error {
        let what = format!("{} {addr}/{prefix} dev {dev}", op.name());
        match self {
            Failure::Io(e) => io::Error::new(e.kind(), format!("{what}: {e}")),
            Failure::Nack { errno, msg } => {
                let os = io::Error::from_raw_os_error(errno);
                let text = match msg {
                    Some(m) => format!("{what}: {os}: {m}"),
                    None => format!("{what}: {os}"),
                };
                io::Error::new(os.kind(), text)
            }
        }
    }
}

fn bad_name(dev: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("bad interface name {dev:?}"),
    )
}

fn check_name(dev: &str) -> io::Result<()> {
    let b = dev.as_bytes();
    if b.is_empty() || b.len() >= IFNAMSIZ || b.contains(&0) {
        return Err(bad_name(dev));
    }
    Ok(())
}

fn check_prefix(addr: IpAddr, prefix: u8) -> io::Result<()> {
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("prefix /{prefix} is longer than {addr} ({max} bits)"),
        ));
    }
    Ok(())
}

/// A built request: `buf[..len]`.
struct Request {
    buf: [u8; wire::MAX_REQUEST],
    len: usize,
}

impl Request {
    fn bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or(&[])
    }
}

/// Appends one attribute at `at`; returns the offset after it (aligned).
fn put_attr(buf: &mut [u8], at: usize, kind: u16, data: &[u8]) -> usize {
    let len = wire::RTA_HDRLEN + data.len();
    buf[at..at + 2].copy_from_slice(&(len as u16).to_ne_bytes());
    buf[at + 2..at + 4].copy_from_slice(&kind.to_ne_bytes());
    buf[at + 4..at + len].copy_from_slice(data);
    at + align4(len)
}

/// The `RTM_NEWADDR` / `RTM_DELADDR` message for `addr/prefix` on interface `index`.
fn address_request(op: Op, seq: u32, index: u32, addr: IpAddr, prefix: u8) -> Request {
    use wire::*;
    let mut buf = [0u8; MAX_REQUEST];
    let mut octets = [0u8; 16];
    let (family, flags, n) = match addr {
        IpAddr::V4(a) => {
            octets[..4].copy_from_slice(&a.octets());
            (libc::AF_INET as u8, 0, 4)
        }
        IpAddr::V6(a) => {
            octets.copy_from_slice(&a.octets());
            (libc::AF_INET6 as u8, IFA_F_NODAD, 16)
        }
    };
    let data = &octets[..n];
    let (kind, nl_flags) = match op {
        Op::Add => (
            RTM_NEWADDR,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        ),
        Op::Del => (RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK),
    };
    // struct ifaddrmsg
    let m = NLMSG_HDRLEN;
    buf[m] = family;
    buf[m + 1] = prefix;
    buf[m + 2] = if op == Op::Add { flags } else { 0 };
    buf[m + 3] = 0; // RT_SCOPE_UNIVERSE
    buf[m + 4..m + 8].copy_from_slice(&index.to_ne_bytes());
    let mut at = m + IFADDRMSG_LEN;
    at = put_attr(&mut buf, at, IFA_LOCAL, data);
    at = put_attr(&mut buf, at, IFA_ADDRESS, data);
    // struct nlmsghdr (pid 0: the kernel fills in our port id)
    buf[0..4].copy_from_slice(&(at as u32).to_ne_bytes());
    buf[4..6].copy_from_slice(&kind.to_ne_bytes());
    buf[6..8].copy_from_slice(&nl_flags.to_ne_bytes());
    buf[8..12].copy_from_slice(&seq.to_ne_bytes());
    Request { buf, len: at }
}

/// What one received datagram says about request `seq`.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// Nothing about it (other sequence numbers, other message types).
    Pending,
    /// Acknowledged: error 0.
    Ack,
    /// Refused with this (positive) errno and, with extended acks, a message.
    Nack { errno: i32, msg: Option<String> },
}

fn ne_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn ne_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Parses a datagram from the kernel: a sequence of netlink messages. `None` when it is
/// malformed (a length shorter than a header or beyond the datagram).
fn parse_answer(dgram: &[u8], seq: u32) -> Option<Answer> {
    use wire::*;
    let mut rest = dgram;
    while rest.len() >= NLMSG_HDRLEN {
        let len = ne_u32(rest, 0)? as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return None;
        }
        let msg = &rest[..len];
        let kind = ne_u16(msg, 4)?;
        let flags = ne_u16(msg, 6)?;
        if kind == NLMSG_ERROR && ne_u32(msg, 8)? == seq {
            // struct nlmsgerr { int error; struct nlmsghdr msg; } then, with NLM_F_ACK_TLVS,
            // attributes after the echoed request (only its header when NLM_F_CAPPED).
            let error = ne_u32(msg, NLMSG_HDRLEN)? as i32;
            if error == 0 {
                return Some(Answer::Ack);
            }
            let errno = error.checked_neg().unwrap_or(libc::EIO);
            let mut text = None;
            if flags & NLM_F_ACK_TLVS != 0 {
                let echoed = NLMSG_HDRLEN + 4;
                let orig_len = if flags & NLM_F_CAPPED != 0 {
                    NLMSG_HDRLEN
                } else {
                    align4(ne_u32(msg, echoed)? as usize)
                };
                text = echoed
                    .checked_add(orig_len)
                    .and_then(|at| msg.get(at..))
                    .and_then(ext_ack_message);
            }
            return Some(Answer::Nack { errno, msg: text });
        }
        rest = rest.get(align4(len)..).unwrap_or(&[]);
    }
    Some(Answer::Pending)
}

/// The `NLMSGERR_ATTR_MSG` string among extended-ack attributes.
fn ext_ack_message(mut attrs: &[u8]) -> Option<String> {
    while attrs.len() >= wire::RTA_HDRLEN {
        let len = ne_u16(attrs, 0)? as usize;
        let kind = ne_u16(attrs, 2)? & wire::NLA_TYPE_MASK;
        if len < wire::RTA_HDRLEN || len > attrs.len() {
            return None;
        }
        if kind == wire::NLMSGERR_ATTR_MSG {
            let data = &attrs[wire::RTA_HDRLEN..len];
            let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
            return Some(String::from_utf8_lossy(&data[..end]).into_owned());
        }
        attrs = attrs.get(align4(len)..).unwrap_or(&[]);
    }
    None
}

/// Opens a `NETLINK_ROUTE` socket with a receive timeout and extended acks.
fn route_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked and owned immediately.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: ACK_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: ACK_TIMEOUT.subsec_micros() as libc::suseconds_t,
    };
    set_opt(&sock, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
    // Best effort (kernels before 4.12 lack them): error messages, and no echo of the request.
    let one: libc::c_int = 1;
    let _ = set_opt(&sock, wire::SOL_NETLINK, wire::NETLINK_EXT_ACK, &one);
    let _ = set_opt(&sock, wire::SOL_NETLINK, wire::NETLINK_CAP_ACK, &one);
    Ok(sock)
}

fn set_opt<T>(sock: &OwnedFd, level: i32, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live `T` of the size passed, read only during the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends one address request and waits for its answer.
fn transact(op: Op, index: u32, addr: IpAddr, prefix: u8) -> Result<(), Failure> {
    let sock = route_socket()?;
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let req = address_request(op, seq, index, addr, prefix);
    let bytes = req.bytes();
    // SAFETY: an all-zero `sockaddr_nl` is valid; the fields set below make it the kernel's
    // address (pid 0, no groups).
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `bytes` and `kernel` are live for the call, with the lengths passed.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            0,
            (&raw const kernel).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error().into());
    }
    if sent as usize != bytes.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short netlink send").into());
    }
    let deadline = Instant::now() + ACK_TIMEOUT;
    let mut buf = [0u8; 8192];
    loop {
        // SAFETY: `buf` is writable for its length for the whole call. MSG_TRUNC makes the
        // return value the datagram's real length, so truncation is detected below.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted if Instant::now() < deadline => continue,
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no netlink acknowledgement within {ACK_TIMEOUT:?}"),
                    )
                    .into())
                }
                _ => return Err(e.into()),
            }
        }
        let n = n as usize;
        let Some(dgram) = buf.get(..n) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("netlink answer of {n} bytes truncated"),
            )
            .into());
        };
        match parse_answer(dgram, seq) {
            Some(Answer::Ack) => return Ok(()),
            Some(Answer::Nack { errno, msg }) => return Err(Failure::Nack { errno, msg }),
            Some(Answer::Pending) if Instant::now() < deadline => {}
            Some(Answer::Pending) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no netlink acknowledgement within {ACK_TIMEOUT:?}"),
                )
                .into())
            }
            None => {
                return Err(
                    io::Error::new(io::ErrorKind::InvalidData, "malformed netlink answer").into(),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn hdr(len: u32, kind: u16, flags: u16, seq: u32, pid: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&len.to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(&flags.to_ne_bytes());
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&pid.to_ne_bytes());
        v
    }

    #[test]
    fn ifreq_layout() {
        assert_eq!(std::mem::size_of::<IfReqHwaddr>(), 40);
        assert_eq!(std::mem::offset_of!(IfReqHwaddr, family), 16);
    }

    #[test]
    fn names_and_prefixes_are_checked_before_any_syscall() {
        for bad in ["", "sixteen-chars-xx", "a\0b"] {
            let e = ifindex(bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
            assert_eq!(mac_of(bad).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        }
        let v4 = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert_eq!(
            add_addr("lo", v4, 33).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            del_addr("lo", v6, 129).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert!(check_prefix(v4, 32).is_ok() && check_prefix(v6, 128).is_ok());
    }

    #[test]
    fn ipv4_add_request_bytes() {
        let r = address_request(Op::Add, 7, 3, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 100)), 24);
        // nlmsghdr: len 40, RTM_NEWADDR, REQUEST|ACK|EXCL|CREATE = 0x605, seq 7, pid 0
        let mut want = hdr(40, 20, 0x605, 7, 0);
        // ifaddrmsg: AF_INET, /24, no flags, scope universe, index 3
        want.extend_from_slice(&[2, 24, 0, 0]);
        want.extend_from_slice(&3u32.to_ne_bytes());
        for kind in [2u16, 1] {
            // IFA_LOCAL, then IFA_ADDRESS: len 8
            want.extend_from_slice(&8u16.to_ne_bytes());
            want.extend_from_slice(&kind.to_ne_bytes());
            want.extend_from_slice(&[192, 0, 2, 100]);
        }
        assert_eq!(r.bytes(), &want[..]);
    }

    #[test]
    fn ipv6_requests_carry_nodad_on_add_only() {
        let a: Ipv6Addr = "2001:db8::5".parse().unwrap();
        let add = address_request(Op::Add, 1, 9, IpAddr::V6(a), 64);
        let b = add.bytes();
        assert_eq!(b.len(), 16 + 8 + 20 + 20);
        assert_eq!(ne_u32(b, 0), Some(64));
        assert_eq!(&b[16..20], &[10, 64, 0x02, 0]);
        assert_eq!(&b[28..44], &a.octets());
        assert_eq!(&b[48..64], &a.octets());
        let del = address_request(Op::Del, 2, 9, IpAddr::V6(a), 64);
        let d = del.bytes();
        assert_eq!(ne_u16(d, 4), Some(21));
        assert_eq!(ne_u16(d, 6), Some(0x005));
        assert_eq!(d[18], 0);
    }

    #[test]
    fn parses_ack_nack_and_extended_message() {
        // ACK for seq 5 (capped: the echoed request is only its header).
        let mut ack = hdr(36, 2, 0x100, 5, 1234);
        ack.extend_from_slice(&0i32.to_ne_bytes());
        ack.extend_from_slice(&hdr(40, 20, 0x605, 5, 0));
        assert_eq!(parse_answer(&ack, 5), Some(Answer::Ack));
        assert_eq!(parse_answer(&ack, 6), Some(Answer::Pending));

        // EEXIST with an extended-ack message attribute "Address exists".
        let text = b"Address exists\0";
        let attr_len = 4 + text.len();
        let total = 16 + 4 + 16 + align4(attr_len);
        let mut nack = hdr(total as u32, 2, 0x300, 9, 1234);
        nack.extend_from_slice(&(-libc::EEXIST).to_ne_bytes());
        nack.extend_from_slice(&hdr(40, 20, 0x605, 9, 0));
        nack.extend_from_slice(&(attr_len as u16).to_ne_bytes());
        nack.extend_from_slice(&1u16.to_ne_bytes());
        nack.extend_from_slice(text);
        nack.resize(total, 0);
        assert_eq!(
            parse_answer(&nack, 9),
            Some(Answer::Nack {
                errno: libc::EEXIST,
                msg: Some("Address exists".into())
            })
        );
    }

    #[test]
    fn malformed_answers_are_rejected_without_panicking() {
        assert_eq!(parse_answer(&[], 1), Some(Answer::Pending));
        // A length shorter than the header, and one beyond the datagram.
        assert_eq!(parse_answer(&hdr(8, 2, 0, 1, 0), 1), None);
        assert_eq!(parse_answer(&hdr(64, 2, 0, 1, 0), 1), None);
        // An error message cut before its error field.
        assert_eq!(parse_answer(&hdr(16, 2, 0, 1, 0), 1), None);
        // Every prefix of a valid NACK with TLVs parses to something or None, never panics.
        let mut nack = hdr(44, 2, 0x200, 1, 0);
        nack.extend_from_slice(&(-libc::EINVAL).to_ne_bytes());
        nack.extend_from_slice(&hdr(200, 20, 0, 1, 0));
        nack.extend_from_slice(&[0xff, 0xff, 1, 0, b'x', 0, 0, 0]);
        for n in 0..=nack.len() {
            let _ = parse_answer(&nack[..n], 1);
        }
        assert!(ext_ack_message(&[3, 0, 1, 0]).is_none());
    }
}
