//! Issue 17 through real BGP: three `tun-balancer`s in `[ha] mode = "active-active"` behind a
//! BIRD router's ECMP route (`ha_lab::ecmp`). Each balancer drives its own BIRD over the control
//! socket (`bgp_socket`): it announces the VIP once it serves, after its bulk sync. Mode `nat`
//! with a stateful scheduler (`wlc`), each node with its own SNAT address whose next hop on the
//! backends' side is the node's back address, a floating address the lowest serving node takes
//! over when its owner dies.
//!
//! The test runs paced downloads (content-hashed) and a new connection every 50 ms through the
//! router, `kill -9`s one balancer, measures the time until the router's route loses it, and
//! restarts it: 0 downloads broken, the restarted node announces again only after its bulk sync.
#![allow(missing_docs)]

mod common;
mod ha_lab;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{need_root, need_tool, python};
use ha_lab::ecmp::{back_addr, balancer_config, front_addr, snat_addr, Anchor, EcmpLab, EcmpOpts};
use ha_lab::{workload_script, WorkloadReport, AUTH_KEY, HA_PORT};

/// Node `n`'s configuration: the lab's `nat` one with `wlc`, plus the active-active section.
fn config(lab: &EcmpLab, n: u8, nodes: u8) -> String {
    let mut c =
        balancer_config(n, &lab.backends).replace("scheduler = \"maglev\"", "scheduler = \"wlc\"");
    let peers: Vec<String> = (1..=nodes)
        .filter(|&k| k != n)
        .map(|k| format!("\"{}:{HA_PORT}\"", front_addr(k)))
        .collect();
    c.push_str(&format!(
        "\n[ha]\nmode = \"active-active\"\nnode_id = {n}\nbind = \"{}:{HA_PORT}\"\npeers = [{}]\n\
         auth_key = \"{AUTH_KEY}\"\nadvert_interval_ms = 100\nbgp_socket = \"{}\"\n",
        front_addr(n),
        peers.join(", "),
        lab.bird_socket(&format!("l{n}")).display()
    ));
    for k in 1..=nodes {
        c.push_str(&format!(
            "[[ha.address]]\ndev = \"back0\"\naddr = \"{}/24\"\nnode = {k}\n",
            back_addr(k)
        ));
    }
    c
}

fn ha(lab: &EcmpLab, n: u8) -> serde_json::Value {
    lab.try_sh(
        &format!("l{n}"),
        "curl -sS --max-time 2 http://127.0.0.1:9100/",
    )
    .ok()
    .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
    .map(|v| v["ha"].clone())
    .unwrap_or(serde_json::Value::Null)
}

fn start(lab: &mut EcmpLab, n: u8, nodes: u8) {
    let c = config(lab, n, nodes);
    lab.start_balancer(n, &c);
    // Every node routes every node's SNAT address to its device: it answers a dead peer's
    // flows once it holds that peer's back address.
    for k in 1..=nodes {
        lab.sh(
            &format!("l{n}"),
            &format!("ip route replace {}/32 dev lb0", snat_addr(k)),
        );
    }
}

/// `workload.py` in the client namespace (downloads and new connections; no UDP service here).
struct Load {
    name: String,
    out: PathBuf,
    stop: PathBuf,
}

fn start_load(lab: &mut EcmpLab) -> Load {
    let out = lab.lab.dir.join("load.json");
    let stop = lab.lab.dir.join("load.stop");
    let marks = lab.lab.dir.join("load.marks");
    std::fs::write(&marks, "").expect("marks");
    let script = workload_script();
    let (o, s, m) = (
        out.to_string_lossy().into_owned(),
        stop.to_string_lossy().into_owned(),
        marks.to_string_lossy().into_owned(),
    );
    let argv = [
        python(),
        &script,
        "--vip",
        "203.0.113.10",
        "--downloads",
        "12",
        "--download-bytes",
        "1048576",
        "--download-rate",
        "16384",
        "--stall-s",
        "5",
        "--conn-interval-ms",
        "50",
        "--conn-timeout-s",
        "3",
        "--udp-flows",
        "0",
        "--udp-interval-ms",
        "50",
        "--duration-s",
        "300",
        "--stop-file",
        &s,
        "--mark-file",
        &m,
        "--out",
        &o,
    ];
    lab.start("client", "load", &argv);
    let running = lab.lab.wait_for(Duration::from_secs(20), || {
        lab.log("load").contains("running:").then_some(())
    });
    assert!(
        running.is_some(),
        "workload did not start: {}",
        lab.log("load")
    );
    Load {
        name: "load".into(),
        out,
        stop,
    }
}

fn stop_load(lab: &mut EcmpLab, l: Load) -> WorkloadReport {
    std::fs::write(&l.stop, "").expect("stop file");
    let _ = lab.lab.wait_for(Duration::from_secs(30), || {
        std::fs::metadata(&l.out).ok().filter(|m| m.len() > 0)
    });
    lab.stop(&l.name, Duration::from_secs(1));
    let text = std::fs::read_to_string(&l.out)
        .unwrap_or_else(|e| panic!("no workload report ({e}): {}", lab.log(&l.name)));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("workload report: {e}: {text}"))
}

#[test]
fn active_active_behind_bgp_ecmp() {
    if !need_root() || !need_tool("bird") || !need_tool("curl") {
        return;
    }
    const N: u8 = 3;
    let opts = EcmpOpts {
        anchor: Anchor::Device("lb0".into()),
        start_disabled: true,
        ..EcmpOpts::default()
    };
    let mut lab = EcmpLab::new("aabgp", opts);
    lab.start_servers();
    lab.start_birds();
    for n in 1..=N {
        start(&mut lab, n, N);
    }
    let all: std::collections::BTreeSet<u8> = (1..=N).collect();
    assert!(
        lab.wait_next_hops(&all, Instant::now(), Duration::from_secs(15))
            .is_some(),
        "the balancers did not announce the VIP: {:?}\n{}",
        lab.next_hops(),
        lab.bird_report()
    );
    for n in 1..=N {
        assert_eq!(ha(&lab, n)["role"], "active", "{}", ha(&lab, n));
        assert_eq!(ha(&lab, n)["announced"], true);
    }
    let load = start_load(&mut lab);
    std::thread::sleep(Duration::from_secs(3));

    // Node 2 dies: its TUN device goes with it, so its BIRD withdraws at once (the static
    // route's anchor); BFD would catch a whole node.
    let t = lab.kill9("balancer-l2");
    let rest: std::collections::BTreeSet<u8> = [1, 3].into_iter().collect();
    let gone = lab.wait_next_hops(&rest, t, Duration::from_secs(5));
    println!("kill -9 of node 2 -> the router drops its next hop after {gone:?}");
    assert!(
        gone.is_some(),
        "the router kept node 2: {:?}",
        lab.next_hops()
    );
    let took = lab.lab.wait_for(Duration::from_secs(3), || {
        ha(&lab, 1)["held"]
            .to_string()
            .contains(&back_addr(2))
            .then_some(())
    });
    assert!(
        took.is_some(),
        "node 1 did not take node 2's address: {}",
        ha(&lab, 1)
    );
    std::thread::sleep(Duration::from_secs(4));

    // Node 2 comes back: it announces only once it serves (bulk sync first).
    let back = Instant::now();
    start(&mut lab, 2, N);
    assert!(
        lab.wait_next_hops(&all, back, Duration::from_secs(10))
            .is_some(),
        "node 2 did not announce again: {}",
        ha(&lab, 2)
    );
    let v2 = ha(&lab, 2);
    assert_eq!(v2["role"], "active", "{v2}");
    assert!(
        v2["sync"]["bulk_received"].as_u64().unwrap_or(0) >= 2,
        "{v2}"
    );
    std::thread::sleep(Duration::from_secs(4));
    let r = stop_load(&mut lab, load);
    println!(
        "downloads ok {} broken {} corrupted {} in flight {}; conns {} ok / {} failed / {} slow",
        r.downloads.ok,
        r.downloads.broken,
        r.downloads.corrupted,
        r.downloads.in_flight,
        r.conns.ok,
        r.conns.failed,
        r.conns.slow
    );
    let broken = r.broken_downloads();
    assert!(
        broken.is_empty(),
        "broken downloads:\n{}",
        broken.join("\n")
    );
    assert!(r.conns.ok > 50);
}
