//! Issue 18 item 4, IP fragments, end to end: datagrams larger than the MTU through
//! `tun-balancer` in mode `nat`, the kernels of the client and the backends fragmenting them
//! at MTU 1500 (every veth of the standard topology) and reassembling them at the far end;
//! the balancer sees, rewrites and forwards each fragment on its own (no reassembly: a
//! non-first fragment follows its first fragment by the datagram's identity).
//!
//! - `udp_echo_of_4000_byte_datagrams_arrives_whole`: 60 datagrams of 4 000 bytes each (three
//!   fragments) per family, each from a fresh source port, to python UDP echo servers on the
//!   three backends: every echo comes back whole and identical; the balancer forwarded the
//!   fragments one by one (at least 6 packets per datagram) and dropped none.
//! - `sip_invite_of_3000_bytes_with_call_id_affinity` (and `_ipv6`): sipp places 100 calls
//!   whose INVITE carries a padded SDP body (about 3 300 bytes: three fragments), `affinity =
//!   "sip-call-id"`, through to sipp UASes: 0 failed calls, 0 retransmissions, every call
//!   completed on the UAS that took its INVITE, the calls spread over the three backends.
//!
//! `cargo test -p lb-examples --test fragments -- --nocapture` (as root; skipped otherwise).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{need_root, need_tool, python, Lab, Topo};

const ROUTES: [&str; 4] = [
    "203.0.113.10/32 dev lb0",
    "203.0.113.100/32 dev lb0",
    "2001:db8:10::10/128 dev lb0",
    "2001:db8:100::100/128 dev lb0",
];

/// A UDP echo server (one datagram in, the same datagram back).
const ECHO: &str = r#"
import socket, sys
a, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((a, port))
while True:
    d, peer = s.recvfrom(65535)
    s.sendto(d, peer)
"#;

/// Sends `n` datagrams of `size` bytes, each from a new socket (a new source port: a new
/// flow), and prints "ok bad lost".
const CLIENT: &str = r#"
import os, socket, sys
vip, port, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
fam = socket.AF_INET6 if ":" in vip else socket.AF_INET
ok = bad = lost = 0
for i in range(n):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(2)
    msg = (b"%d:" % i + os.urandom(size))[:size]
    s.sendto(msg, (vip, port))
    try:
        d, _ = s.recvfrom(65535)
        if d == msg:
            ok += 1
        else:
            bad += 1
    except socket.timeout:
        lost += 1
    s.close()
print(ok, bad, lost)
"#;

fn try_stats(lab: &Lab, t: &Topo) -> Option<serde_json::Value> {
    let out = lab
        .try_sh(&t.balancer, "curl -sS --max-time 3 http://127.0.0.1:9100/")
        .ok()?;
    serde_json::from_str(&out).ok()
}

/// Starts the balancer and waits until the three backends are healthy.
fn start(lab: &mut Lab, t: &Topo, config: &str) {
    lab.start_balancer(t, "lb0", config, &ROUTES);
    let up = lab.wait_for(Duration::from_secs(10), || {
        let s = try_stats(lab, t)?;
        let b = s["backends"].as_array()?.clone();
        (!b.is_empty() && b.iter().all(|x| x["healthy"] == true)).then_some(())
    });
    assert!(
        up.is_some(),
        "backends not healthy: {}",
        lab.log("balancer")
    );
}

#[test]
fn udp_echo_of_4000_byte_datagrams_arrives_whole() {
    if !need_root() || !need_tool("curl") {
        return;
    }
    let mut lab = Lab::new("fragecho");
    let t = lab.topology(3);
    let echo = lab.write("echo.py", ECHO);
    let echo = echo.to_string_lossy().into_owned();
    let client = lab.write("client.py", CLIENT);
    let client = client.to_string_lossy().into_owned();
    for b in t.backends.clone() {
        for (fam, a) in [("4", b.v4.to_string()), ("6", b.v6.to_string())] {
            let name = format!("echo{fam}-{}", b.name);
            lab.spawn(&b.ns, &name, &[python(), &echo, &a, "7000"]);
        }
        lab.wait_listen(&b.ns, "udp", 7000);
    }
    let mut config = String::from(
        "[balancer]\ndevice = \"lb0\"\nsnat_addrs = [\"203.0.113.100\", \"2001:db8:100::100\"]\n\
         conntrack_capacity = 65536\nstats = \"127.0.0.1:9100\"\n",
    );
    for v6 in [false, true] {
        let vip = if v6 {
            "[2001:db8:10::10]:53"
        } else {
            "203.0.113.10:53"
        };
        config.push_str(&format!(
            "\n[[service]]\nvip = \"{vip}\"\nproto = \"udp\"\nmode = \"nat\"\nscheduler = \"maglev\"\n\
             [service.health]\nkind = \"udp\"\nsend = \"ping\"\nexpect = \"ping\"\ninterval_ms = 200\n\
             rise = 2\nfall = 2\n"
        ));
        for b in &t.backends {
            let addr = if v6 {
                format!("[{}]:7000", b.v6)
            } else {
                format!("{}:7000", b.v4)
            };
            config.push_str(&format!(
                "[[service.backend]]\naddr = \"{addr}\"\nweight = 1\n"
            ));
        }
    }
    start(&mut lab, &t, &config);
    let before = lab.balancer_stats(&t);
    const N: u64 = 60;
    for vip in ["203.0.113.10", "2001:db8:10::10"] {
        let out = lab
            .try_sh_timeout(
                &t.client,
                &format!("{} {client} {vip} 53 {N} 4000", python()),
                Duration::from_secs(60),
            )
            .unwrap_or_else(|e| panic!("client via {vip}: {e}\n{}", lab.log("balancer")));
        let got: Vec<u64> = out
            .split_whitespace()
            .map(|x| x.parse().expect("count"))
            .collect();
        println!("{vip}: 4000-byte echoes ok / bad / lost = {got:?}");
        assert_eq!(got, [N, 0, 0], "via {vip}: {}", lab.log("balancer"));
    }
    let after = lab.balancer_stats(&t);
    let fwd = after["forwarded"].as_u64().unwrap() - before["forwarded"].as_u64().unwrap();
    println!("balancer: {fwd} packets forwarded for {} datagrams", 4 * N);
    // Three fragments each way per datagram (IPv4 and IPv6 at MTU 1500), health checks aside.
    assert!(
        fwd >= 2 * 2 * 3 * N,
        "{fwd} forwarded: not one per fragment\n{after}"
    );
    assert_eq!(after["drops"]["fragment"], 0, "{after}");
    let flows: u64 = after["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["flows"].as_u64().unwrap_or(0))
        .sum();
    // One flow per datagram, but for the few whose random ephemeral port repeated an earlier
    // one's while its UDP entry lived (120 draws from ~28 000 ports: about one time in four
    // a repeat, which failed a CI run when this asked for exactly 120).
    assert!(
        flows + 10 >= 2 * N,
        "{flows} flows for {} datagrams: {after}",
        2 * N
    );
}

const SIP_PORT: u16 = 5060;
const CALLS: u32 = 100;

/// The UAC scenario of `tests/sip/uac.xml` with 36 SDP attribute lines of padding in the
/// INVITE: about 3 300 bytes, three fragments at MTU 1500 (the Call-ID header stays in the
/// first, as in any SIP message: headers come before the body).
fn big_uac(lab: &Lab) -> PathBuf {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sip/uac.xml");
    let xml = std::fs::read_to_string(&base).expect("uac.xml");
    let pad: String = (0..36)
        .map(|i| format!("      a=x-pad:{i:02}-{}\n", "p".repeat(64)))
        .collect();
    let anchor = "      a=rtpmap:0 PCMU/8000\n";
    assert!(xml.contains(anchor), "uac.xml changed: no {anchor:?}");
    let big = xml.replacen(anchor, &format!("{anchor}{pad}"), 1);
    lab.write("uac-big.xml", &big)
}

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

fn num(row: &HashMap<String, String>, col: &str) -> u64 {
    row.get(col)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("column {col} missing in {row:?}"))
}

#[test]
fn sip_invite_of_3000_bytes_with_call_id_affinity() {
    if !need_root() || !need_tool("sipp") || !need_tool("curl") {
        return;
    }
    sip_run(false);
}

/// The same over IPv6 (the INVITE's fragments carry a Fragment header).
#[test]
fn sip_invite_of_3000_bytes_with_call_id_affinity_ipv6() {
    if !need_root() || !need_tool("sipp") || !need_tool("curl") {
        return;
    }
    sip_run(true);
}

fn sip_run(v6: bool) {
    let mut lab = Lab::new(if v6 { "fragsip6" } else { "fragsip" });
    let t = lab.topology(3);
    let baddr = |b: &common::BackendNs| -> String {
        if v6 {
            b.v6.to_string()
        } else {
            b.v4.to_string()
        }
    };
    let sock = |a: &str| -> String {
        if v6 {
            format!("[{a}]:{SIP_PORT}")
        } else {
            format!("{a}:{SIP_PORT}")
        }
    };
    let (vip, client_addr) = if v6 {
        ("2001:db8:10::10", "2001:db8:c::2")
    } else {
        ("203.0.113.10", "192.0.2.2")
    };
    let uas = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sip/uas.xml");
    for b in t.backends.clone() {
        let dir = lab.dir.join(format!("uas-{}", b.name));
        std::fs::create_dir_all(&dir).expect("uas dir");
        // As in tests/sip.rs: `-bye` off, so a BYE reaching the wrong UAS fails the call.
        let script = format!(
            "cd '{}' && exec sipp -sf '{}' -i {} -p {SIP_PORT} -nostdin -trace_stat -stf uas.csv \
             -fd 1 -trace_counts -default_behaviors all,-bye",
            dir.display(),
            uas.display(),
            baddr(&b)
        );
        lab.spawn(&b.ns, &format!("uas-{}", b.name), &["sh", "-c", &script]);
        lab.wait_listen(&b.ns, "udp", SIP_PORT);
    }
    let mut config = format!(
        "[balancer]\ndevice = \"lb0\"\nsnat_addrs = [\"203.0.113.100\", \"2001:db8:100::100\"]\n\
         conntrack_capacity = 65536\nstats = \"127.0.0.1:9100\"\n\n\
         [[service]]\nvip = \"{}\"\nproto = \"udp\"\nmode = \"nat\"\n\
         scheduler = \"maglev\"\naffinity = \"sip-call-id\"\n\
         [service.health]\nkind = \"sip-options\"\ninterval_ms = 200\ntimeout_ms = 150\n\
         rise = 2\nfall = 2\n",
        sock(vip)
    );
    for b in &t.backends {
        config.push_str(&format!(
            "[[service.backend]]\naddr = \"{}\"\nweight = 1\n",
            sock(&baddr(b))
        ));
    }
    start(&mut lab, &t, &config);
    let uac = big_uac(&lab);
    let dir = lab.dir.join("uac");
    std::fs::create_dir_all(&dir).expect("uac dir");
    let stf = dir.join("uac.csv");
    let (m, stf_s) = (CALLS.to_string(), stf.to_string_lossy().into_owned());
    let uac_s = uac.to_string_lossy().into_owned();
    let target = sock(vip);
    let argv = [
        "sipp",
        "-sf",
        &uac_s,
        "-i",
        client_addr,
        "-p",
        "5060",
        "-m",
        &m,
        "-r",
        "30",
        "-rp",
        "1000",
        "-nostdin",
        "-trace_stat",
        "-stf",
        &stf_s,
        "-fd",
        "1",
        "-timeout",
        "50s",
        &target,
    ];
    let client = t.client.clone();
    lab.spawn(&client, "uac", &argv);
    let exit = lab.wait_exit("uac", Duration::from_secs(60));
    if exit.is_none() {
        lab.kill("uac");
    }
    let row =
        last_csv_row(&stf).unwrap_or_else(|| panic!("no UAC statistics; log:\n{}", lab.log("uac")));
    let (created, ok, failed, retrans) = (
        num(&row, "TotalCallCreated"),
        num(&row, "SuccessfulCall(C)"),
        num(&row, "FailedCall(C)"),
        num(&row, "Retransmissions(C)"),
    );
    // The UASes' per-message counts (sipp dumps them every second).
    std::thread::sleep(Duration::from_millis(2200));
    let mut per = Vec::new();
    for b in &t.backends {
        let d = lab.dir.join(format!("uas-{}", b.name));
        let counts = std::fs::read_dir(&d)
            .ok()
            .and_then(|r| {
                r.flatten()
                    .map(|e| e.path())
                    .find(|p| p.to_string_lossy().ends_with("_counts.csv"))
            })
            .and_then(|p| last_csv_row(&p))
            .unwrap_or_else(|| panic!("no UAS counts in {}", d.display()));
        per.push((
            b.name.clone(),
            num(&counts, "1_INVITE_Recv"),
            num(&counts, "7_200_Sent"),
        ));
    }
    let s = lab.balancer_stats(&t);
    println!(
        "3000-byte INVITEs (v6 {v6}): created {created}, successful {ok}, failed {failed}, \
         retransmissions {retrans}; per backend (INVITEs, BYEs answered) {per:?}"
    );
    println!("balancer: {s}");
    assert_eq!(exit, Some(0), "{}", lab.log("uac"));
    assert_eq!((created, ok, failed), (CALLS.into(), CALLS.into(), 0));
    assert_eq!(retrans, 0);
    let invites: u64 = per.iter().map(|x| x.1).sum();
    assert_eq!(invites, u64::from(CALLS), "{per:?}");
    for (name, inv, byes) in &per {
        assert_eq!(inv, byes, "{name}: a call's BYE went elsewhere: {per:?}");
        assert!(*inv > 0, "{name} took no call: {per:?}");
    }
    assert_eq!(s["drops"]["fragment"], 0, "{s}");
    let misses: u64 = s["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["sip_call_id_misses"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(misses, 0, "{s}");
    // Each call: an INVITE in three fragments, an ACK and a BYE towards the backends, each
    // fragment forwarded on its own (the kernel in the balancer's namespace did not reassemble).
    let packets: u64 = s["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["packets"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(packets, 5 * u64::from(CALLS), "{s}");
}
