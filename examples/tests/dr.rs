//! End to end, mode `dr` (direct routing): `tun-balancer` on a TAP device that is a port of the
//! backends' bridge rewrites only destination MACs; backends hold the VIPs on `lo` without
//! answering ARP for them and reply to the client directly.
//!
//! Balancer-namespace commands beyond the standard topology (the balancer's MAC is
//! 02:00:5e:10:00:01, reached through a static neighbour that the VIP routes point at):
//! ```text
//! ip link set lb0 master br0
//! bridge fdb add 02:00:5e:10:00:01 dev lb0 master static
//! ip neigh add 198.51.100.254 lladdr 02:00:5e:10:00:01 dev br0 nud permanent
//! ip route add 203.0.113.10/32 via 198.51.100.254 dev br0
//! ip -6 neigh add 2001:db8:b::254 lladdr 02:00:5e:10:00:01 dev br0 nud permanent
//! ip -6 route add 2001:db8:10::10/128 via 2001:db8:b::254 dev br0
//! ```
//! Backends: `ip link set e0 address 02:00:00:00:00:1N`, the VIPs on `lo`,
//! `sysctl net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2`, `rp_filter=0`.

mod common;

use std::net::IpAddr;

use common::{need_root, need_tool, Lab};

const VIP4: &str = "203.0.113.10";
const VIP6: &str = "2001:db8:10::10";
const LB_MAC: &str = "02:00:5e:10:00:01";

fn dr_config() -> String {
    let mut c = format!(
        "[balancer]\ndevice = \"lb0\"\nconntrack_capacity = 65536\nstats = \"127.0.0.1:9100\"\nmac = \"{LB_MAC}\"\n"
    );
    for (vip, b) in [
        ("203.0.113.10", "198.51.100.1"),
        ("[2001:db8:10::10]", "[2001:db8:b::1"),
    ] {
        for (proto, port, kind) in [("tcp", 80, "tcp"), ("udp", 47000, "none")] {
            c.push_str(&format!(
                "\n[[service]]\nvip = \"{vip}:{port}\"\nproto = \"{proto}\"\nmode = \"dr\"\n\
                 [service.health]\nkind = \"{kind}\"\ninterval_ms = 200\n"
            ));
            for i in 1..=3 {
                let addr = if b.starts_with('[') {
                    format!("{b}{i}]:0")
                } else {
                    format!("{b}{i}:0")
                };
                c.push_str(&format!(
                    "[[service.backend]]\naddr = \"{addr}\"\nmac = \"02:00:00:00:00:1{i}\"\n"
                ));
            }
        }
    }
    c
}

#[test]
fn dr_tcp_and_udp_ipv4_ipv6() {
    if !need_root() || !need_tool("socat") || !need_tool("curl") || !need_tool("bridge") {
        return;
    }
    let mut lab = Lab::new("dr");
    let t = lab.topology(3);
    for (i, b) in t.backends.clone().into_iter().enumerate() {
        lab.dr_backend(i, &b, &[VIP4, VIP6]);
        lab.http_server(&b, 80);
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
    lab.start_balancer(&t, "lb0", &dr_config(), &[]);
    lab.attach_dr(&t, LB_MAC);
    for url in [format!("http://{VIP4}/id"), format!("http://[{VIP6}]/id")] {
        let got = lab
            .curl_many(&t.client, &url, 300)
            .unwrap_or_else(|e| panic!("{url}: {e}\nbalancer: {}", lab.log("balancer")));
        let tally = Lab::tally(&got);
        println!("{url}: {tally:?}");
        assert_eq!(got.len(), 300);
        for b in ["b1", "b2", "b3"] {
            let share = *tally.get(b).unwrap_or(&0) as f64 / 300.0;
            assert!((share - 1.0 / 3.0).abs() <= 0.10, "{b}: {tally:?}");
        }
    }
    for vip in [VIP4, VIP6] {
        let ip: IpAddr = vip.parse().unwrap();
        assert_eq!(
            lab.udp_ask(&t.client, ip, 47000, "direct").unwrap(),
            "direct"
        );
    }
    let s = lab.balancer_stats(&t);
    println!("drops: {}", s["drops"]);
    // Only the client's direction passes the balancer.
    assert_eq!(s["backends"][0]["reply_packets"], 0);
}
