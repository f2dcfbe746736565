//! [`Workload`]: `workload.py` in the client namespace, and its JSON report as typed values.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{unix_ms, workload_script, HaLab, VIP4};
use crate::common::python;

/// What the workload does (see `workload.py`).
#[derive(Debug, Clone)]
pub struct WorkloadOpts {
    /// The VIP (IPv4 or IPv6).
    pub vip: String,
    /// Concurrent long downloads (each restarted 200 ms after it ends).
    pub downloads: usize,
    /// Bytes per download.
    pub download_bytes: u64,
    /// Pace of each download, bytes per second.
    pub download_rate: u64,
    /// A download that receives nothing for this long is broken.
    pub stall: Duration,
    /// A new short connection every this often.
    pub conn_interval: Duration,
    /// Each short connection must finish within this (connect, request, answer).
    pub conn_timeout: Duration,
    /// UDP flows (fixed source ports 10000.., one datagram per `udp_interval` each).
    pub udp_flows: usize,
    /// Interval of each UDP flow.
    pub udp_interval: Duration,
    /// The workload ends by itself after this long (a safety net: tests call [`Workload::stop`]).
    pub max_duration: Duration,
}

impl Default for WorkloadOpts {
    fn default() -> Self {
        WorkloadOpts {
            vip: VIP4.to_owned(),
            downloads: 20,
            download_bytes: 1 << 20,
            download_rate: 16 << 10,
            stall: Duration::from_secs(5),
            conn_interval: Duration::from_millis(50),
            conn_timeout: Duration::from_secs(3),
            udp_flows: 10,
            udp_interval: Duration::from_millis(50),
            max_duration: Duration::from_secs(600),
        }
    }
}

/// A running workload in the client namespace.
#[derive(Debug)]
pub struct Workload {
    name: String,
    out: PathBuf,
    stop_file: PathBuf,
    marks: PathBuf,
}

impl Workload {
    /// Starts `workload.py` in the client namespace with `opts`; returns once it runs.
    pub fn start(h: &mut HaLab, opts: &WorkloadOpts) -> Workload {
        let n = (1..)
            .find(|i| !h.procs.contains_key(&format!("workload-{i}")))
            .expect("a free workload number");
        let name = format!("workload-{n}");
        let out = h.lab.dir.join(format!("{name}.json"));
        let stop_file = h.lab.dir.join(format!("{name}.stop"));
        let marks = h.lab.dir.join(format!("{name}.marks"));
        std::fs::write(&marks, "").expect("marks file");
        let args: Vec<String> = vec![
            python().to_owned(),
            workload_script(),
            "--vip".into(),
            opts.vip.clone(),
            "--downloads".into(),
            opts.downloads.to_string(),
            "--download-bytes".into(),
            opts.download_bytes.to_string(),
            "--download-rate".into(),
            opts.download_rate.to_string(),
            "--stall-s".into(),
            format!("{:.3}", opts.stall.as_secs_f64()),
            "--conn-interval-ms".into(),
            opts.conn_interval.as_millis().to_string(),
            "--conn-timeout-s".into(),
            format!("{:.3}", opts.conn_timeout.as_secs_f64()),
            "--udp-flows".into(),
            opts.udp_flows.to_string(),
            "--udp-interval-ms".into(),
            opts.udp_interval.as_millis().to_string(),
            "--duration-s".into(),
            opts.max_duration.as_secs().to_string(),
            "--stop-file".into(),
            stop_file.to_string_lossy().into_owned(),
            "--mark-file".into(),
            marks.to_string_lossy().into_owned(),
            "--out".into(),
            out.to_string_lossy().into_owned(),
        ];
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        h.start("client", &name, &argv);
        let running = h.lab.wait_for(Duration::from_secs(20), || {
            h.log(&name).contains("running:").then_some(())
        });
        assert!(
            running.is_some(),
            "workload did not start: {}",
            h.log(&name)
        );
        Workload {
            name,
            out,
            stop_file,
            marks,
        }
    }

    /// Records a mark (Unix ms, e.g. a kill instant): the report's windows start at marks.
    pub fn mark(&self, unix_ms: u64) {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.marks)
            .expect("marks file");
        writeln!(f, "{unix_ms}").expect("write mark");
    }

    /// Records a mark now; returns it.
    pub fn mark_now(&self) -> u64 {
        let t = unix_ms();
        self.mark(t);
        t
    }

    /// Stops the workload and returns its report (panics, with the log, if it has none).
    pub fn stop(self, h: &mut HaLab) -> WorkloadReport {
        std::fs::write(&self.stop_file, "").expect("stop file");
        let code = h.wait_exit(&self.name, Duration::from_secs(30));
        h.stop(&self.name, Duration::from_secs(1));
        let text = std::fs::read_to_string(&self.out).unwrap_or_else(|e| {
            panic!(
                "workload wrote no report ({e}; exit {code:?}): {}",
                h.log(&self.name)
            )
        });
        let v: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("workload report is not JSON ({e}): {text}"));
        if let Some(err) = v.get("error") {
            panic!("workload failed: {err}\n{}", h.log(&self.name));
        }
        serde_json::from_value(v).unwrap_or_else(|e| panic!("workload report: {e}: {text}"))
    }
}

/// The summary `workload.py` prints (times are Unix ms unless a name says `_ms` relative).
#[derive(Debug, Clone, Deserialize)]
pub struct WorkloadReport {
    /// When the workload started.
    pub started_unix_ms: u64,
    /// When it stopped.
    pub ended_unix_ms: u64,
    /// The marks, sorted.
    pub marks: Vec<u64>,
    /// The long downloads.
    pub downloads: Downloads,
    /// The short connections.
    pub conns: Conns,
    /// The UDP flows.
    pub udp: Udp,
    /// `before` (start to the first mark), then one window per mark (to the next mark or the
    /// end).
    pub windows: Vec<Window>,
}

/// Totals of the long downloads.
#[derive(Debug, Clone, Deserialize)]
pub struct Downloads {
    /// Downloads started (finished + in flight at the end).
    pub started: u64,
    /// Complete with the right content.
    pub ok: u64,
    /// Ended without the whole content (reset, stall, early close) or corrupted.
    pub broken: u64,
    /// Content that differs from the expected bytes.
    pub corrupted: u64,
    /// Still running when the workload stopped (neither ok nor broken).
    pub in_flight: u64,
    /// Bytes received in all.
    pub bytes: u64,
    /// Every download (in-flight ones with `end_ms` 0).
    pub records: Vec<DownloadRecord>,
}

/// One download.
#[derive(Debug, Clone, Deserialize)]
pub struct DownloadRecord {
    /// Its slot (0..downloads).
    pub slot: u64,
    /// Start (Unix ms).
    pub start_ms: u64,
    /// End (Unix ms; 0 while in flight).
    pub end_ms: u64,
    /// Last data received (Unix ms; 0: none).
    pub last_byte_ms: u64,
    /// Bytes received.
    pub bytes: u64,
    /// Bytes expected.
    pub expected: u64,
    /// Complete and correct.
    pub ok: bool,
    /// Content differed.
    pub corrupted: bool,
    /// The backend that served it (its `X-Backend` header).
    pub backend: String,
    /// What went wrong.
    pub error: String,
}

/// Totals of the short connections.
#[derive(Debug, Clone, Deserialize)]
pub struct Conns {
    /// Attempts.
    pub attempts: u64,
    /// Answered.
    pub ok: u64,
    /// Failed (refused, reset, timed out).
    pub failed: u64,
    /// Answered, but after 900 ms or more (a lost SYN retransmitted).
    pub slow: u64,
    /// Answers per backend.
    pub backends: BTreeMap<String, u64>,
    /// The failures (at most 500).
    pub failures: Vec<ConnFailure>,
}

/// A failed short connection.
#[derive(Debug, Clone, Deserialize)]
pub struct ConnFailure {
    /// Attempt start (Unix ms).
    pub start_ms: u64,
    /// Failure (Unix ms).
    pub end_ms: u64,
    /// The error.
    pub error: String,
}

/// The UDP flows.
#[derive(Debug, Clone, Deserialize)]
pub struct Udp {
    /// One per source port.
    pub flows: Vec<UdpFlow>,
}

/// One UDP flow.
#[derive(Debug, Clone, Deserialize)]
pub struct UdpFlow {
    /// Its source port.
    pub sport: u16,
    /// Datagrams sent.
    pub sent: u64,
    /// Answers received.
    pub received: u64,
    /// Datagrams never answered (excluding the last second).
    pub lost: u64,
    /// When lost datagrams were sent (Unix ms, at most 200).
    pub lost_ms: Vec<u64>,
    /// Answers per backend.
    pub backends: BTreeMap<String, u64>,
    /// Each change of the answering backend.
    pub changes: Vec<BackendChange>,
    /// The longest time without an answer (start and end of the run included).
    pub longest_silence_ms: u64,
    /// When that silence began (Unix ms).
    pub longest_silence_from_ms: u64,
    /// The first answer (Unix ms; 0: none).
    pub first_reply_ms: u64,
}

/// A UDP flow's answers came from a new backend.
#[derive(Debug, Clone, Deserialize)]
pub struct BackendChange {
    /// The first answer from the new backend (Unix ms).
    pub t_ms: u64,
    /// The previous backend.
    pub from: String,
    /// The new one.
    pub to: String,
}

/// What happened in one window of time (see [`WorkloadReport::windows`]).
#[derive(Debug, Clone, Deserialize)]
pub struct Window {
    /// `before`, `mark0`, `mark1`, ...
    pub name: String,
    /// The mark (the start, for `before`).
    pub mark_unix_ms: u64,
    /// Window start.
    pub from_unix_ms: u64,
    /// Window end.
    pub to_unix_ms: u64,
    /// Short connections started in the window.
    pub conn_attempts: u64,
    /// Of which failed.
    pub conn_failed: u64,
    /// Start of the first failed one, relative to the mark.
    pub conn_first_fail_ms: Option<i64>,
    /// Start of the last failed one, relative to the mark.
    pub conn_last_fail_ms: Option<i64>,
    /// Answered after 900 ms or more.
    pub conn_slow: u64,
    /// Distinct errors (at most 10).
    pub conn_errors: Vec<String>,
    /// Downloads that ended in the window.
    pub downloads_ended: u64,
    /// Of which broken.
    pub downloads_broken: u64,
    /// Of which corrupted.
    pub downloads_corrupted: u64,
    /// UDP flows whose backend changed in the window.
    pub udp_flows_moved: u64,
    /// UDP datagrams sent in the window and never answered.
    pub udp_lost: u64,
    /// The longest UDP silence of any flow within the window (ms, from the mark at most).
    pub udp_longest_silence_ms: u64,
}

impl WorkloadReport {
    /// The window that starts at mark `i`.
    pub fn window(&self, i: usize) -> &Window {
        &self.windows[i + 1]
    }

    /// The window before the first mark.
    pub fn before(&self) -> &Window {
        &self.windows[0]
    }

    /// Downloads running at `unix_ms` (started before, ended after or still running).
    pub fn downloads_in_flight_at(&self, unix_ms: u64) -> usize {
        self.downloads
            .records
            .iter()
            .filter(|d| d.start_ms <= unix_ms && (d.end_ms == 0 || d.end_ms > unix_ms))
            .count()
    }

    /// The downloads that ended without their whole, correct content, one line each (slot,
    /// backend, bytes, error).
    pub fn broken_downloads(&self) -> Vec<String> {
        self.downloads
            .records
            .iter()
            .filter(|d| !d.ok && d.end_ms != 0)
            .map(|d| {
                format!(
                    "slot {} from {} ({} of {} bytes): {}",
                    d.slot, d.backend, d.bytes, d.expected, d.error
                )
            })
            .collect()
    }

    /// UDP flows whose backend changed at least once.
    pub fn udp_flows_moved(&self) -> usize {
        self.udp
            .flows
            .iter()
            .filter(|f| !f.changes.is_empty())
            .count()
    }

    /// The longest UDP silence of any flow (ms).
    pub fn longest_udp_silence_ms(&self) -> u64 {
        self.udp
            .flows
            .iter()
            .map(|f| f.longest_silence_ms)
            .max()
            .unwrap_or(0)
    }
}
