//! Issue 16, the active/backup pair of `tun-balancer` in mode `nat`, end to end: every test
//! kills, stops, cuts or forges something while real clients talk to real servers through the
//! pair (topology, workload and the keepalived baseline: `ha_lab`; tunnel, dr and SIP:
//! `ha_modes.rs`).
//!
//! - `kill_master_repeatedly`: 10 × `kill -9` of whichever node is master, each killed node
//!   restarted as a backup: 0 downloads broken, 0 UDP flows moved, new connections fail only
//!   inside a takeover gap, and the gap (kill → first packet forwarded by the new master) is
//!   printed as p50 / max.
//! - `old_master_returns`: with `preempt = false` the returning higher-priority node stays
//!   backup and gets a bulk sync; with `preempt = true` it takes over only after its bulk sync
//!   completed: 0 broken flows either way.
//! - `split_brain_heals`: heartbeats cut both ways for 2 s (both nodes claim the addresses: how
//!   long is printed), then healed: one master within 1 s, no flow broken.
//! - `forged_and_replayed_messages`: captured genuine heartbeats and sync messages replayed, and
//!   altered copies (wrong MAC) sent, by a third host: no role change, nothing installed, every
//!   one counted.
//! - `replayed_sync_after_a_backup_restart`: sync datagrams captured from the master, replayed
//!   at the backup after it restarted (before its real stream opens): every one refused as
//!   `sync_unfresh`, nothing installed; the pair then syncs and fails over.
//! - `stalled_master_yields`: SIGSTOP of the master for 2 s: the backup takes over; after
//!   SIGCONT the old master steps down without a second takeover.
#![allow(missing_docs)]

mod common;
mod ha_lab;

use std::time::{Duration, Instant};

use common::{need_root, need_tool, python, tshark_read};
use ha_lab::{
    pair_config, peer_of, unix_ms, HaLab, PairOpts, Workload, WorkloadOpts, WorkloadReport,
};

/// The tests take turns: each measures takeover times on a 2-core machine.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn ready() -> bool {
    need_root() && need_tool("curl") && need_tool("tshark") && need_tool("dumpcap")
}

/// The `ha` object of node `n`'s statistics (`Null` while it does not answer).
fn ha(h: &HaLab, n: u8) -> serde_json::Value {
    h.stats(n)
        .and_then(|s| s.get("ha").cloned())
        .unwrap_or(serde_json::Value::Null)
}

fn num(v: &serde_json::Value, path: &[&str]) -> u64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_u64().unwrap_or(0)
}

/// Waits until node `n` is a backup whose bulk sync completed.
fn wait_synced_backup(h: &HaLab, n: u8, timeout: Duration) -> bool {
    h.lab
        .wait_for(timeout, || {
            let v = ha(h, n);
            (v["role"] == "backup" && v["synced"] == true).then_some(())
        })
        .is_some()
}

/// Starts node 1 (priority 200) and waits for it to be master, then node 2 (priority 100)
/// and waits for it to be a synced backup.
fn start_pair(h: &mut HaLab, opts: &PairOpts) {
    h.start_servers();
    h.start_balancer(1, "nat", &pair_config(1, "nat", opts));
    assert!(
        h.wait_role(1, "master", Duration::from_secs(5)),
        "node 1 never became master: {}",
        h.log("balancer-l1")
    );
    h.start_balancer(2, "nat", &pair_config(2, "nat", opts));
    assert!(
        wait_synced_backup(h, 2, Duration::from_secs(5)),
        "node 2 not a synced backup: {:?}\n{}",
        ha(h, 2),
        h.log("balancer-l2")
    );
}

/// Waits for node `n`'s first packet forwarded after a takeover at or after `since`; the gap.
fn takeover_gap(h: &HaLab, n: u8, since: u64) -> Option<u64> {
    h.lab.wait_for(Duration::from_secs(3), || {
        let v = ha(h, n);
        let f = v["first_forward_unix_ms"].as_u64()?;
        let t = v["takeover_unix_ms"].as_u64()?;
        (t >= since && f >= since).then(|| f - since)
    })
}

/// What every test asserts about the traffic: no download broken or corrupted, every UDP flow
/// on its backend, and traffic that really ran.
fn assert_sessions_whole(r: &WorkloadReport, what: &str) {
    println!(
        "{what}: downloads ok {} broken {} corrupted {} in flight {}; new conns {} ok / {} failed / {} slow; UDP flows moved {}, longest UDP silence {} ms",
        r.downloads.ok,
        r.downloads.broken,
        r.downloads.corrupted,
        r.downloads.in_flight,
        r.conns.ok,
        r.conns.failed,
        r.conns.slow,
        r.udp_flows_moved(),
        r.longest_udp_silence_ms()
    );
    let broken = r.broken_downloads();
    assert!(
        broken.is_empty(),
        "{what}: broken downloads:\n{}",
        broken.join("\n")
    );
    assert_eq!(r.downloads.corrupted, 0, "{what}: corrupted downloads");
    assert_eq!(
        r.udp_flows_moved(),
        0,
        "{what}: UDP flows changed backend: {:?}",
        r.udp
            .flows
            .iter()
            .filter(|f| !f.changes.is_empty())
            .map(|f| (f.sport, &f.changes))
            .collect::<Vec<_>>()
    );
    assert!(
        r.downloads.in_flight + r.downloads.ok >= 10,
        "{what}: the downloads did not run"
    );
    assert!(r.conns.ok > 20, "{what}: too few new connections succeeded");
}

#[test]
fn kill_master_repeatedly() {
    if !ready() {
        return;
    }
    let _g = serial();
    const KILLS: usize = 10;
    let mut h = HaLab::new("hakill");
    let opts = PairOpts::default();
    start_pair(&mut h, &opts);
    let w = Workload::start(&mut h, &WorkloadOpts::default());
    std::thread::sleep(Duration::from_secs(2));
    let mut master = 1u8;
    let mut gaps = Vec::new();
    let mut kills = Vec::new();
    for i in 0..KILLS {
        let backup = peer_of(master);
        assert!(
            wait_synced_backup(&h, backup, Duration::from_secs(10)),
            "kill {i}: node {backup} is not a synced backup: {:?}",
            ha(&h, backup)
        );
        // Traffic keeps flowing through the master for a moment: flows opened just now must
        // be synced too.
        std::thread::sleep(Duration::from_millis(700));
        let kill = h.kill_balancer(master);
        w.mark(kill);
        kills.push(kill);
        assert!(
            h.wait_role(backup, "master", Duration::from_secs(3)),
            "kill {i}: node {backup} did not take over: {}",
            h.log(&format!("balancer-l{backup}"))
        );
        let gap = takeover_gap(&h, backup, kill).unwrap_or_else(|| {
            panic!(
                "kill {i}: node {backup} forwarded nothing: {:?}",
                ha(&h, backup)
            )
        });
        gaps.push(gap);
        // The killed node comes back as a backup (preempt = false) and is resynced.
        h.start_balancer(master, "nat", &pair_config(master, "nat", &opts));
        master = backup;
    }
    std::thread::sleep(Duration::from_secs(1));
    let r = w.stop(&mut h);
    let mut sorted = gaps.clone();
    sorted.sort_unstable();
    let p50 = sorted[sorted.len() / 2];
    let max = sorted[sorted.len() - 1];
    println!(
        "takeover gap over {KILLS} kills (kill -9 -> first packet forwarded by the new master), advert_interval_ms = {}: p50 {p50} ms, max {max} ms; all: {gaps:?}",
        opts.advert_interval_ms
    );
    assert_sessions_whole(&r, "10 kills");
    // New connections fail only inside a takeover gap (a SYN lost in the gap is retried by the
    // client's kernel and counts as slow, not failed).
    for (i, gap) in gaps.iter().enumerate() {
        let win = r.window(i);
        if let Some(last) = win.conn_last_fail_ms {
            assert!(
                last <= *gap as i64 + 100,
                "kill {i}: a new connection failed {last} ms after the kill, the gap was {gap} ms: {:?}",
                win.conn_errors
            );
        }
    }
    assert!(
        r.windows.iter().map(|w| w.downloads_broken).sum::<u64>() == 0,
        "broken downloads in some window"
    );
    // A sanity bound, not the goal (500 ms, reported above): a takeover that needs seconds
    // means the election or the announcements are broken.
    assert!(max < 2000, "a takeover took {max} ms");
}

#[test]
fn old_master_returns() {
    if !ready() {
        return;
    }
    let _g = serial();
    let mut h = HaLab::new("haret");
    let opts = PairOpts::default();
    start_pair(&mut h, &opts);
    let w = Workload::start(&mut h, &WorkloadOpts::default());
    std::thread::sleep(Duration::from_secs(2));
    let kill = h.kill_balancer(1);
    w.mark(kill);
    assert!(h.wait_role(2, "master", Duration::from_secs(3)));
    std::thread::sleep(Duration::from_secs(1));

    // preempt = false: node 1 (priority 200) returns, is resynced and stays backup.
    h.start_balancer(1, "nat", &pair_config(1, "nat", &opts));
    assert!(
        wait_synced_backup(&h, 1, Duration::from_secs(5)),
        "node 1 not resynced: {:?}",
        ha(&h, 1)
    );
    std::thread::sleep(Duration::from_secs(3));
    let v1 = ha(&h, 1);
    assert_eq!(
        v1["role"], "backup",
        "preempt = false: node 1 took over: {v1}"
    );
    assert!(num(&v1, &["sync", "bulk_received"]) >= 1, "{v1}");
    assert_eq!(h.masters(), vec![2]);
    let entries = |n: u8| {
        h.stats(n)
            .map(|s| num(&s, &["conntrack", "entries"]))
            .unwrap_or(0)
    };
    let (e1, e2) = (entries(1), entries(2));
    println!("preempt = false: node 1 stays backup; flow entries node 1 {e1}, node 2 {e2}");
    // (Read one after the other while new connections keep coming: a few apart at most.)
    assert!(
        e1.abs_diff(e2) <= 10 + e2 / 20,
        "the backup's table differs: {e1} vs {e2}"
    );

    // preempt = true: node 1 restarts with it; it takes over, but only after its bulk sync.
    let t_restart = unix_ms();
    w.mark(t_restart);
    h.kill_balancer(1);
    let popts = PairOpts {
        preempt: true,
        ..PairOpts::default()
    };
    h.start_balancer(1, "nat", &pair_config(1, "nat", &popts));
    assert!(
        h.wait_role(1, "master", Duration::from_secs(5)),
        "preempt = true: node 1 did not take over: {}",
        h.log("balancer-l1")
    );
    assert!(h.wait_role(2, "backup", Duration::from_secs(2)));
    // The log of node 1's latest incarnation.
    let all = h.log("balancer-l1");
    let log = all.rsplit("--- balancer-l1").next().unwrap_or(&all);
    let synced_at = log
        .find("bulk sync complete")
        .expect("node 1 logged its bulk sync");
    let master_at = log
        .find("to=\"master\"")
        .expect("node 1 logged its takeover");
    assert!(
        synced_at < master_at,
        "node 1 took over before its bulk sync completed:\n{log}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let r = w.stop(&mut h);
    assert_sessions_whole(&r, "return of the old master");
}

#[test]
fn split_brain_heals() {
    if !ready() {
        return;
    }
    let _g = serial();
    let mut h = HaLab::new("hasplit");
    start_pair(&mut h, &PairOpts::default());
    let w = Workload::start(&mut h, &WorkloadOpts::default());
    std::thread::sleep(Duration::from_secs(2));
    let cut = unix_ms();
    w.mark(cut);
    h.cut_heartbeat();
    // While cut: poll who claims the addresses.
    let t0 = Instant::now();
    let mut both_ms = 0u64;
    let mut last = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        let both = h.masters().len() == 2;
        let now = Instant::now();
        if both {
            both_ms += (now - last).as_millis() as u64;
        }
        last = now;
        std::thread::sleep(Duration::from_millis(50));
    }
    h.heal_heartbeat();
    let healed = Instant::now();
    w.mark(unix_ms());
    let one = h.lab.wait_for(Duration::from_secs(3), || {
        (h.masters() == vec![1]).then_some(())
    });
    let settle = healed.elapsed();
    println!(
        "split brain: both nodes claimed master for about {both_ms} ms of the 2 s cut; one master {} ms after healing",
        settle.as_millis()
    );
    assert!(
        one.is_some(),
        "no single master after healing: {:?}",
        h.roles()
    );
    assert!(
        settle < Duration::from_millis(1000),
        "one master only {} ms after healing",
        settle.as_millis()
    );
    assert!(both_ms > 0, "the cut did not make node 2 take over");
    std::thread::sleep(Duration::from_secs(3));
    let r = w.stop(&mut h);
    assert_sessions_whole(&r, "split brain");
    let t = num(&ha(&h, 1), &["transitions"]);
    println!(
        "node 1 role changes: {t}; node 2: {}",
        num(&ha(&h, 2), &["transitions"])
    );
}

/// Sends the UDP payloads `hex` (one per line) from the client namespace to `to`.
fn send_from_client(h: &HaLab, to: &str, payloads: &[Vec<u8>]) {
    let hex: Vec<String> = payloads
        .iter()
        .map(|p| p.iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    let file = h.lab.write("replay.hex", &hex.join("\n"));
    let (ip, port) = to.rsplit_once(':').expect("addr:port");
    h.sh(
        "client",
        &format!(
            "{} -c 'import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nfor l in open(sys.argv[1]):\n    l=l.strip()\n    if l: s.sendto(bytes.fromhex(l),(sys.argv[2],int(sys.argv[3])))' {} {ip} {port}",
            python(),
            file.display()
        ),
    );
}

#[test]
fn forged_and_replayed_messages() {
    if !ready() {
        return;
    }
    let _g = serial();
    let mut h = HaLab::new("haforge");
    start_pair(&mut h, &PairOpts::default());
    // Capture, in full, what node 1 sends node 2 (heartbeats, sync records) while a burst of
    // connections makes records.
    let genuine = capture_from_node_1(&mut h, 30);
    let heartbeats = genuine.iter().filter(|p| p.starts_with(b"LH")).count();
    let syncs = genuine.iter().filter(|p| p.starts_with(b"LC")).count();
    assert!(
        heartbeats >= 10 && syncs >= 1,
        "captured {heartbeats} heartbeats, {syncs} sync messages"
    );
    // Let the refresh passes of the burst's flows go by: from now on node 1 sends no records.
    std::thread::sleep(Duration::from_secs(11));
    let before = [ha(&h, 1), ha(&h, 2)];
    // Forged: each genuine message with one byte changed (the MAC no longer matches), among
    // them "priority 255, master" heartbeats and resync requests.
    let mut forged: Vec<Vec<u8>> = genuine
        .iter()
        .map(|p| {
            let mut f = p.clone();
            let i = (p.len() / 2).max(4).min(p.len() - 1);
            f[i] ^= 0x5a;
            f
        })
        .collect();
    for p in genuine.iter().filter(|p| p.starts_with(b"LH")).take(5) {
        let mut f = p.clone();
        // Status body: seq (8), role, priority, load: claim master at 255.
        if f.len() > 26 {
            f[24] = 2;
            f[25] = 255;
        }
        forged.push(f);
    }
    send_from_client(&h, "192.0.2.12:7400", &genuine);
    send_from_client(&h, "192.0.2.12:7400", &forged);
    send_from_client(&h, "192.0.2.11:7400", &forged);
    std::thread::sleep(Duration::from_secs(1));
    let after = [ha(&h, 1), ha(&h, 2)];
    for n in 0..2 {
        println!(
            "node {}: auth drops {} -> {}, replay drops {} -> {}, records installed {} -> {}, role changes {} -> {}",
            n + 1,
            num(&before[n], &["drops", "auth"]),
            num(&after[n], &["drops", "auth"]),
            num(&before[n], &["drops", "replay"]),
            num(&after[n], &["drops", "replay"]),
            num(&before[n], &["sync", "installed"]),
            num(&after[n], &["sync", "installed"]),
            num(&before[n], &["transitions"]),
            num(&after[n], &["transitions"]),
        );
        assert_eq!(after[n]["role"], before[n]["role"]);
        assert_eq!(
            num(&after[n], &["transitions"]),
            num(&before[n], &["transitions"])
        );
        assert_eq!(
            num(&after[n], &["sync", "installed"]),
            num(&before[n], &["sync", "installed"]),
            "node {}: records installed from forged or replayed messages",
            n + 1
        );
        assert_eq!(
            num(&after[n], &["sync", "received"]),
            num(&before[n], &["sync", "received"])
        );
    }
    let auth2 = num(&after[1], &["drops", "auth"]) - num(&before[1], &["drops", "auth"]);
    let replay2 = num(&after[1], &["drops", "replay"]) - num(&before[1], &["drops", "replay"]);
    assert_eq!(auth2, forged.len() as u64, "every forged message counted");
    assert_eq!(
        replay2,
        genuine.len() as u64,
        "every replayed message counted"
    );
    // Node 1 drops the copies of its own messages as its own (heartbeats after their MAC check,
    // sync messages by their sender id): only the forged heartbeats count as forgeries there.
    assert!(num(&after[0], &["drops", "auth"]) > num(&before[0], &["drops", "auth"]));
    assert_eq!(h.masters(), vec![1]);
    // The pair still works.
    let ok = h.sh(
        "client",
        "curl -s -o /dev/null -w '%{http_code}' --max-time 3 http://203.0.113.10/",
    );
    assert_eq!(ok.trim(), "200");
}

/// The datagrams (heartbeats `LH`, sync `LC`) node 1 sends node 2 while `n` connections go
/// through the pair.
fn capture_from_node_1(h: &mut HaLab, n: usize) -> Vec<Vec<u8>> {
    let cap = h.lab.dir.join("genuine.pcapng");
    let capf = cap.to_string_lossy().into_owned();
    h.start(
        "l2",
        "cap-sync",
        &[
            "dumpcap",
            "-n",
            "-i",
            "front0",
            "-f",
            "udp dst port 7400 and src host 192.0.2.11",
            "-s",
            "0",
            "-w",
            &capf,
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    let ok = h.sh(
        "client",
        &format!("for i in $(seq 1 {n}); do curl -s -o /dev/null -w '%{{http_code}}\\n' --max-time 3 http://203.0.113.10/; done | grep -c 200"),
    );
    assert_eq!(
        ok.trim(),
        n.to_string(),
        "the burst through the pair failed"
    );
    std::thread::sleep(Duration::from_secs(1));
    h.signal("cap-sync", "INT");
    let _ = h.wait_exit("cap-sync", Duration::from_secs(10));
    tshark_read(&cap, &["-T", "fields", "-e", "udp.payload"])
        .lines()
        .map(|l| l.trim().replace(':', ""))
        .filter(|l| !l.is_empty())
        .map(|l| {
            (0..l.len() / 2)
                .map(|i| u8::from_str_radix(&l[2 * i..2 * i + 2], 16).expect("hex"))
                .collect()
        })
        .collect()
}

#[test]
fn replayed_sync_after_a_backup_restart() {
    if !ready() {
        return;
    }
    let _g = serial();
    let mut h = HaLab::new("hafresh");
    let opts = PairOpts::default();
    start_pair(&mut h, &opts);
    let mut genuine = capture_from_node_1(&mut h, 30);
    genuine.retain(|p| p.starts_with(b"LC"));
    assert!(!genuine.is_empty(), "no sync datagram captured");
    // Node 2 restarts while the pair's sync datagrams (UDP payload "LC") are cut, so its
    // stream from node 1 stays unopened; heartbeats go on (it stays a backup).
    h.stop("balancer-l2", Duration::from_secs(2));
    h.cut("sync", "udp dport 7400 @th,64,16 0x4c43");
    h.start_balancer(2, "nat", &pair_config(2, "nat", &opts));
    assert!(
        h.wait_role(2, "backup", Duration::from_secs(5)),
        "node 2 not back as a backup: {:?}",
        ha(&h, 2)
    );
    std::thread::sleep(Duration::from_millis(500));
    let before = ha(&h, 2);
    send_from_client(&h, "192.0.2.12:7400", &genuine);
    std::thread::sleep(Duration::from_secs(1));
    let after = ha(&h, 2);
    let unfresh =
        num(&after, &["drops", "sync_unfresh"]) - num(&before, &["drops", "sync_unfresh"]);
    println!(
        "replayed {} captured sync datagrams at the restarted backup: sync_unfresh +{unfresh}, installed {} -> {}, received {} -> {}, synced {}",
        genuine.len(),
        num(&before, &["sync", "installed"]),
        num(&after, &["sync", "installed"]),
        num(&before, &["sync", "received"]),
        num(&after, &["sync", "received"]),
        after["synced"]
    );
    assert_eq!(
        unfresh,
        genuine.len() as u64,
        "every replayed datagram refused: {after}"
    );
    assert_eq!(
        num(&after, &["sync", "installed"]),
        0,
        "replayed records installed"
    );
    assert_eq!(num(&after, &["sync", "received"]), 0);
    assert_eq!(after["synced"], false);
    // The cut heals: the backup asks with its challenge, the master's dump echoes it.
    h.heal("sync");
    let t0 = Instant::now();
    assert!(
        wait_synced_backup(&h, 2, Duration::from_secs(10)),
        "node 2 never synced after the replay: {:?}\n{}",
        ha(&h, 2),
        h.log("balancer-l2")
    );
    println!(
        "node 2 synced {} ms after the heal",
        t0.elapsed().as_millis()
    );
    assert!(
        num(&ha(&h, 2), &["sync", "installed"]) > 0,
        "{:?}",
        ha(&h, 2)
    );
    // And takes over.
    h.kill_balancer(1);
    assert!(
        h.wait_role(2, "master", Duration::from_secs(3)),
        "node 2 did not take over: {}",
        h.log("balancer-l2")
    );
    let ok = h.lab.wait_for(Duration::from_secs(3), || {
        let c = h.sh(
            "client",
            "curl -s -o /dev/null -w '%{http_code}' --max-time 2 http://203.0.113.10/",
        );
        (c.trim() == "200").then_some(())
    });
    assert!(ok.is_some(), "no service through node 2");
}

#[test]
fn stalled_master_yields() {
    if !ready() {
        return;
    }
    let _g = serial();
    let mut h = HaLab::new("hastall");
    start_pair(&mut h, &PairOpts::default());
    let w = Workload::start(&mut h, &WorkloadOpts::default());
    std::thread::sleep(Duration::from_secs(2));
    let stop = unix_ms();
    w.mark(stop);
    h.pause("balancer-l1");
    assert!(
        h.wait_role(2, "master", Duration::from_secs(2)),
        "node 2 did not take over from the stopped master"
    );
    let gap = takeover_gap(&h, 2, stop);
    std::thread::sleep(Duration::from_millis(
        2000u64.saturating_sub(unix_ms() - stop),
    ));
    h.resume("balancer-l1");
    let resumed = Instant::now();
    assert!(
        h.wait_role(1, "backup", Duration::from_secs(2)),
        "the old master did not step down: {:?}",
        ha(&h, 1)
    );
    println!(
        "SIGSTOP 2 s: takeover gap {gap:?} ms; the old master stepped down {} ms after SIGCONT",
        resumed.elapsed().as_millis()
    );
    // No second flap: node 2 stays master, having changed role once.
    for _ in 0..30 {
        assert_eq!(h.masters(), vec![2], "a second takeover: {:?}", h.roles());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(num(&ha(&h, 2), &["transitions"]), 1, "{}", ha(&h, 2));
    let log = h.log("balancer-l1");
    assert!(log.contains("did not run for"), "{log}");
    let r = w.stop(&mut h);
    assert_sessions_whole(&r, "SIGSTOP of the master");
}

/// `detector = "phi"`: the backup also judges the master by φ accrual over the arrival times of
/// its heartbeats; the takeover still works (3 kills), and the gaps are printed beside the
/// fixed timeout's.
#[test]
fn phi_detector_takes_over() {
    if !ready() {
        return;
    }
    let _g = serial();
    let mut h = HaLab::new("haphi");
    let opts = PairOpts::default();
    let phi = |n: u8| {
        pair_config(n, "nat", &opts)
            .replace("preempt = false\n", "preempt = false\ndetector = \"phi\"\n")
    };
    h.start_servers();
    h.start_balancer(1, "nat", &phi(1));
    assert!(h.wait_role(1, "master", Duration::from_secs(5)));
    h.start_balancer(2, "nat", &phi(2));
    assert!(wait_synced_backup(&h, 2, Duration::from_secs(5)));
    let w = Workload::start(&mut h, &WorkloadOpts::default());
    std::thread::sleep(Duration::from_secs(2));
    let mut master = 1u8;
    let mut gaps = Vec::new();
    for i in 0..3 {
        let backup = peer_of(master);
        assert!(
            wait_synced_backup(&h, backup, Duration::from_secs(10)),
            "kill {i}"
        );
        std::thread::sleep(Duration::from_millis(700));
        let kill = h.kill_balancer(master);
        w.mark(kill);
        assert!(
            h.wait_role(backup, "master", Duration::from_secs(3)),
            "kill {i}"
        );
        gaps.push(takeover_gap(&h, backup, kill).expect("the new master forwards"));
        h.start_balancer(master, "nat", &phi(master));
        master = backup;
    }
    std::thread::sleep(Duration::from_secs(1));
    let r = w.stop(&mut h);
    println!("phi detector: takeover gaps {gaps:?} ms");
    assert_sessions_whole(&r, "phi detector");
    // No false suspicion while both ran: each node changed role only at the kills.
    for n in 1..=2 {
        assert!(num(&ha(&h, n), &["transitions"]) <= 2, "{}", ha(&h, n));
    }
}

/// Node `n`'s tun-balancer process id.
fn balancer_pid(h: &HaLab, n: u8) -> u32 {
    h.pid(&format!("balancer-l{n}"))
        .unwrap_or_else(|| panic!("balancer-l{n} runs"))
}

/// The master's data-path thread alone stops for 3 s (frozen by the cgroup freezer, or held in
/// a ptrace-stop: `ha_lab/stall_thread.py`) while its other threads, the HA thread included,
/// keep running and would keep advertising it: the data-path watchdog makes it resign
/// (priority-0 advert, `fault`), the backup takes over, and when the thread runs again the old
/// master comes back as a backup, without a second takeover.
#[test]
fn datapath_stall_yields() {
    if !ready() {
        return;
    }
    let _g = serial();
    let mut h = HaLab::new("hawd");
    start_pair(&mut h, &PairOpts::default());
    let w = Workload::start(&mut h, &WorkloadOpts::default());
    std::thread::sleep(Duration::from_secs(2));
    let pid = balancer_pid(&h, 1);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ha_lab/stall_thread.py");
    let method = std::env::var("LB_STALL_METHOD").unwrap_or_else(|_| "freezer".into());
    let stall = unix_ms();
    w.mark(stall);
    h.start(
        "l1",
        "stall",
        &[
            "env",
            &format!("STALL_METHOD={method}"),
            python(),
            script,
            &pid.to_string(),
            "datapath-0",
            "3",
        ],
    );
    assert!(
        h.wait_role(2, "master", Duration::from_secs(3)),
        "node 2 did not take over from a master whose data path stalled: {}",
        h.log("balancer-l1")
    );
    let gap = takeover_gap(&h, 2, stall);
    assert_eq!(
        h.wait_exit("stall", Duration::from_secs(10)),
        Some(0),
        "{}",
        h.log("stall")
    );
    let released = Instant::now();
    assert!(
        h.wait_role(1, "backup", Duration::from_secs(3)),
        "node 1 did not come back as backup: {:?}",
        ha(&h, 1)
    );
    println!(
        "data path of the master stopped 3 s ({}): takeover gap {gap:?} ms (watchdog_ms = 1000); node 1 backup again {} ms after the thread ran",
        h.log("stall").lines().find(|l| l.contains("thread")).unwrap_or("").trim(),
        released.elapsed().as_millis()
    );
    for _ in 0..20 {
        assert_eq!(h.masters(), vec![2], "a second takeover: {:?}", h.roles());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(num(&ha(&h, 2), &["transitions"]), 1, "{}", ha(&h, 2));
    let log = h.log("balancer-l1");
    assert!(log.contains("the data path stalled (watchdog)"), "{log}");
    let r = w.stop(&mut h);
    assert_sessions_whole(&r, "data-path stall");
}
