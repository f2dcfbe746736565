//! The active/backup pair of `tun-balancer`, end to end: every test kills, stops, cuts or
//! forges something (topology and workload: `ha_lab`).
#![allow(missing_docs)]

mod common;
mod ha_lab;

use std::time::Duration;

use common::{need_root, need_tool};
use ha_lab::{pair_config, HaLab, PairOpts, Workload, WorkloadOpts};

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts both nodes in `mode`; waits for node 1 to be master and node 2 a synced backup.
fn start_pair(h: &mut HaLab, mode: &str, opts: &PairOpts) {
    h.prepare_mode(mode);
    h.start_servers();
    h.start_balancer(1, mode, &pair_config(1, mode, opts));
    assert!(h.wait_role(1, "master", Duration::from_secs(5)), "node 1 never became master: {}", h.log("balancer-l1"));
    h.start_balancer(2, mode, &pair_config(2, mode, opts));
    assert!(h.wait_role(2, "backup", Duration::from_secs(5)), "node 2 not backup: {}", h.log("balancer-l2"));
}

#[test]
fn smoke_kill_master_nat() {
    if !need_root() || !need_tool("curl") {
        return;
    }
    let _g = serial();
    let mut h = HaLab::new("hasmoke");
    start_pair(&mut h, "nat", &PairOpts::default());
    let w = Workload::start(&mut h, &WorkloadOpts::default());
    std::thread::sleep(Duration::from_secs(3));
    println!("before: {:?}", h.ha(1));
    println!("before: {:?}", h.ha(2));
    let kill = h.kill_balancer(1);
    w.mark(kill);
    assert!(h.wait_role(2, "master", Duration::from_secs(3)), "{}", h.log("balancer-l2"));
    std::thread::sleep(Duration::from_secs(3));
    let st = h.ha(2).unwrap();
    println!("after: {st:?}");
    let r = w.stop(&mut h);
    println!("downloads {:?} conns ok {} failed {} udp moved {} windows {:#?}", (r.downloads.ok, r.downloads.broken, r.downloads.in_flight), r.conns.ok, r.conns.failed, r.udp_flows_moved(), r.windows);
    println!("gap: {:?} ms", st.first_forward_unix_ms.map(|f| f as i64 - kill as i64));
    println!("{}", h.log("balancer-l2"));
}
