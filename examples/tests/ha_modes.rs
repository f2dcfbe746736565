//! The active/backup pair of `tun-balancer` where the connection sync is all that keeps a flow
//! on its backend across a `kill -9` of the master (topology and workload: `ha_lab`).
//!
//! - Modes `tunnel` and `dr`: the backends answer the client directly, so the balancer never
//!   sees a reply and nothing but its flow entry ties a flow to its backend. A flow the new
//!   master does not know is scheduled again (a mid-stream ACK joins as a new flow, as IPVS'
//!   sloppy TCP does) and, if it lands on another backend, that backend resets it.
//! - Mode `splice` (TCP; UDP in `nat`): the balancer opened each backend connection itself
//!   and translates sequence numbers and timestamps; a node that does not know a spliced
//!   connection's offsets cannot forward a byte of it (its mid-stream segments fail the SYN
//!   cookie check and are dropped), whichever backend it would pick.
//! - SIP with `affinity = "sip-call-id"` (mode `nat`): nothing but the call's Call-ID binding
//!   ties the messages of a call to the UAS that took its INVITE.
//!
//! Every test uses `scheduler = "random"` (seeded per process), on which two balancers that
//! share no state agree on a flow's backend one time in three only. With maglev (the lab's
//! default) both nodes pick the same backend without any sync, and a test that passes without
//! sync proves nothing. `rr` is not enough either: its cursor starts at the first backend on
//! both nodes, so flows that reach each node in the same order get the same backends (the
//! workload's ten UDP flows start as one burst: with `rr` and the sync defeated none of them
//! moved). The `*_without_sync_*` tests are the controls: the same run with the sync datagrams
//! dropped in the switch (heartbeats still pass, so the backup takes over exactly as before),
//! where flows must move and break. They show that the tests above can fail.
//!
//! What a synced pair cannot promise: the master sends what changed every sync tick (2 ms, see
//! `lb_examples::ha::TICK`), so a flow it created in its last tick before dying never reached
//! the backup. The assertions allow that for new connections ([`SYNC_SLACK_MS`]) and for one
//! SIP call.
//!
//! Run: `cargo test -p lb-examples --test ha_modes -- --nocapture` (root; the tests of this
//! file run one at a time: about 13 s for each mode test, 20 s for each SIP test, 120 s in
//! all).
#![allow(missing_docs)]

mod common;
mod ha_lab;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{need_root, need_tool};
use ha_lab::pair::{HaStatus, SIP_PORT};
use ha_lab::{pair_config, HaLab, PairOpts, Workload, WorkloadOpts, WorkloadReport};

/// The scheduler of these tests: one where two independent balancers disagree (see the module
/// docs for why not `rr`).
const SCHEDULER: &str = "random";
/// How long the workload runs before the kill (the flows are established and synced).
const BEFORE_KILL: Duration = Duration::from_secs(3);
/// How long it runs after the takeover: longer than the workload's stall limit (5 s), so a
/// download whose flow the new master sent elsewhere is reported broken.
const AFTER_TAKEOVER: Duration = Duration::from_millis(6500);
/// A new connection that started this long before the kill may have had its flow created in
/// the master's last sync tick (2 ms; 20 ms leaves room for a busy machine): its failure is
/// the asynchronous sync's known window, not a lost sync.
const SYNC_SLACK_MS: u64 = 20;
/// The backup becomes master within this of the kill (it takes ~360 ms: 3 adverts + skew).
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(5);

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The last 60 lines of both balancers' logs (for failure messages).
fn logs(h: &HaLab) -> String {
    let tail = |s: String| {
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    };
    format!(
        "=== balancer-l1\n{}\n=== balancer-l2\n{}",
        tail(h.log("balancer-l1")),
        tail(h.log("balancer-l2"))
    )
}

/// Waits until every backend of every service of node `node` is healthy.
fn wait_healthy(h: &HaLab, node: u8, timeout: Duration) {
    let ok = h.lab.wait_for(timeout, || {
        let s = h.stats(node)?;
        let b = s["backends"].as_array()?.clone();
        (!b.is_empty() && b.iter().all(|x| x["healthy"] == true)).then_some(())
    });
    assert!(
        ok.is_some(),
        "node {node}: backends not all healthy: {:?}\n{}",
        h.stats(node),
        logs(h)
    );
}

/// Asserts that node `node` sees every backend healthy now (called after the pair has run for
/// seconds: a backend starts presumed healthy, so [`wait_healthy`] alone can pass before the
/// first failed probes).
fn assert_healthy_now(h: &HaLab, node: u8, when: &str) {
    let s = h.stats(node);
    let down: Vec<String> = s
        .as_ref()
        .and_then(|s| s["backends"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter(|b| b["healthy"] != true)
        .map(|b| b["addr"].as_str().unwrap_or("?").to_owned())
        .collect();
    assert!(
        s.is_some() && down.is_empty(),
        "{when}: node {node} sees backends down: {down:?} (a backup would take over without \
         them)\n{}",
        logs(h)
    );
}

/// Starts both balancers in `mode` (the backends' servers already run): node 1 master, node 2
/// a backup whose bulk sync completed, every backend healthy on both.
fn start_pair(h: &mut HaLab, mode: &str, opts: &PairOpts) {
    h.start_balancer(1, mode, &pair_config(1, mode, opts));
    assert!(
        h.wait_role(1, "master", Duration::from_secs(5)),
        "node 1 never became master\n{}",
        logs(h)
    );
    h.start_balancer(2, mode, &pair_config(2, mode, opts));
    assert!(
        h.wait_synced(2, "backup", Duration::from_secs(10)),
        "node 2 is not a synced backup: {:?}\n{}",
        h.ha(2),
        logs(h)
    );
    for n in [1, 2] {
        wait_healthy(h, n, Duration::from_secs(10));
    }
}

/// The tag of the switch rule that defeats the sync.
const NOSYNC: &str = "nosync";

/// Drops the pair's sync datagrams in the switch, both ways, and lets the heartbeats pass:
/// every datagram to the HA port starts with a two-byte magic, `LC` (0x4c43) for sync and `LH`
/// for heartbeats; `@th,64,16` is the 16 bits after the 8-byte UDP header.
fn defeat_sync(h: &mut HaLab) {
    h.cut(
        NOSYNC,
        &format!("udp dport {} @th,64,16 0x4c43", ha_lab::HA_PORT),
    );
}

/// Sync datagrams the [`defeat_sync`] rule dropped.
fn sync_dropped(h: &HaLab) -> u64 {
    let out = h.sh("sw", &format!("nft list table bridge cut_{NOSYNC}"));
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {out}"))
}

/// A counter of the `ha.sync` object.
fn sync_counter(st: &HaStatus, name: &str) -> u64 {
    st.sync[name].as_u64().unwrap_or(0)
}

/// Whether the sync runs or is defeated (the control).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sync {
    On,
    Defeated,
}

/// What a kill under the workload measured.
struct KillRun {
    /// The `kill -9` instant (Unix ms).
    kill: u64,
    /// The new master's first forwarded packet − the kill (ms).
    gap: u64,
    /// The new master's takeover − the kill (ms).
    takeover: u64,
    /// Downloads running at the kill.
    downloads_at_kill: usize,
    /// The new master's `ha` object at the end.
    new_master: HaStatus,
    /// Records node 2 had installed before the kill.
    installed_before: u64,
    /// Sync datagrams the switch dropped (the control only).
    dropped: Option<u64>,
    report: WorkloadReport,
}

impl KillRun {
    /// Short connections that failed, with their start relative to the kill (ms).
    fn conn_failures(&self) -> Vec<(i64, String)> {
        self.report
            .conns
            .failures
            .iter()
            .map(|f| (f.start_ms as i64 - self.kill as i64, f.error.clone()))
            .collect()
    }

    fn print(&self, label: &str) {
        let r = &self.report;
        let w = r.window(0);
        println!(
            "{label}: kill -9 of the master: takeover after {} ms, first forward (gap) after {} ms",
            self.takeover, self.gap
        );
        println!(
            "{label}: downloads: {} in flight at the kill, {} broken, {} corrupted, {} ok, {} still running at the end",
            self.downloads_at_kill,
            r.downloads.broken,
            r.downloads.corrupted,
            r.downloads.ok,
            r.downloads.in_flight
        );
        for d in r
            .downloads
            .records
            .iter()
            .filter(|d| !d.ok && d.end_ms > 0)
            .take(5)
        {
            println!(
                "{label}:   broken download slot {} on {} at kill{:+} ms: {}",
                d.slot,
                d.backend,
                d.end_ms as i64 - self.kill as i64,
                d.error
            );
        }
        println!(
            "{label}: UDP flows moved to another backend: {} of {}; lost after the kill {}, longest silence {} ms",
            r.udp_flows_moved(),
            r.udp.flows.len(),
            w.udp_lost,
            w.udp_longest_silence_ms
        );
        println!(
            "{label}: new connections: {} attempts, {} failed ({} before the kill, {} after), {} slow; failures at kill+ms: {:?}",
            r.conns.attempts,
            r.conns.failed,
            r.before().conn_failed,
            w.conn_failed,
            r.conns.slow,
            self.conn_failures()
        );
        println!(
            "{label}: node 2 sync: installed {} before the kill, {} at the end; received {}; switch dropped {:?} sync datagrams",
            self.installed_before,
            sync_counter(&self.new_master, "installed"),
            sync_counter(&self.new_master, "received"),
            self.dropped
        );
    }
}

/// The pair in `mode` with [`SCHEDULER`], the standard workload, `kill -9` of the master, the
/// backup's takeover, [`AFTER_TAKEOVER`] of traffic, the workload's report.
fn kill_master_under_workload(tag: &str, mode: &str, sync: Sync) -> (HaLab, KillRun) {
    let mut h = HaLab::new(tag);
    let opts = PairOpts {
        scheduler: SCHEDULER,
        ..PairOpts::default()
    };
    h.prepare_mode(mode);
    h.start_servers();
    start_pair(&mut h, mode, &opts);
    if sync == Sync::Defeated {
        defeat_sync(&mut h);
        // The heartbeats still pass: node 2 stays a backup that hears the master.
        std::thread::sleep(Duration::from_millis(500));
        let st = h.ha(2).expect("node 2 stats");
        assert!(
            st.role == "backup" && st.peer_seen_ms_ago.is_some_and(|ms| ms < 300),
            "the sync cut also cut the heartbeats: {st:?}\n{}",
            logs(&h)
        );
    }
    let wopts = WorkloadOpts::default();
    let w = Workload::start(&mut h, &wopts);
    std::thread::sleep(BEFORE_KILL);
    let installed_before = h.ha(2).map_or(0, |s| sync_counter(&s, "installed"));
    if mode == "splice" {
        println!(
            "splice: node 1 {:?}; node 2 {:?} (before the kill)",
            splice_counters(&h, 1),
            splice_counters(&h, 2)
        );
    }
    assert_healthy_now(&h, 1, "before the kill");
    assert_healthy_now(&h, 2, "before the kill");
    let kill = h.kill_balancer(1);
    w.mark(kill);
    let took_over = h.wait_role(2, "master", TAKEOVER_TIMEOUT);
    if !took_over {
        let _ = w.stop(&mut h);
        panic!("node 2 did not take over: {:?}\n{}", h.ha(2), logs(&h));
    }
    std::thread::sleep(AFTER_TAKEOVER);
    let new_master = h.ha(2).expect("node 2 stats after the takeover");
    let dropped = (sync == Sync::Defeated).then(|| sync_dropped(&h));
    let report = w.stop(&mut h);
    let first_forward = new_master
        .first_forward_unix_ms
        .unwrap_or_else(|| panic!("the new master never forwarded: {new_master:?}"));
    let takeover = new_master.takeover_unix_ms.unwrap_or(0);
    let run = KillRun {
        kill,
        gap: first_forward.saturating_sub(kill),
        takeover: takeover.saturating_sub(kill),
        downloads_at_kill: report.downloads_in_flight_at(kill),
        new_master,
        installed_before,
        dropped,
        report,
    };
    (h, run)
}

/// The promises of a synced pair under a crash of its master, in a mode where the backends
/// answer the client directly.
fn assert_flows_kept(h: &HaLab, run: &KillRun, downloads: usize) {
    let r = &run.report;
    let ctx = || format!("{}\n{}", run_summary(run), logs(h));
    // The long downloads were all running through the kill, and every one went on with the
    // same backend: a reset (another backend), a stall or a byte out of place breaks one.
    assert_eq!(
        run.downloads_at_kill,
        downloads,
        "not every download ran through the kill\n{}",
        ctx()
    );
    assert_eq!(r.downloads.broken, 0, "broken downloads\n{}", ctx());
    assert_eq!(r.downloads.corrupted, 0, "corrupted downloads\n{}", ctx());
    // Every UDP flow kept its backend, and was answered again after the takeover (so "kept"
    // is not a flow that went silent).
    assert_eq!(r.udp_flows_moved(), 0, "UDP flows moved\n{}", ctx());
    assert!(
        r.longest_udp_silence_ms() < 3000,
        "a UDP flow was not answered after the takeover\n{}",
        ctx()
    );
    // New connections failed only within the takeover gap (from the kill, less the last sync
    // tick's flows, to the new master's first forwarded packet), and succeeded after it.
    let lo = -(SYNC_SLACK_MS as i64);
    let hi = run.gap as i64;
    let outside: Vec<(i64, String)> = run
        .conn_failures()
        .into_iter()
        .filter(|(t, _)| *t < lo || *t > hi)
        .collect();
    assert!(
        outside.is_empty(),
        "new connections failed outside the takeover gap [{lo}, {hi}] ms: {outside:?}\n{}",
        ctx()
    );
    let w = r.window(0);
    assert!(
        w.conn_attempts > w.conn_failed + 50,
        "too few new connections succeeded after the takeover\n{}",
        ctx()
    );
    // What the backup held came from the sync.
    assert!(
        run.installed_before > 0,
        "node 2 installed no synced flow before the kill\n{}",
        ctx()
    );
}

/// One line of what matters, for failure messages.
fn run_summary(run: &KillRun) -> String {
    let r = &run.report;
    format!(
        "gap {} ms; downloads at kill {}, broken {}, corrupted {}; UDP moved {}; conns failed {:?}; windows {:?}",
        run.gap,
        run.downloads_at_kill,
        r.downloads.broken,
        r.downloads.corrupted,
        r.udp_flows_moved(),
        run.conn_failures(),
        r.windows
    )
}

/// The control: with the sync dropped, the same crash moves UDP flows and breaks downloads.
fn assert_flows_lost(h: &HaLab, run: &KillRun) {
    let r = &run.report;
    let ctx = || format!("{}\n{}", run_summary(run), logs(h));
    assert!(
        run.dropped.unwrap_or(0) > 0,
        "the switch dropped no sync datagram\n{}",
        ctx()
    );
    assert_eq!(
        sync_counter(&run.new_master, "installed"),
        run.installed_before,
        "sync records reached node 2 through the cut\n{}",
        ctx()
    );
    assert!(
        r.udp_flows_moved() > 0,
        "without sync no UDP flow moved: the test cannot tell sync from luck\n{}",
        ctx()
    );
    assert!(
        r.downloads.broken > 0,
        "without sync no download broke: the test cannot tell sync from luck\n{}",
        ctx()
    );
}

/// Node `node`'s splice counters that tell a spliced connection's fate: (spliced here,
/// installed from the peer, translated towards the client).
fn splice_counters(h: &HaLab, node: u8) -> (u64, u64, u64) {
    let s = h.stats(node).and_then(|s| s.get("splice").cloned());
    let get = |k: &str| {
        s.as_ref()
            .and_then(|s| s.get(k))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
    };
    (get("spliced"), get("synced_in"), get("to_client"))
}

fn tools() -> bool {
    need_root() && need_tool("curl") && need_tool("nft")
}

fn kill_test(tag: &str, mode: &str, sync: Sync) {
    let _g = serial();
    let t0 = Instant::now();
    let (h, run) = kill_master_under_workload(tag, mode, sync);
    let label = match sync {
        Sync::On => format!("{mode}, {SCHEDULER}, synced"),
        Sync::Defeated => format!("{mode}, {SCHEDULER}, sync defeated"),
    };
    run.print(&label);
    match sync {
        Sync::On => assert_flows_kept(&h, &run, WorkloadOpts::default().downloads),
        Sync::Defeated => assert_flows_lost(&h, &run),
    }
    if mode == "splice" {
        // The downloads' connections were spliced by node 1; node 2 spliced none of them but
        // translated them after the takeover from what the sync installed (or, defeated,
        // installed nothing).
        let (_, synced_in, to_client) = splice_counters(&h, 2);
        println!("{label}: node 2 installed {synced_in} spliced connections, translated {to_client} segments to clients");
        match sync {
            Sync::On => assert!(
                synced_in >= WorkloadOpts::default().downloads as u64 && to_client > 0,
                "node 2: {synced_in} spliced connections installed, {to_client} segments translated"
            ),
            Sync::Defeated => assert_eq!(synced_in, 0),
        }
    }
    drop(h);
    println!("{label}: {:.1} s", t0.elapsed().as_secs_f64());
}

#[test]
fn tunnel_kill_master_flows_keep_their_backend() {
    if !tools() {
        return;
    }
    kill_test("hmtun", "tunnel", Sync::On);
}

#[test]
fn tunnel_kill_master_without_sync_flows_move() {
    if !tools() {
        return;
    }
    kill_test("hmtunx", "tunnel", Sync::Defeated);
}

#[test]
fn splice_kill_master_spliced_downloads_go_on() {
    if !tools() {
        return;
    }
    kill_test("hmspl", "splice", Sync::On);
}

#[test]
fn splice_kill_master_without_sync_spliced_downloads_break() {
    if !tools() {
        return;
    }
    kill_test("hmsplx", "splice", Sync::Defeated);
}

#[test]
fn dr_kill_master_flows_keep_their_backend() {
    if !tools() {
        return;
    }
    kill_test("hmdr", "dr", Sync::On);
}

#[test]
fn dr_kill_master_without_sync_flows_move() {
    if !tools() {
        return;
    }
    kill_test("hmdrx", "dr", Sync::Defeated);
}

// ---- SIP ------------------------------------------------------------------------------------
//
// With `affinity = "sip-call-id"` the data path keeps, per call, a persistence template keyed
// by (service, keyed hash of the Call-ID) in lb-conntrack's `PersistTable` (`TemplateKey::
// Affinity`) that names the call's backend; the NAT state is one flow entry per (client,
// backend). The master's sync log carries both: every template written is sent as a template
// record (`TemplateRecord`: key, backend, remaining and idle timeout), every NAT flow as a flow
// record with its SNAT address and port. The backup installs them, so after a takeover the
// ACK, the BYE and the retransmissions of a call in progress find the UAS that took its
// INVITE, and the UAS's answers to the SNAT address find their way back. With a consistent hash
// (maglev over the Call-ID hash, the pair sharing its hash key) a new master would pick the
// same UAS even without the templates; with `random` it sends the rest of a call to another
// UAS two times in three, which knows nothing of it.

/// Calls per run.
const CALLS: u32 = 300;
/// Calls per second: the run lasts CALLS / RATE = 15 s.
const CALL_RATE: u32 = 20;
/// The kill, into the UAC's run, plus a random part of one call interval (see
/// [`sip_kill_delay`]).
const SIP_KILL_AFTER: Duration = Duration::from_millis(7500);

/// [`SIP_KILL_AFTER`] plus 0..50 ms. sipp starts a call every 50 ms from its start, so a kill at
/// a fixed delay always lands at the same phase of that schedule, and when that phase is where
/// an INVITE has just passed the master, every run loses that call's binding (3 runs of 15 lost
/// one with a fixed 7.5 s): a random phase makes the test see the window as often as traffic
/// would.
fn sip_kill_delay() -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    SIP_KILL_AFTER + Duration::from_nanos(u64::from(nanos % 50_000_000))
}

fn sip_scenario(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sip")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// The data rows of a sipp CSV file (`;`-separated, first line the header) as maps.
fn csv_rows(path: &Path) -> Vec<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let header: Vec<&str> = header.split(';').collect();
    lines
        .map(|l| {
            header
                .iter()
                .zip(l.split(';'))
                .map(|(h, v)| ((*h).to_owned(), v.trim().to_owned()))
                .collect()
        })
        .collect()
}

fn num(row: &BTreeMap<String, String>, col: &str) -> u64 {
    row.get(col)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("column {col} missing or not a number in {row:?}"))
}

/// sipp's `CurrentTime` (`date<TAB>time<TAB>unix seconds`) as Unix ms.
fn row_unix_ms(row: &BTreeMap<String, String>) -> Option<u64> {
    let secs: f64 = row.get("CurrentTime")?.split('\t').nth(2)?.parse().ok()?;
    Some((secs * 1000.0) as u64)
}

/// What the UAC measured (its `-trace_stat` file, last row, and exit code).
#[derive(Debug, Clone, Copy, Default)]
struct Uac {
    exit: Option<i32>,
    created: u64,
    successful: u64,
    failed: u64,
    retransmissions: u64,
    unexpected: u64,
    /// Calls in progress at the kill (the last statistics row before it, every 200 ms).
    in_progress_at_kill: u64,
}

/// What one UAS saw (`-trace_counts`).
#[derive(Debug, Clone, Copy, Default)]
struct Uas {
    invites: u64,
    bye_answered: u64,
    unexpected: u64,
}

/// Starts a sipp UAS (`tests/sip/uas.xml`, which answers the SIP OPTIONS check too) on every
/// backend, with the options of the SIP tests (`-default_behaviors all,-bye`). Its per-message
/// counts show what the UAC's verdict can miss: a call split over two UASes that sipp's UAC
/// still counts successful.
fn start_uases(h: &mut HaLab) {
    for b in h.backends.clone() {
        let dir = h.lab.dir.join(format!("uas-{}", b.name));
        std::fs::create_dir_all(&dir).expect("uas dir");
        let script = format!(
            "cd '{}' && exec sipp -sf '{}' -i {} -p {SIP_PORT} -nostdin -trace_stat -stf uas.csv \
             -fd 1 -trace_counts -trace_err -error_file errors.log -default_behaviors all,-bye",
            dir.display(),
            sip_scenario("uas.xml"),
            b.v4
        );
        h.start(&b.name, &format!("uas-{}", b.name), &["sh", "-c", &script]);
    }
    for b in &h.backends {
        h.lab.wait_listen(&b.ns, "udp", SIP_PORT);
    }
}

/// Starts the UAC in the client: [`CALLS`] calls at [`CALL_RATE`] from 192.0.2.2:5060 to the
/// VIP; returns its statistics file.
fn start_uac(h: &mut HaLab) -> PathBuf {
    let dir = h.lab.dir.join("uac");
    std::fs::create_dir_all(&dir).expect("uac dir");
    let stf = dir.join("uac.csv");
    let stf_s = stf.to_string_lossy().into_owned();
    let err = dir.join("errors.log").to_string_lossy().into_owned();
    let (m, r) = (CALLS.to_string(), CALL_RATE.to_string());
    let target = format!("{}:{SIP_PORT}", ha_lab::VIP4);
    let uac = sip_scenario("uac.xml");
    h.start(
        "client",
        "uac",
        &[
            "sipp",
            "-sf",
            &uac,
            "-i",
            "192.0.2.2",
            "-p",
            "5060",
            "-m",
            &m,
            "-r",
            &r,
            "-rp",
            "1000",
            "-nostdin",
            "-trace_stat",
            "-stf",
            &stf_s,
            "-fd",
            "200ms",
            "-trace_err",
            "-error_file",
            &err,
            "-timeout",
            "50s",
            &target,
        ],
    );
    stf
}

/// Waits (bounded) for the UAC to finish; its numbers.
fn finish_uac(h: &mut HaLab, stf: &Path, kill: u64) -> Uac {
    let exit = h.wait_exit("uac", Duration::from_secs(55));
    if exit.is_none() {
        h.stop("uac", Duration::from_secs(1));
    }
    let rows = csv_rows(stf);
    let last = rows
        .last()
        .unwrap_or_else(|| panic!("no UAC statistics: {}", h.log("uac")));
    let in_progress_at_kill = rows
        .iter()
        .rev()
        .find(|r| row_unix_ms(r).is_some_and(|t| t <= kill))
        .map_or(0, |r| num(r, "CurrentCall"));
    Uac {
        exit,
        created: num(last, "TotalCallCreated"),
        successful: num(last, "SuccessfulCall(C)"),
        failed: num(last, "FailedCall(C)"),
        retransmissions: num(last, "Retransmissions(C)"),
        unexpected: num(last, "FailedUnexpectedMessage(C)")
            + num(last, "OutOfCallMsgs(C)")
            + num(last, "DeadCallMsgs(C)"),
        in_progress_at_kill,
    }
}

/// Each UAS's counts, after its next periodic dump (every second).
fn uas_results(h: &HaLab) -> Vec<(String, Uas)> {
    std::thread::sleep(Duration::from_millis(2200));
    h.backends
        .iter()
        .map(|b| {
            let dir = h.lab.dir.join(format!("uas-{}", b.name));
            let counts = std::fs::read_dir(&dir)
                .ok()
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .find(|p| p.to_string_lossy().ends_with("_counts.csv"))
                .unwrap_or_else(|| panic!("no UAS counts in {}", dir.display()));
            let rows = csv_rows(&counts);
            let row = rows
                .last()
                .unwrap_or_else(|| panic!("empty {}", counts.display()));
            let unexpected = row
                .iter()
                .filter(|(k, _)| k.ends_with("_Unexp"))
                .map(|(_, v)| v.parse::<u64>().unwrap_or(0))
                .sum();
            (
                b.name.clone(),
                Uas {
                    invites: num(row, "1_INVITE_Recv"),
                    bye_answered: num(row, "7_200_Sent"),
                    unexpected,
                },
            )
        })
        .collect()
}

/// The pair with the SIP service (mode `nat`, [`SCHEDULER`], Call-ID affinity), a UAC run,
/// `kill -9` of the master [`SIP_KILL_AFTER`] into it.
fn sip_kill_run(tag: &str, sync: Sync) -> (HaLab, Uac, Vec<(String, Uas)>) {
    let mut h = HaLab::new(tag);
    let opts = PairOpts {
        families: Vec::new(),
        scheduler: SCHEDULER,
        sip: true,
        ..PairOpts::default()
    };
    start_uases(&mut h);
    start_pair(&mut h, "nat", &opts);
    if sync == Sync::Defeated {
        defeat_sync(&mut h);
    }
    let stf = start_uac(&mut h);
    let kill_after = sip_kill_delay();
    std::thread::sleep(kill_after);
    // The backup must be ready to take over with every UAS. (This caught a bug, fixed in
    // 962d682: the `sip-options` probes of both nodes carried the same Call-IDs, so a UAS took
    // the backup's probes for repeats of the master's and did not answer them; the backup
    // marked UASes down and, after a takeover, re-placed the calls pinned to them.)
    assert_healthy_now(&h, 1, "before the kill");
    assert_healthy_now(&h, 2, "before the kill");
    let kill = h.kill_balancer(1);
    let took_over = h.wait_role(2, "master", TAKEOVER_TIMEOUT);
    assert!(
        took_over,
        "node 2 did not take over: {:?}\n{}",
        h.ha(2),
        logs(&h)
    );
    let uac = finish_uac(&mut h, &stf, kill);
    let per = uas_results(&h);
    let st = h.ha(2).expect("node 2 stats");
    let since_kill = |t: Option<u64>| t.map_or(-1, |t| t as i64 - kill as i64);
    let gap = since_kill(st.first_forward_unix_ms);
    let takeover = since_kill(st.takeover_unix_ms);
    let label = match sync {
        Sync::On => format!("sip, {SCHEDULER}, synced"),
        Sync::Defeated => format!("sip, {SCHEDULER}, sync defeated"),
    };
    println!(
        "{label}: kill -9 at {} ms into the run, {} calls in progress; takeover after {takeover} ms, first forward (gap) after {gap} ms",
        kill_after.as_millis(),
        uac.in_progress_at_kill
    );
    println!(
        "{label}: uac: exit {:?}, {} calls, {} successful, {} failed, {} retransmissions, {} unexpected messages",
        uac.exit, uac.created, uac.successful, uac.failed, uac.retransmissions, uac.unexpected
    );
    for (name, u) in &per {
        println!(
            "{label}: uas {name}: {} INVITEs, {} BYEs answered, {} unexpected messages",
            u.invites, u.bye_answered, u.unexpected
        );
    }
    println!(
        "{label}: node 2 sync installed {}, received {}",
        sync_counter(&st, "installed"),
        sync_counter(&st, "received")
    );
    (h, uac, per)
}

#[test]
fn sip_kill_master_mid_run_no_call_fails() {
    if !tools() || !need_tool("sipp") {
        return;
    }
    let _g = serial();
    let t0 = Instant::now();
    let (h, uac, per) = sip_kill_run("hmsip", Sync::On);
    let ctx = || format!("uac {uac:?}\nuas {per:?}\n{}\n{}", h.log("uac"), logs(&h));
    // sipp's own verdict: every call placed, every call successful.
    assert_eq!(uac.created, u64::from(CALLS), "{}", ctx());
    assert_eq!(uac.failed, 0, "failed calls\n{}", ctx());
    assert_eq!(uac.successful, u64::from(CALLS), "{}", ctx());
    assert_eq!(
        uac.exit,
        Some(0),
        "sipp exits 0 only when every call succeeded\n{}",
        ctx()
    );
    assert!(
        uac.in_progress_at_kill > 0,
        "no call was in progress at the kill\n{}",
        ctx()
    );
    // And on the UAS side: every call was completed by the UAS that took its INVITE, except at
    // most one call whose INVITE the master forwarded in its last sync tick: its binding never
    // reached the backup, so the new master places the call's next message (the INVITE's
    // retransmission, or the ACK) again, and the first UAS waits in vain for the ACK (one or two
    // UASes leave that call incomplete, one of them may count a second INVITE; sipp's UAC still
    // counts it successful). The master sends a new binding 1 ms after the INVITE at the
    // median, 2 ms at p90, 7.5 ms at p99 (measured on this lab under load), so at 20 calls/s
    // about one run in twenty loses one call; the damaged calls seen had their INVITE reach
    // their UAS ~10 ms after the kill instant (the `kill` command's own latency).
    let invites: u64 = per.iter().map(|(_, u)| u.invites).sum();
    let split = invites.saturating_sub(u64::from(CALLS));
    let incomplete: u64 = per
        .iter()
        .map(|(_, u)| u.invites.saturating_sub(u.bye_answered))
        .sum();
    println!(
        "sip, {SCHEDULER}, synced: calls the UASes left incomplete: {incomplete}; INVITEs on a second UAS: {split}"
    );
    assert!(
        invites >= u64::from(CALLS) && split <= 1 && incomplete <= 2,
        "more than the one call of the last sync tick was split over two UASes or left \
         incomplete ({incomplete} incomplete, {split} INVITEs on a second UAS)\n{}",
        ctx()
    );
    drop(h);
    println!(
        "sip, {SCHEDULER}, synced: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn sip_kill_master_without_sync_calls_fail() {
    if !tools() || !need_tool("sipp") {
        return;
    }
    let _g = serial();
    let t0 = Instant::now();
    let (h, uac, per) = sip_kill_run("hmsipx", Sync::Defeated);
    let dropped = sync_dropped(&h);
    println!("sip, {SCHEDULER}, sync defeated: the switch dropped {dropped} sync datagrams");
    // The control: the calls in progress at the kill lose their Call-ID binding (the rest of
    // the call goes to a UAS that does not know it, two times in three) and their NAT entry
    // (the UAS's retransmitted answers to the old SNAT port are dropped).
    assert!(dropped > 0, "the switch dropped no sync datagram");
    assert!(
        uac.failed > 0,
        "without sync no call failed: the test cannot tell sync from luck\nuac {uac:?}\nuas {per:?}\n{}",
        logs(&h)
    );
    drop(h);
    println!(
        "sip, {SCHEDULER}, sync defeated: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
