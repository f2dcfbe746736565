//! End to end, mode `nat` (full NAT over TUN): real curl / socat clients, python / socat servers,
//! the kernel routing between namespaces, `tun-balancer` rewriting in the middle.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::{nat_config, need_root, need_tool, Lab};

const VIP4: &str = "203.0.113.10";
const VIP6: &str = "2001:db8:10::10";

fn nat_routes() -> Vec<&'static str> {
    vec![
        "203.0.113.10/32 dev lb0",
        "203.0.113.100/32 dev lb0",
        "2001:db8:10::10/128 dev lb0",
        "2001:db8:100::100/128 dev lb0",
    ]
}

fn setup(lab: &mut Lab, mode: &str) -> common::Topo {
    let t = lab.topology(3);
    for b in t.backends.clone() {
        lab.http_server(&b, 8080);
        lab.udp_echo(&b.ns, &format!("echo4-{}", b.name), b.v4, 7000);
        lab.udp_echo(&b.ns, &format!("echo6-{}", b.name), b.v6, 7000);
    }
    lab.start_balancer(
        &t,
        "lb0",
        &nat_config(mode, &["4", "6"], 200),
        &nat_routes(),
    );
    t
}

fn assert_spread(lab: &Lab, t: &common::Topo, url: &str, n: usize) {
    let got = lab.curl_many(&t.client, url, n).unwrap_or_else(|e| {
        panic!(
            "curl through the VIP failed: {e}\nbalancer log:\n{}",
            lab.log("balancer")
        )
    });
    assert_eq!(got.len(), n, "{got:?}");
    let tally = Lab::tally(&got);
    println!("{url}: {tally:?}");
    for b in ["b1", "b2", "b3"] {
        let share = *tally.get(b).unwrap_or(&0) as f64 / n as f64;
        assert!(
            (share - 1.0 / 3.0).abs() <= 0.10,
            "{b} got {:.1}% of {n} flows: {tally:?}",
            share * 100.0
        );
    }
}

#[test]
fn nat_tcp_and_udp_ipv4_ipv6() {
    if !need_root() || !need_tool("socat") || !need_tool("curl") {
        return;
    }
    let mut lab = Lab::new("nat");
    let t = setup(&mut lab, "nat");
    // 300 new TCP flows (one connection and source port each) spread over 3 equal backends.
    assert_spread(&lab, &t, &format!("http://{VIP4}/id"), 300);
    assert_spread(&lab, &t, &format!("http://[{VIP6}]/id"), 300);
    // UDP echo through the VIP, both families.
    for vip in [VIP4, VIP6] {
        let vip: IpAddr = vip.parse().unwrap();
        for i in 0..5 {
            let msg = format!("hello-{i}");
            let got = lab
                .udp_ask(&t.client, vip, 53, &msg)
                .unwrap_or_else(|e| panic!("udp via {vip}: {e}\n{}", lab.log("balancer")));
            assert_eq!(got, msg);
        }
    }
    // The backends saw the SNAT address, never the client.
    let s = lab.balancer_stats(&t);
    assert!(s["forwarded"].as_u64().unwrap() > 2000, "{s}");
    assert_eq!(s["drops"]["malformed"], 0, "{s}");
    let flows = lab.flows_per_backend(&t);
    assert!(flows.values().sum::<u64>() >= 610, "{flows:?}");
    // The HTTP (GET /id) and UDP (echo) health checks of all 12 backends kept succeeding.
    let backends = s["backends"].as_array().cloned().unwrap_or_default();
    assert_eq!(backends.len(), 12);
    assert!(backends.iter().all(|b| b["healthy"] == true), "{s}");
    assert!(
        !lab.log("balancer").contains("backend down"),
        "{}",
        lab.log("balancer")
    );
    // Clean exit on SIGTERM.
    lab.signal("balancer", "TERM");
    assert_eq!(
        lab.wait_exit("balancer", Duration::from_secs(10)),
        Some(0),
        "{}",
        lab.log("balancer")
    );
}

/// Starts a slow download of `/big` (4 MiB at 1 MiB/s) through the VIP in the background;
/// returns the name of the backend that serves it (from the servers' request logs).
fn start_stream(lab: &mut Lab, t: &common::Topo, name: &str) -> String {
    let out = lab.dir.join(format!("{name}.size"));
    let script = format!(
        "curl -sS --max-time 60 --limit-rate 1M -o /dev/null -w '%{{size_download}}' http://{VIP4}/big > {}",
        out.display()
    );
    lab.spawn(&t.client, name, &["sh", "-c", &script]);
    let who = lab.wait_for(Duration::from_secs(10), || {
        ["b1", "b2", "b3"]
            .into_iter()
            .find(|b| lab.log(&format!("http-{b}")).contains("GET /big"))
            .map(str::to_owned)
    });
    who.unwrap_or_else(|| panic!("stream did not start: {}", lab.log("balancer")))
}

/// Waits for the stream to finish and checks that every byte arrived.
fn finish_stream(lab: &mut Lab, name: &str) {
    let code = lab.wait_exit(name, Duration::from_secs(40));
    let size = std::fs::read_to_string(lab.dir.join(format!("{name}.size"))).unwrap_or_default();
    assert_eq!(
        code,
        Some(0),
        "stream failed (size {size:?}): {}",
        lab.log(name)
    );
    assert_eq!(size.trim(), (4 << 20).to_string(), "stream truncated");
}

#[test]
fn nat_health_check_failover() {
    if !need_root() || !need_tool("socat") || !need_tool("curl") {
        return;
    }
    let mut lab = Lab::new("failover");
    let t = setup(&mut lab, "nat");
    let keep = start_stream(&mut lab, &t, "stream");
    let victim = ["b1", "b2", "b3"].into_iter().find(|b| *b != keep).unwrap();
    let vb = t
        .backends
        .iter()
        .find(|b| b.name == victim)
        .unwrap()
        .clone();
    // Kill the victim's server: connections to it are refused, its health check fails.
    lab.kill(&format!("http-{victim}"));
    let killed = std::time::Instant::now();
    // fall (2) × interval (200 ms) + probe time + 1 s.
    std::thread::sleep(Duration::from_millis(2 * 200 + 1000));
    let got = lab
        .curl_many(&t.client, &format!("http://{VIP4}/id"), 60)
        .unwrap_or_else(|e| {
            panic!(
                "requests after failover failed: {e}\n{}",
                lab.log("balancer")
            )
        });
    let tally = Lab::tally(&got);
    println!(
        "after killing {victim} ({:?} ago): {tally:?}",
        killed.elapsed()
    );
    assert_eq!(got.len(), 60);
    assert!(
        !tally.contains_key(victim),
        "{victim} still got flows: {tally:?}"
    );
    assert!(
        lab.log("balancer").contains("backend down"),
        "{}",
        lab.log("balancer")
    );
    // The stream to another backend was never disturbed.
    finish_stream(&mut lab, "stream");
    // The victim comes back: after rise (2) × interval it takes new flows again.
    lab.http_server(&vb, 8080);
    std::thread::sleep(Duration::from_millis(2 * 200 + 1000));
    let got = lab
        .curl_many(&t.client, &format!("http://{VIP4}/id"), 90)
        .unwrap();
    let tally = Lab::tally(&got);
    println!("after {victim} returned: {tally:?}");
    assert!(
        tally.get(victim).copied().unwrap_or(0) >= 10,
        "{victim} got no flows back: {tally:?}"
    );
}

#[test]
fn nat_reload_removes_a_backend_without_breaking_flows() {
    if !need_root() || !need_tool("socat") || !need_tool("curl") {
        return;
    }
    let mut lab = Lab::new("reload");
    let t = setup(&mut lab, "nat");
    let keep = start_stream(&mut lab, &t, "stream");
    let gone = ["b1", "b2", "b3"].into_iter().find(|b| *b != keep).unwrap();
    let gone_addr = t
        .backends
        .iter()
        .find(|b| b.name == gone)
        .unwrap()
        .v4
        .to_string();
    // A bad configuration is rejected and the running one kept.
    lab.reload_balancer(
        "[balancer]\ndevice = \"lb0\"\nbogus = 1\n",
        "reload rejected",
    );
    assert!(
        lab.log("balancer").contains("bogus"),
        "the error names the field"
    );
    assert_eq!(
        lab.curl_many(&t.client, &format!("http://{VIP4}/id"), 5)
            .unwrap()
            .len(),
        5
    );
    // Remove one backend (not the stream's) from the IPv4 TCP service.
    let cfg = nat_config("nat", &["4", "6"], 200).replacen(
        &format!("[[service.backend]]\naddr = \"{gone_addr}:8080\"\nweight = 1\n"),
        "",
        1,
    );
    lab.reload_balancer(&cfg, "configuration reloaded");
    let got = lab
        .curl_many(&t.client, &format!("http://{VIP4}/id"), 60)
        .unwrap();
    let tally = Lab::tally(&got);
    println!("after removing {gone}: {tally:?}");
    assert_eq!(got.len(), 60);
    assert!(!tally.contains_key(gone), "{tally:?}");
    finish_stream(&mut lab, "stream");
}

#[test]
fn dnat_tcp_and_udp_ipv4_ipv6() {
    if !need_root() || !need_tool("socat") || !need_tool("curl") {
        return;
    }
    let mut lab = Lab::new("dnat");
    let t = setup(&mut lab, "dnat");
    // Single rewrite: the backends see the client's address and answer it through the
    // balancer, whose namespace hands everything arriving from the backends' bridge to lb0.
    for fam in ["", "-6 "] {
        lab.ip(&t.balancer, &format!("{fam}rule add iif br0 lookup 100"));
        lab.ip(
            &t.balancer,
            &format!("{fam}route add default dev lb0 table 100"),
        );
    }
    assert_spread(&lab, &t, &format!("http://{VIP4}/id"), 300);
    assert_spread(&lab, &t, &format!("http://[{VIP6}]/id"), 300);
    for vip in [VIP4, VIP6] {
        let vip: IpAddr = vip.parse().unwrap();
        let got = lab
            .udp_ask(&t.client, vip, 53, "dnat-hello")
            .unwrap_or_else(|e| panic!("udp via {vip}: {e}\n{}", lab.log("balancer")));
        assert_eq!(got, "dnat-hello");
    }
    // The backends saw the client's own address.
    assert!(lab.log("http-b1").contains("192.0.2.2") || lab.log("http-b2").contains("192.0.2.2"));
}

#[test]
fn nat_multi_queue() {
    if !need_root() || !need_tool("socat") || !need_tool("curl") {
        return;
    }
    let mut lab = Lab::new("mq");
    let t = lab.topology(3);
    for b in t.backends.clone() {
        lab.http_server(&b, 8080);
        lab.udp_echo(&b.ns, &format!("echo4-{}", b.name), b.v4, 7000);
    }
    let cfg = nat_config("nat", &["4"], 200).replace("[balancer]\n", "[balancer]\nqueues = 2\n");
    let started = std::time::Instant::now();
    lab.start_balancer(&t, "lb0", &cfg, &nat_routes()[..2]);
    // Two queues and data-path threads over one flow table: a flow's replies may arrive on either
    // queue and still find it.
    assert_spread(&lab, &t, &format!("http://{VIP4}/id"), 300);
    let keep = start_stream(&mut lab, &t, "stream");
    println!("stream on {keep}");
    finish_stream(&mut lab, "stream");
    for i in 0..20 {
        let msg = format!("mq-{i}");
        assert_eq!(
            lab.udp_ask(&t.client, VIP4.parse().unwrap(), 53, &msg)
                .unwrap(),
            msg
        );
    }
    // The threads flush their lock times at their next housekeeping round (an idle thread's
    // poll ends within 100 ms).
    std::thread::sleep(std::time::Duration::from_millis(300));
    let s = lab.balancer_stats(&t);
    let elapsed = started.elapsed();
    println!("drops: {}; datapath: {}", s["drops"], s["datapath"]);
    // Every packet read went through the lock in a batch of at most 32, and the lock is
    // exclusive: the threads' summed holding time fits in the time the balancer has run.
    let d = &s["datapath"];
    let taken = d["lock_taken"].as_u64().expect("lock_taken");
    let held = d["lock_held_ns"].as_u64().expect("lock_held_ns");
    assert!(d["lock_wait_ns"].as_u64().is_some(), "lock_wait_ns");
    let rx = s["rx_packets"].as_u64().expect("rx_packets");
    assert!(
        rx > 0 && taken * 32 >= rx,
        "lock taken {taken} times for {rx} packets"
    );
    assert!(held > 0, "no time holding the lock");
    assert!(
        u128::from(held) <= elapsed.as_nanos(),
        "held {held} ns in {elapsed:?}: the lock is exclusive"
    );
    // Packets of one flow may be read by both threads and processed out of order (a segment
    // after its flow was closed, say): counted, never a lost flow (checked above).
}

/// Two services in front of the same servers (one VIP on ports 80 and 8081, both to the
/// backends' port 8080): each service has its own backend ids, and their flows to one server
/// must not be given the same SNAT (address, port). With an SNAT pool per backend id, both
/// pools handed out the same pairs in the same order, and the second service's SYNs were
/// dropped (`table_full`) while the first service's flows held them.
#[test]
fn nat_services_sharing_backends() {
    if !need_root() || !need_tool("curl") {
        return;
    }
    let mut lab = Lab::new("share");
    let t = lab.topology(3);
    for b in t.backends.clone() {
        lab.http_server(&b, 8080);
    }
    let mut cfg = nat_config("nat", &["4"], 200);
    cfg.push_str("\n[[service]]\nvip = \"203.0.113.10:8081\"\nproto = \"tcp\"\nmode = \"nat\"\nscheduler = \"maglev\"\n");
    for i in 1..=3 {
        cfg.push_str(&format!(
            "[[service.backend]]\naddr = \"198.51.100.{}:8080\"\nweight = 1\n",
            10 + i
        ));
    }
    lab.start_balancer(&t, "lb0", &cfg, &nat_routes()[..2]);
    // 60 connections through each service, one after the other: the first 60 still hold
    // their pairs (closed connections linger in the table) when the next 60 take theirs.
    for port in [80, 8081, 80, 8081] {
        let url = format!("http://{VIP4}:{port}/id");
        let got = lab
            .curl_many(&t.client, &url, 60)
            .unwrap_or_else(|e| panic!("curl {url}: {e}\nbalancer log:\n{}", lab.log("balancer")));
        assert_eq!(got.len(), 60, "{url}: {got:?}");
    }
    let s = lab.balancer_stats(&t);
    println!("drops: {}", s["drops"]);
    assert_eq!(s["drops"]["table_full"], 0, "{s}");
    assert_eq!(s["drops"]["ports_exhausted"], 0, "{s}");
}

/// A client → VIP UDP stream (a datagram per millisecond) sent while other clients open and
/// close HTTP/1.0 connections through the same balancer as fast as they can.
const CHURN: &str = r#"
import socket, sys, threading, time, urllib.request
vip, dur = sys.argv[1], float(sys.argv[2])
stop = time.time() + dur
conns = [0, 0]
def churn():
    while time.time() < stop:
        try:
            urllib.request.urlopen("http://%s/id" % vip, timeout=2).read()
            conns[0] += 1
        except Exception:
            conns[1] += 1
threads = [threading.Thread(target=churn) for _ in range(4)]
for t in threads:
    t.start()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((vip, 9000))
sent, due = 0, time.time()
while time.time() < stop:
    s.send(b"x" * 32)
    sent += 1
    due += 0.001
    wait = due - time.time()
    if wait > 0:
        time.sleep(wait)
for t in threads:
    t.join()
print("udp %d tcp %d failed %d" % (sent, conns[0], conns[1]))
"#;

/// An established flow keeps going the fast way (by its queue thread's plan, without the data
/// path's lock) while connections open and close beside it: each closing connection retires
/// only its own plans (its flow's epoch), not the stream's. With one generation for all plans,
/// every close sent the stream's next datagram back through the lock.
#[test]
fn an_established_flow_stays_on_the_fast_path_while_connections_close_beside_it() {
    if !need_root() || !need_tool("socat") {
        return;
    }
    let mut lab = Lab::new("nat-epoch");
    let t = lab.topology(3);
    for b in t.backends.clone() {
        lab.http_server(&b, 8080);
        lab.udp_echo(&b.ns, &format!("echo4-{}", b.name), b.v4, 7000);
        // A sink for the stream.
        let sink = format!("UDP4-RECV:9000,bind={},reuseaddr", b.v4);
        lab.spawn(
            &b.ns,
            &format!("sink-{}", b.name),
            &["socat", "-u", &sink, "/dev/null"],
        );
        lab.wait_listen(&b.ns, "udp", 9000);
    }
    let mut cfg = nat_config("nat", &["4"], 200);
    cfg.push_str(
        "\n[[service]]\nvip = \"203.0.113.10:9000\"\nproto = \"udp\"\nmode = \"nat\"\n\
         scheduler = \"maglev\"\n[service.health]\nkind = \"none\"\n",
    );
    for i in 1..=3 {
        cfg.push_str(&format!(
            "[[service.backend]]\naddr = \"198.51.100.{}:9000\"\n",
            10 + i
        ));
    }
    lab.start_balancer(&t, "lb0", &cfg, &nat_routes()[..2]);
    // Health checks of the HTTP and echo backends pass (rise 2 × 200 ms).
    std::thread::sleep(Duration::from_millis(1000));
    let script = lab.write("churn.py", CHURN);
    let out = lab
        .try_sh_timeout(
            &t.client,
            &format!("{} '{}' {VIP4} 3", common::python(), script.display()),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.log("balancer")));
    println!("{}", out.trim());
    let mut f = out.split_whitespace();
    let mut field = |name: &str| {
        f.find(|w| *w == name)
            .and_then(|_| f.next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in {out:?}"))
    };
    let (sent, conns) = (field("udp"), field("tcp"));
    assert!(sent >= 1000, "only {sent} datagrams sent");
    assert!(
        conns >= 100,
        "only {conns} connections opened and closed beside the stream"
    );
    // The counts of the last packets reach the stats at the thread's next lock (10 ms).
    std::thread::sleep(Duration::from_millis(300));
    let s = lab.balancer_stats(&t);
    println!("fast_path: {}", s["fast_path"]);
    let stream: Vec<&serde_json::Value> = s["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .filter(|b| b["service"].as_str().is_some_and(|v| v.ends_with(":9000")))
        .collect();
    let sum = |k: &str| {
        stream
            .iter()
            .map(|b| b[k].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    let (packets, fast) = (sum("packets"), sum("fast_packets"));
    println!("stream: {packets} datagrams forwarded, {fast} by plan without the lock");
    assert_eq!(packets, sent, "every datagram of the stream was forwarded");
    // The first two datagrams (the flow is confirmed by its second) and one per second
    // (a plan's life) take the lock; everything else goes by plan.
    assert!(
        fast * 100 >= packets * 95,
        "only {fast} of {packets} datagrams went by plan while {conns} connections closed"
    );
}
