//! Announcing and withdrawing a VIP over BGP by driving a BIRD 2 daemon through its control
//! socket (the Unix socket `birdc` talks to), so that `tun-balancer` never speaks BGP itself.
//!
//! # Why BIRD, not ExaBGP or GoBGP
//! All three are Debian packages that a program can drive. BIRD was chosen because:
//! - **BFD** is built in (the router drops a dead balancer within interval × multiplier, a few
//!   hundred ms): ExaBGP has none, GoBGP only since 4.6 (Debian ships 3.10);
//! - **fate sharing**: a static route anchored on the balancer's TUN device is withdrawn by BIRD
//!   itself when the process dies; with ExaBGP's text API (or GoBGP's gRPC) a crashed balancer
//!   leaves its announcement in place until a health-check script notices;
//! - **the control socket** is a line protocol on a Unix socket (what `birdc` speaks), needing no
//!   Python runtime, gRPC stack or generated code in the balancer;
//! - the same daemon runs on the router in the tests (and on many real route servers).
//!
//! # The arrangement
//! Each balancer host runs its own BIRD, which holds the eBGP session (with BFD) to the
//! router; the VIP is a route of a `static` protocol exported to that session. Enabling the
//! protocol announces the VIP, disabling it withdraws it (BIRD sends the UPDATE at once):
//! ```text
//! protocol device { }
//! protocol static vip {
//!     ipv4;
//!     disabled;                         # nothing is announced until tun-balancer says so
//!     route 203.0.113.10/32 via "lb0";  # withdrawn by BIRD itself if lb0 disappears
//! }
//! protocol bfd { interface "front0" { interval 100 ms; multiplier 3; }; }
//! protocol bgp up0 {
//!     local 198.18.0.11 as 65001; neighbor 198.18.0.1 as 65000;
//!     ipv4 { import none; export where proto = "vip"; };
//!     bfd on;                           # not `graceful`: a dead balancer's routes must go
//! }                                     # and no `graceful restart on` (see below)
//! ```
//! - **`disabled;`**: a BIRD that starts (boot, restart after a crash) announces nothing until
//!   the balancer enables the protocol (*install before you announce*). The balancer therefore
//!   re-asserts the state it wants every second or so: [`Bird::enable`] and [`Bird::disable`]
//!   are idempotent (BIRD answers `already enabled` / `already disabled`).
//! - **`via "lb0"`** (the balancer's TUN device) rather than `blackhole`: when `tun-balancer`
//!   exits or crashes the kernel deletes its (non-persistent) device, and BIRD's device
//!   protocol turns the route unreachable and withdraws it by itself, with no call through this
//!   module (tests/ecmp_bgp.rs measures it). BIRD 2.0.12 looks at the device's existence and
//!   administrative state only, not its carrier: a *persistent* TUN device
//!   (`ip tuntap add`) left without its process still counts as up, so do not pre-create it.
//!   A stopped (SIGSTOP) or wedged whole process keeps its device and cannot withdraw: a
//!   supervisor that kills it (systemd `WatchdogSec=`) turns that into the crash case.
//! - **BFD** on the session makes the router drop the path of a dead host within its detection
//!   time (interval × multiplier); without it the hold timer (3 s at least) does.
//! - **Graceful restart** stays at BIRD's default (`aware`). With `graceful restart on` a
//!   balancer asks its neighbours to keep its routes through a restart: after a `kill -9` of
//!   its BIRD (TCP session closed, no BFD) the router kept the VIP's route to it (still there
//!   2 s later, checked by hand with 2.0.12 on both ends; the restart time defaults to 120 s),
//!   where the default withdrew it in ~30 ms. `bfd on` (not `graceful`) ends it either way.
//!
//! # Driving it (the HA thread)
//! - Hold an `Option<Bird>`; while it is `None`, [`Bird::connect`] at most once a second (the
//!   socket is missing or refuses while BIRD is down).
//! - Announce ([`Bird::enable`]) once the node can serve: data path running, backends checked,
//!   a bulk sync (if any) completed. Withdraw ([`Bird::disable`]) to drain, when the data-path
//!   watchdog fires, and on SIGTERM before exiting.
//! - Re-assert the wanted state every second and read [`Bird::protocol_up`] of the BGP
//!   protocol for the statistics (is the session to the router established?).
//! - On any `Err`, drop the connection and try again a second later; never retry in a loop.
//!   The call blocks the caller up to the timeout: from the HA thread, whose heartbeats wait
//!   meanwhile, use a short one (`set_timeout(100 ms)`; BIRD answers in well under 1 ms).
//!
//! Measured by `tests/ecmp_bgp.rs` (BIRD 2.0.12 on both ends, Linux 6.18): `disable` → the
//! router's kernel route lacks this node 5–12 ms later, `enable` → back in 4–25 ms; BFD
//! 100 ms × 3 drops an isolated node in 240–315 ms, the 3 s hold timer alone in 2.1–3.1 s;
//! a killed tun-balancer's route goes in 30–60 ms through the `via "lb0"` anchor. A withdrawal
//! sends all of this node's flows to the others, and the router's hash-threshold multipath
//! route also moves about a quarter of the others' flows between them when the first or last
//! of three next hops goes (none for the middle one): peers must place mid-flow packets they
//! do not know as this node would.
//!
//! # The control protocol
//! Read from BIRD's `nest/cli.c` and `doc/reply_codes`, and checked against BIRD 2.0.12 (the
//! unit tests hold replies captured from it). A client sends one command per line; every reply
//! is a sequence of lines
//! - `DDDD-text`: a line with reply code `DDDD`, more lines follow;
//! - ` text` (a leading space): a continuation line with the previous line's code;
//! - `DDDD text`: the last line of the reply;
//! - `+text`: an asynchronous log line (only after an `echo` command; skipped here).
//!
//! Codes `0xxx` report success, `1xxx` are table rows, `2xxx` table headings, `8xxx` run-time
//! errors and `9xxx` parse errors. Upon connection BIRD greets with `0001 BIRD 2.0.12 ready.`.
//! Examples:
//! ```text
//! > disable vip           < 0009-vip: disabled          (0008-vip: already disabled)
//!                         < 0000
//! > enable vip            < 0011-vip: enabled           (0010-vip: already enabled)
//!                         < 0000
//! > enable nosuch         < 9001 syntax error, unexpected CF_SYM_UNDEFINED, expecting ...
//! > show protocols vip    < 2002-Name       Proto      Table      State  Since         Info
//!                         < 1002-vip        Static     master4    up     16:37:00.993
//!                         < 0000
//! (on a socket restricted with `restrict`, or birdc -r)   > disable vip   < 8007 Access denied
//! ```
//!
//! # Use from a thread with a deadline
//! Every read and write waits at most the connection's timeout ([`DEFAULT_TIMEOUT`], see
//! [`Bird::set_timeout`]); the whole reply must arrive within it. BIRD answers these commands
//! in well under a millisecond, so a timeout means a stuck or overloaded daemon. After any
//! error other than an error *reply* (a timeout, a closed socket, a malformed line) the
//! connection is unusable — a late reply would be mistaken for the next one — and every call
//! returns [`io::ErrorKind::NotConnected`]: connect again (BIRD may have restarted). Error
//! replies leave the connection usable. `connect` itself does not time out: a Unix socket
//! connect blocks only while the daemon's listen backlog is full.
//!
//! Nothing BIRD sends can make this module panic: lines are parsed by [`ReplyParser`], which
//! bounds line and reply sizes and turns anything unexpected into an error.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long a reply may take unless [`Bird::set_timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);

/// The longest reply line accepted (BIRD's own limit, `CLI_LINE_SIZE`, is 512 bytes).
pub const MAX_LINE: usize = 4096;

/// The largest reply accepted, in bytes (a full routing table is not something to ask for on
/// this connection).
pub const MAX_REPLY: usize = 1 << 20;

/// BIRD's reply codes used here (`doc/reply_codes`).
pub mod code {
    /// The empty final line of a successful reply.
    pub const OK: u16 = 0;
    /// The greeting: `BIRD <version> ready.`
    pub const WELCOME: u16 = 1;
    /// `disable`: the protocol was disabled already.
    pub const ALREADY_DISABLED: u16 = 8;
    /// `disable`: the protocol is now disabled.
    pub const DISABLED: u16 = 9;
    /// `enable`: the protocol was enabled already.
    pub const ALREADY_ENABLED: u16 = 10;
    /// `enable`: the protocol is now enabled.
    pub const ENABLED: u16 = 11;
    /// `restrict`: this connection may only look from now on.
    pub const ACCESS_RESTRICTED: u16 = 16;
    /// A row of `show protocols`.
    pub const PROTOCOL_LIST: u16 = 1002;
    /// The heading of `show protocols`.
    pub const PROTOCOL_HEADING: u16 = 2002;
    /// The smallest error code (`8xxx` run-time, `9xxx` parse-time).
    pub const FIRST_ERROR: u16 = 8000;
    /// A pattern (`"v*"`) named no protocol.
    pub const NO_PROTOCOLS_MATCH: u16 = 8003;
    /// The connection is restricted.
    pub const ACCESS_DENIED: u16 = 8007;
    /// A command BIRD could not parse, e.g. one naming an undefined symbol.
    pub const PARSE_ERROR: u16 = 9001;
    /// A symbol that is not a protocol, or one whose protocol does not exist any more.
    pub const INVALID_SYMBOL: u16 = 9002;
}

/// One line of a reply: its code (a continuation line has the code of the line it continues)
/// and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyLine {
    /// The four-digit reply code.
    pub code: u16,
    /// The text after the code and its separator (lossily decoded as UTF-8).
    pub text: String,
}

/// A complete reply: its lines in order, the final one last.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reply {
    /// The lines (asynchronous `+` lines excluded).
    pub lines: Vec<ReplyLine>,
}

impl Reply {
    /// The code of the final line (0 for an empty reply, which [`ReplyParser`] never makes).
    pub fn code(&self) -> u16 {
        self.lines.last().map_or(code::OK, |l| l.code)
    }

    /// The first error line (`8xxx` or `9xxx`), if any.
    pub fn error(&self) -> Option<&ReplyLine> {
        self.lines.iter().find(|l| l.code >= code::FIRST_ERROR)
    }

    /// The reply itself when it holds no error line; else the error as an [`io::Error`]
    /// carrying BIRD's code and message (its kind: [`io::ErrorKind::NotFound`] for an unknown
    /// protocol, `PermissionDenied` on a restricted connection, `InvalidInput` for other
    /// parse errors, `Other` otherwise).
    pub fn check(self) -> io::Result<Reply> {
        match self.error() {
            None => Ok(self),
            Some(l) => Err(reply_error(l)),
        }
    }

    /// Whether a line has code `code` and text starting with `prefix`.
    pub fn has(&self, code: u16, prefix: &str) -> bool {
        self.lines
            .iter()
            .any(|l| l.code == code && l.text.starts_with(prefix))
    }
}

/// The [`io::Error`] for an error line.
fn reply_error(l: &ReplyLine) -> io::Error {
    let kind = match l.code {
        code::NO_PROTOCOLS_MATCH | code::INVALID_SYMBOL => io::ErrorKind::NotFound,
        // An undefined name is a parse error to BIRD (the grammar wants a known symbol).
        code::PARSE_ERROR if l.text.contains("CF_SYM_UNDEFINED") => io::ErrorKind::NotFound,
        code::PARSE_ERROR => io::ErrorKind::InvalidInput,
        code::ACCESS_DENIED => io::ErrorKind::PermissionDenied,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("BIRD: {:04} {}", l.code, l.text))
}

fn invalid_data(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Assembles replies from lines, without I/O: feed each line (without its `\n`) to
/// [`ReplyParser::push_line`], which returns the reply once its final line arrived.
///
/// Errors (a line that is neither `DDDD-`, `DDDD `, ` ` nor `+`; a continuation with no line
/// before it; a line longer than [`MAX_LINE`]; a reply larger than [`MAX_REPLY`]) leave the
/// parser in an unknown place of the stream: drop it with the connection.
#[derive(Debug, Default)]
pub struct ReplyParser {
    lines: Vec<ReplyLine>,
    /// The code a continuation line takes (the last `DDDD-` line's).
    last: Option<u16>,
    bytes: usize,
}

impl ReplyParser {
    /// A parser at the start of a reply.
    pub fn new() -> ReplyParser {
        ReplyParser::default()
    }

    /// Takes one line (a trailing `\r` is ignored); `Some` when it ended the reply.
    pub fn push_line(&mut self, line: &[u8]) -> io::Result<Option<Reply>> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > MAX_LINE {
            return Err(invalid_data(format!(
                "BIRD reply line of {} bytes (at most {MAX_LINE})",
                line.len()
            )));
        }
        self.bytes += line.len() + 1;
        if self.bytes > MAX_REPLY {
            return Err(invalid_data(format!(
                "BIRD reply longer than {MAX_REPLY} bytes"
            )));
        }
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        match line {
            [b'+', ..] => Ok(None),
            [b' ', rest @ ..] => match self.last {
                Some(code) => {
                    self.lines.push(ReplyLine {
                        code,
                        text: text(rest),
                    });
                    Ok(None)
                }
                None => Err(invalid_data(format!(
                    "BIRD continuation line without a code: {:?}",
                    text(line)
                ))),
            },
            [a, b, c, d, rest @ ..] if [a, b, c, d].iter().all(|x| x.is_ascii_digit()) => {
                let code = [a, b, c, d]
                    .iter()
                    .fold(0u16, |n, &&x| n * 10 + u16::from(x - b'0'));
                let (last, body) = match rest {
                    [] => (true, &[][..]),
                    [b' ', body @ ..] => (true, body),
                    [b'-', body @ ..] => (false, body),
                    _ => {
                        return Err(invalid_data(format!(
                            "malformed BIRD reply line {:?}",
                            text(line)
                        )))
                    }
                };
                self.lines.push(ReplyLine {
                    code,
                    text: text(body),
                });
                if last {
                    let reply = Reply {
                        lines: std::mem::take(&mut self.lines),
                    };
                    *self = ReplyParser::default();
                    Ok(Some(reply))
                } else {
                    self.last = Some(code);
                    Ok(None)
                }
            }
            _ => Err(invalid_data(format!(
                "malformed BIRD reply line {:?}",
                text(line)
            ))),
        }
    }
}

/// A row of `show protocols`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolStatus {
    /// The protocol's name.
    pub name: String,
    /// Its kind (`BGP`, `Static`, `BFD`, ...).
    pub proto: String,
    /// Its table (`master4`; `---` for BGP and BFD, whose tables are per channel).
    pub table: String,
    /// `up`, `down`, `start`, `stop` or `flush` (`nest/proto.c`, `proto_state_name`).
    pub state: String,
    /// When it entered that state, in the configured `timeformat protocol` (one or two words)
    /// and the protocol's own information (`Established`, `Active  Socket: Connection
    /// closed`, ...), as BIRD printed them.
    pub since_info: String,
}

impl ProtocolStatus {
    /// Whether the protocol is up (a BGP session: `Established`).
    pub fn is_up(&self) -> bool {
        self.state == "up"
    }
}

/// The rows of a `show protocols` reply (rows that do not have four columns are skipped).
pub fn parse_protocols(reply: &Reply) -> Vec<ProtocolStatus> {
    reply
        .lines
        .iter()
        .filter(|l| l.code == code::PROTOCOL_LIST)
        .filter_map(|l| {
            let (cols, rest) = split_fields::<4>(&l.text)?;
            let [name, proto, table, state] = cols;
            Some(ProtocolStatus {
                name: name.to_owned(),
                proto: proto.to_owned(),
                table: table.to_owned(),
                state: state.to_owned(),
                since_info: rest.trim_end().to_owned(),
            })
        })
        .collect()
}

/// The first `N` whitespace-separated fields of `s` and what follows them (trimmed at its
/// start); `None` when `s` has fewer fields.
fn split_fields<const N: usize>(s: &str) -> Option<([&str; N], &str)> {
    let mut out = [""; N];
    let mut rest = s;
    for f in &mut out {
        let t = rest.trim_start();
        let end = t.find(char::is_whitespace).unwrap_or(t.len());
        if end == 0 {
            return None;
        }
        *f = &t[..end];
        rest = &t[end..];
    }
    Some((out, rest.trim_start()))
}

/// Checks that `name` can be written into a command as a protocol symbol: a BIRD identifier
/// (`[A-Za-z_][A-Za-z0-9_]*`, at most 64 bytes). Anything else (spaces, quotes, a newline that
/// would start a second command) is refused before it reaches BIRD.
pub fn check_protocol_name(name: &str) -> io::Result<()> {
    let mut chars = name.chars();
    let ok = name.len() <= 64
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a BIRD protocol name"),
        ))
    }
}

/// A connection to BIRD's control socket.
#[derive(Debug)]
pub struct Bird {
    stream: UnixStream,
    /// Bytes read but not yet parsed (at most one partial line after a reply).
    buf: Vec<u8>,
    timeout: Duration,
    /// The greeting's text (`BIRD 2.0.12 ready.`).
    greeting: String,
    /// Set by an I/O or protocol error: the stream's position is unknown.
    broken: bool,
}

impl Bird {
    /// Connects to the control socket at `path` (BIRD's `-s` option; `/run/bird/bird.ctl` by
    /// default) and reads the greeting, waiting at most [`DEFAULT_TIMEOUT`] for it.
    pub fn connect(path: &Path) -> io::Result<Bird> {
        Bird::connect_timeout(path, DEFAULT_TIMEOUT)
    }

    /// [`Bird::connect`] with `timeout` for the greeting and every later reply.
    pub fn connect_timeout(path: &Path, timeout: Duration) -> io::Result<Bird> {
        let stream = UnixStream::connect(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot connect to BIRD at {}: {e}", path.display()),
            )
        })?;
        let mut bird = Bird {
            stream,
            buf: Vec::new(),
            timeout: nonzero(timeout),
            greeting: String::new(),
            broken: false,
        };
        let hello = bird.read_reply()?;
        match hello.lines.as_slice() {
            [l] if l.code == code::WELCOME => {
                bird.greeting = l.text.clone();
                Ok(bird)
            }
            _ => Err(invalid_data(format!(
                "unexpected greeting from {}: {hello:?}",
                path.display()
            ))),
        }
    }

    /// The greeting's text, e.g. `BIRD 2.0.12 ready.`
    pub fn greeting(&self) -> &str {
        &self.greeting
    }

    /// The reply timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sets the reply timeout (a zero duration is taken as 1 ms).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = nonzero(timeout);
    }

    /// Sends one command line and reads its reply. An error *reply* is returned as a reply
    /// (see [`Reply::check`]); `Err` means the exchange itself failed, after which the
    /// connection is unusable. `command` must not contain a line break.
    pub fn command(&mut self, command: &str) -> io::Result<Reply> {
        if self.broken {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the BIRD connection failed earlier: connect again",
            ));
        }
        if command.contains(['\n', '\r']) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a BIRD command is one line",
            ));
        }
        let result = self.exchange(command);
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    fn exchange(&mut self, command: &str) -> io::Result<Reply> {
        let mut line = Vec::with_capacity(command.len() + 1);
        line.extend_from_slice(command.as_bytes());
        line.push(b'\n');
        self.stream.set_write_timeout(Some(self.timeout))?;
        self.stream
            .write_all(&line)
            .map_err(|e| timed_out(e, self.timeout))?;
        self.read_reply()
    }

    /// Reads lines until a final one, within the timeout.
    fn read_reply(&mut self) -> io::Result<Reply> {
        let deadline = Instant::now() + self.timeout;
        let mut parser = ReplyParser::new();
        let mut chunk = [0u8; 4096];
        loop {
            while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                match parser.push_line(&line[..nl]) {
                    Ok(Some(reply)) => return Ok(reply),
                    Ok(None) => {}
                    Err(e) => {
                        self.broken = true;
                        return Err(e);
                    }
                }
            }
            if self.buf.len() > MAX_LINE {
                self.broken = true;
                return Err(invalid_data(format!(
                    "BIRD sent {} bytes without a line end",
                    self.buf.len()
                )));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.broken = true;
                return Err(timed_out_msg(self.timeout));
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.broken = true;
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "BIRD closed the control connection",
                    ));
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.broken = true;
                    return Err(timed_out(e, self.timeout));
                }
            }
        }
    }

    /// Enables protocol `protocol` (for the VIP's `static` protocol: announces the VIP). Done
    /// when BIRD says `enabled` or `already enabled`.
    pub fn enable(&mut self, protocol: &str) -> io::Result<()> {
        self.switch("enable", protocol, code::ENABLED, code::ALREADY_ENABLED)
    }

    /// Disables protocol `protocol` (for the VIP's `static` protocol: withdraws the VIP). Done
    /// when BIRD says `disabled` or `already disabled`.
    pub fn disable(&mut self, protocol: &str) -> io::Result<()> {
        self.switch("disable", protocol, code::DISABLED, code::ALREADY_DISABLED)
    }

    fn switch(&mut self, verb: &str, protocol: &str, done: u16, already: u16) -> io::Result<()> {
        check_protocol_name(protocol)?;
        let reply = self
            .command(&format!("{verb} {protocol}"))?
            .check()
            .map_err(|e| io::Error::new(e.kind(), format!("{verb} {protocol}: {e}")))?;
        let prefix = format!("{protocol}:");
        if reply.has(done, &prefix) || reply.has(already, &prefix) {
            Ok(())
        } else {
            Err(invalid_data(format!(
                "{verb} {protocol}: unexpected reply {reply:?}"
            )))
        }
    }

    /// The `show protocols` row of protocol `protocol`; `NotFound` when BIRD has none.
    pub fn protocol(&mut self, protocol: &str) -> io::Result<ProtocolStatus> {
        check_protocol_name(protocol)?;
        let reply = self
            .command(&format!("show protocols {protocol}"))?
            .check()
            .map_err(|e| io::Error::new(e.kind(), format!("show protocols {protocol}: {e}")))?;
        parse_protocols(&reply)
            .into_iter()
            .find(|p| p.name == protocol)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("show protocols {protocol}: no such row in {reply:?}"),
                )
            })
    }

    /// Whether protocol `protocol` is up: for the VIP's `static` protocol, whether it is
    /// enabled (announced); for a BGP protocol, whether the session is established.
    pub fn protocol_up(&mut self, protocol: &str) -> io::Result<bool> {
        self.protocol(protocol).map(|p| p.is_up())
    }
}

fn nonzero(d: Duration) -> Duration {
    d.max(Duration::from_millis(1))
}

fn timed_out_msg(timeout: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "no complete reply from BIRD within {} ms",
            timeout.as_millis()
        ),
    )
}

/// A socket timeout (`WouldBlock` / `TimedOut`) as a `TimedOut` error naming the timeout.
fn timed_out(e: io::Error, timeout: Duration) -> io::Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => timed_out_msg(timeout),
        _ => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;

    /// Feeds `text` line by line; the replies it completes and whatever error stopped it.
    fn parse_all(text: &str) -> (Vec<Reply>, Option<io::Error>) {
        let mut p = ReplyParser::new();
        let mut out = Vec::new();
        for line in text.split_terminator('\n') {
            match p.push_line(line.as_bytes()) {
                Ok(Some(r)) => out.push(r),
                Ok(None) => {}
                Err(e) => return (out, Some(e)),
            }
        }
        (out, None)
    }

    fn one(text: &str) -> Reply {
        let (mut v, e) = parse_all(text);
        assert!(e.is_none(), "{e:?}");
        assert_eq!(v.len(), 1, "{v:?}");
        v.remove(0)
    }

    fn line(code: u16, text: &str) -> ReplyLine {
        ReplyLine {
            code,
            text: text.to_owned(),
        }
    }

    // Replies below were captured from BIRD 2.0.12 (Debian bird2) on its control socket.

    #[test]
    fn greeting_and_enable_disable() {
        assert_eq!(
            one("0001 BIRD 2.0.12 ready.\n").lines,
            [line(1, "BIRD 2.0.12 ready.")]
        );
        let r = one("0009-vip: disabled\n0000 \n");
        assert_eq!(r.lines, [line(9, "vip: disabled"), line(0, "")]);
        assert!(r.has(code::DISABLED, "vip:"));
        assert!(r.clone().check().is_ok());
        assert!(one("0008-vip: already disabled\n0000 \n").has(code::ALREADY_DISABLED, "vip:"));
        assert!(one("0011-vip: enabled\n0000 \n").has(code::ENABLED, "vip:"));
        assert!(one("0010-vip: already enabled\n0000 \n").has(code::ALREADY_ENABLED, "vip:"));
    }

    #[test]
    fn errors_carry_bird_message_and_kind() {
        let e = one(
            "9001 syntax error, unexpected CF_SYM_UNDEFINED, expecting CF_SYM_KNOWN or TEXT or ALL\n",
        )
        .check()
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("9001 syntax error"), "{e}");
        let e = one("9001 syntax error, unexpected CF_SYM_UNDEFINED\n").check();
        assert_eq!(e.unwrap_err().kind(), io::ErrorKind::NotFound);
        let e = one("9001 syntax error, unexpected END\n").check();
        assert_eq!(e.unwrap_err().kind(), io::ErrorKind::InvalidInput);
        let e = one("8003 No protocols match\n").check();
        assert_eq!(e.unwrap_err().kind(), io::ErrorKind::NotFound);
        let e = one("8007 Access denied\n").check();
        assert_eq!(e.unwrap_err().kind(), io::ErrorKind::PermissionDenied);
        let e = one("9002 filter1 is not a protocol\n").check();
        assert_eq!(e.unwrap_err().kind(), io::ErrorKind::NotFound);
        // An error line in the middle of a reply is an error too.
        let e = one("0011-a: enabled\n8000-Reply too long\n0000 \n").check();
        assert_eq!(e.unwrap_err().kind(), io::ErrorKind::Other);
        assert_eq!(
            one("0016 Access restricted\n").code(),
            code::ACCESS_RESTRICTED
        );
    }

    #[test]
    fn continuation_lines_take_the_previous_code() {
        let r = one(
            "0010-device1: already enabled\n vip: already enabled\n bfd1: already enabled\n \
             up0: already enabled\n0000 \n",
        );
        assert_eq!(r.lines.len(), 5);
        assert!(r.lines[..4].iter().all(|l| l.code == code::ALREADY_ENABLED));
        assert!(r.has(code::ALREADY_ENABLED, "up0:"));
        let r = one("1007-Table master4:\n 203.0.113.10/32      unicast [vip 16:37:42.155] * (200)\n \tdev lb0\n0000 \n");
        assert_eq!(r.lines[2], line(1007, "\tdev lb0"));
    }

    #[test]
    fn show_protocols_rows() {
        let r = one(
            "2002-Name       Proto      Table      State  Since         Info\n\
             1002-device1    Device     ---        up     16:36:43.007  \n \
             vip        Static     master4    down   16:36:55.654  \n \
             bfd1       BFD        ---        up     16:36:43.007  \n \
             up0        BGP        ---        up     16:36:46.907  Established   \n0000 \n",
        );
        let rows = parse_protocols(&r);
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[1].name, "vip");
        assert_eq!(rows[1].proto, "Static");
        assert_eq!(rows[1].table, "master4");
        assert!(!rows[1].is_up());
        assert_eq!(rows[1].since_info, "16:36:55.654");
        assert!(rows[3].is_up());
        assert_eq!(rows[3].since_info, "16:36:46.907  Established");
        let r = one(
            "2002-Name       Proto      Table      State  Since         Info\n\
             1002-l1         BGP        ---        start  16:38:56.033  Active        Socket: Connection closed\n\
             0000 \n",
        );
        let rows = parse_protocols(&r);
        assert_eq!(rows[0].state, "start");
        assert!(rows[0].since_info.ends_with("Socket: Connection closed"));
        // `show protocols all NAME` adds 1006 detail lines, which are not rows.
        let r = one(
            "2002-Name       Proto      Table      State  Since         Info\n\
             1002-vip        Static     master4    up     16:37:00.993  \n\
             1006-  Channel ipv4\n     State:          UP\n     Table:          master4\n \n0000 \n",
        );
        assert_eq!(parse_protocols(&r).len(), 1);
        // A row too short to hold a state is skipped.
        assert!(parse_protocols(&one("1002-vip Static\n0000 \n")).is_empty());
    }

    #[test]
    fn async_lines_are_skipped_and_crlf_tolerated() {
        let r = one("+2026-12-03 16:36:55.654 <INFO> Disabling protocol vip\n0009-vip: disabled\r\n0000 \r\n");
        assert_eq!(r.lines, [line(9, "vip: disabled"), line(0, "")]);
        // A final line without the separator.
        assert_eq!(one("0000\n").lines, [line(0, "")]);
    }

    #[test]
    fn malformed_input_is_an_error() {
        for bad in [
            " orphan continuation\n",
            "abcd-x\n",
            "000-x\n",
            "0000x\n",
            "\n",
            "ready.\n",
        ] {
            let (replies, e) = parse_all(bad);
            assert!(replies.is_empty(), "{bad:?}");
            assert_eq!(
                e.map(|e| e.kind()),
                Some(io::ErrorKind::InvalidData),
                "{bad:?}"
            );
        }
        let long = format!("0000 {}\n", "x".repeat(MAX_LINE));
        assert!(parse_all(&long).1.is_some());
        let mut p = ReplyParser::new();
        let row = format!("1007-{}", "r".repeat(1000));
        let mut failed = false;
        for _ in 0..(MAX_REPLY / 1000 + 2) {
            if p.push_line(row.as_bytes()).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "an endless reply must be refused");
    }

    #[test]
    fn several_replies_in_one_stream() {
        let (v, e) =
            parse_all("0001 BIRD 2.0.12 ready.\n0011-vip: enabled\n0000 \n8007 Access denied\n");
        assert!(e.is_none());
        assert_eq!(v.len(), 3);
        assert_eq!(v[2].code(), code::ACCESS_DENIED);
    }

    #[test]
    fn protocol_names() {
        for ok in ["vip", "vip4", "_x", "up0", "a_b_C"] {
            assert!(check_protocol_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "4vip",
            "v ip",
            "vip\nshutdown",
            "\"v*\"",
            "all;",
            &"x".repeat(65),
        ] {
            assert_eq!(
                check_protocol_name(bad).unwrap_err().kind(),
                io::ErrorKind::InvalidInput,
                "{bad:?}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn parser_never_panics(lines in proptest::collection::vec(
            proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80), 0..20)) {
            let mut p = ReplyParser::new();
            for l in &lines {
                match p.push_line(l) {
                    Ok(Some(r)) => { let _ = parse_protocols(&r); let _ = r.check(); }
                    Ok(None) => {}
                    Err(_) => p = ReplyParser::new(),
                }
            }
        }

        #[test]
        fn rows_never_panic(text in "[ -~\t]{0,120}") {
            let r = Reply { lines: vec![ReplyLine { code: code::PROTOCOL_LIST, text }] };
            let _ = parse_protocols(&r);
        }
    }

    // ---- the client against a scripted server -------------------------------------------------

    /// A fresh temporary directory, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("lb-bgp-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("temp dir");
            TempDir(dir)
        }

        fn socket(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Serves one connection: sends `greeting`, then for each expected command line sends the
    /// scripted answer (`None`: stays silent for 2 s).
    fn serve(
        path: &Path,
        greeting: &'static str,
        script: Vec<(&'static str, Option<&'static str>)>,
    ) -> std::thread::JoinHandle<()> {
        let listener = UnixListener::bind(path).expect("bind");
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            s.write_all(greeting.as_bytes()).expect("greet");
            let mut r = io::BufReader::new(s.try_clone().expect("clone"));
            for (want, answer) in script {
                let mut got = String::new();
                if io::BufRead::read_line(&mut r, &mut got).unwrap_or(0) == 0 {
                    return;
                }
                assert_eq!(got, format!("{want}\n"));
                match answer {
                    // Split writes: the client must reassemble lines.
                    Some(a) => {
                        let (x, y) = a.split_at(a.len() / 2);
                        let _ = s.write_all(x.as_bytes());
                        std::thread::sleep(Duration::from_millis(5));
                        let _ = s.write_all(y.as_bytes());
                    }
                    None => std::thread::sleep(Duration::from_secs(2)),
                }
            }
        })
    }

    #[test]
    fn client_enables_disables_and_reads_state() {
        let dir = TempDir::new("ok");
        let path = dir.socket("bird.ctl");
        let server = serve(
            &path,
            "0001 BIRD 2.0.12 ready.\n",
            vec![
                ("enable vip", Some("0011-vip: enabled\n0000 \n")),
                ("disable vip", Some("0008-vip: already disabled\n0000 \n")),
                (
                    "show protocols vip",
                    Some("2002-Name       Proto      Table      State  Since         Info\n1002-vip        Static     master4    up     16:37:00.993  \n0000 \n"),
                ),
                ("enable nosuch", Some("9001 syntax error, unexpected CF_SYM_UNDEFINED, expecting CF_SYM_KNOWN or TEXT or ALL\n")),
                ("show protocols up0", Some("2002-Name       Proto      Table      State  Since         Info\n1002-up0        BGP        ---        start  16:38:56.033  Active        Socket: Connection closed\n0000 \n")),
                ("disable vip", Some("8007 Access denied\n")),
            ],
        );
        let mut b = Bird::connect(&path).expect("connect");
        assert_eq!(b.greeting(), "BIRD 2.0.12 ready.");
        b.enable("vip").expect("enable");
        b.disable("vip").expect("disable");
        assert!(b.protocol_up("vip").expect("show"));
        let e = b.enable("nosuch").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("CF_SYM_UNDEFINED"), "{e}");
        // An error reply leaves the connection usable.
        assert!(!b.protocol_up("up0").expect("show"));
        let e = b.disable("vip").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        // Refused before anything is sent.
        assert_eq!(
            b.enable("vip; shutdown").unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        server.join().expect("server");
    }

    #[test]
    fn silence_times_out_and_poisons_the_connection() {
        let dir = TempDir::new("slow");
        let path = dir.socket("bird.ctl");
        let server = serve(
            &path,
            "0001 BIRD 2.0.12 ready.\n",
            vec![("enable vip", None)],
        );
        let mut b = Bird::connect_timeout(&path, Duration::from_millis(100)).expect("connect");
        let t = Instant::now();
        let e = b.enable("vip").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        assert_eq!(
            b.enable("vip").unwrap_err().kind(),
            io::ErrorKind::NotConnected
        );
        server.join().expect("server");
    }

    #[test]
    fn bad_greetings_and_closed_sockets_are_errors() {
        let dir = TempDir::new("errors");
        let path = dir.socket("greet.ctl");
        let server = serve(&path, "0016 Access restricted\n", vec![]);
        let e = Bird::connect(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        server.join().expect("server");

        let path = dir.socket("closed.ctl");
        let server = serve(&path, "0001 BIRD 2.0.12 ready.\n", vec![]);
        let mut b = Bird::connect(&path).expect("connect");
        server.join().expect("server");
        let e = b.enable("vip").unwrap_err();
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::BrokenPipe
            ),
            "{e}"
        );

        let path = dir.socket("nobody.ctl");
        let e = Bird::connect(&path).unwrap_err();
        assert!(e.to_string().contains("cannot connect to BIRD"), "{e}");

        let path = dir.socket("garbage.ctl");
        let server = serve(&path, "Welcome to something else\n", vec![]);
        assert_eq!(
            Bird::connect(&path).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        server.join().expect("server");
    }
}
