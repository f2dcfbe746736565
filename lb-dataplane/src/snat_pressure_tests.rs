//! SNAT port pressure through the data path: a spoofed SYN flood against a `nat` service with a
//! tiny pool. New flows reclaim the oldest half-open flow's port instead of being dropped
//! (`ports_exhausted`), established flows keep theirs, and the reclaim reaches live load, the
//! removal log and the sync log like any other removal.

use std::collections::HashSet;

use super::*;

const VIP: &str = "203.0.113.10:80";
const BACKEND: &str = "198.51.100.11:8080";

fn rig() -> Rig {
    let mut spec = nat_spec(VIP, Proto::Tcp, &[BACKEND]);
    // Two SNAT ports for the one backend.
    spec.snat_ports = 40_000..=40_001;
    let key = HashKey::from_bytes([9; 16]);
    let mut r = Rig::new(spec.clone(), Link::Ip);
    let mut opts = DataplaneOptions::new(key);
    opts.removal_log = 64;
    opts.sync_log = 64;
    opts.snat_ports = spec.snat_ports.clone();
    r.dp = Dataplane::new(&spec, r.cp.build().unwrap(), opts).unwrap();
    r
}

fn from(i: u32) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(std::net::Ipv4Addr::from(0xc000_0200 + i)),
        40_000,
    )
}

fn conns(r: &Rig) -> (u32, u32) {
    let id = r.cp.backend_id(sa(VIP), Proto::Tcp, sa(BACKEND)).unwrap();
    let l = r.dp.backend_load(id, r.now).unwrap();
    (l.active_conns, l.inactive_conns)
}

#[test]
fn spoofed_syns_reclaim_half_open_ports_and_every_consumer_sees_it() {
    let mut r = rig();
    // A real client completes its handshake: its port is never reclaimed.
    let out = r.forward(&tcp(from(1), sa(VIP), SYN, b""));
    let p = parse(&out, Link::Ip).unwrap();
    let (snat, bsrc) = (
        SocketAddr::new(p.key.src(), p.key.src_port()),
        SocketAddr::new(p.key.dst(), p.key.dst_port()),
    );
    r.forward(&tcp(bsrc, snat, SYNACK, b""));
    r.forward(&tcp(from(1), sa(VIP), ACK, b""));
    assert_eq!(conns(&r), (1, 0));
    // Spoofed SYNs: the first takes the last free port, each later one the previous one's.
    for i in 2..12 {
        r.now += lb_core::Duration::from_millis(1);
        r.forward(&tcp(from(i), sa(VIP), SYN, b""));
        assert_eq!(conns(&r), (1, 1), "after spoofed SYN {i}");
    }
    let t = r.dp.table_stats();
    assert_eq!(t.evicted_snat_pressure, 9);
    assert_eq!(r.dp.stats().drops_for(DropReason::PortsExhausted), 0);
    // The established client still flows; an evicted spoofed flow's ACK finds nothing.
    r.forward(&tcp(from(1), sa(VIP), ACK, b"GET /"));
    assert!(matches!(
        r.run(&tcp(from(2), sa(VIP), ACK, b"")).0,
        Verdict::Drop(_)
    ));
    // The removal log has the nine victims, oldest first, as half-open pressure evictions.
    let gone: Vec<Removal> = std::iter::from_fn(|| r.dp.poll_removal()).collect();
    assert_eq!(gone.len(), 9);
    for (x, i) in gone.iter().zip(2..) {
        assert_eq!(x.key.src(), from(i).ip());
        assert_eq!(x.reason, lb_conntrack::RemovalReason::EvictedSnatPressure);
        assert!(!x.was_active());
    }
    // The sync log tells the backup they are gone.
    let (mut seen, mut records, mut templates) = (HashSet::new(), Vec::new(), Vec::new());
    r.dp.sync_drain(r.now, 1024, &mut seen, &mut records, &mut templates);
    let deleted: HashSet<IpAddr> = records
        .iter()
        .filter(|x| x.op == lb_conntrack::sync::RecordOp::Delete)
        .map(|x| x.key.src())
        .collect();
    assert_eq!(deleted, (2..11).map(|i| from(i).ip()).collect());
    // Once the last half-open flow completes, only established flows hold ports: refused.
    assert_eq!(r.dp.table_stats().entries, 2);
    r.forward(&tcp(from(11), sa(VIP), ACK, b""));
    assert_eq!(conns(&r), (2, 0));
    assert_eq!(
        r.run(&tcp(from(12), sa(VIP), SYN, b"")).0,
        Verdict::Drop(DropReason::PortsExhausted)
    );
    assert_eq!(r.dp.table_stats().evicted_snat_pressure, 9);
}
