//! Issue 20, layer-5 switching by delayed binding and TCP splicing, end to end: real curl
//! clients, python HTTP servers, tshark, hping3, `tun-balancer` with `mode = "splice"` in the
//! middle (the harness's standard topology: client, balancer, three backends).
//!
//! - `splice_host_and_path_rules_and_a_50mib_download`: requests with different Host headers
//!   and paths land on the configured backends (the body of `/id` names the backend); requests
//!   no rule matches spread over all three; a 50 MiB download through a spliced connection is
//!   byte-identical (sha256 on both ends); tshark on the client side and on the backend side:
//!   every segment's checksum is valid (`tcp.check_checksum:TRUE`) and the backend sees the
//!   client's ISN (the balancer's SYN to it carries the client's sequence number).
//! - `splice_sip_tcp_call_id_affinity`: sipp over TCP with one connection per call
//!   (`-t tn`), `affinity = "sip-call-id"`: 0 failed calls, calls spread over the three UASes;
//!   then one shared connection (`-t t1`): the splice binds the connection on its first
//!   request, so every call follows the first call's backend (a per-message SIP proxy mode
//!   would have to parse each message on the stream, which means owning the byte stream:
//!   terminating TCP, i.e. a proxy, not a splice).
//! - `splice_vs_haproxy` (`#[ignore]`, run by hand for `benches/results/splice.md`): the same
//!   topology and backends behind three front ends at once: the splice (VIP:80), our L4 NAT
//!   (VIP:81) and HAProxy `mode http` in the balancer namespace (203.0.113.20:80); new
//!   connections/s (wrk, `Connection: close`), one-stream throughput (curl, 200 MiB), time to
//!   first byte (curl, median of 100) and balancer CPU (user + system of the process) per
//!   connection.
//! - `splice_syn_flood_keeps_no_state`: an hping3 SYN flood at the VIP while curl clients
//!   fetch through it: the clients are served, the SYNs leave no splice slot behind.

mod common;

use std::time::Duration;

use std::collections::HashMap;
use std::path::Path;

use common::{need_root, need_tool, tshark_read, Lab, Topo};

const VIP4: &str = "203.0.113.10";

fn routes() -> Vec<&'static str> {
    vec!["203.0.113.10/32 dev lb0", "203.0.113.100/32 dev lb0"]
}

/// One spliced TCP service on VIP:80 → backends :8080, with two content rules.
fn config(affinity: &str) -> String {
    let mut c = String::from(
        "[balancer]\ndevice = \"lb0\"\nsnat_addrs = [\"203.0.113.100\"]\n\
         conntrack_capacity = 65536\nstats = \"127.0.0.1:9100\"\n\
         hash_key = \"e2e cluster secret 0123456789\"\nsplice_capacity = 4096\n",
    );
    c.push_str(&format!(
        "\n[[service]]\nvip = \"{VIP4}:80\"\nproto = \"tcp\"\nmode = \"splice\"\naffinity = \"{affinity}\"\n\
         [service.health]\nkind = \"http\"\npath = \"/id\"\ninterval_ms = 500\nrise = 2\nfall = 2\n\
         [service.splice]\nhead_timeout_ms = 3000\n\
         [[service.splice.rule]]\nhost = \"one.example\"\nbackends = [\"198.51.100.11:8080\"]\n\
         [[service.splice.rule]]\nhost = \"app.example\"\npath_prefix = \"/two/\"\nbackends = [\"198.51.100.12:8080\"]\n"
    ));
    for i in 1..=3 {
        c.push_str(&format!(
            "[[service.backend]]\naddr = \"198.51.100.{}:8080\"\nweight = 1\n",
            10 + i
        ));
    }
    c
}

fn setup(lab: &mut Lab, affinity: &str) -> Topo {
    let t = lab.topology(3);
    for b in t.backends.clone() {
        // /two/id on every backend names it too (the path rule decides who serves it).
        let two = lab.dir.join(format!("www-{}", b.name)).join("two");
        std::fs::create_dir_all(&two).unwrap();
        std::fs::write(two.join("id"), format!("{}\n", b.name)).unwrap();
        lab.http_server(&b, 8080);
    }
    lab.start_balancer(&t, "lb0", &config(affinity), &routes());
    // Wait for the health checks to pass (rise 2 × 500 ms).
    std::thread::sleep(Duration::from_millis(1500));
    t
}

fn curl(lab: &Lab, t: &Topo, args: &str) -> Result<String, String> {
    lab.try_sh_timeout(
        &t.client,
        &format!("curl -sS -g --max-time 10 --retry 0 {args}"),
        Duration::from_secs(20),
    )
}

#[test]
fn splice_host_and_path_rules_and_a_50mib_download() {
    if !need_root()
        || !need_tool("curl")
        || !need_tool("tshark")
        || !need_tool("sha256sum")
        || !need_tool("ethtool")
    {
        return;
    }
    let mut lab = Lab::new("sp-http");
    let t = setup(&mut lab, "none");
    // The end hosts' own segments would carry partial checksums (veth offload) that tshark
    // flags: computed in software here, so that every segment on the wire can be checked.
    lab.sh(&t.client, "ethtool -K c0 tx off >/dev/null");
    lab.sh(&t.backends[0].ns, "ethtool -K e0 tx off >/dev/null");
    // The balancer's own super-packets and partial checksums (TUN offloads, translated whole
    // once spliced) are cut and completed by its namespace's kernel on the way out of these
    // ports, from the sums the balancer left: tshark then checks those.
    for p in ["c1", "b1", "b2", "b3"] {
        lab.sh(
            &t.balancer,
            &format!("ethtool -K {p} tx off tso off gso off >/dev/null"),
        );
    }
    let cap_c = lab.capture(&t.client, "c0", "tcp port 80");
    let cap_b = lab.capture(&t.backends[0].ns, "e0", "tcp port 8080");
    std::thread::sleep(Duration::from_millis(500));
    let log = |lab: &Lab| lab.log("balancer");
    // Host rules.
    for _ in 0..10 {
        let got = curl(
            &lab,
            &t,
            &format!("-H 'Host: one.example' http://{VIP4}/id"),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", log(&lab)));
        assert_eq!(got.trim(), "b1");
        let got = curl(
            &lab,
            &t,
            &format!("-H 'Host: APP.example:80' http://{VIP4}/two/id"),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", log(&lab)));
        assert_eq!(got.trim(), "b2");
    }
    // app.example outside /two/, and hosts no rule names: the default group (all three).
    let urls = std::iter::repeat_n(format!("http://{VIP4}/id"), 90)
        .collect::<Vec<_>>()
        .join(" ");
    let got = curl(
        &lab,
        &t,
        &format!("-H 'Host: app.example' -H 'Connection: close' {urls}"),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", log(&lab)));
    let lines: Vec<String> = got.lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 90, "{got}");
    let tally = Lab::tally(&lines);
    println!("default group: {tally:?}");
    for b in ["b1", "b2", "b3"] {
        assert!(tally.get(b).copied().unwrap_or(0) >= 10, "{tally:?}");
    }
    // 50 MiB of random bytes from b1 (host rule), hashed on both ends.
    let big = lab.dir.join("www-b1").join("big50");
    lab.sh(
        &t.backends[0].ns,
        &format!("head -c {} /dev/urandom > {}", 50 << 20, big.display()),
    );
    let want = lab.sh(&t.backends[0].ns, &format!("sha256sum < {}", big.display()));
    let got = lab
        .try_sh_timeout(
            &t.client,
            &format!(
                "curl -sS --max-time 60 -H 'Host: one.example' http://{VIP4}/big50 | sha256sum"
            ),
            Duration::from_secs(70),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", log(&lab)));
    assert_eq!(got.trim(), want.trim(), "50 MiB through the splice differ");
    println!("50 MiB sha256 {}", got.trim());
    std::thread::sleep(Duration::from_millis(300));
    lab.stop_capture(&cap_c);
    lab.stop_capture(&cap_b);
    // Every segment's checksum is valid on both sides.
    // On the backend side, the balancer namespace's own health checks (from 198.51.100.1,
    // with the bridge's checksum offload) are not spliced traffic: left out.
    for (side, cap, spliced) in [
        ("client", &cap_c, "tcp"),
        ("backend", &cap_b, "tcp && ip.addr == 203.0.113.100"),
    ] {
        // Linux's software checksum (`skb_checksum_help`, the end hosts' and the balancer
        // namespace's ports here) writes a sum that folds to zero as 0xffff
        // (`CSUM_MANGLED_0`), the one's-complement equal of the 0x0000 tshark computes and
        // flags: about one segment in 65 536, valid to every receiver, so not counted bad.
        let bad_filter = format!(
            "{spliced} && tcp.checksum.status == 0 \
             && !(tcp.checksum == 0xffff && tcp.checksum_calculated == 0x0000)"
        );
        let bad = tshark_read(
            cap,
            &[
                "-o",
                "tcp.check_checksum:TRUE",
                "-Y",
                &bad_filter,
                "-T",
                "fields",
                "-e",
                "frame.number",
            ],
        );
        let all = tshark_read(cap, &["-Y", spliced, "-T", "fields", "-e", "frame.number"]);
        let n = all.lines().count();
        println!(
            "{side}: {n} segments, {} with a bad checksum",
            bad.lines().count()
        );
        assert!(n > 1000, "{side}: {n} segments captured");
        if !bad.trim().is_empty() {
            // Name each bad segment fully, so that a rare failure says where it came from.
            let frames = bad
                .lines()
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" || frame.number == ");
            let detail = tshark_read(
                cap,
                &[
                    "-o",
                    "tcp.check_checksum:TRUE",
                    "-o",
                    "tcp.relative_sequence_numbers:FALSE",
                    "-Y",
                    &format!("frame.number == {frames}"),
                    "-T",
                    "fields",
                    "-e",
                    "frame.number",
                    "-e",
                    "frame.time_relative",
                    "-e",
                    "ip.src",
                    "-e",
                    "tcp.srcport",
                    "-e",
                    "ip.dst",
                    "-e",
                    "tcp.dstport",
                    "-e",
                    "tcp.flags.str",
                    "-e",
                    "tcp.seq",
                    "-e",
                    "tcp.ack",
                    "-e",
                    "tcp.len",
                    "-e",
                    "tcp.checksum",
                    "-e",
                    "tcp.checksum_calculated",
                ],
            );
            panic!("{side}: bad checksums in frames:\n{detail}\n{}", log(&lab));
        }
    }
    // The backend side uses the client's ISNs: every SYN the client sent to the VIP with
    // sequence number x reappears as a SYN from the balancer to b1 with the same x.
    let raw = [
        "-o",
        "tcp.relative_sequence_numbers:FALSE",
        "-Y",
        "tcp.flags.syn == 1 && tcp.flags.ack == 0",
        "-T",
        "fields",
        "-e",
        "tcp.seq",
    ];
    let c_isns: std::collections::HashSet<String> = tshark_read(&cap_c, &raw)
        .lines()
        .map(str::to_owned)
        .collect();
    let b_isns: Vec<String> = tshark_read(&cap_b, &raw)
        .lines()
        .map(str::to_owned)
        .collect();
    let spliced: Vec<&String> = b_isns.iter().filter(|s| c_isns.contains(*s)).collect();
    println!(
        "backend-side SYNs: {}, with a client ISN: {}",
        b_isns.len(),
        spliced.len()
    );
    // b1 also receives the health checker's SYNs (their own ISNs): only the spliced ones count.
    assert!(spliced.len() >= 11, "{b_isns:?} vs {c_isns:?}");
}

#[test]
fn splice_syn_flood_keeps_no_state() {
    if !need_root() || !need_tool("curl") || !need_tool("hping3") {
        return;
    }
    let mut lab = Lab::new("sp-flood");
    let t = setup(&mut lab, "none");
    // 20 s of SYNs from random sources (spoofed: their SYN-ACKs go nowhere, no ACK comes).
    lab.spawn(
        &t.client,
        "hping",
        &[
            "timeout",
            "20",
            "hping3",
            "-S",
            "-p",
            "80",
            "--rand-source",
            "-i",
            "u100",
            VIP4,
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    let urls = std::iter::repeat_n(format!("http://{VIP4}/id"), 100)
        .collect::<Vec<_>>()
        .join(" ");
    let got = curl(&lab, &t, &format!("-H 'Connection: close' {urls}")).unwrap_or_else(|e| {
        panic!(
            "clients not served during the flood: {e}\n{}",
            lab.log("balancer")
        )
    });
    assert_eq!(got.lines().count(), 100, "{got}");
    // Closed connections linger 2 s (their last ACKs still translate), then leave.
    std::thread::sleep(Duration::from_secs(3));
    let s = lab.balancer_stats(&t);
    println!("{}", s["splice"]);
    let sent = s["splice"]["cookies_sent"].as_u64().unwrap_or(0);
    let ok = s["splice"]["cookies_ok"].as_u64().unwrap_or(0);
    let active = s["splice"]["active"].as_u64().unwrap_or(u64::MAX);
    assert!(
        sent > 1_000,
        "the flood's SYNs were answered with cookies: {s}"
    );
    // Only the real clients' ACKs took a slot; the flood left none.
    assert!((100..=110).contains(&ok), "{s}");
    assert!(active <= 5, "{s}");
    lab.kill("hping");
}

/// The last data line of a sipp CSV file (`;`-separated, first line = header) as a map.
fn last_csv_row(path: &Path) -> Option<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines.next()?.split(';').collect();
    let last = lines.next_back()?;
    Some(
        header
            .iter()
            .zip(last.split(';'))
            .map(|(h, v)| ((*h).to_owned(), v.trim().to_owned()))
            .collect(),
    )
}

fn sip_scenario(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sip")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// INVITEs each UAS received so far (from its `-trace_counts` file).
fn invites(lab: &Lab) -> Vec<u64> {
    (1..=3)
        .map(|i| {
            let dir = lab.dir.join(format!("uas-b{i}"));
            std::fs::read_dir(&dir)
                .ok()
                .and_then(|d| {
                    d.flatten()
                        .map(|e| e.path())
                        .find(|p| p.to_string_lossy().ends_with("_counts.csv"))
                })
                .and_then(|p| last_csv_row(&p))
                .and_then(|r| r.get("1_INVITE_Recv").and_then(|v| v.parse().ok()))
                .unwrap_or(0)
        })
        .collect()
}

/// Runs a sipp UAC over TCP (`transport` `tn` or `t1`) placing `calls` calls; returns its exit
/// code and statistics.
fn run_uac(
    lab: &mut Lab,
    t: &Topo,
    name: &str,
    transport: &str,
    calls: u32,
) -> (Option<i32>, HashMap<String, String>) {
    let dir = lab.dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let stf = dir.join("uac.csv");
    let script = format!(
        "cd '{}' && exec sipp -sf '{}' -t {transport} -i 192.0.2.2 -p 5070 -m {calls} -r 20 -rp 1000 -max_socket 1000 \
         -nostdin -trace_stat -stf uac.csv -fd 1 -timeout 50s {VIP4}:5060",
        dir.display(),
        sip_scenario("uac.xml"),
    );
    lab.spawn(&t.client, name, &["sh", "-c", &script]);
    let exit = lab.wait_exit(name, Duration::from_secs(60));
    if exit.is_none() {
        lab.kill(name);
    }
    // The UASes dump their counts every second.
    std::thread::sleep(Duration::from_millis(1500));
    (exit, last_csv_row(&stf).unwrap_or_default())
}

#[test]
fn splice_sip_tcp_call_id_affinity() {
    if !need_root() || !need_tool("sipp") || !need_tool("curl") {
        return;
    }
    let mut lab = Lab::new("sp-sip");
    let t = lab.topology(3);
    for b in t.backends.clone() {
        let dir = lab.dir.join(format!("uas-{}", b.name));
        std::fs::create_dir_all(&dir).unwrap();
        let script = format!(
            "cd '{}' && exec sipp -sf '{}' -t t1 -i {} -p 5060 -nostdin -trace_stat -stf uas.csv \
             -fd 1 -trace_counts -default_behaviors all,-bye",
            dir.display(),
            sip_scenario("uas.xml"),
            b.v4
        );
        lab.spawn(&b.ns, &format!("uas-{}", b.name), &["sh", "-c", &script]);
        lab.wait_listen(&b.ns, "tcp", 5060);
    }
    let mut c = String::from(
        "[balancer]\ndevice = \"lb0\"\nsnat_addrs = [\"203.0.113.100\"]\n\
         stats = \"127.0.0.1:9100\"\nhash_key = \"e2e cluster secret 0123456789\"\n",
    );
    c.push_str(&format!(
        "\n[[service]]\nvip = \"{VIP4}:5060\"\nproto = \"tcp\"\nmode = \"splice\"\naffinity = \"sip-call-id\"\n\
         [service.health]\nkind = \"tcp\"\ninterval_ms = 500\nrise = 2\nfall = 2\n"
    ));
    for i in 1..=3 {
        c.push_str(&format!(
            "[[service.backend]]\naddr = \"198.51.100.{}:5060\"\nweight = 1\n",
            10 + i
        ));
    }
    lab.start_balancer(&t, "lb0", &c, &routes());
    std::thread::sleep(Duration::from_millis(1500));
    // One TCP connection per call.
    let (exit, row) = run_uac(&mut lab, &t, "uac-tn", "tn", 60);
    let per = invites(&lab);
    println!(
        "-t tn: exit {exit:?}, successful {:?}, failed {:?}, INVITEs per backend {per:?}",
        row.get("SuccessfulCall(C)"),
        row.get("FailedCall(C)")
    );
    println!("splice: {}", lab.balancer_stats(&t)["splice"]);
    assert_eq!(
        exit,
        Some(0),
        "sipp exits 0 only when every call succeeded: {}",
        lab.log("uac-tn")
    );
    assert_eq!(row.get("FailedCall(C)").map(String::as_str), Some("0"));
    assert_eq!(row.get("SuccessfulCall(C)").map(String::as_str), Some("60"));
    assert_eq!(per.iter().sum::<u64>(), 60);
    assert!(per.iter().all(|&n| n >= 8), "calls not spread: {per:?}");
    // One shared connection: bound with its first request, every call follows it.
    let before = per;
    let (exit, row) = run_uac(&mut lab, &t, "uac-t1", "t1", 30);
    let after = invites(&lab);
    let delta: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    println!(
        "-t t1: exit {exit:?}, successful {:?}, INVITEs per backend {delta:?}",
        row.get("SuccessfulCall(C)")
    );
    assert_eq!(exit, Some(0), "{}", lab.log("uac-t1"));
    assert_eq!(delta.iter().sum::<u64>(), 30);
    assert_eq!(
        delta.iter().filter(|&&n| n > 0).count(),
        1,
        "one connection, one backend: {delta:?}"
    );
}

/// User + system CPU time of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may contain spaces) end with ')'.
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line: 11 and 12 after the command.
    (ticks(11) + ticks(12)) / 100.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

#[test]
#[ignore = "a measurement: cargo test -p lb-examples --test splice -- --ignored --nocapture"]
fn splice_vs_haproxy() {
    if !need_root()
        || !need_tool("curl")
        || !need_tool("wrk")
        || !need_tool("haproxy")
        || !need_tool("nginx")
    {
        return;
    }
    let mut lab = Lab::new("sp-bench");
    let t = lab.topology(3);
    // nginx on the backends (one worker, listen backlog 4096): python's http.server, with its
    // backlog of 5, drops SYNs under wrk and its 1-second retransmissions would decide the
    // connection rates.
    for b in t.backends.clone() {
        let root = lab.dir.join(format!("www-{}", b.name));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("id"), format!("{}\n", b.name)).unwrap();
        let big = root.join("big200");
        lab.sh(
            &b.ns,
            &format!("head -c {} /dev/zero > {}", 200 << 20, big.display()),
        );
        let dir = lab.dir.join(format!("nginx-{}", b.name));
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.display();
        let conf = lab.write(
            &format!("nginx-{}.conf", b.name),
            &format!(
                "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
                 events {{ worker_connections 16384; }}\nhttp {{\n  access_log off;\n  sendfile on;\n  \
                 client_body_temp_path {d};\n  proxy_temp_path {d};\n  fastcgi_temp_path {d};\n  \
                 uwsgi_temp_path {d};\n  scgi_temp_path {d};\n  server {{\n    \
                 listen 8080 backlog=4096 reuseport;\n    root {};\n  }}\n}}\n",
                root.display()
            ),
        );
        let conf = conf.to_string_lossy().into_owned();
        let errlog = format!("{d}/error.log");
        lab.spawn(
            &b.ns,
            &format!("nginx-{}", b.name),
            &["nginx", "-c", &conf, "-e", &errlog],
        );
        lab.wait_listen(&b.ns, "tcp", 8080);
    }
    // `LB_BENCH_NO_TIMEWAIT=1`: the backends and HAProxy keep no TIME_WAIT sockets, so a 4-tuple an
    // earlier run used is accepted again whatever the SYN's TSval (see benches/results/splice.md).
    if std::env::var_os("LB_BENCH_NO_TIMEWAIT").is_some() {
        for ns in t.backends.iter().map(|b| &b.ns).chain([&t.balancer]) {
            lab.sh(ns, "sysctl -qw net.ipv4.tcp_max_tw_buckets=0");
        }
    }
    // The splice on :80 and layer-4 NAT on :81, one balancer.
    let mut c = config("none");
    c.push_str(&format!(
        "\n[[service]]\nvip = \"{VIP4}:81\"\nproto = \"tcp\"\nmode = \"nat\"\n\
         [service.health]\nkind = \"http\"\npath = \"/id\"\ninterval_ms = 500\nrise = 2\nfall = 2\n"
    ));
    for i in 1..=3 {
        c.push_str(&format!(
            "[[service.backend]]\naddr = \"198.51.100.{}:8080\"\nweight = 1\n",
            10 + i
        ));
    }
    lab.start_balancer(&t, "lb0", &c, &routes());
    // HAProxy, mode http, in the balancer namespace on its own address.
    lab.sh(&t.balancer, "ip addr add 203.0.113.20/32 dev lo");
    let hcfg = lab.write(
        "haproxy.cfg",
        "global\n  maxconn 4000\n  nbthread 1\ndefaults\n  mode http\n  timeout connect 2s\n  \
         timeout client 30s\n  timeout server 30s\nfrontend f\n  bind 203.0.113.20:80\n  \
         default_backend b\nbackend b\n  balance roundrobin\n  server b1 198.51.100.11:8080\n  \
         server b2 198.51.100.12:8080\n  server b3 198.51.100.13:8080\n",
    );
    let hcfg = hcfg.to_string_lossy().into_owned();
    lab.spawn(&t.balancer, "haproxy", &["haproxy", "-db", "-f", &hcfg]);
    std::thread::sleep(Duration::from_secs(2));
    let fronts = [
        ("splice", format!("{VIP4}:80"), "balancer"),
        ("nat (L4)", format!("{VIP4}:81"), "balancer"),
        ("haproxy http", "203.0.113.20:80".to_owned(), "haproxy"),
    ];
    println!(
        "| front end | new conn/s, wrk -c 16 | CPU ms / 1000 conns | p50 / p99 ms | new conn/s, \
         wrk -c 64 | CPU ms / 1000 conns | one stream 200 MiB (MB/s) | first byte p50 (ms) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, addr, proc_name) in &fronts {
        let pid = lab.pid(proc_name).expect("pid");
        let mut cols = Vec::new();
        for conns in [16, 64] {
            let cpu0 = cpu_secs(pid);
            let out = lab
                .try_sh_timeout(
                    &t.client,
                    &format!(
                        "wrk -t 2 -c {conns} -d 10s --latency -H 'Connection: close' \
                         http://{addr}/id"
                    ),
                    Duration::from_secs(30),
                )
                .unwrap_or_else(|e| panic!("wrk {name}: {e}\n{}", lab.log(proc_name)));
            let cpu = cpu_secs(pid) - cpu0;
            let reqs: f64 = out
                .lines()
                .find(|l| l.contains("requests in"))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            let rate: f64 = out
                .lines()
                .find(|l| l.starts_with("Requests/sec:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            let errors = out
                .lines()
                .find(|l| l.contains("Socket errors") || l.contains("Non-2xx"))
                .map(|e| format!(" ({})", e.trim()))
                .unwrap_or_default();
            let pct = |p: &str| {
                out.lines()
                    .map(str::trim)
                    .find(|l| l.starts_with(p))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .unwrap_or("?")
                    .to_owned()
            };
            cols.push(format!(
                "{rate:.0}{errors} | {:.1}",
                cpu * 1000.0 / (reqs / 1000.0).max(1e-9)
            ));
            if conns == 16 {
                cols.push(format!("{} / {}", pct("50%"), pct("99%")));
            }
        }
        let speed: f64 = lab
            .try_sh_timeout(
                &t.client,
                &format!("curl -sS --max-time 60 -o /dev/null -w '%{{speed_download}}' http://{addr}/big200"),
                Duration::from_secs(70),
            )
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0);
        let mut ttfb = Vec::new();
        for _ in 0..100 {
            if let Ok(v) = lab.try_sh_timeout(
                &t.client,
                &format!("curl -sS --max-time 5 -o /dev/null -w '%{{time_starttransfer}}' http://{addr}/id"),
                Duration::from_secs(10),
            ) {
                if let Ok(x) = v.trim().parse::<f64>() {
                    ttfb.push(x * 1000.0);
                }
            }
        }
        println!(
            "| {name} | {} | {:.0} | {:.2} |",
            cols.join(" | "),
            speed / 1e6,
            median(ttfb)
        );
    }
    println!("splice: {}", lab.balancer_stats(&t)["splice"]);
    println!("offload: {}", lab.balancer_stats(&t)["offload"]);
}

#[test]
fn splice_rules_reload_with_sighup_and_spliced_connections_stay() {
    if !need_root() || !need_tool("curl") || !need_tool("sha256sum") {
        return;
    }
    let mut lab = Lab::new("sp-reload");
    let t = setup(&mut lab, "none");
    let get_id = |lab: &Lab| {
        curl(lab, &t, &format!("-H 'Host: one.example' http://{VIP4}/id"))
            .unwrap_or_else(|e| panic!("{e}\n{}", lab.log("balancer")))
    };
    assert_eq!(get_id(&lab).trim(), "b1");
    // A 48 MiB download from b1 at 4 MiB/s (far more than the socket buffers hold), spliced
    // under the old rule, runs across the reload.
    let big = lab.dir.join("www-b1").join("big48");
    lab.sh(
        &t.backends[0].ns,
        &format!("head -c {} /dev/urandom > {}", 48 << 20, big.display()),
    );
    let want = lab.sh(&t.backends[0].ns, &format!("sha256sum < {}", big.display()));
    let got_file = lab.dir.join("slow.sha");
    lab.spawn(
        &t.client,
        "slow",
        &[
            "sh",
            "-c",
            &format!(
                "curl -sS --max-time 30 --limit-rate 4M -H 'Host: one.example' http://{VIP4}/big48 \
                 | sha256sum > {}",
                got_file.display()
            ),
        ],
    );
    std::thread::sleep(Duration::from_secs(1));
    // one.example now goes to b3.
    let cfg = config("none").replace("[\"198.51.100.11:8080\"]", "[\"198.51.100.13:8080\"]");
    assert_ne!(cfg, config("none"));
    lab.reload_balancer(&cfg, "configuration reloaded");
    for _ in 0..10 {
        assert_eq!(
            get_id(&lab).trim(),
            "b3",
            "new connections follow the new rule"
        );
    }
    // The splice counters in Prometheus text too.
    let metrics = lab.sh(
        &t.balancer,
        "curl -sS --max-time 3 http://127.0.0.1:9100/metrics",
    );
    let spliced: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("lb_splice_spliced_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no lb_splice_spliced_total in {metrics}"));
    assert!(spliced >= 12, "{spliced} spliced connections counted");
    assert!(metrics.contains("# TYPE lb_splice_active gauge"));
    let t0 = std::time::Instant::now();
    assert_eq!(lab.wait_exit("slow", Duration::from_secs(30)), Some(0));
    let after = t0.elapsed();
    println!("the download ended {after:?} after the reload checks");
    assert!(
        after > Duration::from_millis(500),
        "the download did not outlast the reload ({after:?})"
    );
    let got = std::fs::read_to_string(&got_file).unwrap_or_default();
    assert_eq!(
        got.trim(),
        want.trim(),
        "the download spliced before the reload arrived whole"
    );
    // A reload that would need new slots is refused, and the running rules stay.
    lab.reload_balancer(
        &cfg.replace("splice_capacity = 4096", "splice_capacity = 8192"),
        "splice_capacity needs a restart",
    );
    assert_eq!(get_id(&lab).trim(), "b3");
}

/// With `splice_capacity` in the file at start, a reload can make a plain NAT service splice
/// (the slots were set up at start); without it, the reload is refused (the first test above
/// holds the capacity-change case).
#[test]
fn the_first_spliced_service_comes_by_reload_when_splice_capacity_was_set() {
    if !need_root() || !need_tool("curl") {
        return;
    }
    let spliced = config("none");
    let from = spliced.find("[service.splice]").unwrap();
    let to = spliced.find("[[service.backend]]").unwrap();
    let nat = format!("{}{}", &spliced[..from], &spliced[to..]).replace("\"splice\"", "\"nat\"");
    let mut lab = Lab::new("sp-first");
    let t = lab.topology(3);
    for b in t.backends.clone() {
        lab.http_server(&b, 8080);
    }
    lab.start_balancer(&t, "lb0", &nat, &routes());
    std::thread::sleep(Duration::from_millis(1500));
    let get_id = |lab: &Lab| {
        curl(lab, &t, &format!("-H 'Host: one.example' http://{VIP4}/id"))
            .unwrap_or_else(|e| panic!("{e}\n{}", lab.log("balancer")))
    };
    // NAT: any backend, no splice.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..12 {
        seen.insert(get_id(&lab).trim().to_owned());
    }
    assert!(seen.len() > 1, "NAT spreads: {seen:?}");
    assert_eq!(lab.balancer_stats(&t)["splice"]["cookies_sent"], 0);
    lab.reload_balancer(&spliced, "configuration reloaded");
    for _ in 0..6 {
        assert_eq!(get_id(&lab).trim(), "b1", "one.example's rule, spliced");
    }
    let s = lab.balancer_stats(&t);
    assert!(
        s["splice"]["spliced"].as_u64().unwrap_or(0) >= 6,
        "{}",
        s["splice"]
    );
    // The same without splice_capacity at start: refused with a reason, NAT goes on.
    lab.stop_balancer(&t, "lb0");
    let nat_only = nat.replace("splice_capacity = 4096\n", "");
    lab.start_balancer(&t, "lb0", &nat_only, &routes());
    std::thread::sleep(Duration::from_millis(1500));
    lab.reload_balancer(
        &spliced.replace("splice_capacity = 4096\n", ""),
        "first spliced service needs a restart",
    );
    assert!(["b1", "b2", "b3"].contains(&get_id(&lab).trim()));
    // Started spliced (slots set up, no splice_capacity in the file), reloaded to plain NAT,
    // then spliced again: the slots are those of the start, so the last reload is taken
    // (it was refused while the check read the configuration in force).
    lab.stop_balancer(&t, "lb0");
    let spliced_only = spliced.replace("splice_capacity = 4096\n", "");
    lab.start_balancer(&t, "lb0", &spliced_only, &routes());
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(get_id(&lab).trim(), "b1", "spliced from the start");
    lab.reload_balancer(&nat_only, "configuration reloaded");
    lab.write("balancer.toml", &spliced_only);
    lab.signal("balancer", "HUP");
    let taken = lab.wait_for(Duration::from_secs(5), || {
        let log = lab.log("balancer");
        if log.contains("reload rejected") {
            Some(false)
        } else {
            (log.matches("configuration reloaded").count() >= 2).then_some(true)
        }
    });
    assert_eq!(taken, Some(true), "{}", lab.log("balancer"));
    for _ in 0..3 {
        assert_eq!(
            get_id(&lab).trim(),
            "b1",
            "spliced again after the round trip"
        );
    }
}
