//! `lb-udpgen`: a UDP packet generator and sink for packet-rate measurements, so that the
//! generator is not what limits them (iperf3 tops out near 150 k 64-byte packets per second on the
//! development machine: one `send` per packet plus its own bookkeeping).
//!
//! ```text
//! lb-udpgen send --dst 203.0.113.10:5300 [--size 64] [--batch 64] [--sockets 16] [--threads 1] [--seconds 5] [--rate PPS]
//! lb-udpgen sink --listen 0.0.0.0:5300 [--batch 64] [--seconds N]
//! ```
//!
//! `send` opens `--sockets` connected UDP sockets (each its own source port, hence its own flow
//! for a balancer's hash), and round-robins batches of `--batch` datagrams of `--size` payload
//! bytes over them with one `sendmmsg` call per batch (from `--threads` threads, each with its share
//! of the sockets), for `--seconds`, optionally capped at
//! `--rate` packets per second. At the end it prints one JSON line: datagrams the kernel accepted,
//! failed calls by reason, the elapsed time and its own CPU seconds (user + system, from
//! `getrusage`).
//!
//! `sink` receives on one socket with `recvmmsg` (a 32 MiB receive buffer), counts datagrams and
//! bytes per second, and prints its totals as one JSON line when `--seconds` have passed or on
//! SIGTERM / SIGINT, including its own CPU seconds and the per-second counts.
//!
//! Bad arguments are reported by clap (exit code 2); system call failures at set-up end the process
//! with a message and exit code 1. Nothing panics on input.
//!
//! `unsafe` is limited to two system calls libc exposes and std does not (`sendmmsg`,
//! `getrusage`), each on buffers this file owns and keeps alive for the duration of the call.
//! The sink reads through `lb_examples::sys::RecvBatch` (as `lb-decap` does), and socket buffers
//! are sized with `lb_examples::sys::set_buffer`; a size that cannot be set keeps the default.
#![allow(unsafe_code)]

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use lb_examples::sys::{set_buffer, RecvBatch, SocketBuffer};

/// The largest batch a call may carry (the kernel's `UIO_MAXIOV`).
const MAX_BATCH: usize = 1024;

#[derive(Debug, Parser)]
#[command(
    name = "lb-udpgen",
    about = "UDP packet generator (sendmmsg) and sink (recvmmsg) for packet-rate measurements."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Send datagrams to an address as fast as possible (or at `--rate`).
    Send(SendArgs),
    /// Receive and count datagrams on an address.
    Sink(SinkArgs),
}

#[derive(Debug, clap::Args)]
struct SendArgs {
    /// Destination address and port.
    #[arg(long)]
    dst: SocketAddr,
    /// UDP payload bytes per datagram.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(0..=65000))]
    size: u16,
    /// Datagrams per `sendmmsg` call.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=MAX_BATCH as i64))]
    batch: u16,
    /// Sockets, each with its own source port (= flows).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=4096))]
    sockets: u16,
    /// Sending threads (the sockets are shared out between them).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: u16,
    /// How long to send, in seconds.
    #[arg(long, default_value_t = 5.0, value_parser = positive_seconds)]
    seconds: f64,
    /// Cap on datagrams per second (0: none).
    #[arg(long, default_value_t = 0)]
    rate: u64,
}

#[derive(Debug, clap::Args)]
struct SinkArgs {
    /// Address and port to receive on.
    #[arg(long)]
    listen: SocketAddr,
    /// Datagrams per `recvmmsg` call.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=MAX_BATCH as i64))]
    batch: u16,
    /// Stop after this many seconds (default: at SIGTERM / SIGINT only).
    #[arg(long, value_parser = positive_seconds)]
    seconds: Option<f64>,
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if v.is_finite() && v > 0.0 && v <= 86_400.0 {
        Ok(v)
    } else {
        Err(format!("{s:?}: seconds must be in (0, 86400]"))
    }
}

fn main() {
    let cli = Cli::parse();
    let out = match cli.cmd {
        Cmd::Send(a) => send(&a),
        Cmd::Sink(a) => sink(&a),
    };
    match out {
        Ok(json) => println!("{json}"),
        Err(e) => {
            eprintln!("lb-udpgen: {e}");
            std::process::exit(1);
        }
    }
}

/// Context for an I/O error.
fn ctx(what: &str) -> impl FnOnce(io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: `getrusage` writes one `rusage` into the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Failed calls by reason.
#[derive(Debug, Default, Clone, Copy)]
struct SendErrors {
    /// ENOBUFS / EAGAIN: a full queue.
    no_buffer: u64,
    /// ECONNREFUSED: an ICMP port unreachable came back on a connected socket.
    refused: u64,
    /// Anything else.
    other: u64,
}

/// What one sending thread did.
#[derive(Debug, Default)]
struct SendTotals {
    sent: u64,
    calls: u64,
    errors: SendErrors,
}

fn send(a: &SendArgs) -> Result<String, String> {
    let bind: SocketAddr = if a.dst.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let threads = usize::from(a.threads.min(a.sockets));
    let mut groups: Vec<Vec<UdpSocket>> = (0..threads).map(|_| Vec::new()).collect();
    for i in 0..usize::from(a.sockets) {
        let s = UdpSocket::bind(bind).map_err(ctx("bind"))?;
        s.connect(a.dst).map_err(ctx("connect"))?;
        let _ = set_buffer(&s, SocketBuffer::Send, 4 << 20);
        groups[i % threads].push(s);
    }
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(a.seconds);
    // The rate cap is shared evenly between the threads.
    let rate = a.rate as f64 / threads as f64;
    let (size, batch) = (usize::from(a.size), usize::from(a.batch));
    let handles: Vec<_> = groups
        .into_iter()
        .map(|socks| std::thread::spawn(move || send_loop(&socks, size, batch, rate, start, end)))
        .collect();
    let mut t = SendTotals::default();
    for h in handles {
        let r = h.join().map_err(|_| "a sending thread failed".to_owned())?;
        t.sent += r.sent;
        t.calls += r.calls;
        t.errors.no_buffer += r.errors.no_buffer;
        t.errors.refused += r.errors.refused;
        t.errors.other += r.errors.other;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    Ok(format!(
        "{{\"mode\":\"send\",\"dst\":\"{}\",\"size\":{},\"batch\":{},\"sockets\":{},\"threads\":{threads},\"packets\":{},\"calls\":{},\
         \"errors\":{{\"no_buffer\":{},\"refused\":{},\"other\":{}}},\"seconds\":{secs:.3},\"pps\":{:.0},\"cpu_s\":{cpu:.3}}}",
        a.dst,
        a.size,
        a.batch,
        a.sockets,
        t.sent,
        t.calls,
        t.errors.no_buffer,
        t.errors.refused,
        t.errors.other,
        t.sent as f64 / secs.max(1e-9),
    ))
}

/// One thread's sending loop: batches of `batch` datagrams of `size` bytes, round-robin over
/// `socks`, until `end`, at most `rate` datagrams per second when `rate` > 0.
fn send_loop(
    socks: &[UdpSocket],
    size: usize,
    batch: usize,
    rate: f64,
    start: Instant,
    end: Instant,
) -> SendTotals {
    // One payload shared by every datagram (the content does not matter); one iovec and one
    // header per datagram of the batch, all pointing at it. Connected sockets: no address.
    let mut payload: Vec<u8> = (0..size).map(|i| i as u8).collect();
    let mut iov = vec![
        libc::iovec {
            iov_base: payload.as_mut_ptr().cast(),
            iov_len: payload.len(),
        };
        batch
    ];
    // SAFETY: `mmsghdr` is plain data; all-zero is a valid empty header.
    let mut hdrs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; batch];
    for (h, v) in hdrs.iter_mut().zip(iov.iter_mut()) {
        h.msg_hdr.msg_iov = v;
        h.msg_hdr.msg_iovlen = 1;
    }
    let mut t = SendTotals::default();
    let mut next = 0usize;
    loop {
        let now = Instant::now();
        if now >= end || socks.is_empty() {
            break;
        }
        if rate > 0.0 {
            // Ahead of the schedule: sleep until the next batch is due (at most 10 ms at once,
            // so that the end time is kept).
            let ahead = t.sent as f64 / rate - now.duration_since(start).as_secs_f64();
            if ahead > 0.0 {
                std::thread::sleep(Duration::from_secs_f64(ahead.min(0.01)));
                continue;
            }
        }
        let fd = socks[next].as_raw_fd();
        next = (next + 1) % socks.len();
        // SAFETY: `hdrs` holds `batch` initialised headers whose iovecs point into `payload`;
        // all three live until after the call.
        let n = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), batch as libc::c_uint, 0) };
        t.calls += 1;
        if n >= 0 {
            t.sent += n as u64;
        } else {
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::ENOBUFS) | Some(libc::EAGAIN) => t.errors.no_buffer += 1,
                Some(libc::ECONNREFUSED) => t.errors.refused += 1,
                _ => t.errors.other += 1,
            }
        }
    }
    t
}

fn sink(a: &SinkArgs) -> Result<String, String> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).map_err(ctx("signal"))?;
    }
    let sock = UdpSocket::bind(a.listen).map_err(ctx("bind"))?;
    sink_on(&sock, a, &stop)
}

/// [`sink`] on a bound socket, until `a.seconds` pass or `stop` is set.
fn sink_on(sock: &UdpSocket, a: &SinkArgs, stop: &AtomicBool) -> Result<String, String> {
    let _ = set_buffer(sock, SocketBuffer::Receive, 32 << 20);
    // Wake up regularly to notice the stop flag and the end of a second.
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(ctx("SO_RCVTIMEO"))?;
    // 2 KiB a datagram: room for any packet-rate measurement's payload (a longer one is
    // counted with the bytes that fit).
    let mut rx = RecvBatch::with_slot(usize::from(a.batch), 2048);
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let end = a.seconds.map(|s| start + Duration::from_secs_f64(s));
    let (mut packets, mut bytes) = (0u64, 0u64);
    let mut first: Option<Instant> = None;
    let mut last = start;
    // Packets per second since the first one arrived.
    let mut per_second: Vec<u64> = Vec::new();
    let mut errors = 0u64;
    while !stop.load(Ordering::Relaxed) && end.is_none_or(|e| Instant::now() < e) {
        // Waits for the first datagram at most SO_RCVTIMEO, then takes what else is queued.
        let n = match rx.recv_wait(sock) {
            Ok(0) => continue,
            Ok(n) => n,
            Err(_) => {
                errors += 1;
                continue;
            }
        };
        let now = Instant::now();
        let t0 = *first.get_or_insert(now);
        last = now;
        packets += n as u64;
        bytes += (0..n).filter_map(|i| rx.received(i)).sum::<usize>() as u64;
        let sec = now.duration_since(t0).as_secs() as usize;
        if per_second.len() <= sec {
            per_second.resize(sec + 1, 0);
        }
        per_second[sec] += n as u64;
    }
    let cpu = cpu_seconds() - cpu0;
    let active = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
    let series = per_second
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    Ok(format!(
        "{{\"mode\":\"sink\",\"listen\":\"{}\",\"packets\":{packets},\"bytes\":{bytes},\"errors\":{errors},\
         \"active_seconds\":{active:.3},\"pps_active\":{:.0},\"cpu_s\":{cpu:.3},\"per_second\":[{series}]}}",
        a.listen,
        if active > 0.0 {
            packets as f64 / active
        } else {
            0.0
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_arguments_are_errors_not_panics() {
        for args in [
            &["lb-udpgen", "send", "--dst", "nope"][..],
            &["lb-udpgen", "send", "--dst", "127.0.0.1:9", "--batch", "0"],
            &[
                "lb-udpgen",
                "send",
                "--dst",
                "127.0.0.1:9",
                "--batch",
                "5000",
            ],
            &[
                "lb-udpgen",
                "send",
                "--dst",
                "127.0.0.1:9",
                "--seconds",
                "0",
            ],
            &[
                "lb-udpgen",
                "send",
                "--dst",
                "127.0.0.1:9",
                "--seconds",
                "NaN",
            ],
            &[
                "lb-udpgen",
                "send",
                "--dst",
                "127.0.0.1:9",
                "--size",
                "70000",
            ],
            &[
                "lb-udpgen",
                "sink",
                "--listen",
                "127.0.0.1:9",
                "--seconds",
                "inf",
            ],
            &["lb-udpgen", "flood"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?} accepted");
        }
        assert!(Cli::try_parse_from(["lb-udpgen", "sink", "--listen", "[::1]:5300"]).is_ok());
    }

    #[test]
    fn positive_seconds_bounds() {
        assert_eq!(positive_seconds("2.5"), Ok(2.5));
        for bad in ["0", "-1", "x", "inf", "1e9"] {
            assert!(positive_seconds(bad).is_err(), "{bad}");
        }
    }

    /// The sink over loopback counts every datagram and byte sent to it, in batches, and stops
    /// when its time is up.
    #[test]
    fn sink_counts_datagrams_and_bytes() {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let listen = sock.local_addr().expect("addr");
        let a = SinkArgs {
            listen,
            batch: 8,
            seconds: Some(1.5),
        };
        let stop = AtomicBool::new(false);
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let (json, sent) = std::thread::scope(|s| {
            let h = s.spawn(|| sink_on(&sock, &a, &stop));
            let mut sent = 0u64;
            for round in 0..50u64 {
                // Sizes vary per datagram: the byte count is their sum, not a multiple.
                for i in 0..10u64 {
                    let n = 1 + ((round * 10 + i) % 1500) as usize;
                    tx.send_to(&vec![7u8; n], listen).expect("send");
                    sent += n as u64;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (h.join().expect("sink thread").expect("sink"), sent)
        });
        let v: serde_json::Value = serde_json::from_str(&json).expect("json");
        assert_eq!(v["packets"].as_u64(), Some(500), "{json}");
        assert_eq!(v["bytes"].as_u64(), Some(sent), "{json}");
        assert_eq!(v["errors"].as_u64(), Some(0), "{json}");
        let per_second: u64 = v["per_second"]
            .as_array()
            .expect("series")
            .iter()
            .filter_map(serde_json::Value::as_u64)
            .sum();
        assert_eq!(per_second, 500, "{json}");
    }

    /// A capped send over loopback: every datagram the sender counts arrives, with the payload
    /// size asked for, and the rate cap holds.
    #[test]
    fn capped_send_over_loopback_arrives_whole() {
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let _ = set_buffer(&rx, SocketBuffer::Receive, 8 << 20);
        let dst = rx.local_addr().expect("addr");
        let a = SendArgs {
            dst,
            size: 100,
            batch: 8,
            sockets: 4,
            threads: 2,
            seconds: 0.5,
            rate: 2000,
        };
        let json = send(&a).expect("send");
        let v: serde_json::Value = serde_json::from_str(&json).expect("json");
        let sent = v["packets"].as_u64().expect("packets");
        // 2000/s for 0.5 s, two threads each ahead by at most one batch (fewer on a loaded
        // machine, never more).
        assert!((1..=1016).contains(&sent), "{json}");
        rx.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let mut buf = [0u8; 2048];
        let mut got = 0u64;
        while let Ok(n) = rx.recv(&mut buf) {
            assert_eq!(n, 100);
            got += 1;
        }
        assert_eq!(got, sent, "{json}");
    }
}
