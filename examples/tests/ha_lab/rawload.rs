//! A paced sender of one-datagram UDP flows from a raw IPv4 socket (`IPPROTO_RAW`), for the
//! measurements (`ha_perf.rs`, `ecmp_perf.rs`): flow `i` comes from `base + i / 60 000`, port
//! `1024 + i % 60 000`, so no 5-tuple repeats, and each flow is exactly one new conntrack entry.
//! hping3 cannot do this: it holds about 5 000 packets/s here, from one address.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::common::in_ns;

/// What the flows look like.
#[derive(Debug, Clone, Copy)]
pub struct FlowLoad {
    /// The first source address.
    pub base: Ipv4Addr,
    /// Where every flow goes.
    pub dst: Ipv4Addr,
    /// Its UDP port.
    pub port: u16,
    /// Every datagram's payload (even length: no checksum padding).
    pub payload: &'static [u8],
}

/// What a sender did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sent {
    /// Datagrams sent.
    pub packets: u64,
    /// `sendto` failures.
    pub errors: u64,
    /// How long it took.
    pub secs: f64,
    /// The furthest the sender fell behind its schedule.
    pub max_behind_ms: f64,
}

impl Sent {
    /// Datagrams per second.
    pub fn rate(&self) -> f64 {
        self.packets as f64 / self.secs.max(1e-9)
    }
}

impl FlowLoad {
    /// Source address and port of flow `i`.
    pub fn source(&self, i: u64) -> (Ipv4Addr, u16) {
        (
            Ipv4Addr::from(u32::from(self.base) + (i / 60_000) as u32),
            1024 + (i % 60_000) as u16,
        )
    }

    /// The IPv4 + UDP datagram of flow `i` (IP checksum and id left to the kernel).
    pub fn datagram(&self, i: u64, out: &mut Vec<u8>) {
        let (src, sport) = self.source(i);
        let udp_len = (8 + self.payload.len()) as u16;
        out.clear();
        out.extend_from_slice(&[0x45, 0]);
        out.extend_from_slice(&(20 + udp_len).to_be_bytes());
        // id 0, DF, TTL 64, UDP, checksum 0: filled in by the kernel (IP_HDRINCL).
        out.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
        out.extend_from_slice(&src.octets());
        out.extend_from_slice(&self.dst.octets());
        out.extend_from_slice(&sport.to_be_bytes());
        out.extend_from_slice(&self.port.to_be_bytes());
        out.extend_from_slice(&udp_len.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(self.payload);
        // RFC 768: the checksum covers a pseudo-header (addresses, protocol, UDP length) and the
        // datagram; a computed 0 is sent as all ones.
        let mut sum = ones_sum(&src.octets(), 0);
        sum = ones_sum(&self.dst.octets(), sum);
        sum += 17 + u32::from(udp_len);
        sum = ones_sum(&out[20..], sum);
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        let c = match !(sum as u16) {
            0 => 0xffff,
            c => c,
        };
        out[26..28].copy_from_slice(&c.to_be_bytes());
    }

    /// Sends `rate × dur` new flows from flow `first` on, each at its time on the schedule (the
    /// sender sleeps until the next is due and sends every flow due, so a late wake-up is caught
    /// up at once). Never blocks on the socket; gives up 5 s after the schedule's end.
    #[allow(unsafe_code)]
    pub fn send(&self, fd: &OwnedFd, first: u64, rate: f64, dur: Duration) -> Sent {
        let total = (rate * dur.as_secs_f64()).round() as u64;
        let dst = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(self.dst).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let mut buf = Vec::with_capacity(64);
        let mut s = Sent::default();
        let start = Instant::now();
        let give_up = start + dur + Duration::from_secs(5);
        let mut i = 0u64;
        while i < total {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            let now = Instant::now();
            if now > give_up {
                break;
            }
            if now < due {
                std::thread::sleep(due - now);
                continue;
            }
            s.max_behind_ms = s.max_behind_ms.max((now - due).as_secs_f64() * 1e3);
            self.datagram(first + i, &mut buf);
            // SAFETY: `buf` and `dst` are live for the call and their lengths are the ones given.
            let rc = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&raw const dst).cast(),
                    len,
                )
            };
            if rc < 0 {
                s.errors += 1;
            } else {
                s.packets += 1;
            }
            i += 1;
        }
        s.secs = start.elapsed().as_secs_f64();
        s
    }
}

/// RFC 1071 one's-complement sum of `data` added to `sum` (not folded).
fn ones_sum(data: &[u8], mut sum: u32) -> u32 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]));
    }
    sum
}

/// A raw IPv4 socket (`IPPROTO_RAW`: send only, the caller writes the IP header) in `ns`.
#[allow(unsafe_code)]
pub fn raw_socket(ns: &str) -> OwnedFd {
    in_ns(ns, || {
        // SAFETY: a plain system call; the descriptor it returns is owned by the `OwnedFd` below
        // and by nothing else.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_RAW,
            )
        };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        unsafe { OwnedFd::from_raw_fd(fd) }
    })
}
