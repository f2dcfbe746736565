//! State sync between two data paths: what the master logs, sent through lb-conntrack's wire
//! format, installed on the backup, which then forwards every synced flow exactly as the master
//! did.

use std::collections::HashSet;

use lb_conntrack::sync::{SyncReceiver, SyncSender};
use proptest::prelude::*;

use super::*;

/// A master and a backup with the same configuration and key, and a sync channel between them.
struct Pair {
    a: Rig,
    b: Rig,
    tx: SyncSender,
    rx: SyncReceiver,
    seen: HashSet<SyncChange>,
}

impl Pair {
    fn new(mut spec: DataplaneSpec) -> Pair {
        // Each node schedules on its own (rr from its own cursor, its own SNAT start): only
        // sync can make the backup agree with the master.
        spec.services[0].scheduler = "rr".parse().unwrap();
        let key = HashKey::from_bytes([7; 16]);
        let mk = |seed: u64| {
            let mut cp = ControlPlane::new(spec.clone(), key).unwrap();
            let mut opts = DataplaneOptions::new(key);
            opts.seed = seed;
            opts.sync_log = 1024;
            let dp = Dataplane::new(&spec, cp.build().unwrap(), opts).unwrap();
            Rig {
                cp,
                dp,
                buf: vec![0; 4096],
                now: Instant::from_secs(1),
            }
        };
        let mac = HashKey::from_bytes([3; 16]);
        Pair {
            a: mk(1),
            b: mk(0x5eed_5eed),
            tx: {
                // The receiver's challenge, echoed by the sender (wire freshness).
                let mut tx = SyncSender::new(1, 1, mac, 1472).unwrap();
                tx.set_echo(1);
                tx
            },
            rx: SyncReceiver::new(mac, 1),
            seen: HashSet::new(),
        }
    }

    /// Drains the master's log, sends it, installs it on the backup; returns the records sent.
    fn sync(&mut self) -> usize {
        let (mut recs, mut tmpls, mut out) = (Vec::new(), Vec::new(), Vec::new());
        self.a.dp.sync_drain(
            self.a.now,
            usize::MAX,
            &mut self.seen,
            &mut recs,
            &mut tmpls,
        );
        self.tx.encode_items(&recs, &tmpls, 0, &mut out);
        for m in &out {
            let got = self.rx.receive(m).unwrap();
            self.b.dp.apply_sync(&got.message, self.b.now, false);
        }
        recs.len() + tmpls.len()
    }

    /// A bulk dump of the master to the backup.
    fn bulk(&mut self) {
        self.export(None);
    }

    /// A pass over the master's tables (only flows seen since `since`, if given) sent to
    /// the backup.
    fn export(&mut self, since: Option<Instant>) {
        let (mut recs, mut tmpls, mut out) = (Vec::new(), Vec::new(), Vec::new());
        let mut c = Some(SyncCursor::START);
        while let Some(cur) = c {
            c = self
                .a
                .dp
                .sync_export(cur, 7, since, self.a.now, &mut recs, &mut tmpls);
        }
        self.tx.encode_items(&recs, &tmpls, 0, &mut out);
        for m in &out {
            let got = self.rx.receive(m).unwrap();
            self.b.dp.apply_sync(&got.message, self.b.now, false);
        }
    }

    fn tick(&mut self, ms: u64) {
        self.a.now += lb_core::Duration::from_millis(ms);
        self.b.now += lb_core::Duration::from_millis(ms);
    }
}

fn ends(out: &[u8]) -> (SocketAddr, SocketAddr) {
    let p = parse(out, Link::Ip).unwrap();
    (
        SocketAddr::new(p.key.src(), p.key.src_port()),
        SocketAddr::new(p.key.dst(), p.key.dst_port()),
    )
}

#[test]
fn backup_forwards_synced_flows_as_the_master_did() {
    let mut p = Pair::new(nat_spec("203.0.113.10:80", Proto::Tcp, &B3));
    let vip = sa("203.0.113.10:80");
    let clients: Vec<SocketAddr> = (0..12)
        .map(|i| SocketAddr::new("192.0.2.2".parse().unwrap(), 40_000 + i))
        .collect();
    let mut on_master = Vec::new();
    for c in &clients {
        let out = p.a.forward(&tcp(*c, vip, SYN, b""));
        let (snat, backend) = ends(&out);
        let back = p.a.forward(&tcp(backend, snat, SYNACK, b""));
        assert_eq!(ends(&back).1, *c);
        p.a.forward(&tcp(*c, vip, ACK, b""));
        on_master.push((snat, backend));
    }
    let sent = p.sync();
    // One record per flow: the SYN, SYN-ACK and ACK of each coalesce into its latest state.
    assert_eq!(sent, clients.len());
    // The master dies; the backup sees mid-stream packets only (no SYN): every flow keeps its
    // backend and its SNAT address and port, in both directions.
    p.tick(300);
    for (c, (snat, backend)) in clients.iter().zip(&on_master) {
        let out = p.b.forward(&tcp(*c, vip, ACK, b"more data"));
        assert_eq!(ends(&out), (*snat, *backend), "client {c}");
        let back = p.b.forward(&tcp(*backend, *snat, ACK, b"answer"));
        assert_eq!(ends(&back), (vip, *c));
    }
    // The installed flows count as the backends' active connections, as on the master.
    for id in 0..3 {
        let a = p.a.dp.backend_load(BackendId(id), p.a.now).unwrap();
        let b = p.b.dp.backend_load(BackendId(id), p.b.now).unwrap();
        assert_eq!(a.active_conns, b.active_conns, "backend {id}");
    }
    // The backup's SNAT pools hold the synced pairs: its own new flows never reuse one.
    let used: HashSet<(SocketAddr, SocketAddr)> = on_master.iter().copied().collect();
    for i in 0..3000 {
        let c = SocketAddr::new("192.0.2.77".parse().unwrap(), 1024 + i);
        let out = p.b.forward(&tcp(c, vip, SYN, b""));
        assert!(
            !used.contains(&ends(&out)),
            "SNAT pair reused: {:?}",
            ends(&out)
        );
    }
}

#[test]
fn removals_and_state_changes_reach_the_backup() {
    let mut p = Pair::new(nat_spec("203.0.113.10:80", Proto::Tcp, &B3));
    let vip = sa("203.0.113.10:80");
    let c1 = sa("192.0.2.2:40001");
    let c2 = sa("192.0.2.2:40002");
    let mut snat1 = None;
    for c in [c1, c2] {
        let (snat, backend) = ends(&p.a.forward(&tcp(c, vip, SYN, b"")));
        if c == c1 {
            snat1 = Some((snat, backend));
        }
    }
    p.sync();
    // c1 is established (a long timeout on the backup once synced).
    let (snat, backend) = snat1.unwrap();
    p.a.forward(&tcp(backend, snat, SYNACK, b""));
    p.a.forward(&tcp(c1, vip, ACK, b""));
    p.sync();
    let key = |c: SocketAddr| {
        lb_core::FlowKey::new(c.ip(), c.port(), vip.ip(), 80, lb_core::IpProto::Tcp).unwrap()
    };
    assert!(p.b.dp.flow_backend(&key(c1), p.b.now).is_some());
    // c1 is reset (CLOSE: a short timeout) and expires on the master 11 s later; the
    // backup, which last heard of it ESTABLISHED, would keep it: the removal is synced as a
    // delete.
    p.a.forward(&tcp(c1, vip, 0x04, b""));
    p.tick(11_000);
    p.a.dp.housekeeping(p.a.now, 4096);
    p.b.dp.housekeeping(p.b.now, 4096);
    assert_eq!(p.a.dp.flow_backend(&key(c1), p.a.now), None);
    assert!(p.b.dp.flow_backend(&key(c1), p.b.now).is_some());
    p.sync();
    assert_eq!(p.b.dp.flow_backend(&key(c1), p.b.now), None);
    assert!(p.b.dp.flow_backend(&key(c2), p.b.now).is_some());
    // Nothing more to say: an empty drain.
    assert_eq!(p.sync(), 0);
    // The backup does not echo what it installed.
    assert_eq!(p.b.dp.sync_pending(), 0);
}

#[test]
fn templates_and_bulk_dumps() {
    let mut spec = nat_spec("203.0.113.10:80", Proto::Tcp, &B3);
    spec.services[0].persistence_timeout = lb_core::Duration::from_secs(60);
    let mut p = Pair::new(spec);
    let vip = sa("203.0.113.10:80");
    let mut first = Vec::new();
    for i in 0..5u8 {
        let c = SocketAddr::new(IpAddr::from([192, 0, 2, 10 + i]), 1000);
        first.push(ends(&p.a.forward(&tcp(c, vip, SYN, b""))).1);
    }
    // Nothing was sent incrementally: the backup learns it all from a bulk dump.
    p.a.dp.sync_drain(
        p.a.now,
        usize::MAX,
        &mut p.seen,
        &mut Vec::new(),
        &mut Vec::new(),
    );
    p.bulk();
    // After a takeover, a client's *new* connections follow its template to the same backend.
    for i in 0..5u8 {
        let c = SocketAddr::new(IpAddr::from([192, 0, 2, 10 + i]), 2000);
        let got = ends(&p.b.forward(&tcp(c, vip, SYN, b""))).1;
        assert_eq!(got, first[i as usize], "client {c}");
    }
}

/// A SIP call becomes established on the master with its second message, and the master tells
/// the backup, whose eviction then spares the call too; a Call-ID seen once stays new there.
#[test]
fn a_calls_second_message_establishes_it_on_the_backup_too() {
    let mut spec = nat_spec("203.0.113.10:5060", Proto::Udp, &B3);
    spec.services[0].affinity = Affinity::SipCallId;
    let mut p = Pair::new(spec);
    let (client, vip) = (sa("192.0.2.2:5060"), sa("203.0.113.10:5060"));
    let sip = |method: &str, call: &str| {
        format!("{method} sip:b@203.0.113.10 SIP/2.0\r\nCall-ID: {call}\r\n\r\n").into_bytes()
    };
    p.a.forward(&udp(client, vip, &sip("INVITE", "call-1")));
    p.a.forward(&udp(client, vip, &sip("INVITE", "once")));
    p.sync();
    let service = lb_conntrack::Service::of_flow(
        &lb_core::FlowKey::new(
            client.ip(),
            client.port(),
            vip.ip(),
            vip.port(),
            lb_core::IpProto::Udp,
        )
        .unwrap(),
    );
    let tk = |call: &[u8]| TemplateKey::affinity(service, p.a.dp.flows.hash_bytes(call));
    let (call, once) = (tk(b"call-1"), tk(b"once"));
    let est = |dp: &Dataplane, k| {
        dp.ct4
            .persist()
            .get(k, Instant::from_secs(1))
            .map(|i| i.established)
    };
    assert_eq!(est(&p.b.dp, &call), Some(false));
    p.a.forward(&udp(client, vip, &sip("ACK", "call-1")));
    assert!(p.sync() >= 1, "the promotion is logged");
    assert_eq!(est(&p.a.dp, &call), Some(true));
    assert_eq!(est(&p.b.dp, &call), Some(true));
    assert_eq!(est(&p.b.dp, &once), Some(false));
    // Bulk dumps carry the flag too.
    p.b.dp
        .ct4
        .persist_mut()
        .expire(Instant::from_secs(10_000), 100);
    p.bulk();
    assert_eq!(est(&p.b.dp, &call), Some(true));
}

#[test]
fn merge_keeps_the_masters_own_flows() {
    let mut p = Pair::new(nat_spec("203.0.113.10:80", Proto::Tcp, &B3));
    let vip = sa("203.0.113.10:80");
    let c = sa("192.0.2.2:40001");
    // Both nodes forwarded the same 4-tuple during a split, to different backends (b's round
    // robin is one step ahead).
    let on_a = ends(&p.a.forward(&tcp(c, vip, SYN, b""))).1;
    p.b.forward(&tcp(sa("192.0.2.3:1"), vip, SYN, b""));
    let on_b = ends(&p.b.forward(&tcp(c, vip, SYN, b""))).1;
    assert_ne!(on_a, on_b);
    let (mut recs, mut tmpls, mut out) = (Vec::new(), Vec::new(), Vec::new());
    p.a.dp
        .sync_drain(p.a.now, usize::MAX, &mut p.seen, &mut recs, &mut tmpls);
    p.tx.encode_items(&recs, &tmpls, 0, &mut out);
    let got = p.rx.receive(&out[0]).unwrap();
    // b is master too: merging leaves its own entry alone.
    let r = p.b.dp.apply_sync(&got.message, p.b.now, true);
    assert_eq!((r.installed, r.ignored), (0, 1));
    assert_eq!(ends(&p.b.forward(&tcp(c, vip, ACK, b""))).1, on_b);
    // Without merge (a backup), the master's entry replaces it.
    let r = p.b.dp.apply_sync(&got.message, p.b.now, false);
    assert_eq!(r.updated, 1);
    assert_eq!(ends(&p.b.forward(&tcp(c, vip, ACK, b""))).1, on_a);
}

/// Backend ids are recycled, so two balancers' ids for one backend may differ: records name
/// backends by their tag (service and address), and the backup installs each flow and template
/// under its own id for the same backend; a backend it does not have is refused.
#[test]
fn a_peer_whose_ids_differ_gets_the_same_backends() {
    for missing in [false, true] {
        let mut spec = nat_spec("203.0.113.10:80", Proto::Tcp, &B3);
        spec.services[0].persistence_timeout = lb_core::Duration::from_secs(60);
        let mut p = Pair::new(spec.clone());
        // The backup lists the backends in another order (other ids), or lacks one.
        let order: &[&str] = if missing {
            &["198.51.100.13:8080", "198.51.100.12:8080"]
        } else {
            &[
                "198.51.100.13:8080",
                "198.51.100.12:8080",
                "198.51.100.11:8080",
            ]
        };
        let mut bspec = nat_spec("203.0.113.10:80", Proto::Tcp, order);
        bspec.services[0].scheduler = "rr".parse().unwrap();
        bspec.services[0].persistence_timeout = lb_core::Duration::from_secs(60);
        let key = HashKey::from_bytes([7; 16]);
        let mut cp = ControlPlane::new(bspec.clone(), key).unwrap();
        let mut opts = DataplaneOptions::new(key);
        opts.seed = 0x5eed;
        p.b.dp = Dataplane::new(&bspec, cp.build().unwrap(), opts).unwrap();
        let vip = sa("203.0.113.10:80");
        let mut on_master = Vec::new();
        for i in 0..6u8 {
            let c = SocketAddr::new(IpAddr::from([192, 0, 2, 10 + i]), 40_000);
            on_master.push((c, ends(&p.a.forward(&tcp(c, vip, SYN, b"")))));
        }
        p.sync();
        let gone = sa("198.51.100.11:8080");
        let lost = on_master.iter().filter(|(_, (_, b))| *b == gone).count() as u64;
        let s = p.b.dp.stats();
        assert_eq!(s.sync_refused, if missing { 2 * lost } else { 0 }, "{s:?}");
        for (c, (snat, backend)) in &on_master {
            if missing && *backend == gone {
                continue;
            }
            // The flow, and a new connection of the same client (its template), go to the
            // backend the master chose.
            assert_eq!(
                ends(&p.b.forward(&tcp(*c, vip, ACK, b"x"))),
                (*snat, *backend)
            );
            let again = SocketAddr::new(c.ip(), 50_000);
            assert_eq!(ends(&p.b.forward(&tcp(again, vip, SYN, b""))).1, *backend);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// Whatever the master does (new flows, replies, time passing, expiry), after a sync
    /// (the log, then a refresh pass over the flows seen since the previous pass) the backup
    /// holds exactly the master's flows, each with its backend, expiring when the master's do.
    #[test]
    fn backup_mirrors_master(ops in prop::collection::vec((0u8..4, 0u16..24, 0u64..4000), 1..80)) {
        let mut p = Pair::new(nat_spec("203.0.113.10:80", Proto::Udp, &B3));
        let vip = sa("203.0.113.10:80");
        let mut pass = p.a.now;
        for (op, port, ms) in ops {
            let c = SocketAddr::new("192.0.2.2".parse().unwrap(), 5000 + port);
            match op {
                0 | 1 => {
                    let out = p.a.forward(&udp(c, vip, b"q"));
                    if op == 1 {
                        let (snat, backend) = ends(&out);
                        p.a.forward(&udp(backend, snat, b"a"));
                    }
                }
                2 => {
                    p.tick(ms * 10);
                    p.a.dp.housekeeping(p.a.now, 4096);
                    p.b.dp.housekeeping(p.b.now, 4096);
                }
                _ => {
                    p.sync();
                    p.export(Some(pass));
                    pass = p.a.now;
                }
            }
        }
        p.sync();
        p.export(Some(pass));
        for port in 0..24 {
            let c = SocketAddr::new("192.0.2.2".parse().unwrap(), 5000 + port);
            let k = lb_core::FlowKey::new(c.ip(), c.port(), vip.ip(), 80, lb_core::IpProto::Udp).unwrap();
            prop_assert_eq!(p.a.dp.flow_backend(&k, p.a.now), p.b.dp.flow_backend(&k, p.b.now), "{}", c);
        }
    }
}
