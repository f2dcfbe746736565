//! Health-check probe I/O: performs the probes that `lb_health::HealthChecker` asks for.
//!
//! [`execute`] runs one probe synchronously within its timeout. [`ProbeRunner`] runs many at once,
//! each on a short-lived thread (at most one probe is in flight per backend, so the number of
//! threads is bounded by the number of backends), and hands the outcomes back over a channel for the
//! checker's drive loop.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use lb_core::BackendId;
use lb_health::{FailureReason, ProbeKind, ProbeOutcome};

/// Runs one probe against `addr`, giving up after `timeout`.
pub fn execute(kind: &ProbeKind, addr: SocketAddr, timeout: Duration, token: u64) -> ProbeOutcome {
    let deadline = Instant::now() + timeout;
    let result = match kind {
        ProbeKind::Tcp => TcpStream::connect_timeout(&addr, timeout).map(|_| ProbeOutcome::Success),
        ProbeKind::Http {
            path,
            expect_status,
        } => http(addr, path, *expect_status, deadline),
        ProbeKind::Udp { payload, expect } => udp(addr, payload, expect.as_deref(), deadline),
        ProbeKind::SipOptions => sip_options(addr, token, deadline),
        _ => Ok(ProbeOutcome::Failure(FailureReason::Other)),
    };
    result.unwrap_or_else(|e| io_outcome(&e))
}

fn io_outcome(e: &std::io::Error) -> ProbeOutcome {
    match e.kind() {
        ErrorKind::TimedOut | ErrorKind::WouldBlock => ProbeOutcome::Timeout,
        ErrorKind::ConnectionRefused => ProbeOutcome::Failure(FailureReason::Refused),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
            ProbeOutcome::Failure(FailureReason::Reset)
        }
        ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => {
            ProbeOutcome::Failure(FailureReason::Unreachable)
        }
        _ => ProbeOutcome::Failure(FailureReason::Other),
    }
}

fn remaining(deadline: Instant) -> std::io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(ErrorKind::TimedOut.into())
    } else {
        Ok(left)
    }
}

fn http(
    addr: SocketAddr,
    path: &str,
    expect: u16,
    deadline: Instant,
) -> std::io::Result<ProbeOutcome> {
    let mut s = TcpStream::connect_timeout(&addr, remaining(deadline)?)?;
    s.set_write_timeout(Some(remaining(deadline)?))?;
    let req = format!(
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: tun-balancer-health\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())?;
    let mut buf = [0u8; 256];
    let mut have = 0;
    while have < buf.len() {
        s.set_read_timeout(Some(remaining(deadline)?))?;
        let n = s.read(&mut buf[have..])?;
        if n == 0 {
            break;
        }
        have += n;
        if buf[..have].contains(&b'\n') {
            break;
        }
    }
    // "HTTP/1.x NNN reason"
    let line = String::from_utf8_lossy(&buf[..have]);
    let status = line
        .strip_prefix("HTTP/")
        .and_then(|r| r.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok());
    Ok(match status {
        Some(s) if s == expect => ProbeOutcome::Success,
        Some(s) => ProbeOutcome::Failure(FailureReason::BadResponse(s)),
        None => ProbeOutcome::Failure(FailureReason::BadResponse(0)),
    })
}

fn udp_exchange(
    addr: SocketAddr,
    payload: &[u8],
    deadline: Instant,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    let local: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().map_err(|_| ErrorKind::InvalidInput)?
    } else {
        "[::]:0".parse().map_err(|_| ErrorKind::InvalidInput)?
    };
    let s = UdpSocket::bind(local)?;
    s.connect(addr)?;
    s.send(payload)?;
    s.set_read_timeout(Some(remaining(deadline)?))?;
    s.recv(buf)
}

fn udp(
    addr: SocketAddr,
    payload: &[u8],
    expect: Option<&[u8]>,
    deadline: Instant,
) -> std::io::Result<ProbeOutcome> {
    let mut buf = [0u8; 2048];
    let n = udp_exchange(addr, payload, deadline, &mut buf)?;
    Ok(match expect {
        Some(e) if !buf[..n].starts_with(e) => ProbeOutcome::Failure(FailureReason::BadResponse(0)),
        _ => ProbeOutcome::Success,
    })
}

/// 64 random bits from the OS generator, or (if that fails) from the clock and the process id:
/// not a key, it only needs to differ between processes.
fn process_nonce() -> u64 {
    if let Ok(r) = getrandom::u64() {
        return r;
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 32)
}

/// The SIP OPTIONS request sent by the `sip-options` check (RFC 3261 §11); `token` names the
/// Via branch, the From tag and the Call-ID.
pub fn sip_options_request(addr: SocketAddr, token: u64) -> String {
    let host = match addr {
        SocketAddr::V4(a) => a.ip().to_string(),
        SocketAddr::V6(a) => format!("[{}]", a.ip()),
    };
    format!(
        "OPTIONS sip:{host}:{port} SIP/2.0\r\n\
         Via: SIP/2.0/UDP lb.invalid;branch=z9hG4bK{token:x}\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:health@lb.invalid>;tag={token:x}\r\n\
         To: <sip:{host}:{port}>\r\n\
         Call-ID: health-{token:x}@lb.invalid\r\n\
         CSeq: 1 OPTIONS\r\n\
         Accept: application/sdp\r\n\
         Content-Length: 0\r\n\r\n",
        port = addr.port()
    )
}

fn sip_options(addr: SocketAddr, token: u64, deadline: Instant) -> std::io::Result<ProbeOutcome> {
    let mut buf = [0u8; 2048];
    let n = udp_exchange(
        addr,
        sip_options_request(addr, token).as_bytes(),
        deadline,
        &mut buf,
    )?;
    let text = String::from_utf8_lossy(&buf[..n]);
    let status = text
        .strip_prefix("SIP/2.0 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse::<u16>().ok());
    // Any final response means a live SIP stack, except 408 / 503 (overloaded or timing out).
    Ok(match status {
        Some(s) if (200..700).contains(&s) && s != 408 && s != 503 => ProbeOutcome::Success,
        Some(s) => ProbeOutcome::Failure(FailureReason::BadResponse(s)),
        None => ProbeOutcome::Failure(FailureReason::BadResponse(0)),
    })
}

/// A finished probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeResult {
    /// The backend probed.
    pub backend: BackendId,
    /// The checker's token for the probe.
    pub token: u64,
    /// What happened.
    pub outcome: ProbeOutcome,
}

/// What the runner's channel carries: a finished probe, or a wake-up ([`ProbeWaker`]).
#[derive(Debug)]
enum Msg {
    Done(ProbeResult),
    Wake,
}

/// Ends a [`ProbeRunner::next`] wait early (from another thread, e.g. on a signal).
#[derive(Debug, Clone)]
pub struct ProbeWaker(Sender<Msg>);

impl ProbeWaker {
    /// Makes the current (or the next) [`ProbeRunner::next`] return at once.
    pub fn wake(&self) {
        let _ = self.0.send(Msg::Wake);
    }
}

/// Runs probes concurrently, one thread per in-flight probe.
#[derive(Debug)]
pub struct ProbeRunner {
    tx: Sender<Msg>,
    rx: Receiver<Msg>,
    /// Mixed into what a probe puts on the wire (the SIP OPTIONS Call-ID, branch and tag), so
    /// that two balancers probing the same backend never send byte-identical requests: the
    /// checker's tokens follow the same sequence in every process, and a SIP stack takes an
    /// identical request from a second source for a retransmission and does not answer it.
    nonce: u64,
}

impl Default for ProbeRunner {
    fn default() -> Self {
        Self::new()
    }
}

impl ProbeRunner {
    /// A runner with no probe in flight.
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel();
        ProbeRunner {
            tx,
            rx,
            nonce: process_nonce(),
        }
    }

    /// Starts a probe in the background.
    pub fn start(
        &self,
        backend: BackendId,
        token: u64,
        kind: ProbeKind,
        addr: SocketAddr,
        timeout: Duration,
    ) {
        let tx = self.tx.clone();
        let wire = token ^ self.nonce;
        let spawned = std::thread::Builder::new()
            .name("probe".into())
            .spawn(move || {
                let outcome = execute(&kind, addr, timeout, wire);
                let _ = tx.send(Msg::Done(ProbeResult {
                    backend,
                    token,
                    outcome,
                }));
            });
        if spawned.is_err() {
            let _ = self.tx.send(Msg::Done(ProbeResult {
                backend,
                token,
                outcome: ProbeOutcome::Failure(FailureReason::Other),
            }));
        }
    }

    /// Waits up to `timeout` for a finished probe; `None` after the timeout or a wake-up.
    pub fn next(&self, timeout: Duration) -> Option<ProbeResult> {
        match self.rx.recv_timeout(timeout) {
            Ok(Msg::Done(r)) => Some(r),
            _ => None,
        }
    }

    /// A handle that ends a [`ProbeRunner::next`] wait early.
    pub fn waker(&self) -> ProbeWaker {
        ProbeWaker(self.tx.clone())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn two_runners_never_send_the_same_sip_request() {
        // The checker's tokens are the same sequence in every process; the runner's nonce
        // makes the requests of two balancers differ (a SIP stack ignores a "retransmission").
        let (a, b) = (ProbeRunner::new(), ProbeRunner::new());
        assert_ne!(a.nonce, b.nonce);
        let addr: std::net::SocketAddr = "198.51.100.11:5060".parse().unwrap();
        assert_ne!(
            sip_options_request(addr, 7 ^ a.nonce),
            sip_options_request(addr, 7 ^ b.nonce)
        );
    }

    use super::*;
    use std::net::TcpListener;

    #[test]
    fn a_waker_ends_the_wait_at_once() {
        let runner = ProbeRunner::new();
        let waker = runner.waker();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            waker.wake();
        });
        let start = std::time::Instant::now();
        assert_eq!(runner.next(Duration::from_secs(10)), None);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        t.join().unwrap();
        // Nothing queued any more: the next wait runs to its timeout.
        assert_eq!(runner.next(Duration::from_millis(20)), None);
    }

    fn local(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn tcp_up_and_refused() {
        let l = TcpListener::bind(local(0)).unwrap();
        let addr = l.local_addr().unwrap();
        assert_eq!(
            execute(&ProbeKind::Tcp, addr, Duration::from_secs(2), 1),
            ProbeOutcome::Success
        );
        drop(l);
        assert_eq!(
            execute(&ProbeKind::Tcp, addr, Duration::from_secs(2), 2),
            ProbeOutcome::Failure(FailureReason::Refused)
        );
    }

    #[test]
    fn http_status() {
        let l = TcpListener::bind(local(0)).unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            for status in [200, 503] {
                let (mut c, _) = l.accept().unwrap();
                let mut req = Vec::new();
                let mut chunk = [0u8; 512];
                while !req.ends_with(b"\r\n\r\n") {
                    let n = c.read(&mut chunk).unwrap();
                    assert!(n > 0);
                    req.extend_from_slice(&chunk[..n]);
                }
                assert!(req.starts_with(b"GET /healthz HTTP/1.0\r\n"));
                write!(c, "HTTP/1.0 {status} X\r\n\r\n").unwrap();
            }
        });
        let kind = ProbeKind::Http {
            path: "/healthz".into(),
            expect_status: 200,
        };
        assert_eq!(
            execute(&kind, addr, Duration::from_secs(2), 1),
            ProbeOutcome::Success
        );
        assert_eq!(
            execute(&kind, addr, Duration::from_secs(2), 2),
            ProbeOutcome::Failure(FailureReason::BadResponse(503))
        );
        server.join().unwrap();
    }

    #[test]
    fn udp_echo_timeout_and_sip() {
        let s = UdpSocket::bind(local(0)).unwrap();
        let addr = s.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            // 1: echo; 2: silence (timeout); 3: SIP answer.
            let (n, from) = s.recv_from(&mut buf).unwrap();
            s.send_to(&buf[..n], from).unwrap();
            let _ = s.recv_from(&mut buf).unwrap();
            let (n, from) = s.recv_from(&mut buf).unwrap();
            assert!(buf[..n].starts_with(b"OPTIONS sip:127.0.0.1:"));
            s.send_to(b"SIP/2.0 200 OK\r\n\r\n", from).unwrap();
        });
        let kind = ProbeKind::Udp {
            payload: b"ping".to_vec(),
            expect: Some(b"pi".to_vec()),
        };
        assert_eq!(
            execute(&kind, addr, Duration::from_secs(2), 1),
            ProbeOutcome::Success
        );
        assert_eq!(
            execute(&kind, addr, Duration::from_millis(100), 2),
            ProbeOutcome::Timeout
        );
        assert_eq!(
            execute(&ProbeKind::SipOptions, addr, Duration::from_secs(2), 3),
            ProbeOutcome::Success
        );
        server.join().unwrap();
    }

    #[test]
    fn runner_reports_back() {
        let l = TcpListener::bind(local(0)).unwrap();
        let r = ProbeRunner::new();
        r.start(
            BackendId(4),
            9,
            ProbeKind::Tcp,
            l.local_addr().unwrap(),
            Duration::from_secs(2),
        );
        let res = r.next(Duration::from_secs(5)).unwrap();
        assert_eq!(
            res,
            ProbeResult {
                backend: BackendId(4),
                token: 9,
                outcome: ProbeOutcome::Success
            }
        );
    }
}
