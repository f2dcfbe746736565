//! Applying records: per-record outcomes, merge mode, SNAT reservations, templates and the
//! flows that pin them.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use lb_core::{BackendId, Duration, FlowKey, HashKey, Instant, IpProto};

use super::*;
use crate::sync::{RecordOp, SyncReceiver, SyncSender, TemplateRecord, FLAG_BULK};
use crate::{
    Config, ConnTable, Insert, NewFlow, Packet, Refusal, RemovalReason, Service, SnatPool,
    TcpFlags, TcpState, TemplateKey,
};

const ESTABLISHED: FlowState = FlowState::Tcp(TcpState::Established);
const SNAT: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));

fn key(i: u32) -> FlowKey {
    FlowKey::v4(
        Ipv4Addr::from(0xc000_0200 + i), // 192.0.2.i
        40_000,
        Ipv4Addr::new(203, 0, 113, 10),
        443,
        IpProto::Tcp,
    )
}

fn secs(s: u64) -> Instant {
    Instant::from_secs(s)
}

fn table(cfg: Config) -> ConnTable {
    ConnTable::new(cfg, HashKey::from_bytes([9; 16])).unwrap()
}

fn rec(i: u32, op: RecordOp, backend: u32) -> SyncRecord {
    SyncRecord {
        op,
        key: key(i),
        backend: BackendId(backend),
        backend_tag: None,
        state: ESTABLISHED,
        remaining_ms: 60_000,
        nat: None,
        persist: None,
    }
}

/// A reply tuple from backend `backend_host` (192.0.2.50 + host, port 8080) to SNAT port `port`.
fn reply(backend_host: u8, addr: IpAddr, port: u16) -> FlowKey {
    let b = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 50 + backend_host));
    FlowKey::new(b, 8080, addr, port, IpProto::Tcp).unwrap()
}

fn nat_table(ports: std::ops::RangeInclusive<u16>, backends: &[u32]) -> ConnTable {
    let mut t = table(Config {
        nat: true,
        ..Config::with_capacity(64)
    });
    let mut pool = SnatPool::new(vec![SNAT], ports).unwrap();
    for &b in backends {
        pool.add_backend(BackendId(b));
    }
    t.set_snat_pool(pool);
    t
}

fn available(t: &mut ConnTable, b: u32) -> usize {
    t.snat_pool_mut().unwrap().available(BackendId(b))
}

/// A new local full-NAT flow of backend 5 (at 192.0.2.50:8080): its SNAT port.
fn local_snat(t: &mut ConnTable, i: u32, now: Instant) -> Option<u16> {
    let backend: SocketAddr = "192.0.2.50:8080".parse().unwrap();
    let flow = NewFlow::new(key(i), BackendId(5)).with_first(Packet::original(TcpFlags::SYN, 60));
    let (out, r) = t.insert_snat(flow, backend, now);
    // Established at once: an empty pool then refuses rather than reclaims (SNAT pressure
    // takes only half-open flows' pairs).
    let _ = t.track(&key(i), Packet::original(TcpFlags::ACK, 52), now);
    out.is_inserted().then(|| r.map(|r| r.dst_port())).flatten()
}

#[test]
fn record_outcomes() {
    let mut t = table(Config::with_capacity(16));
    let now = secs(10);
    let new = rec(1, RecordOp::New, 3);
    assert_eq!(apply_record(&mut t, &new, now, false), Applied::Installed);
    let syn = SyncRecord {
        op: RecordOp::Update,
        state: FlowState::Tcp(TcpState::FinWait),
        backend: BackendId(4),
        backend_tag: None,
        ..new
    };
    assert_eq!(
        apply_record(&mut t, &syn, now, false),
        Applied::Updated { was: ESTABLISHED }
    );
    let e = t.get(&key(1), now).unwrap();
    assert_eq!((e.backend, e.state), (BackendId(4), syn.state));
    assert_eq!(
        apply_record(&mut t, &new, now, false),
        Applied::Updated { was: syn.state }
    );
    let del = rec(1, RecordOp::Delete, 0);
    assert_eq!(apply_record(&mut t, &del, now, false), Applied::Deleted);
    assert_eq!(t.poll_removal().unwrap().reason, RemovalReason::SyncDelete);
    assert_eq!(apply_record(&mut t, &del, now, false), Applied::Ignored);
    let big = rec(2, RecordOp::New, crate::MAX_BACKEND_ID + 1);
    assert_eq!(apply_record(&mut t, &big, now, false), Applied::Refused);
    // A timed-out entry is replaced: installed again, the old one reported as expired.
    apply_record(&mut t, &new, now, false);
    let later = now + Duration::from_secs(61);
    assert_eq!(apply_record(&mut t, &new, later, false), Applied::Installed);
    assert_eq!(t.poll_removal().unwrap().reason, RemovalReason::Expired);
    assert_eq!(t.len(), 1);
}

#[test]
fn merge_mode_only_installs_absent_entries() {
    let mut t = table(Config::with_capacity(16));
    let now = secs(10);
    t.insert_with(
        NewFlow::new(key(1), BackendId(1)).with_first(Packet::original(TcpFlags::SYN, 60)),
        now,
    );
    let theirs = rec(1, RecordOp::Update, 9);
    assert_eq!(apply_record(&mut t, &theirs, now, true), Applied::Ignored);
    let del = rec(1, RecordOp::Delete, 9);
    assert_eq!(apply_record(&mut t, &del, now, true), Applied::Ignored);
    let e = t.get(&key(1), now).unwrap();
    assert_eq!(
        (e.backend, e.state),
        (BackendId(1), FlowState::Tcp(TcpState::SynRecv))
    );
    assert_eq!(
        apply_record(&mut t, &rec(2, RecordOp::New, 9), now, true),
        Applied::Installed
    );
    assert_eq!(t.get(&key(2), now).unwrap().backend, BackendId(9));
    assert_eq!(t.pending_removals(), 0);
}

#[test]
fn a_synced_snat_pair_is_reserved_until_the_entry_leaves() {
    let mut t = nat_table(40_000..=40_003, &[5]);
    let now = secs(10);
    let synced = SyncRecord {
        nat: Some(reply(0, SNAT, 40_001)),
        ..rec(100, RecordOp::New, 5)
    };
    assert_eq!(
        apply_record(&mut t, &synced, now, false),
        Applied::Installed
    );
    assert_eq!(available(&mut t, 5), 3);
    assert_eq!(t.counters().sync_nat_conflicts, 0);
    // New local flows of the same backend never get it.
    let ports: Vec<_> = (0..4).map(|i| local_snat(&mut t, i, now)).collect();
    assert_eq!(ports, [Some(40_000), Some(40_002), Some(40_003), None]);
    // A sync delete releases it, as a local flow's removal would.
    let del = SyncRecord {
        op: RecordOp::Delete,
        ..synced
    };
    assert_eq!(apply_record(&mut t, &del, now, false), Applied::Deleted);
    assert_eq!(available(&mut t, 5), 1);
    assert_eq!(local_snat(&mut t, 10, now), Some(40_001));
    // So does expiry.
    assert!(t.remove(&key(10), now));
    let again = SyncRecord {
        remaining_ms: 1_000,
        ..synced
    };
    assert_eq!(apply_record(&mut t, &again, now, false), Applied::Installed);
    assert_eq!(available(&mut t, 5), 0);
    assert_eq!(t.expire(secs(12), 100), 1);
    assert_eq!(available(&mut t, 5), 1);
    assert_eq!(t.counters().sync_nat_conflicts, 0);
}

#[test]
fn snat_pairs_that_cannot_be_reserved_are_counted_and_never_released() {
    let mut t = nat_table(40_000..=40_001, &[5, 6]);
    let now = secs(10);
    assert_eq!(local_snat(&mut t, 0, now), Some(40_000));
    // Same pair and backend id but another backend address: another reply tuple, so the
    // table installs it, but the pair is the local flow's.
    let clash = SyncRecord {
        nat: Some(reply(1, SNAT, 40_000)),
        ..rec(100, RecordOp::New, 5)
    };
    assert_eq!(apply_record(&mut t, &clash, now, false), Applied::Installed);
    assert_eq!(t.counters().sync_nat_conflicts, 1);
    // A backend without a pool: counted too.
    let orphan = SyncRecord {
        nat: Some(reply(0, SNAT, 40_001)),
        ..rec(101, RecordOp::New, 7)
    };
    assert_eq!(
        apply_record(&mut t, &orphan, now, false),
        Applied::Installed
    );
    assert_eq!(t.counters().sync_nat_conflicts, 2);
    // A pair outside the pool is someone else's business: not counted.
    let foreign = SyncRecord {
        nat: Some(reply(2, SNAT, 50_000)),
        ..rec(102, RecordOp::New, 5)
    };
    assert_eq!(
        apply_record(&mut t, &foreign, now, false),
        Applied::Installed
    );
    assert_eq!(t.counters().sync_nat_conflicts, 2);
    // Leaving, they release nothing: the local flow keeps its pair.
    for i in [100, 101, 102] {
        assert!(t.remove(&key(i), now));
    }
    assert_eq!(available(&mut t, 5), 1);
    assert_eq!(local_snat(&mut t, 1, now), Some(40_001));
    assert_eq!(local_snat(&mut t, 2, now), None);
    // The same reply tuple as a live entry's is a NAT conflict: refused.
    let dup = SyncRecord {
        nat: Some(reply(0, SNAT, 40_000)),
        ..rec(103, RecordOp::New, 5)
    };
    assert_eq!(apply_record(&mut t, &dup, now, false), Applied::Refused);
    assert_eq!(t.counters().refused_nat, 1);
}

#[test]
fn a_synced_backend_change_moves_the_reservation() {
    let mut t = nat_table(40_000..=40_001, &[5, 6]);
    let now = secs(10);
    let synced = SyncRecord {
        nat: Some(reply(0, SNAT, 40_001)),
        ..rec(100, RecordOp::New, 5)
    };
    apply_record(&mut t, &synced, now, false);
    let moved = SyncRecord {
        op: RecordOp::Update,
        backend: BackendId(6),
        backend_tag: None,
        ..synced
    };
    assert_eq!(
        apply_record(&mut t, &moved, now, false),
        Applied::Updated { was: ESTABLISHED }
    );
    assert_eq!((available(&mut t, 5), available(&mut t, 6)), (2, 1));
    assert!(t.remove(&key(100), now));
    assert_eq!((available(&mut t, 5), available(&mut t, 6)), (2, 2));
}

fn svc() -> Service {
    Service::of_flow(&key(0))
}

fn tpl(k: TemplateKey, backend: u32, remaining_ms: u32) -> TemplateRecord {
    TemplateRecord {
        delete: false,
        key: k,
        backend: BackendId(backend),
        backend_tag: None,
        remaining_ms,
        timeout_ms: 300_000,
        established: false,
    }
}

#[test]
fn templates_install_expire_and_refresh() {
    let mut t = table(Config::with_capacity(16));
    let call = TemplateKey::affinity(svc(), 0xca11);
    let now = secs(100);
    let r = tpl(call, 2, 30_000);
    assert_eq!(apply_template(&mut t, &r, now, false), Applied::Installed);
    let info = t.persist().get(&call, now).unwrap();
    assert_eq!(
        (info.backend, info.deadline, info.timeout),
        (BackendId(2), secs(130), Duration::from_secs(300))
    );
    // It times out its remaining time after `now`...
    assert_eq!(
        t.persist().peek(&call, Instant::from_millis(129_999)),
        Some(BackendId(2))
    );
    assert_eq!(t.persist().peek(&call, secs(130)), None);
    // ... unless used: then its full idle timeout starts.
    assert_eq!(t.persist_mut().lookup(&call, secs(120)), Some(BackendId(2)));
    assert_eq!(
        t.persist().get(&call, secs(120)).unwrap().deadline,
        secs(420)
    );
    assert_eq!(t.persist_mut().expire(secs(419), 10), 0);
    // A refresh replaces the backend and the times.
    let r2 = tpl(call, 3, 5_000);
    assert_eq!(
        apply_template(&mut t, &r2, secs(200), false),
        Applied::Refreshed
    );
    assert_eq!(
        t.persist().get(&call, secs(200)).unwrap().deadline,
        secs(205)
    );
    assert_eq!(t.persist().peek(&call, secs(204)), Some(BackendId(3)));
    assert_eq!(t.persist_mut().expire(secs(205), 10), 1);
    // An expired template is replaced: installed again.
    assert_eq!(
        apply_template(&mut t, &r2, secs(300), false),
        Applied::Installed
    );
    assert_eq!(
        apply_template(&mut t, &r2, secs(400), false),
        Applied::Installed
    );
    // Merge mode leaves a live template alone, and deletes nothing.
    let theirs = tpl(call, 9, 60_000);
    assert_eq!(
        apply_template(&mut t, &theirs, secs(401), true),
        Applied::Ignored
    );
    let del = TemplateRecord {
        delete: true,
        ..theirs
    };
    assert_eq!(
        apply_template(&mut t, &del, secs(401), true),
        Applied::Ignored
    );
    assert_eq!(t.persist().peek(&call, secs(401)), Some(BackendId(3)));
    let other = TemplateKey::affinity(svc(), 7);
    assert_eq!(
        apply_template(&mut t, &tpl(other, 9, 1_000), secs(401), true),
        Applied::Installed
    );
    // Deletes.
    assert_eq!(
        apply_template(&mut t, &del, secs(402), false),
        Applied::Deleted
    );
    assert_eq!(
        apply_template(&mut t, &del, secs(402), false),
        Applied::Ignored
    );
    assert_eq!(t.persist().peek(&call, secs(402)), None);
}

#[test]
fn synced_flows_pin_their_templates() {
    let mut t = table(Config::with_capacity(16));
    let tk = TemplateKey::client(key(1).src(), 24, svc());
    let now = secs(100);
    let flow = SyncRecord {
        persist: Some(24),
        ..rec(1, RecordOp::New, 4)
    };
    // The flow comes first: a placeholder bound to its backend, pinned.
    assert_eq!(apply_record(&mut t, &flow, now, false), Applied::Installed);
    assert_eq!(t.persist().refs(&tk), 1);
    assert_eq!(t.persist().peek(&tk, now), Some(BackendId(4)));
    assert_eq!(t.get(&key(1), now).unwrap().persist, Some(24));
    // The template follows: refreshed, still pinned.
    let r = tpl(tk, 4, 10_000);
    assert_eq!(apply_template(&mut t, &r, now, false), Applied::Refreshed);
    assert_eq!(t.persist().refs(&tk), 1);
    // Another flow of the same /24 pins it too; pinned, it outlives its remaining time.
    let flow2 = SyncRecord {
        persist: Some(24),
        ..rec(2, RecordOp::New, 4)
    };
    assert_eq!(apply_record(&mut t, &flow2, now, false), Applied::Installed);
    assert_eq!(t.persist().refs(&tk), 2);
    assert_eq!(t.persist_mut().expire(secs(200), 10), 0);
    assert_eq!(t.persist().get(&tk, secs(50)).unwrap().deadline, secs(350));
    // An update of a flow does not pin twice.
    let upd = SyncRecord {
        op: RecordOp::Update,
        ..flow
    };
    apply_record(&mut t, &upd, secs(101), false);
    assert_eq!(t.persist().refs(&tk), 2);
    // When the last flow leaves, its idle timeout starts.
    for i in [1, 2] {
        let del = rec(i, RecordOp::Delete, 4);
        assert_eq!(
            apply_record(&mut t, &del, secs(150), false),
            Applied::Deleted
        );
    }
    assert_eq!(t.persist().refs(&tk), 0);
    assert_eq!(t.persist().get(&tk, secs(150)).unwrap().deadline, secs(450));
    assert_eq!(t.persist_mut().expire(secs(449), 10), 0);
    assert_eq!(t.persist_mut().expire(secs(450), 10), 1);
}

#[test]
fn placeholders_and_deleted_templates_go_with_their_last_flow() {
    let mut t = table(Config::with_capacity(16));
    let tk = TemplateKey::client(key(1).src(), 32, svc());
    let now = secs(100);
    let flow = SyncRecord {
        persist: Some(32),
        ..rec(1, RecordOp::New, 4)
    };
    apply_record(&mut t, &flow, now, false);
    assert!(t.remove(&key(1), now));
    assert_eq!(
        t.persist().peek(&tk, now),
        None,
        "a placeholder has no idle time"
    );
    // A template deleted while pinned stays until its flow leaves, then goes at once.
    apply_record(&mut t, &flow, now, false);
    apply_template(&mut t, &tpl(tk, 4, 60_000), now, false);
    let del = TemplateRecord {
        delete: true,
        ..tpl(tk, 4, 0)
    };
    assert_eq!(apply_template(&mut t, &del, now, false), Applied::Deleted);
    assert_eq!(t.persist().peek(&tk, secs(1_000)), Some(BackendId(4)));
    assert!(t.remove(&key(1), secs(1_000)));
    assert_eq!(t.persist().peek(&tk, secs(1_000)), None);
    assert_eq!(t.persist_mut().expire(secs(1_000), 10), 1);
    assert!(t.persist().is_empty());
}

#[test]
fn a_full_template_table_refuses() {
    let mut t = table(Config {
        persist_capacity: 1,
        ..Config::with_capacity(16)
    });
    let now = secs(1);
    let pinned = SyncRecord {
        persist: Some(32),
        ..rec(1, RecordOp::New, 4)
    };
    apply_record(&mut t, &pinned, now, false);
    let r = tpl(TemplateKey::affinity(svc(), 1), 1, 1_000);
    assert_eq!(apply_template(&mut t, &r, now, false), Applied::Refused);
    // The flow is installed even when its template cannot be: it just does not pin one.
    let other = SyncRecord {
        persist: Some(32),
        ..rec(2, RecordOp::New, 4)
    };
    assert_eq!(apply_record(&mut t, &other, now, false), Applied::Installed);
    assert_eq!(t.get(&key(2), now).unwrap().persist, None);
}

#[test]
fn a_bulk_dump_carries_flows_and_templates() {
    let mac = HashKey::from_bytes([5; 16]);
    let t0 = secs(100);
    let mut active = table(Config::with_capacity(256));
    for i in 0..40u32 {
        let c = key(i).src();
        let tk = TemplateKey::client(c, 24, svc());
        active
            .persist_mut()
            .insert(tk, BackendId(i % 3), Duration::from_secs(300), t0);
        let flow = NewFlow::new(key(i), BackendId(i % 3))
            .with_first(Packet::original(TcpFlags::SYN, 60))
            .with_persist(24);
        assert_eq!(active.insert_with(flow, t0), Insert::New);
        let call = TemplateKey::affinity(svc(), u64::from(i));
        active.persist_mut().insert(
            call,
            BackendId(7),
            Duration::from_secs(60 + u64::from(i)),
            t0,
        );
    }
    // One client template (all of 192.0.2.0/24) pinned by 40 flows, 40 call bindings.
    assert_eq!(active.persist().len(), 41);
    let now = secs(130);
    let mut tx = SyncSender::new(1, 1, mac, 1472).unwrap();
    tx.set_echo(1);
    let mut msgs = Vec::new();
    let (mut flows, mut tpls) = (Vec::new(), Vec::new());
    let mut c = Some(0);
    while let Some(cur) = c {
        flows.clear();
        c = active.export_chunk(cur, 16, now, &mut flows);
        let recs: Vec<_> = flows
            .iter()
            .map(|e| SyncRecord::from_info(RecordOp::New, e, now))
            .collect();
        tx.encode_items(&recs, &[], FLAG_BULK, &mut msgs);
    }
    let mut c = Some(0);
    while let Some(cur) = c {
        tpls.clear();
        c = active.persist().export_chunk(cur, 16, now, &mut tpls);
        let recs: Vec<_> = tpls
            .iter()
            .map(|i| TemplateRecord::from_info(false, i, now))
            .collect();
        tx.encode_items(&[], &recs, FLAG_BULK, &mut msgs);
    }
    msgs.push(tx.bulk_end());
    let mut backup = table(Config::with_capacity(256));
    let mut rx = SyncReceiver::new(mac, 1);
    let mut total = ApplyReport::default();
    for m in &msgs {
        let r = apply(&mut backup, &rx.receive(m).unwrap().message, now);
        total.installed += r.installed;
        total.templates += r.templates;
        total.refused += r.refused;
    }
    // The client template came as a placeholder with the first flow, then was refreshed.
    assert_eq!(
        (total.installed, total.templates, total.refused),
        (40, 41, 0)
    );
    let tk = TemplateKey::client(key(0).src(), 24, svc());
    assert_eq!(backup.persist().refs(&tk), 40);
    for i in 0..40u32 {
        let call = TemplateKey::affinity(svc(), u64::from(i));
        assert_eq!(
            backup.persist().get(&call, now),
            active.persist().get(&call, now)
        );
        let (a, b) = (active.get(&key(i), now), backup.get(&key(i), now));
        assert_eq!(
            b.map(|e| (e.backend, e.deadline, e.persist)),
            a.map(|e| (e.backend, e.deadline, e.persist))
        );
    }
    assert_eq!(
        backup.persist().get(&tk, now),
        active.persist().get(&tk, now)
    );
}

#[test]
fn apply_reports_templates_and_ignores_resync_requests() {
    let mac = HashKey::from_bytes([5; 16]);
    let mut tx = SyncSender::new(1, 1, mac, 1472).unwrap();
    tx.set_echo(1);
    let mut msgs = Vec::new();
    let call = TemplateKey::affinity(svc(), 1);
    let del = TemplateRecord {
        delete: true,
        ..tpl(call, 1, 0)
    };
    tx.encode_items(
        &[rec(1, RecordOp::New, 1), rec(2, RecordOp::Delete, 1)],
        &[tpl(call, 1, 1_000), tpl(call, 2, 1_000), del, del],
        0,
        &mut msgs,
    );
    let mut t = table(Config::with_capacity(16));
    let mut rx = SyncReceiver::new(mac, 1);
    let r = apply(&mut t, &rx.receive(&msgs[0]).unwrap().message, secs(1));
    let want = ApplyReport {
        installed: 1,
        templates: 3,
        ..ApplyReport::default()
    };
    assert_eq!(r, want);
    let req = tx.resync_request(1);
    let m = rx.receive(&req).unwrap().message;
    assert_eq!(apply(&mut t, &m, secs(1)), ApplyReport::default());
    assert_eq!(Refusal::NatConflict, Refusal::NatConflict);
}
