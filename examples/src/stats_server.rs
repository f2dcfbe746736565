//! Serves statistics on demand over TCP: `GET /metrics` answers Prometheus text,
//! `GET /explain?...` an explanation of a flow's placement, anything else JSON.
//!
//! A tiny HTTP/1.0 responder: one request per connection, answered and closed. What it serves
//! comes from a render function the caller supplies, so the server knows nothing of the data path.
//!
//! One thread accepts; each connection gets its own thread, so a slow or silent client delays
//! nobody else. Each connection has [`REQUEST_TIMEOUT`] for its whole request head (a deadline,
//! not a per-read timeout, so trickling a byte at a time does not extend it) and
//! [`WRITE_TIMEOUT`] for the answer; at most [`MAX_CONNECTIONS`] are served at once, and one
//! past that is answered `503` at once and closed. (A crate such as `tiny_http` was considered:
//! it has neither per-connection timeouts nor a connection cap, which are the point here.)

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::sys::poll_readable;

/// How long a client has to send its whole request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long writing the answer may block.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections served at once (one thread each).
pub const MAX_CONNECTIONS: usize = 32;

/// What is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    /// The statistics, `application/json`.
    Json,
    /// The statistics, Prometheus text exposition format 0.0.4.
    Prometheus,
    /// "Why this backend" (`/explain?proto=tcp&src=IP:PORT&dst=VIP:PORT`), JSON; holds the
    /// query string.
    Explain(String),
}

/// Produces the current statistics in a format.
pub type Render = Arc<dyn Fn(Format) -> String + Send + Sync>;

/// A running statistics server; stops when `stop` is set (checked every 100 ms).
#[derive(Debug)]
pub struct StatsServer {
    addr: SocketAddr,
    handle: JoinHandle<()>,
}

impl StatsServer {
    /// Binds `addr` and serves on a new thread.
    ///
    /// # Errors
    /// Binding failed.
    pub fn start(
        addr: SocketAddr,
        render: Render,
        stop: Arc<AtomicBool>,
    ) -> io::Result<StatsServer> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let handle = std::thread::Builder::new()
            .name("stats".into())
            .spawn(move || accept_loop(&listener, &render, &stop))?;
        Ok(StatsServer { addr, handle })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits for the server thread to finish (after `stop` was set).
    pub fn join(self) {
        let _ = self.handle.join();
    }
}

/// Accepts until `stop`, one thread per connection (at most [`MAX_CONNECTIONS`]).
fn accept_loop(listener: &TcpListener, render: &Render, stop: &AtomicBool) {
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        // Wake on a connection at once, or every 100 ms to look at `stop`.
        if let Err(e) = poll_readable(&[listener], 100) {
            tracing::warn!("stats poll failed: {e}");
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        loop {
            let conn = match listener.accept() {
                Ok((conn, _)) => conn,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!("stats accept failed: {e}");
                    break;
                }
            };
            if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                active.fetch_sub(1, Ordering::AcqRel);
                tracing::debug!("stats: {MAX_CONNECTIONS} connections open, refusing one");
                busy(conn);
                continue;
            }
            let (render, done) = (render.clone(), Slot(active.clone()));
            let spawned = std::thread::Builder::new()
                .name("stats-conn".into())
                .spawn(move || {
                    let _done = done;
                    if let Err(e) = answer(conn, &render) {
                        tracing::debug!("stats request failed: {e}");
                    }
                });
            if let Err(e) = spawned {
                // The closure (and its slot) was dropped with the error.
                tracing::warn!("stats: cannot start a connection thread: {e}");
            }
        }
    }
}

/// A connection's place in the count of open ones, given back when dropped.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Answers `503` without reading the request, never blocking (the send buffer of a new socket
/// holds it), and closes.
fn busy(mut conn: TcpStream) {
    let _ = conn.set_nonblocking(true);
    let _ = conn.write_all(
        b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
}

fn answer(mut conn: TcpStream, render: &Render) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut req = [0u8; 1024];
    let mut have = 0;
    while have < req.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no complete request in time",
            ));
        }
        conn.set_read_timeout(Some(left))?;
        let n = conn.read(&mut req[have..])?;
        if n == 0 {
            break;
        }
        have += n;
        if req[..have].windows(4).any(|w| w == b"\r\n\r\n")
            || req[..have].windows(2).any(|w| w == b"\n\n")
        {
            break;
        }
    }
    let line = String::from_utf8_lossy(&req[..have]);
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let (format, ctype) = if path.starts_with("/metrics") {
        (Format::Prometheus, "text/plain; version=0.0.4")
    } else if let Some(rest) = path.strip_prefix("/explain") {
        let query = rest.strip_prefix('?').unwrap_or("").to_owned();
        (Format::Explain(query), "application/json")
    } else {
        (Format::Json, "application/json")
    };
    let body = render(format);
    write!(
        conn,
        "HTTP/1.0 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}

/// Fetches `path` from a stats server (a minimal HTTP/1.0 client for tests and tools).
///
/// # Errors
/// Connecting or reading failed, or the answer has no body.
pub fn fetch(addr: SocketAddr, path: &str) -> io::Result<String> {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    c.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(c, "GET {path} HTTP/1.0\r\n\r\n")?;
    let mut out = String::new();
    c.read_to_string(&mut out)?;
    match out.split_once("\r\n\r\n") {
        Some((_, body)) => Ok(body.to_owned()),
        None => Err(io::ErrorKind::InvalidData.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_both_formats() {
        let stop = Arc::new(AtomicBool::new(false));
        let render: Render = Arc::new(|f| match f {
            Format::Json => "{\"ok\":1}".to_owned(),
            Format::Prometheus => "lb_ok 1\n".to_owned(),
            Format::Explain(q) => format!("{{\"q\":\"{q}\"}}"),
        });
        let s = StatsServer::start("127.0.0.1:0".parse().unwrap(), render, stop.clone()).unwrap();
        let addr = s.local_addr();
        assert_eq!(fetch(addr, "/").unwrap(), "{\"ok\":1}");
        assert_eq!(fetch(addr, "/metrics").unwrap(), "lb_ok 1\n");
        assert_eq!(
            fetch(addr, "/explain?proto=tcp&src=1.2.3.4:5").unwrap(),
            "{\"q\":\"proto=tcp&src=1.2.3.4:5\"}"
        );
        stop.store(true, Ordering::Relaxed);
        s.join();
    }

    fn serve(render: Render) -> (StatsServer, Arc<AtomicBool>) {
        let stop = Arc::new(AtomicBool::new(false));
        let s = StatsServer::start("127.0.0.1:0".parse().unwrap(), render, stop.clone()).unwrap();
        (s, stop)
    }

    #[test]
    fn silent_clients_hold_up_nobody_and_are_cut_off() {
        let (s, stop) = serve(Arc::new(|_| "{}".to_owned()));
        let addr = s.local_addr();
        let mut silent: Vec<TcpStream> =
            (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let t = Instant::now();
        assert_eq!(fetch(addr, "/").unwrap(), "{}");
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        // Each silent connection is closed once its request time is up.
        for c in &mut silent {
            c.set_read_timeout(Some(REQUEST_TIMEOUT * 2)).unwrap();
            let mut b = [0u8; 16];
            assert!(matches!(c.read(&mut b), Ok(0) | Err(_)), "not closed");
        }
        assert!(t.elapsed() < REQUEST_TIMEOUT + Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
        s.join();
    }

    #[test]
    fn connections_past_the_cap_get_503() {
        let (s, stop) = serve(Arc::new(|_| "{}".to_owned()));
        let addr = s.local_addr();
        let _silent: Vec<TcpStream> = (0..MAX_CONNECTIONS)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        // Let the server accept them all before the one too many.
        std::thread::sleep(Duration::from_millis(300));
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.0 503"), "{out:?}");
        stop.store(true, Ordering::Relaxed);
        s.join();
    }
}
