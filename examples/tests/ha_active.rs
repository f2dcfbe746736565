//! Issue 17, active-active (`[ha] mode = "active-active"`), end to end on the pair lab: both
//! balancers forward at once; the client namespace is the router, with a kernel ECMP route for
//! the VIP over both (`fib_multipath_hash_policy = 1`: by 5-tuple). Each node streams its flows
//! to the other. In mode `nat` each node has its own SNAT address, which the backends reach
//! through that node's floating back address (`[[ha.address]] node = N`); when a node dies, the
//! survivor holds that address too and answers the dead node's flows from the synced state.
//! (BGP with BFD instead of hand-edited next hops: `ecmp_bgp.rs`.)
//!
//! Each test runs the workload (20 paced downloads checked by content, a new connection every
//! 50 ms, 10 UDP flows), then: removes node 1's next hop and kills it (its flows move to node 2
//! mid-stream), restarts it (it joins with a bulk sync from node 2 and takes its address back),
//! and restores its next hop (ECMP moves some flows back to it mid-stream). 0 downloads broken,
//! 0 UDP flows moved to another backend.
#![allow(missing_docs)]

mod common;
mod ha_lab;

use std::time::Duration;

use common::{need_root, need_tool};
use ha_lab::{pair_config, HaLab, PairOpts, Workload, WorkloadOpts, AUTH_KEY, HA_PORT};

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Node `n`'s SNAT address in mode `nat`.
fn snat(n: u8) -> String {
    format!("203.0.113.{}", 100 + n)
}

/// Node `n`'s floating back address: the backends' next hop to [`snat`]`(n)`.
fn back(n: u8) -> String {
    format!("198.51.100.{}", 200 + n)
}

/// Node `n`'s configuration: the pair's services with `scheduler`, its own SNAT address, and an
/// active-active `[ha]` section.
fn config(n: u8, mode: &str, scheduler: &str) -> String {
    let base = pair_config(n, mode, &PairOpts::default());
    let base = &base[..base.find("[ha]").expect("an [ha] section")];
    let mut c = base
        .replace(
            "snat_addrs = [\"203.0.113.100\", \"2001:db8:100::100\"]",
            &format!("snat_addrs = [\"{}\"]", snat(n)),
        )
        .replace(
            "scheduler = \"maglev\"",
            &format!("scheduler = \"{scheduler}\""),
        );
    // IPv4 services only (one SNAT address per node).
    if let Some(v6) = c.find("\n[[service]]\nvip = \"[") {
        c.truncate(v6);
        c.push('\n');
    }
    let peer = 3 - n;
    c.push_str(&format!(
        "[ha]\nmode = \"active-active\"\nnode_id = {n}\nbind = \"192.0.2.1{n}:{HA_PORT}\"\n\
         peers = [\"192.0.2.1{peer}:{HA_PORT}\"]\nauth_key = \"{AUTH_KEY}\"\nadvert_interval_ms = 100\n"
    ));
    if mode == "nat" {
        for k in 1..=2u8 {
            c.push_str(&format!(
                "[[ha.address]]\ndev = \"back0\"\naddr = \"{}/24\"\nnode = {k}\n",
                back(k)
            ));
        }
    } else {
        // The backends answer the client directly, through their default route
        // (198.51.100.1): node 1's address, held by node 2 while node 1 is down.
        c.push_str("[[ha.address]]\ndev = \"back0\"\naddr = \"198.51.100.1/24\"\nnode = 1\n");
    }
    c
}

fn ha(h: &HaLab, n: u8) -> serde_json::Value {
    h.stats(n)
        .and_then(|s| s.get("ha").cloned())
        .unwrap_or(serde_json::Value::Null)
}

fn wait_active(h: &HaLab, n: u8) -> bool {
    h.lab
        .wait_for(Duration::from_secs(8), || {
            (ha(h, n)["role"] == "active").then_some(())
        })
        .is_some()
}

/// The client's route to the VIP over the balancers `nodes`.
fn route(h: &HaLab, nodes: &[u8]) {
    let hops: Vec<String> = nodes
        .iter()
        .map(|n| format!("nexthop via 192.0.2.1{n} dev c0"))
        .collect();
    h.sh(
        "client",
        &format!("ip route replace 203.0.113.10/32 {}", hops.join(" ")),
    );
}

fn flows(h: &HaLab, n: u8) -> u64 {
    h.stats(n)
        .and_then(|s| s["backends"].as_array().cloned())
        .map(|b| b.iter().map(|x| x["flows"].as_u64().unwrap_or(0)).sum())
        .unwrap_or(0)
}

fn start(h: &mut HaLab, n: u8, mode: &str, scheduler: &str) {
    h.start_balancer(n, mode, &config(n, mode, scheduler));
    if mode == "nat" {
        for k in 1..=2u8 {
            h.sh(
                &format!("l{n}"),
                &format!("ip route replace {}/32 dev lb0", snat(k)),
            );
        }
    }
}

fn run(tag: &str, mode: &str, scheduler: &str) {
    if !need_root() || !need_tool("curl") {
        return;
    }
    let _g = serial();
    let mut h = HaLab::new(tag);
    h.prepare_mode(mode);
    h.start_servers();
    h.sh("client", "sysctl -qw net.ipv4.fib_multipath_hash_policy=1");
    if mode == "nat" {
        for b in h.backends.clone() {
            for k in 1..=2u8 {
                h.lab
                    .ip(&b.ns, &format!("route add {}/32 via {}", snat(k), back(k)));
            }
        }
    }
    for n in 1..=2u8 {
        start(&mut h, n, mode, scheduler);
    }
    for n in 1..=2u8 {
        assert!(wait_active(&h, n), "node {n} not active: {:?}", ha(&h, n));
    }
    route(&h, &[1, 2]);
    let w = Workload::start(&mut h, &WorkloadOpts::default());
    std::thread::sleep(Duration::from_secs(3));
    let (f1, f2) = (flows(&h, 1), flows(&h, 2));
    println!("{mode}/{scheduler}: flows created by node 1: {f1}, node 2: {f2}");
    assert!(
        f1 > 0 && f2 > 0,
        "ECMP did not spread the flows: {f1} / {f2}"
    );

    // Node 1 leaves the route, then dies: its flows reach node 2 mid-stream.
    route(&h, &[2]);
    let kill = h.kill_balancer(1);
    w.mark(kill);
    if mode == "nat" {
        let took = h.lab.wait_for(Duration::from_secs(3), || {
            let held = ha(&h, 2)["held"].to_string();
            held.contains(&back(1)).then_some(())
        });
        assert!(
            took.is_some(),
            "node 2 did not take node 1's address: {:?}",
            ha(&h, 2)
        );
        println!(
            "{mode}: node 2 holds node 1's SNAT next hop {} ms after the kill",
            ha_lab::unix_ms() - kill
        );
    }
    std::thread::sleep(Duration::from_secs(4));

    // Node 1 comes back: it joins (bulk sync), takes its address back, and gets its share of
    // the flows again, mid-stream.
    start(&mut h, 1, mode, scheduler);
    assert!(wait_active(&h, 1), "node 1 did not rejoin: {:?}", ha(&h, 1));
    let back_at = ha_lab::unix_ms();
    w.mark(back_at);
    route(&h, &[1, 2]);
    std::thread::sleep(Duration::from_secs(4));
    let r = w.stop(&mut h);
    let v1 = ha(&h, 1);
    println!(
        "{mode}/{scheduler}: downloads ok {} broken {} corrupted {} in flight {}; conns {} ok / {} failed / {} slow; UDP flows moved {}; node 1 after rejoining: {v1}",
        r.downloads.ok,
        r.downloads.broken,
        r.downloads.corrupted,
        r.downloads.in_flight,
        r.conns.ok,
        r.conns.failed,
        r.conns.slow,
        r.udp_flows_moved()
    );
    let broken = r.broken_downloads();
    assert!(
        broken.is_empty(),
        "broken downloads:\n{}",
        broken.join("\n")
    );
    assert_eq!(r.downloads.corrupted, 0);
    assert_eq!(r.udp_flows_moved(), 0, "UDP flows changed backend");
    if mode == "nat" {
        assert!(
            v1["held"].to_string().contains(&back(1)),
            "node 1 did not take its address back: {v1}"
        );
    }
}

#[test]
fn active_active_nat() {
    run("aanat", "nat", "wlc");
}

#[test]
fn active_active_tunnel() {
    run("aatun", "tunnel", "rr");
}
