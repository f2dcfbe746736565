//! End to end with the device's offloads on (`balancer.offload = true`): the kernel hands the
//! balancer GSO super-packets (up to 64 KiB of TCP payload with a partial checksum) and takes
//! them back. In every forwarding mode a 4 MiB upload (client → backend, through the balancer)
//! and a 4 MiB download of random bytes must arrive byte for byte (SHA-256), and the balancer's
//! counters must show that super-packets really crossed it: rewritten whole in `nat`, `dnat`
//! and `dr`, cut into plain packets in `tunnel` (the virtio-net header cannot describe an
//! encapsulated super-packet). In `nat` and `dnat` the transfers run again with the balancer
//! namespace's ports unable to checksum, so that the receivers verify checksums the kernel
//! completed from the balancer's partial sums. A TCP splice (`mode = "splice"`) reads the
//! handshake and the request head as plain packets, then translates super-packets whole: an
//! HTTP upload and download through it, both families, the same two passes.

mod common;

use common::{need_root, need_tool, python, Lab, Topo};

const VIP4: &str = "203.0.113.10";
const VIP6: &str = "2001:db8:10::10";
const LB_MAC: &str = "02:00:5e:10:00:01";
/// The upload service's port (the hash server on every backend).
const HASH_PORT: u16 = 9000;
const SIZE: usize = 4 << 20;

/// Reads a connection to its end, answers `<bytes> <sha256>`.
const HASH_SERVER: &str = r#"
import hashlib, socket, socketserver
class H(socketserver.BaseRequestHandler):
    def handle(self):
        h, n = hashlib.sha256(), 0
        while True:
            b = self.request.recv(1 << 16)
            if not b:
                break
            h.update(b)
            n += len(b)
        self.request.sendall(f"{n} {h.hexdigest()}\n".encode())
class S(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True
S(("::", 9000), H).serve_forever()
"#;

/// Sends `SIZE` random bytes to `argv[1]:argv[2]`, then checks the server's digest; downloads
/// `argv[3]` (a URL) and prints its digest. Exits non-zero on a mismatch.
const CLIENT: &str = r#"
import hashlib, os, socket, sys, urllib.request
host, port, url = sys.argv[1], int(sys.argv[2]), sys.argv[3]
data = os.urandom(int(sys.argv[4]))
want = f"{len(data)} {hashlib.sha256(data).hexdigest()}"
s = socket.create_connection((host, port), timeout=30)
s.sendall(data)
s.shutdown(socket.SHUT_WR)
got = b""
while not got.endswith(b"\n"):
    b = s.recv(4096)
    if not b:
        break
    got += b
got = got.decode().strip()
print("upload", "ok" if got == want else f"MISMATCH got {got!r} want {want!r}")
body = urllib.request.urlopen(url, timeout=30).read()
print("download", len(body), hashlib.sha256(body).hexdigest())
sys.exit(0 if got == want else 1)
"#;

/// Starts the hash server and an HTTP server with a random file on every backend; returns the
/// random file's SHA-256 per backend (they differ).
fn servers(lab: &mut Lab, t: &Topo) -> Vec<String> {
    servers_with(lab, t, "hash_server.py", HASH_SERVER)
}

/// [`servers`] with another upload server script on :9000.
fn servers_with(lab: &mut Lab, t: &Topo, name: &str, hash_server: &str) -> Vec<String> {
    let script = lab.write(name, hash_server);
    let mut sums = Vec::new();
    for b in t.backends.clone() {
        lab.http_server(&b, 80);
        let file = lab.dir.join(format!("www-{}", b.name)).join("rand");
        lab.sh(
            &b.ns,
            &format!("head -c {SIZE} /dev/urandom > '{}'", file.display()),
        );
        sums.push(
            lab.sh(&b.ns, &format!("sha256sum '{}'", file.display()))
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string(),
        );
        let s = script.to_string_lossy().into_owned();
        lab.spawn(&b.ns, &format!("hash-{}", b.name), &[python(), &s]);
        lab.wait_listen(&b.ns, "tcp", HASH_PORT);
    }
    sums
}

/// One upload and one download through `vip` (bracketed for IPv6 in the URL); returns the
/// downloaded file's digest.
fn transfer(lab: &Lab, t: &Topo, vip: &str) -> String {
    let client = lab.write("offload_client.py", CLIENT);
    let url_host = if vip.contains(':') {
        format!("[{vip}]")
    } else {
        vip.to_string()
    };
    let out = lab
        .try_sh_timeout(
            &t.client,
            &format!(
                "{} '{}' {vip} {HASH_PORT} http://{url_host}/rand {SIZE}",
                python(),
                client.display()
            ),
            std::time::Duration::from_secs(120),
        )
        .unwrap_or_else(|e| panic!("transfer via {vip}: {e}\n{}", lab.log("balancer")));
    println!("{vip}: {}", out.trim().replace('\n', "; "));
    assert!(out.contains("upload ok"), "upload via {vip}: {out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("download"))
        .unwrap_or_else(|| panic!("no download line: {out}"));
    let mut f = line.split_whitespace().skip(1);
    assert_eq!(
        f.next().and_then(|n| n.parse::<usize>().ok()),
        Some(SIZE),
        "download size via {vip}: {line}"
    );
    f.next().unwrap_or_default().to_string()
}

/// The balancer's offload counters and the drops they could cause.
fn offload_stats(lab: &Lab, t: &Topo) -> (u64, u64, u64, u64) {
    let s = lab.balancer_stats(t);
    let o = &s["offload"];
    let get = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    println!("offload counters: {o}; drops {}", s["drops"]);
    (
        get(&o["gso_packets"]),
        get(&o["gso_segments"]),
        get(&o["gso_cut"]),
        get(&s["drops"]["bad_offload"]) + get(&s["drops"]["malformed"]),
    )
}

fn services(mode: &str, extra: &str, backend_port: u16) -> String {
    let mut c = String::new();
    for (vip, b4) in [("203.0.113.10", true), ("[2001:db8:10::10]", false)] {
        for port in [80u16, HASH_PORT] {
            c.push_str(&format!(
                "\n[[service]]\nvip = \"{vip}:{port}\"\nproto = \"tcp\"\nmode = \"{mode}\"\n{extra}\
                 scheduler = \"maglev\"\n[service.health]\nkind = \"none\"\n"
            ));
            for i in 1..=3 {
                let bp = if backend_port == 0 { 0 } else { port };
                let addr = if b4 {
                    format!("198.51.100.{}:{bp}", 10 + i)
                } else {
                    format!("[2001:db8:b::{}]:{bp}", 10 + i)
                };
                let mac = if mode == "dr" {
                    format!("mac = \"02:00:00:00:00:1{i}\"\n")
                } else {
                    String::new()
                };
                c.push_str(&format!("[[service.backend]]\naddr = \"{addr}\"\n{mac}"));
            }
        }
    }
    c
}

/// Starts the balancer with `cfg` for a `nat` or `dnat` service set: routes for the VIPs (and
/// in `nat` the SNAT addresses) into lb0; in `dnat` the backends answer the client's own
/// address, through the balancer's namespace, which hands everything arriving from the
/// backends' bridge to lb0.
fn start_nat_or_dnat(lab: &mut Lab, t: &Topo, mode: &str, cfg: &str) {
    let mut routes = vec!["203.0.113.10/32 dev lb0", "2001:db8:10::10/128 dev lb0"];
    if mode == "nat" {
        routes.extend(["203.0.113.100/32 dev lb0", "2001:db8:100::100/128 dev lb0"]);
    }
    lab.start_balancer(t, "lb0", cfg, &routes);
    if mode == "dnat" {
        for fam in ["", "-6 "] {
            lab.ip(&t.balancer, &format!("{fam}rule add iif br0 lookup 100"));
            lab.ip(
                &t.balancer,
                &format!("{fam}route add default dev lb0 table 100"),
            );
        }
    }
}

/// Checks a mode: transfers both families, then the counters (`cut`: tunnel mode, which cuts
/// super-packets; `fast`: the established flows go the fast way).
fn check(lab: &Lab, t: &Topo, sums: &[String], cut: bool, fast: bool) {
    for vip in [VIP4, VIP6] {
        let got = transfer(lab, t, vip);
        assert!(
            sums.contains(&got),
            "download via {vip}: digest {got} is no backend's file ({sums:?})"
        );
    }
    let (gso, segs, cuts, bad) = offload_stats(lab, t);
    assert!(
        gso > 0 && segs > gso,
        "no GSO super-packet crossed the balancer (gso {gso}, segments {segs})"
    );
    if cut {
        assert!(cuts > 0, "tunnel mode cut no super-packet");
    }
    if fast {
        // The transfers' established packets went by the queue thread's plans (in tunnel
        // mode, the cut segments' by the cutter's), without the data path's lock
        // (`balancer.fast_path`, on by default), and arrived whole (the digests above).
        let s = lab.balancer_stats(t);
        let f = &s["fast_path"];
        let fast = f["packets"].as_u64().unwrap_or(0);
        let rx = s["rx_packets"].as_u64().unwrap_or(0);
        println!("fast path: {f} of {rx} packets");
        // (Each connection's handshake, first request and response, and close take the lock.)
        assert!(
            fast > rx / 4,
            "fewer than a quarter of the packets went the fast way ({fast} of {rx}): {f}"
        );
    }
    assert_eq!(bad, 0, "offload or malformed drops");
}

/// `balancer.io = "tun-rs"`: the same transfers with the device read and written through the
/// `tun-rs` crate, which cuts the kernel's super-packets before the data path sees them (no
/// super-packet reaches it) and coalesces its output again; both families arrive byte for
/// byte, also with the balancer namespace's ports unable to checksum or segment.
#[test]
fn tun_rs_io_carries_nat_and_dnat() {
    if !need_root() || !need_tool("curl") {
        return;
    }
    for mode in ["nat", "dnat"] {
        let mut lab = Lab::new(&format!("tunrs{mode}"));
        let t = lab.topology(3);
        let sums = servers(&mut lab, &t);
        let cfg = format!(
            "[balancer]\ndevice = \"lb0\"\nsnat_addrs = [\"203.0.113.100\", \"2001:db8:100::100\"]\n\
             conntrack_capacity = 65536\nstats = \"127.0.0.1:9100\"\noffload = true\n\
             io = \"tun-rs\"\n{}",
            services(mode, "", 1)
        );
        start_nat_or_dnat(&mut lab, &t, mode, &cfg);
        assert!(
            lab.log("balancer").contains("io=TunRs"),
            "the balancer does not say it uses tun-rs: {}",
            lab.log("balancer")
        );
        let mut passes = vec!["offloads on"];
        if need_tool("ethtool") {
            passes.push("the balancer's ports without offloads");
        }
        for pass in passes {
            if pass != "offloads on" {
                for p in ["c1", "b1", "b2", "b3"] {
                    lab.sh(
                        &t.balancer,
                        &format!("ethtool -K {p} tx off tso off gso off"),
                    );
                }
            }
            println!("mode {mode}, tun-rs, {pass}:");
            for vip in [VIP4, VIP6] {
                let got = transfer(&lab, &t, vip);
                assert!(
                    sums.contains(&got),
                    "download via {vip}: digest {got} is no backend's file"
                );
            }
            let (gso, _, _, bad) = offload_stats(&lab, &t);
            assert_eq!(gso, 0, "tun-rs cuts super-packets before the data path");
            assert_eq!(bad, 0, "offload or malformed drops");
            let s = lab.balancer_stats(&t);
            let fwd = s["forwarded"].as_u64().unwrap_or(0);
            // Two 4 MiB transfers per family cross as ~1.4 KiB segments, each direction's
            // data one packet per segment (their ACKs on top).
            assert!(fwd as usize > 4 * SIZE / 1500, "forwarded {fwd}: {s}");
        }
    }
}

#[test]
fn offload_nat_and_dnat_rewrite_super_packets_whole() {
    if !need_root() || !need_tool("curl") {
        return;
    }
    // The third round writes through io_uring (`balancer.io_uring`).
    for (mode, uring) in [("nat", false), ("dnat", false), ("nat", true)] {
        let mut lab = Lab::new(&format!("off{mode}{}", if uring { "u" } else { "" }));
        let t = lab.topology(3);
        let sums = servers(&mut lab, &t);
        let cfg = format!(
            "[balancer]\ndevice = \"lb0\"\nsnat_addrs = [\"203.0.113.100\", \"2001:db8:100::100\"]\n\
             conntrack_capacity = 65536\nstats = \"127.0.0.1:9100\"\noffload = true\n\
             io_uring = {uring}\n{}",
            services(mode, "", 1)
        );
        start_nat_or_dnat(&mut lab, &t, mode, &cfg);
        println!("mode {mode}{}:", if uring { ", io_uring" } else { "" });
        check(&lab, &t, &sums, false, true);
        if uring {
            assert!(
                lab.log("balancer").contains("io_uring=true"),
                "the balancer does not say it writes through io_uring: {}",
                lab.log("balancer")
            );
        }
        if need_tool("ethtool") {
            // A receiver on a veth trusts a partial checksum without looking at it. With the
            // balancer namespace's own ports unable to checksum or segment, its kernel
            // segments the balancer's super-packets in software and computes every checksum
            // from the pseudo-header sums the balancer left: the receivers then verify real
            // checksums, and a wrong sum would stall the transfers.
            let ports = ["c1", "b1", "b2", "b3"];
            for p in ports {
                lab.sh(
                    &t.balancer,
                    &format!("ethtool -K {p} tx off tso off gso off"),
                );
            }
            println!("mode {mode}, the balancer's ports without offloads:");
            check(&lab, &t, &sums, false, true);
        }
    }
}

#[test]
fn offload_tunnel_cuts_super_packets() {
    if !need_root() || !need_tool("curl") {
        return;
    }
    // The third round writes through io_uring: the cut segments too, a burst per submission;
    // the fourth has two queues, each thread with its own plans and its own cutter's.
    for (tunnel, uring, queues) in [
        ("gue", false, 1),
        ("ipip", false, 1),
        ("ipip", true, 1),
        ("gue", false, 2),
    ] {
        let mut lab = Lab::new(&format!(
            "off{tunnel}{}{queues}",
            if uring { "u" } else { "" }
        ));
        let t = lab.topology(3);
        for b in t.backends.clone() {
            lab.vip_on_backend(&b, &[VIP4, VIP6]);
            lab.decap_agent(&b);
        }
        let sums = servers(&mut lab, &t);
        let cfg = format!(
            "[balancer]\ndevice = \"lb0\"\nsnat_addrs = [\"203.0.113.100\", \"2001:db8:100::100\"]\n\
             conntrack_capacity = 65536\nstats = \"127.0.0.1:9100\"\nmtu = 1500\noffload = true\n\
             io_uring = {uring}\nqueues = {queues}\n{}",
            services(
                "tunnel",
                &format!("tunnel = \"{tunnel}\"\n"),
                0
            )
        );
        lab.start_balancer(
            &t,
            "lb0",
            &cfg,
            &["203.0.113.10/32 dev lb0", "2001:db8:10::10/128 dev lb0"],
        );
        println!(
            "mode tunnel {tunnel}{}, {queues} queue(s):",
            if uring { ", io_uring" } else { "" }
        );
        check(&lab, &t, &sums, true, true);
        // GUE: the cut segments' outer datagrams (one size per flow, the same outer header)
        // go to the kernel again as UDP GSO super-packets, which it cuts back at the same
        // boundaries; IPIP is not UDP and is written a segment at a time.
        let o = &lab.balancer_stats(&t)["offload"];
        let merged = o["udp_coalesced_datagrams"].as_u64().unwrap_or(0);
        if tunnel == "gue" {
            assert!(
                merged > o["gso_cut"].as_u64().unwrap_or(0),
                "gue: the cut segments were not coalesced again ({o})"
            );
        } else {
            assert_eq!(merged, 0, "ipip: nothing is UDP to coalesce ({o})");
        }
    }
}

#[test]
fn offload_dr_forwards_super_frames_whole() {
    if !need_root() || !need_tool("curl") || !need_tool("bridge") {
        return;
    }
    let mut lab = Lab::new("offdr");
    let t = lab.topology(3);
    for (i, b) in t.backends.clone().into_iter().enumerate() {
        lab.dr_backend(i, &b, &[VIP4, VIP6]);
    }
    let sums = servers(&mut lab, &t);
    let cfg = format!(
        "[balancer]\ndevice = \"lb0\"\nconntrack_capacity = 65536\nstats = \"127.0.0.1:9100\"\n\
         mac = \"{LB_MAC}\"\noffload = true\n{}",
        services("dr", "", 0)
    );
    lab.start_balancer(&t, "lb0", &cfg, &[]);
    lab.attach_dr(&t, LB_MAC);
    check(&lab, &t, &sums, false, true);
}

/// HTTP on :9000 for the splice (which binds on a request head): a POST is answered with
/// `<bytes> <sha256>` of its body.
const POST_HASH_SERVER: &str = r#"
import hashlib, http.server, socket
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        h, got = hashlib.sha256(), 0
        while got < n:
            b = self.rfile.read(min(1 << 16, n - got))
            if not b:
                break
            h.update(b)
            got += len(b)
        out = f"{got} {h.hexdigest()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
S(("::", 9000), H).serve_forever()
"#;

/// An HTTP POST of `SIZE` random bytes (checked against the server's digest), then a GET of
/// `/rand` on port 80 whose digest it prints. `argv`: host, size.
const SPLICE_CLIENT: &str = r#"
import hashlib, http.client, os, sys
host, size = sys.argv[1], int(sys.argv[2])
data = os.urandom(size)
c = http.client.HTTPConnection(host, 9000, timeout=30)
c.request("POST", "/up", body=data, headers={"Host": "up.example"})
got = c.getresponse().read().decode().strip()
c.close()
want = f"{len(data)} {hashlib.sha256(data).hexdigest()}"
print("upload", "ok" if got == want else f"MISMATCH got {got!r} want {want!r}")
c = http.client.HTTPConnection(host, 80, timeout=30)
c.request("GET", "/rand")
body = c.getresponse().read()
print("download", len(body), hashlib.sha256(body).hexdigest())
sys.exit(0 if got == want else 1)
"#;

#[test]
fn offload_splice_translates_super_packets_whole_once_spliced() {
    if !need_root() || !need_tool("ethtool") {
        return;
    }
    let mut lab = Lab::new("offsplice");
    let t = lab.topology(3);
    let sums = servers_with(&mut lab, &t, "post_hash_server.py", POST_HASH_SERVER);
    let cfg = format!(
        "[balancer]\ndevice = \"lb0\"\nsnat_addrs = [\"203.0.113.100\", \"2001:db8:100::100\"]\n\
         conntrack_capacity = 65536\nstats = \"127.0.0.1:9100\"\nsplice_capacity = 1024\n\
         offload = true\n{}",
        services("splice", "", 1)
    );
    lab.start_balancer(
        &t,
        "lb0",
        &cfg,
        &[
            "203.0.113.10/32 dev lb0",
            "2001:db8:10::10/128 dev lb0",
            "203.0.113.100/32 dev lb0",
            "2001:db8:100::100/128 dev lb0",
        ],
    );
    let client = lab.write("splice_client.py", SPLICE_CLIENT);
    let pass = |lab: &Lab, what: &str| {
        for vip in [VIP4, VIP6] {
            let out = lab
                .try_sh_timeout(
                    &t.client,
                    &format!("{} '{}' {vip} {SIZE}", python(), client.display()),
                    std::time::Duration::from_secs(120),
                )
                .unwrap_or_else(|e| panic!("{what} via {vip}: {e}\n{}", lab.log("balancer")));
            println!("{what} {vip}: {}", out.trim().replace('\n', "; "));
            assert!(out.contains("upload ok"), "upload via {vip}: {out}");
            let line = out
                .lines()
                .find(|l| l.starts_with("download"))
                .unwrap_or("");
            let f: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(f.get(1), Some(&SIZE.to_string().as_str()), "{line}");
            assert!(
                f.get(2).is_some_and(|d| sums.iter().any(|s| s == d)),
                "download via {vip}: {line} is no backend's file ({sums:?})"
            );
        }
        let s = lab.balancer_stats(&t);
        let sp = &s["splice"];
        let get = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
        println!(
            "{what}: splice {sp}; offload {}; drops {}",
            s["offload"], s["drops"]
        );
        assert_eq!(
            get(&s["drops"]["bad_offload"]) + get(&s["drops"]["malformed"]),
            0,
            "offload or malformed drops"
        );
        get(&sp["gso_translated"])
    };
    let whole = pass(&lab, "offloads on");
    assert!(whole > 0, "no super-packet was translated whole");
    // With the balancer namespace's ports unable to checksum or segment, its kernel cuts the
    // balancer's super-packets and completes every checksum from the partial sums the splice
    // left: the receivers then verify them (see the nat test).
    for p in ["c1", "b1", "b2", "b3"] {
        lab.sh(
            &t.balancer,
            &format!("ethtool -K {p} tx off tso off gso off"),
        );
    }
    let more = pass(&lab, "the balancer's ports without offloads");
    assert!(
        more > whole,
        "no super-packet translated in the second pass"
    );
}

/// Receives on :5300 (both families) the datagrams of [`UDP_SENDER`], checks each one's length
/// and contents, and per flow (source address, port and the flow byte) its order; writes its
/// counts as JSON to `argv[1]` whenever it has been idle for 0.3 s.
const UDP_CHECKER: &str = r#"
import json, os, socket, sys
out = sys.argv[1]
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind(("::", 5300))
s.settimeout(0.3)
pat = bytes(range(256)) * 260
st = {"got": 0, "bad": 0, "reordered": 0, "gaps": 0, "flows": 0}
last = {}
def dump():
    with open(out + ".tmp", "w") as f:
        json.dump(st, f)
    os.replace(out + ".tmp", out)
dump()
while True:
    try:
        b, addr = s.recvfrom(65536)
    except socket.timeout:
        dump()
        continue
    st["got"] += 1
    if len(b) < 7:
        st["bad"] += 1
        continue
    flow, seq, size = b[0], int.from_bytes(b[1:5], "big"), int.from_bytes(b[5:7], "big")
    o = (flow + seq) & 0xFF
    if len(b) != size or b[7:] != pat[o:o + size - 7]:
        st["bad"] += 1
        continue
    k = (addr[0], addr[1], flow)
    prev = last.get(k)
    if prev is None:
        st["flows"] += 1
        prev = -1
    if seq <= prev:
        st["reordered"] += 1
    elif seq != prev + 1:
        st["gaps"] += 1
    last[k] = max(seq, prev)
"#;

/// Sends bursts of numbered datagrams to `argv[1]:5300` from `argv[2]` sockets (flows), each
/// burst one `UDP_SEGMENT` send (10–40 datagrams of 64, 200 or 1 400 bytes, every fourth with
/// a shorter last one) that the client's kernel cuts into back-to-back datagrams; prints the
/// number sent.
const UDP_SENDER: &str = r#"
import socket, sys, time
vip, flows, bursts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fam = socket.AF_INET6 if ":" in vip else socket.AF_INET
pat = bytes(range(256)) * 260
def dgram(flow, seq, size):
    o = (flow + seq) & 0xFF
    return bytes([flow]) + seq.to_bytes(4, "big") + size.to_bytes(2, "big") + pat[o:o + size - 7]
socks = []
for f in range(flows):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.connect((vip, 5300))
    socks.append(s)
seqs, sent = [0] * flows, 0
for b in range(bursts):
    for f, s in enumerate(socks):
        size = (64, 200, 1400)[(b + f) % 3]
        n = 10 + (b * 7 + f) % 31
        parts = []
        for i in range(n):
            short = (b + f) % 4 == 0 and i == n - 1
            parts.append(dgram(f, seqs[f], size // 2 if short else size))
            seqs[f] += 1
        s.setsockopt(socket.SOL_UDP, 103, size)  # UDP_SEGMENT
        s.send(b"".join(parts))
        sent += n
    time.sleep(0.003)
print(sent)
"#;

/// The checkers' counts, summed over the backends, once every checker has been idle.
fn udp_counts(files: &[std::path::PathBuf], want: u64) -> serde_json::Value {
    let mut total = serde_json::json!({});
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(200));
        total = serde_json::json!({"got": 0, "bad": 0, "reordered": 0, "gaps": 0, "flows": 0});
        for f in files {
            let s: serde_json::Value = std::fs::read_to_string(f)
                .ok()
                .and_then(|s| serde_json::from_str(&s).ok())
                .unwrap_or_default();
            for k in ["got", "bad", "reordered", "gaps", "flows"] {
                total[k] = (total[k].as_u64().unwrap_or(0) + s[k].as_u64().unwrap_or(0)).into();
            }
        }
        if total["got"].as_u64() >= Some(want) {
            break;
        }
    }
    total
}

#[test]
fn offload_udp_bursts_are_coalesced_and_arrive_whole_and_in_order() {
    if !need_root() || !need_tool("ethtool") {
        return;
    }
    // dr: Ethernet frames through the balancer's TAP device.
    for mode in ["nat", "dnat", "dr"] {
        let mut lab = Lab::new(&format!("offudp{mode}"));
        let t = lab.topology(3);
        if mode == "dr" {
            for (i, b) in t.backends.clone().into_iter().enumerate() {
                lab.dr_backend(i, &b, &[VIP4, VIP6]);
            }
        }
        let checker = lab.write("udp_checker.py", UDP_CHECKER);
        let mut files = Vec::new();
        for b in t.backends.clone() {
            let f = lab.dir.join(format!("udp-{}.json", b.name));
            let (c, o) = (
                checker.to_string_lossy().into_owned(),
                f.to_string_lossy().into_owned(),
            );
            lab.spawn(&b.ns, &format!("udpcheck-{}", b.name), &[python(), &c, &o]);
            lab.wait_listen(&b.ns, "udp", 5300);
            files.push(f);
        }
        let mut cfg = if mode == "dr" {
            format!(
                "[balancer]\ndevice = \"lb0\"\nconntrack_capacity = 65536\n\
                 stats = \"127.0.0.1:9100\"\nmac = \"{LB_MAC}\"\noffload = true\n"
            )
        } else {
            String::from(
                "[balancer]\ndevice = \"lb0\"\nsnat_addrs = [\"203.0.113.100\", \"2001:db8:100::100\"]\n\
                 conntrack_capacity = 65536\nstats = \"127.0.0.1:9100\"\noffload = true\n",
            )
        };
        for (vip, pre) in [("203.0.113.10", "198.51.100."), ("[2001:db8:10::10]", "")] {
            cfg.push_str(&format!(
                "\n[[service]]\nvip = \"{vip}:5300\"\nproto = \"udp\"\nmode = \"{mode}\"\n\
                 scheduler = \"maglev\"\n[service.health]\nkind = \"none\"\n"
            ));
            for i in 1..=3 {
                // DR keeps the client's port: the backends' own port is 0 there.
                let port = if mode == "dr" { 0 } else { 5300 };
                let addr = if pre.is_empty() {
                    format!("[2001:db8:b::{}]:{port}", 10 + i)
                } else {
                    format!("{pre}{}:{port}", 10 + i)
                };
                let mac = if mode == "dr" {
                    format!("mac = \"02:00:00:00:00:1{i}\"\n")
                } else {
                    String::new()
                };
                cfg.push_str(&format!("[[service.backend]]\naddr = \"{addr}\"\n{mac}"));
            }
        }
        if mode == "dr" {
            lab.start_balancer(&t, "lb0", &cfg, &[]);
            lab.attach_dr(&t, LB_MAC);
        } else {
            start_nat_or_dnat(&mut lab, &t, mode, &cfg);
        }
        // The client's kernel cuts its UDP GSO sends itself: the balancer reads the datagrams
        // of a burst one by one, back to back.
        lab.sh(&t.client, "ethtool -K c0 tx-udp-segmentation off");
        let sender = lab.write("udp_sender.py", UDP_SENDER);
        let (mut sent, mut merged_before) = (0u64, 0u64);
        // The second pass with checksums computed by the client and not vouched for by the
        // balancer's veth: the balancer verifies each datagram's before it merges it, and the
        // backends verify the super-packets' (the balancer's ports compute them in software).
        for pass in ["partial checksums", "full checksums"] {
            if pass == "full checksums" {
                lab.sh(&t.client, "ethtool -K c0 tx off");
                for p in ["c1", "b1", "b2", "b3"] {
                    lab.sh(&t.balancer, &format!("ethtool -K {p} rx off tx off"));
                }
            }
            let sent_before = sent;
            for vip in [VIP4, VIP6] {
                let out = lab.sh(
                    &t.client,
                    &format!("{} '{}' {vip} 4 60", python(), sender.display()),
                );
                sent += out.trim().parse::<u64>().unwrap_or(0);
            }
            let c = udp_counts(&files, sent);
            let s = lab.balancer_stats(&t);
            let o = &s["offload"];
            println!(
                "mode {mode}, {pass}: sent {sent}, backends {c}; balancer offload {o}, drops {}",
                s["drops"]
            );
            assert_eq!(c["bad"], 0, "{mode}, {pass}: corrupted datagrams");
            assert_eq!(c["reordered"], 0, "{mode}, {pass}: datagrams out of order");
            assert_eq!(c["gaps"], 0, "{mode}, {pass}: datagrams lost");
            assert_eq!(
                c["got"].as_u64(),
                Some(sent),
                "{mode}, {pass}: datagrams delivered"
            );
            // Most bursts reach the balancer whole; a quarter of the datagrams merged is far
            // below what it does, far above what chance would give.
            let merged = o["udp_coalesced_datagrams"].as_u64().unwrap_or(0);
            assert!(
                merged - merged_before > (sent - sent_before) / 4,
                "{mode}, {pass}: too little was coalesced ({o})"
            );
            merged_before = merged;
        }
        assert!(
            lab.log("balancer").contains("udp_coalesce=true"),
            "the balancer does not say it coalesces: {}",
            lab.log("balancer")
        );
    }
}
