//! End to end, mode `tunnel`: the balancer encapsulates (IPIP / IP6IP6) towards the backends,
//! whose `lb-decap` agent decapsulates into a local TUN device (this kernel has no `ipip`);
//! backends answer the client directly from the VIP. A tshark capture checks our headers.

mod common;

use std::net::IpAddr;

use common::{need_root, need_tool, tshark_read, Lab};

const VIP4: &str = "203.0.113.10";
const VIP6: &str = "2001:db8:10::10";

fn tunnel_config(tunnel: &str) -> String {
    let mut c = String::from(
        "[balancer]\ndevice = \"lb0\"\nsnat_addrs = [\"203.0.113.100\", \"2001:db8:100::100\"]\n\
         conntrack_capacity = 65536\nstats = \"127.0.0.1:9100\"\nmtu = 1500\n",
    );
    for (vip, b) in [
        ("203.0.113.10", "198.51.100.1"),
        ("[2001:db8:10::10]", "[2001:db8:b::1"),
    ] {
        for (proto, port, kind) in [
            ("tcp", 80, "tcp"),
            ("udp", 47000, "none"),
            ("tcp", 9000, "none"),
        ] {
            c.push_str(&format!(
                "\n[[service]]\nvip = \"{vip}:{port}\"\nproto = \"{proto}\"\nmode = \"tunnel\"\ntunnel = \"{tunnel}\"\n\
                 [service.health]\nkind = \"{kind}\"\ninterval_ms = 500\ntimeout_ms = 400\nfall = 3\n"
            ));
            for i in 1..=3 {
                let addr = if b.starts_with('[') {
                    format!("{b}{i}]:0")
                } else {
                    format!("{b}{i}:0")
                };
                c.push_str(&format!("[[service.backend]]\naddr = \"{addr}\"\n"));
            }
        }
    }
    c
}

fn run_tunnel(tag: &str, tunnel: &str) {
    if !need_root() || !need_tool("socat") || !need_tool("curl") || !need_tool("tshark") {
        return;
    }
    let mut lab = Lab::new(tag);
    let t = lab.topology(3);
    for b in t.backends.clone() {
        lab.vip_on_backend(&b, &[VIP4, VIP6]);
        // The backend's kernel decapsulates where it can (`ipip` / `ip6tnl`, IPIP only); this
        // machine's kernel cannot, so lb-decap does it through a TUN device.
        if tunnel == "ipip"
            && lab.kernel_has_link(&b.ns, "ipip")
            && lab.kernel_has_link(&b.ns, "ip6tnl")
        {
            println!("{}: kernel ipip / ip6tnl devices decapsulate", b.name);
            lab.kernel_decap(&b);
        } else {
            lab.decap_agent(&b);
        }
        lab.http_server(&b, 80);
        lab.spawn(
            &b.ns,
            &format!("tcp-echo-{}", b.name),
            &[
                "socat",
                "TCP6-LISTEN:9000,fork,reuseaddr,ipv6only=0",
                "EXEC:cat",
            ],
        );
        lab.udp_echo(
            &b.ns,
            &format!("echo4-{}", b.name),
            VIP4.parse().unwrap(),
            47000,
        );
        lab.udp_echo(
            &b.ns,
            &format!("echo6-{}", b.name),
            VIP6.parse().unwrap(),
            47000,
        );
    }
    let filter = if tunnel == "gue" {
        "udp port 6080"
    } else {
        "ip proto 4 or ip6 proto 41"
    };
    let cap = lab.capture(&t.balancer, "br0", filter);
    lab.start_balancer(
        &t,
        "lb0",
        &tunnel_config(tunnel),
        &["203.0.113.10/32 dev lb0", "2001:db8:10::10/128 dev lb0"],
    );
    for url in [format!("http://{VIP4}/id"), format!("http://[{VIP6}]/id")] {
        let got = lab.curl_many(&t.client, &url, 300).unwrap_or_else(|e| {
            panic!(
                "{url}: {e}\nbalancer: {}\ndecap: {}",
                lab.log("balancer"),
                lab.log("decap-b1")
            )
        });
        let tally = Lab::tally(&got);
        println!("{url}: {tally:?}");
        assert_eq!(got.len(), 300);
        for b in ["b1", "b2", "b3"] {
            let share = *tally.get(b).unwrap_or(&0) as f64 / 300.0;
            // (A backend the health checks took down meanwhile skews the spread: say so.)
            let health: Vec<String> = lab
                .log("balancer")
                .lines()
                .filter(|l| l.contains("backend down") || l.contains("backend up"))
                .map(str::to_owned)
                .collect();
            assert!(
                (share - 1.0 / 3.0).abs() <= 0.10,
                "{b}: {tally:?}; health transitions: {health:#?}"
            );
        }
    }
    for vip in [VIP4, VIP6] {
        let ip: IpAddr = vip.parse().unwrap();
        assert_eq!(
            lab.udp_ask(&t.client, ip, 47000, "tunnelled").unwrap(),
            "tunnelled"
        );
    }
    // Uploads of full-size segments: 1500-byte packets do not fit the tunnel (MTU 1500 minus
    // the outer header), the balancer answers "fragmentation needed" / "packet too big", the
    // client's TCP lowers its segment size and the echo completes.
    for target in [format!("TCP4:{VIP4}:9000"), format!("TCP6:[{VIP6}]:9000")] {
        let got = lab
            .try_sh_timeout(
                &t.client,
                &format!("head -c 300000 /dev/zero | socat -t 5 -T 10 - {target} | wc -c"),
                std::time::Duration::from_secs(30),
            )
            .unwrap_or_else(|e| panic!("{target}: {e}"));
        assert_eq!(got.trim(), "300000", "{target}: {}", lab.log("balancer"));
    }
    let s = lab.balancer_stats(&t);
    assert!(
        s["icmp_generated"].as_u64().unwrap() >= 2,
        "no ICMP too-big sent: {s}"
    );
    lab.stop_capture(&cap);
    if tunnel == "ipip" {
        // Every captured frame dissects as IP in IP (v4 and v6), with no malformed packet and no
        // bad IP checksum: an independent check of the headers we wrote.
        let protos = tshark_read(&cap, &["-T", "fields", "-e", "frame.protocols"]);
        let lines: Vec<&str> = protos.lines().collect();
        assert!(
            lines.len() > 1000,
            "too few packets captured: {}",
            lines.len()
        );
        assert!(
            lines.iter().any(|l| l.contains("ip:ip:tcp")),
            "{}",
            &protos[..200.min(protos.len())]
        );
        assert!(lines.iter().any(|l| l.contains("ipv6:ipv6:tcp")));
        assert!(
            lines
                .iter()
                .all(|l| l.contains("ip:ip:") || l.contains("ipv6:ipv6:")),
            "a frame did not dissect as IP-in-IP"
        );
        let bad = tshark_read(
            &cap,
            &[
                "-d",
                "udp.port==47000,data",
                "-o",
                "ip.check_checksum:TRUE",
                "-Y",
                "_ws.malformed || ip.checksum.status == \"Bad\"",
            ],
        );
        assert!(bad.trim().is_empty(), "malformed or bad packets:\n{bad}");
    }
}

#[test]
fn tunnel_ipip_tcp_and_udp_ipv4_ipv6() {
    run_tunnel("ipip", "ipip");
}

#[test]
fn tunnel_gue_tcp_and_udp_ipv4_ipv6() {
    run_tunnel("gue", "gue");
}
