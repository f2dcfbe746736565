//! Sync wire tests: round trips, tampering, truncation, replay and gap handling.

use super::*;
use crate::sync::{apply, ApplyReport};
use crate::tcp_state::TcpState;
use crate::{Config, ConnTable, NewFlow, Packet, TcpFlags};
use lb_core::Duration;
use proptest::prelude::*;

const K: HashKey = HashKey::from_bytes(*b"sync-mac-key-016");

fn rec(i: u32, v6: bool, nat: bool) -> SyncRecord {
    let key = if v6 {
        FlowKey::v6(
            Ipv6Addr::from(u128::from(i) + 1),
            1000,
            Ipv6Addr::LOCALHOST,
            80,
            IpProto::Tcp,
        )
    } else {
        FlowKey::v4(
            Ipv4Addr::from(i),
            1000,
            Ipv4Addr::new(203, 0, 113, 1),
            80,
            IpProto::Tcp,
        )
    };
    let nat = nat.then(|| {
        FlowKey::v4(
            Ipv4Addr::new(10, 0, 0, 5),
            8080,
            Ipv4Addr::new(198, 51, 100, 1),
            40000 + i as u16,
            IpProto::Tcp,
        )
    });
    SyncRecord {
        op: RecordOp::New,
        key,
        backend: BackendId(i),
        state: FlowState::Tcp(TcpState::Established),
        remaining_ms: 1000 + i,
        nat,
    }
}

fn arb_record() -> impl Strategy<Value = SyncRecord> {
    (
        any::<u32>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        0u8..13,
        0u8..3,
        0u32..=2_073_600_000,
        any::<[u8; 32]>(),
        any::<u8>(),
    )
        .prop_map(|(b, v6, nat, nat6, class, op, rem, bytes, proto)| {
            let p = IpProto::from_number(proto);
            let mut a = [0u8; 16];
            a.copy_from_slice(&bytes[..16]);
            let mut d = [0u8; 16];
            d.copy_from_slice(&bytes[16..]);
            let mk = |v6: bool, sp: u16| {
                if v6 {
                    FlowKey::v6(a.into(), sp, d.into(), 7, p)
                } else {
                    FlowKey::v4(
                        [a[0], a[1], a[2], a[3]].into(),
                        sp,
                        [d[0], d[1], d[2], d[3]].into(),
                        7,
                        p,
                    )
                }
            };
            SyncRecord {
                op: [RecordOp::New, RecordOp::Update, RecordOp::Delete][usize::from(op)],
                key: mk(v6, b as u16),
                backend: BackendId(b),
                state: FlowState::from_class(class).unwrap_or(FlowState::Other),
                remaining_ms: rem,
                nat: nat.then(|| mk(nat6, 9)),
            }
        })
}

#[test]
fn sizes() {
    assert_eq!(rec(1, false, false).encoded_len(), 23);
    assert_eq!(rec(1, true, true).encoded_len(), 47 + 12);
    let mut tx = SyncSender::new(1, 1, K, 1472).unwrap();
    let recs: Vec<_> = (0..200).map(|i| rec(i, false, false)).collect();
    let mut out = Vec::new();
    tx.encode(&recs, &mut out);
    // (1472 - 39) / 23 = 62 records per message.
    assert_eq!(out.len(), 4);
    assert!(out.iter().all(|m| m.len() <= 1472));
    assert_eq!(out[0].len(), HEADER_LEN + 62 * 23 + MAC_LEN);
    assert!(SyncSender::new(1, 1, K, 100).is_err());
}

#[test]
fn forged_and_malformed_rejected() {
    let mut tx = SyncSender::new(1, 1, K, 1472).unwrap();
    let mut out = Vec::new();
    tx.encode(&[rec(1, false, true)], &mut out);
    let m = &out[0];
    assert!(decode(m, &K).is_ok());
    assert_eq!(
        decode(m, &HashKey::from_bytes([0; 16])),
        Err(SyncError::BadMac)
    );
    assert!(matches!(
        decode(&m[..10], &K),
        Err(SyncError::Truncated { .. })
    ));
    // A well-authenticated message with a bad version is still rejected.
    let mut body = m[..m.len() - MAC_LEN].to_vec();
    body[2] = 9;
    let t = mac(&K, &body);
    body.extend_from_slice(&t);
    assert_eq!(decode(&body, &K), Err(SyncError::Version(9)));
}

#[test]
fn replay_gap_epoch() {
    let mut tx = SyncSender::new(7, 1, K, 1472).unwrap();
    let mut out = Vec::new();
    for i in 0..4 {
        tx.encode(&[rec(i, false, false)], &mut out);
    }
    let mut rx = SyncReceiver::new(K);
    let r = rx.receive(&out[0]).unwrap();
    assert!(r.first_contact && r.needs_resync());
    assert_eq!(
        rx.receive(&out[0]),
        Err(SyncError::Replayed { seq: 1, last: 1 })
    );
    let r = rx.receive(&out[2]).unwrap();
    assert_eq!(r.gap, Some(1));
    assert!(rx.receive(&out[1]).is_err(), "late message is not applied");
    assert_eq!(rx.receive(&out[3]).unwrap().gap, None);
    // The sender restarts with a new epoch: accepted as first contact; the old epoch is stale.
    let mut tx2 = SyncSender::new(7, 2, K, 1472).unwrap();
    let req = tx2.resync_request();
    let r = rx.receive(&req).unwrap();
    assert_eq!(r.message.header.kind, MessageKind::ResyncRequest);
    assert!(r.first_contact);
    let mut late = Vec::new();
    tx.encode(&[rec(9, false, false)], &mut late);
    assert_eq!(
        rx.receive(&late[0]),
        Err(SyncError::StaleEpoch {
            epoch: 1,
            current: 2
        })
    );
}

#[test]
fn bulk_resync_installs_with_remaining_timeouts() {
    let now = Instant::from_secs(100);
    let mut active =
        ConnTable::new(Config::with_capacity(1024), HashKey::from_bytes([1; 16])).unwrap();
    for i in 0..300u32 {
        let k = rec(i, i % 5 == 0, false).key;
        active.insert_with(
            NewFlow::new(k, BackendId(i)).with_first(Packet::original(TcpFlags::SYN, 60)),
            Instant::from_secs(50 + u64::from(i % 10)),
        );
    }
    let mut tx = SyncSender::new(1, 1, K, 1472).unwrap();
    let mut rx = SyncReceiver::new(K);
    let mut backup =
        ConnTable::new(Config::with_capacity(1024), HashKey::from_bytes([2; 16])).unwrap();
    let mut cursor = Some(0);
    let mut chunk = Vec::new();
    let mut msgs = Vec::new();
    while let Some(c) = cursor {
        chunk.clear();
        cursor = active.export_chunk(c, 50, now, &mut chunk);
        let recs: Vec<_> = chunk
            .iter()
            .map(|e| SyncRecord::from_info(RecordOp::New, e, now))
            .collect();
        tx.encode_bulk(&recs, &mut msgs);
    }
    for m in &msgs {
        let r = rx.receive(m).unwrap();
        assert_eq!(r.message.header.flags, 1);
        apply(&mut backup, &r.message, now);
    }
    assert_eq!(backup.len(), 300);
    for e in active.entries(now) {
        let b = backup.get(&e.key, now).unwrap();
        assert_eq!((b.backend, b.state), (e.backend, e.state));
        assert_eq!(b.deadline, e.deadline, "same remaining timeout");
    }
    // SYN_RECV timeout 60 s: inserted at 50..59 s, so all gone at 120 s, none at 109 s.
    assert_eq!(backup.expire(Instant::from_millis(109_999), 1000), 0);
    assert_eq!(backup.expire(Instant::from_secs(120), 1000), 300);
}

#[test]
fn records_with_backend_ids_beyond_a_slot_are_refused() {
    let now = Instant::from_secs(100);
    let mut tx = SyncSender::new(1, 1, K, 1472).unwrap();
    let mut rx = SyncReceiver::new(K);
    let mut backup =
        ConnTable::new(Config::with_capacity(64), HashKey::from_bytes([2; 16])).unwrap();
    let ok = rec(1, false, false);
    let big = SyncRecord {
        backend: BackendId(crate::MAX_BACKEND_ID + 1),
        ..rec(2, false, false)
    };
    // An update moving an installed entry to such a backend is refused too, and leaves it.
    let moved = SyncRecord {
        op: RecordOp::Update,
        backend: BackendId(u32::MAX),
        ..ok
    };
    let mut msgs = Vec::new();
    tx.encode_bulk(&[ok, big, moved], &mut msgs);
    let mut total = ApplyReport::default();
    for m in &msgs {
        let r = apply(&mut backup, &rx.receive(m).unwrap().message, now);
        total.installed += r.installed;
        total.refused += r.refused;
    }
    assert_eq!((total.installed, total.refused), (1, 2));
    assert_eq!(
        backup.get(&ok.key, now).map(|e| e.backend),
        Some(BackendId(1))
    );
    assert!(backup.get(&big.key, now).is_none());
    assert_eq!(backup.counters().refused_backend, 2);
}

proptest! {
    #[test]
    fn encode_decode_is_identity(recs in proptest::collection::vec(arb_record(), 0..40), mtu in 122usize..1500) {
        let mut tx = SyncSender::new(3, 9, K, mtu).unwrap();
        let mut out = Vec::new();
        tx.encode(&recs, &mut out);
        let mut got = Vec::new();
        let mut rx = SyncReceiver::new(K);
        for (i, m) in out.iter().enumerate() {
            prop_assert!(m.len() <= mtu);
            let r = rx.receive(m).unwrap();
            prop_assert_eq!(r.message.header.seq, i as u64 + 1);
            prop_assert_eq!(r.gap, None);
            got.extend(r.message.records);
        }
        prop_assert_eq!(got, recs);
    }

    #[test]
    fn any_corruption_is_rejected(r in arb_record(), at in any::<prop::sample::Index>(), x in 1u8..=255) {
        let mut tx = SyncSender::new(3, 9, K, 1472).unwrap();
        let mut out = Vec::new();
        tx.encode(&[r], &mut out);
        let mut m = out[0].clone();
        let i = at.index(m.len());
        m[i] ^= x;
        prop_assert_eq!(decode(&m, &K), Err(SyncError::BadMac));
        let cut = at.index(m.len());
        prop_assert!(decode(&out[0][..cut], &K).is_err());
    }

    #[test]
    fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode(&b, &K);
        let _ = SyncReceiver::new(K).receive(&b);
    }

    #[test]
    fn replayed_or_reordered_never_roll_back(order in proptest::collection::vec(0usize..12, 1..40)) {
        // Message n sets the flow's backend to n: the backup's backend must never decrease.
        let key = rec(1, false, false).key;
        let mut tx = SyncSender::new(1, 1, K, 1472).unwrap();
        let mut msgs = Vec::new();
        for n in 0..12u32 {
            let r = SyncRecord { op: RecordOp::Update, backend: BackendId(n), ..rec(1, false, false) };
            tx.encode(&[r], &mut msgs);
        }
        let now = Instant::from_secs(1);
        let mut backup = ConnTable::new(Config::with_capacity(16), HashKey::from_bytes([2; 16])).unwrap();
        let mut rx = SyncReceiver::new(K);
        let mut last = None;
        for i in order {
            let accepted = rx.receive(&msgs[i]);
            if let Ok(r) = &accepted {
                apply(&mut backup, &r.message, now);
            }
            let b = backup.get(&key, now).map(|e| e.backend.get());
            prop_assert!(b >= last, "{:?} after {:?}", b, last);
            if accepted.is_ok() {
                prop_assert_eq!(b, Some(i as u32));
            }
            last = b;
        }
        let _ = Duration::ZERO;
    }
}
