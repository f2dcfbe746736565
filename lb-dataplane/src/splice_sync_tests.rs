//! Sync of spliced connections: a peer that applies the records translates every later
//! segment exactly as the node that spliced the connection.

use lb_conntrack::sync::{decode, SpliceRecord, SyncMessage, SyncSender, SPLICE_FIN_CLIENT};

use super::*;

const SYNC_KEY: HashKey = HashKey::from_bytes(*b"splice-sync-key!");

/// Sends `recs` as one stream's messages and decodes them, as a peer receives them.
fn wire(recs: &[SpliceRecord]) -> Vec<SyncMessage> {
    let mut tx = SyncSender::new(1, 1, SYNC_KEY, 1472).unwrap();
    let mut out = Vec::new();
    tx.encode_splices(recs, 0, &mut out);
    out.iter().map(|m| decode(m, &SYNC_KEY).unwrap()).collect()
}

fn drain(r: &mut Rig) -> Vec<SpliceRecord> {
    let mut v = Vec::new();
    r.dp.splice_sync_drain(r.now, &mut v);
    v
}

fn apply(to: &mut Rig, recs: &[SpliceRecord], merge: bool) -> crate::SyncApplied {
    let mut total = crate::SyncApplied::default();
    for m in wire(recs) {
        let a = to.dp.apply_sync(&m, to.now, merge);
        total.splices += a.splices;
        total.refused += a.refused;
        total.ignored += a.ignored;
    }
    total
}

/// Splices a connection with timestamps and window scaling on `r`: returns the client, the
/// backend, the SNAT address, and the next (client seq, our ack, backend seq).
fn spliced(r: &mut Rig, port: u16) -> (SocketAddr, SocketAddr, SocketAddr, (u32, u32, u32)) {
    let client = SocketAddr::new("192.0.2.2".parse().unwrap(), port);
    let head = get("api.example", "/big");
    let (c, l, bsyn) = open(r, client, &head, true);
    let bts = bsyn.o.timestamps.unwrap().0;
    let s = 0x7000_0000u32;
    let (out, _) = r.send(&backend_synack(&bsyn, s, c, bts));
    assert!(out.is_some(), "held head to the backend");
    let hl = head.len() as u32;
    let resp = with_ts(
        seg(
            bsyn.dst,
            bsyn.src,
            s.wrapping_add(1),
            c.wrapping_add(1 + hl),
            flags::ACK | flags::PSH,
            b"HTTP/1.1 200 OK\r\n\r\nabc",
        ),
        50_010,
        bts,
    );
    let (out, _) = r.send(&resp);
    assert!(out.is_some(), "the answer reaches the client");
    (
        client,
        bsyn.dst,
        bsyn.src,
        (
            c.wrapping_add(1 + hl),
            l.wrapping_add(23),
            s.wrapping_add(23),
        ),
    )
}

#[test]
fn a_peer_that_applies_the_records_translates_as_the_splicer_did() {
    let mut a = Rig::new(Affinity::None, |_| {});
    let mut b = Rig::new(Affinity::None, |_| {});
    b.now = a.now;
    // Nothing to send before the backend acknowledged the head.
    let (client, be, snat, (cs, la, bs)) = spliced(&mut a, 40_000);
    let recs = drain(&mut a);
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert!(!recs[0].delete && recs[0].backend_tag.is_some());
    assert_eq!(recs[0].snat, snat);
    let got = apply(&mut b, &recs, false);
    assert_eq!((got.splices, got.refused), (1, 0));
    assert_eq!(b.dp.splice_stats().synced_in, 1);
    assert_eq!(b.dp.splice_stats().active, 1);
    // The same segments, both ways, come out of both nodes byte for byte.
    let vip = sa(VIP);
    let mut to_b = with_ts(seg(client, vip, cs, la, flags::ACK, b"more"), 900, 12_345);
    to_b.h.window = 300;
    let mut to_c = with_ts(
        seg(be, snat, bs, cs, flags::ACK, b"body bytes"),
        50_100,
        4_242,
    );
    to_c.h.window = 2000;
    for s in [&to_b, &to_c] {
        let (oa, va) = a.send(s);
        let (ob, vb) = b.send(s);
        assert!(matches!(va, Verdict::Forward { .. }), "{va:?}");
        assert_eq!(va, vb);
        let (oa, ob) = (oa.unwrap(), ob.unwrap());
        assert_eq!((oa.src, oa.dst, oa.h, oa.o), (ob.src, ob.dst, ob.h, ob.o));
        assert_eq!(oa.data, ob.data);
    }
    // A record from the peer is not sent back.
    assert!(drain(&mut b).is_empty());
    // The client's FIN travels; then the end of the connection deletes it on the peer.
    a.send(&seg(client, vip, cs + 4, la, flags::FIN | flags::ACK, b""));
    let recs = drain(&mut a);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].flags & SPLICE_FIN_CLIENT, SPLICE_FIN_CLIENT);
    apply(&mut b, &recs, false);
    a.send(&seg(
        be,
        snat,
        bs + 10,
        cs + 5,
        flags::FIN | flags::ACK,
        b"",
    ));
    a.now += Duration::from_secs(3);
    assert!(a.poll().is_none());
    assert_eq!(a.dp.splice_stats().active, 0);
    let recs = drain(&mut a);
    assert!(recs.iter().any(|r| r.delete), "{recs:?}");
    let got = apply(&mut b, &recs, false);
    assert!(got.splices >= 1);
    assert_eq!(b.dp.splice_stats().active, 0);
}

#[test]
fn bulk_and_refresh_exports_and_merge_keeps_local_connections() {
    let mut a = Rig::new(Affinity::None, |_| {});
    for i in 0..5 {
        spliced(&mut a, 41_000 + i);
    }
    let mut all = Vec::new();
    a.dp.splice_sync_export(None, a.now, &mut all);
    assert_eq!(all.len(), 5);
    // A refresh pass from later on sends none (no traffic since), one after a segment.
    let later = a.now + Duration::from_secs(1);
    let mut v = Vec::new();
    a.dp.splice_sync_export(Some(later), later, &mut v);
    assert!(v.is_empty(), "{v:?}");
    // A node that is master itself (merge) with its own connection in the first record's
    // slot keeps it, and installs the rest.
    let mut m = Rig::new(Affinity::None, |_| {});
    m.now = a.now;
    let (mine, ..) = spliced(&mut m, 41_000);
    assert_eq!(mine.port(), 41_000);
    let got = apply(&mut m, &all, true);
    assert_eq!((got.splices, got.ignored), (4, 1));
    assert_eq!(m.dp.splice_stats().active, 5);
    // A node whose slots differ (another capacity) refuses what does not fit.
    let mut other = Rig::new(Affinity::None, |s| s.splice_capacity = 16);
    let got = apply(&mut other, &all, false);
    assert_eq!(got.splices + got.refused, 5);
    assert!(got.refused > 0, "{got:?}");
    assert_eq!(other.dp.splice_stats().sync_refused, got.refused);
}

/// The slot pool's bookkeeping agrees with itself: every slot in use is found by its key,
/// the free queue holds exactly the free slots, once each, and `active` counts the rest.
fn assert_consistent(r: &Rig) {
    let sp = &r.dp.splice;
    let mut free = 0;
    for (i, x) in sp.slots.iter().enumerate() {
        if x.state == super::super::State::Free {
            free += 1;
            assert_eq!(sp.free.iter().filter(|&&f| f as usize == i).count(), 1);
        } else {
            assert_eq!(sp.find(&x.key, x.hash), Some(i), "slot {i} not indexed");
        }
    }
    assert_eq!(sp.free.len(), free);
    assert_eq!(sp.stats.active as usize, sp.slots.len() - free);
}

proptest! {
    /// Whatever records a peer sends (in range or not, for this VIP or another, deletes of
    /// anything), applying them never panics, keeps the pool consistent, and a segment of
    /// any installed connection is translated or dropped, never mishandled.
    #[test]
    fn any_peer_records_keep_the_pool_consistent(
        recs in proptest::collection::vec(
            (
                any::<bool>(),
                0u16..6,
                0u16..80,
                0u32..5,
                any::<bool>(),
                any::<[u32; 5]>(),
                0u8..32,
                any::<bool>(),
            ),
            1..60,
        ),
        merge in any::<bool>(),
    ) {
        let mut r = Rig::new(Affinity::None, |_| {});
        let base = r.dp.splice.port_base;
        let vip = sa(VIP);
        for (i, (del, cport, pslot, b, other_vip, n, flags, far)) in recs.into_iter().enumerate() {
            let dst = if other_vip { sa("203.0.113.11:80") } else { vip };
            let key = lb_core::FlowKey::v4(
                "192.0.2.9".parse().unwrap(),
                1000 + cport,
                match dst.ip() { std::net::IpAddr::V4(a) => a, _ => unreachable!() },
                dst.port(),
                lb_core::IpProto::Tcp,
            );
            let rec = if del {
                SpliceRecord::delete(key)
            } else {
                let port = if far { base.wrapping_sub(1) } else { base.wrapping_add(pslot) };
                SpliceRecord {
                    delete: false,
                    backend: lb_core::BackendId(b),
                    snat: SocketAddr::new(SNAT.parse().unwrap(), port),
                    remaining_ms: 1000 + i as u32,
                    local_isn: n[0],
                    backend_isn: n[1],
                    client_ts0: n[2],
                    backend_ts0: n[3],
                    ts_shift: n[4],
                    client_wscale: Some(7),
                    backend_wscale: None,
                    flags,
                    ..SpliceRecord::delete(key)
                }
            };
            apply(&mut r, &[rec], merge);
            assert_consistent(&r);
        }
        // Segments of every installed connection, both ways.
        let live: Vec<(SocketAddr, SocketAddr, SocketAddr)> = r.dp.splice.slots.iter()
            .filter(|x| x.state != super::super::State::Free)
            .map(|x| (x.client, x.baddr, x.snat))
            .collect();
        for (client, be, snat) in live {
            let (_, v) = r.send(&seg(client, vip, 5, 6, flags::ACK, b"x"));
            prop_assert!(matches!(v, Verdict::Forward { .. } | Verdict::Drop(_)), "{:?}", v);
            let (_, v) = r.send(&seg(be, snat, 5, 6, flags::ACK, b"y"));
            prop_assert!(matches!(v, Verdict::Forward { .. } | Verdict::Drop(_)), "{:?}", v);
        }
        r.now += Duration::from_secs(1000);
        while r.poll().is_some() {}
        assert_consistent(&r);
    }
}

/// (active, inactive) connections of the backend at `addr`, as the live load counts them.
fn conns(r: &Rig, addr: SocketAddr) -> (u32, u32) {
    let id = (0..8u32)
        .map(lb_core::BackendId)
        .find(|&b| r.dp.tables.backend(b).is_some_and(|x| x.addr == addr))
        .expect("backend");
    let l = r.dp.backend_load(id, r.now).expect("load");
    (l.active_conns, l.inactive_conns)
}

#[test]
fn spliced_connections_count_in_their_backends_load_here_and_on_the_peer() {
    let mut a = Rig::new(Affinity::None, |_| {});
    let mut b = Rig::new(Affinity::None, |_| {});
    b.now = a.now;
    // While connecting: an inactive connection of the chosen backend.
    let client = sa("192.0.2.2:42000");
    let (c, _, bsyn) = open(&mut a, client, &get("api.example", "/"), true);
    assert_eq!(conns(&a, bsyn.dst), (0, 1));
    // The backend refuses: the next one is tried, the first one's count goes.
    let (next, _) = a.send(&refusal(&bsyn, c));
    let next = next.expect("SYN to the next backend");
    assert_ne!(next.dst, bsyn.dst);
    assert_eq!(conns(&a, bsyn.dst), (0, 0));
    assert_eq!(conns(&a, next.dst), (0, 1));
    // Spliced connections: active, on the node that spliced them and on its peer.
    let (_, be, snat, (cs, la, bs)) = spliced(&mut a, 42_001);
    assert_eq!(conns(&a, be).0, 1);
    apply(&mut b, &drain(&mut a), false);
    assert_eq!(conns(&b, be), (1, 0));
    // Closing: inactive; ended: gone, on both.
    let vip = sa(VIP);
    a.send(&seg(client, vip, 0, 0, flags::RST, b""));
    a.send(&seg(
        sa("192.0.2.2:42001"),
        vip,
        cs,
        la,
        flags::FIN | flags::ACK,
        b"",
    ));
    a.send(&seg(be, snat, bs, cs + 1, flags::FIN | flags::ACK, b""));
    assert_eq!(conns(&a, be), (0, 1));
    a.now += Duration::from_secs(3);
    assert!(a.poll().is_none());
    let recs = drain(&mut a);
    assert_eq!(conns(&a, be), (0, 0));
    apply(&mut b, &recs, false);
    assert_eq!(conns(&b, be), (0, 0));
    assert_eq!(a.dp.splice_stats().active, 0);
}

#[test]
fn a_removed_backend_keeps_its_id_while_a_spliced_connection_holds_it() {
    let mut r = Rig::new(Affinity::None, |_| {});
    let (_, be, ..) = spliced(&mut r, 43_000);
    assert_eq!(be, sa(BACKENDS[0]), "api.example's rule");
    let id = r.cp.backend_id(sa(VIP), Proto::Tcp, be).unwrap();
    // A reload removes the backend (and the rule naming it).
    let mut spec = r.spec.clone();
    spec.services[0].backends.retain(|b| b.addr != be);
    spec.services[0].splice.as_mut().unwrap().rules.clear();
    r.cp.apply(spec.clone()).unwrap();
    let t = r.cp.build().unwrap();
    r.dp.set_tables(t, r.now);
    r.dp.set_splice(&spec).unwrap();
    assert!(
        r.dp.release_retired().is_empty(),
        "the spliced connection still refers to backend {id:?}"
    );
    // Once the connection is gone, the id is free.
    let client = sa("192.0.2.2:43000");
    r.send(&seg(client, sa(VIP), 0, 0, flags::RST, b""));
    r.now += Duration::from_secs(3);
    while r.poll().is_some() {}
    assert_eq!(r.dp.splice_stats().active, 0);
    assert_eq!(r.dp.release_retired(), vec![id]);
}

#[test]
fn an_ended_spliced_connection_is_a_session_of_its_backend() {
    let mut r = Rig::new(Affinity::None, |_| {});
    let before = r.dp.table_stats().sessions.packets.count();
    let t0 = r.now;
    let (client, be, snat, (cs, la, bs)) = spliced(&mut r, 44_000);
    let id = r.cp.backend_id(sa(VIP), Proto::Tcp, be).unwrap();
    let vip = sa(VIP);
    r.now += Duration::from_millis(700);
    for i in 0..5u32 {
        r.send(&seg(client, vip, cs + i, la, flags::ACK, b"x"));
    }
    r.send(&seg(client, vip, cs + 5, la, flags::FIN | flags::ACK, b""));
    r.send(&seg(be, snat, bs, cs + 6, flags::FIN | flags::ACK, b""));
    r.now += Duration::from_secs(3);
    assert!(r.poll().is_none());
    let ts = r.dp.table_stats();
    assert_eq!(ts.sessions.packets.count(), before + 1);
    let b = &ts.backend_sessions[id.get() as usize];
    assert_eq!(b.packets.count(), 1);
    // SYN, ACK, head (3), the backend's SYN-ACK and answer (2), 5 + FIN + FIN (7).
    assert_eq!(b.packets.sum(), 12);
    let ms = (r.now - t0).as_millis() as u64 - 3000;
    assert_eq!(b.duration_ms.sum(), ms, "first packet to last");
}

#[test]
fn a_peer_record_never_evicts_a_live_connection_spliced_here() {
    // Two active nodes splice different clients into the same slot (slot 0, first use).
    let mut a = Rig::new(Affinity::None, |_| {});
    let mut b = Rig::new(Affinity::None, |_| {});
    b.now = a.now;
    let (mine, ..) = spliced(&mut b, 45_000);
    spliced(&mut a, 45_001);
    let recs = drain(&mut a);
    assert_eq!(recs.len(), 1);
    let got = apply(&mut b, &recs, false);
    assert_eq!((got.splices, got.ignored), (0, 1));
    assert_eq!(b.dp.splice_stats().active, 1);
    let key = b.dp.splice.slots[0].key;
    assert_eq!(key.src_port(), mine.port(), "b's own connection stays");
    // A connection a peer sent earlier gives way to the peer's newer one in that slot.
    let mut c = Rig::new(Affinity::None, |_| {});
    c.now = a.now;
    apply(&mut c, &recs, false);
    let mut a2 = Rig::new(Affinity::None, |_| {});
    a2.now = a.now;
    spliced(&mut a2, 45_002);
    let got = apply(&mut c, &drain(&mut a2), false);
    assert_eq!(got.splices, 1);
    assert_eq!(c.dp.splice.slots[0].key.src_port(), 45_002);
    assert_eq!(c.dp.splice_stats().active, 1);
}
