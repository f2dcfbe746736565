//! Serves statistics on demand over TCP: `GET /metrics` answers Prometheus text,
//! `GET /explain?...` an explanation of a flow's placement, anything else JSON.
//!
//! A tiny HTTP/1.0 responder on its own thread: one request per connection, answered and closed.
//! What it serves comes from a render function the caller supplies, so the server knows nothing of
//! the data path.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

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
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            if let Err(e) = answer(conn, &render) {
                                tracing::debug!("stats request failed: {e}");
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        Err(e) => {
                            tracing::warn!("stats accept failed: {e}");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })?;
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

fn answer(mut conn: TcpStream, render: &Render) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(1)))?;
    conn.set_write_timeout(Some(Duration::from_secs(1)))?;
    let mut req = [0u8; 1024];
    let mut have = 0;
    while have < req.len() {
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
}
