//! Throughput through `tun-balancer` (mode `nat`) side by side with the kernel's own NAT
//! balancing (nftables `dnat to jhash ... map`) on the same namespaces, in the same run.
//! Measurements, not assertions: ignored by default; run with
//! `cargo test --release -p lb-examples --test perf -- --ignored --nocapture --test-threads 1`.

mod common;

use std::time::Duration;

use common::{need_root, need_tool, Lab};

/// A tiny HTTP/1.0 server for the connection-rate runs (python's http.server is too slow).
const FAST_HTTP: &str = r#"
import asyncio, sys
RESP = b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n"
async def handle(r, w):
    try:
        await r.readuntil(b"\r\n\r\n")
        w.write(RESP)
        await w.drain()
    except Exception:
        pass
    w.close()
async def main():
    s = await asyncio.start_server(handle, sys.argv[1], int(sys.argv[2]), backlog=4096, reuse_address=True)
    async with s:
        await s.serve_forever()
asyncio.run(main())
"#;

fn iperf_json(lab: &Lab, ns: &str, args: &str) -> serde_json::Value {
    let out = lab
        .try_sh_timeout(ns, &format!("iperf3 -J {args}"), Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("iperf3 {args}: {e}"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("iperf3 JSON: {e}: {out}"))
}

/// CPU time (user + system, all threads) a process has used, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3 (state);
    // utime and stime are fields 14 and 15, in clock ticks.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let hz: f64 = common::run_timeout(Duration::from_secs(5), "getconf", &["CLK_TCK"])
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(ticks / hz)
}

/// `balancer`: the balancer's pid, to report its packet rate per CPU-second.
fn measure(lab: &Lab, t: &common::Topo, vip: &str, label: &str, balancer: Option<u32>) {
    let tcp = iperf_json(lab, &t.client, &format!("-c {vip} -p 5201 -t 5"));
    let gbps = tcp["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9;
    let before = balancer.and_then(|pid| {
        Some((
            cpu_seconds(pid)?,
            lab.balancer_stats(t)["rx_packets"].as_f64()?,
        ))
    });
    let udp = iperf_json(
        lab,
        &t.client,
        &format!("-c {vip} -p 5201 -u -l 64 -b 0 -t 5"),
    );
    let pps = udp["end"]["sum"]["packets"].as_f64().unwrap_or(0.0)
        * (1.0 - udp["end"]["sum"]["lost_percent"].as_f64().unwrap_or(0.0) / 100.0)
        / udp["end"]["sum"]["seconds"].as_f64().unwrap_or(1.0);
    if let (Some((cpu0, rx0)), Some(pid)) = (before, balancer) {
        if let (Some(cpu1), Some(rx1)) = (
            cpu_seconds(pid),
            lab.balancer_stats(t)["rx_packets"].as_f64(),
        ) {
            let cpu = (cpu1 - cpu0).max(0.01);
            println!(
                "{label}: 64-byte UDP run: {:.0} k packets in {cpu:.2} s of balancer CPU = {:.0} kpps per core (balancer busy {:.0} % of one core)",
                (rx1 - rx0) / 1e3,
                (rx1 - rx0) / cpu / 1e3,
                cpu / 5.0 * 100.0
            );
        }
    }
    // Client-side TCP counters and the balancer's TUN drops (packets the kernel could not
    // queue to the device) around the connection-rate run.
    let retrans = |lab: &Lab| -> Vec<u64> {
        let out = lab
            .try_sh(
                &t.client,
                "nstat -az TcpActiveOpens TcpRetransSegs TcpExtTCPSynRetrans",
            )
            .unwrap_or_default();
        let get = |name: &str| {
            out.lines()
                .find_map(|l| {
                    let mut f = l.split_whitespace();
                    (f.next() == Some(name)).then(|| f.next()?.parse().ok())?
                })
                .unwrap_or(0)
        };
        let tun_drops = lab
            .try_sh(
                &t.balancer,
                "cat /sys/class/net/lb0/statistics/tx_dropped 2>/dev/null || echo 0",
            )
            .ok()
            .and_then(|x| x.trim().parse().ok())
            .unwrap_or(0);
        vec![
            get("TcpRetransSegs"),
            get("TcpExtTCPSynRetrans"),
            get("TcpActiveOpens"),
            tun_drops,
        ]
    };
    let r0 = retrans(lab);
    let wrk = lab
        .try_sh_timeout(
            &t.client,
            &format!("wrk -t1 -c32 -d5s -H 'Connection: close' http://{vip}:8081/ | grep -E 'Requests/sec|Socket errors'"),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| e);
    let r1 = retrans(lab);
    println!(
        "{label}: during wrk, client TCP: {} segments retransmitted, {} SYN retransmissions, {} connections opened; lb0 tx_dropped +{}",
        r1[0] - r0[0],
        r1[1] - r0[1],
        r1[2] - r0[2],
        r1[3] - r0[3]
    );
    println!(
        "| {label} | {gbps:.2} Gbit/s | {:.0} kpps (64-byte UDP, delivered) | {} |",
        pps / 1e3,
        wrk.trim().replace('\n', "; ")
    );
}

/// One backend running iperf3 and the tiny HTTP server, behind a fresh balancer namespace.
fn servers(lab: &mut Lab) -> common::Topo {
    let t = lab.topology(1);
    let b = t.backends[0].clone();
    lab.spawn(&b.ns, "iperf3", &["iperf3", "-s", "-p", "5201"]);
    lab.wait_listen(&b.ns, "tcp", 5201);
    let script = lab.write("fast_http.py", FAST_HTTP);
    let script = script.to_string_lossy().into_owned();
    lab.spawn(
        &b.ns,
        "fast-http",
        &[common::python(), &script, "0.0.0.0", "8081"],
    );
    lab.wait_listen(&b.ns, "tcp", 8081);
    t
}

#[test]
#[ignore = "measurement; run explicitly (see the module docs)"]
fn nat_throughput_vs_kernel_nat() {
    if !need_root() || !need_tool("iperf3") || !need_tool("wrk") || !need_tool("nft") {
        return;
    }
    let mut lab = Lab::new("perf");
    let t = servers(&mut lab);
    // tun-balancer: TCP and UDP 5201 and TCP 8081 on 203.0.113.10, one backend.
    let mut cfg = String::from(
        "[balancer]\ndevice = \"lb0\"\nsnat_addrs = [\"203.0.113.100\"]\nconntrack_capacity = 1000000\nstats = \"127.0.0.1:9100\"\n",
    );
    for (proto, port) in [("tcp", 5201), ("udp", 5201), ("tcp", 8081)] {
        cfg.push_str(&format!(
            "[[service]]\nvip = \"203.0.113.10:{port}\"\nproto = \"{proto}\"\nmode = \"nat\"\n\
             [[service.backend]]\naddr = \"198.51.100.11:{port}\"\n"
        ));
    }
    lab.start_balancer(
        &t,
        "lb0",
        &cfg,
        &["203.0.113.10/32 dev lb0", "203.0.113.100/32 dev lb0"],
    );
    lab.ip(&t.balancer, "link set lb0 txqueuelen 10000");
    println!("| path | TCP (iperf3, 1 stream) | UDP | HTTP connections (wrk, Connection: close) |");
    println!("|---|---|---|---|");
    measure(
        &lab,
        &t,
        "203.0.113.10",
        "tun-balancer nat, 1 queue",
        lab.pid("balancer"),
    );
    // The same with two TUN queues and two data-path threads, in fresh namespaces: a second
    // balancer started seconds after the first against the same client and backend runs its
    // connections several times slower whatever its queue count (both backends' TIME_WAIT
    // sockets and whatever else the first run left behind; see benches/results/balancer.md).
    let mut lab2 = Lab::new("perf2");
    let t2 = servers(&mut lab2);
    let cfg2 = cfg.replace("[balancer]\n", "[balancer]\nqueues = 2\n");
    lab2.start_balancer(
        &t2,
        "lb0",
        &cfg2,
        &["203.0.113.10/32 dev lb0", "203.0.113.100/32 dev lb0"],
    );
    lab2.ip(&t2.balancer, "link set lb0 txqueuelen 10000");
    measure(
        &lab2,
        &t2,
        "203.0.113.10",
        "tun-balancer nat, 2 queues",
        lab2.pid("balancer"),
    );
    println!("2 queues: drops {}", lab2.balancer_stats(&t2)["drops"]);
    drop(lab2);
    if std::env::var_os("LB_PERF_PROFILE").is_some() && need_tool("perf") {
        // Where the time goes during a 64-byte UDP run: the whole machine, by command and DSO.
        let data = lab.dir.join("perf.data");
        let d = data.to_string_lossy().into_owned();
        lab.spawn(
            &t.balancer,
            "perf",
            &[
                "perf", "record", "-a", "-g", "-F", "499", "-o", &d, "--", "sleep", "4",
            ],
        );
        let _ = iperf_json(
            &lab,
            &t.client,
            "-c 203.0.113.10 -p 5201 -u -l 64 -b 0 -t 5",
        );
        let _ = lab.wait_exit("perf", Duration::from_secs(30));
        for sort in ["comm,dso", "comm,sym"] {
            let rep = lab
                .try_sh_timeout(
                    &t.balancer,
                    &format!("perf report -i {d} --no-children --sort {sort} --stdio 2>/dev/null | grep -v '^#' | grep '%' | head -40"),
                    Duration::from_secs(120),
                )
                .unwrap_or_else(|e| e);
            println!("perf ({sort}):\n{rep}");
        }
    }
    // The kernel's own NAT on the same namespaces: nftables DNAT by jhash to the backend, SNAT to
    // the balancer's address (a second VIP so that both can coexist).
    let nft = "table ip lbk {
      chain pre {
        type nat hook prerouting priority dstnat;
        ip daddr 203.0.113.20 dnat to jhash ip saddr . th sport mod 1 map { 0 : 198.51.100.11 }
      }
      chain post {
        type nat hook postrouting priority srcnat;
        ip daddr 198.51.100.11 ip saddr 192.0.2.0/24 snat to 198.51.100.1
      }
    }\n";
    let f = lab.write("lbk.nft", nft);
    lab.sh(&t.balancer, &format!("nft -f {}", f.display()));
    measure(&lab, &t, "203.0.113.20", "kernel nftables NAT", None);
    // Plain routing, no NAT at all (the floor of this setup).
    measure(&lab, &t, "198.51.100.11", "kernel routing, no NAT", None);
}
