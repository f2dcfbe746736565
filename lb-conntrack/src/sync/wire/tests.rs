//! Sync wire tests: round trips, tampering, truncation, replay and gap handling.

use super::*;
use crate::persist::{Service, TemplateKey};
use crate::sync::{apply, ApplyReport};
use crate::tcp_state::TcpState;
use crate::{Config, ConnTable, NewFlow, Packet, TcpFlags};
use lb_core::Duration;
use proptest::prelude::*;
use std::net::SocketAddr;

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
        backend_tag: None,
        state: FlowState::Tcp(TcpState::Established),
        remaining_ms: 1000 + i,
        nat,
        persist: None,
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
        proptest::option::of(0u8..=128),
    )
        .prop_map(
            |(b, v6, nat, nat6, class, op, rem, bytes, proto, persist)| {
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
                    backend_tag: (b % 3 == 0).then_some(b ^ 0x5a5a),
                    state: FlowState::from_class(class).unwrap_or(FlowState::Other),
                    remaining_ms: rem,
                    nat: nat.then(|| mk(nat6, 9)),
                    persist: persist.map(|p| if v6 { p } else { p % 33 }),
                }
            },
        )
}

fn svc(v6: bool, port: u16) -> Service {
    Service {
        vip: if v6 {
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 10))
        } else {
            IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10))
        },
        port,
        proto: IpProto::Udp,
    }
}

fn tpl(i: u32, client: Option<bool>, v6: bool) -> TemplateRecord {
    let service = svc(v6, 5060);
    let key = match client {
        Some(c6) => {
            let a = if c6 {
                IpAddr::V6(Ipv6Addr::from(u128::from(i) << 64))
            } else {
                IpAddr::V4(Ipv4Addr::from(i << 8))
            };
            TemplateKey::client(a, if c6 { 64 } else { 24 }, service)
        }
        None => TemplateKey::affinity(service, u64::from(i) * 0x9e37_79b9_7f4a_7c15),
    };
    TemplateRecord {
        delete: false,
        key,
        backend: BackendId(i),
        backend_tag: None,
        remaining_ms: 500 + i,
        timeout_ms: 300_000,
        established: i % 2 == 1,
    }
}

fn arb_template() -> impl Strategy<Value = TemplateRecord> {
    (
        any::<bool>(),
        any::<u32>(),
        any::<(bool, bool, bool)>(),
        any::<[u8; 16]>(),
        0u8..=128,
        any::<(u64, u16, u8)>(),
        (0u32..=2_073_600_000, 0u32..=2_073_600_000, any::<bool>()),
    )
        .prop_map(
            |(delete, b, (client, c6, v6), a, prefix, (k, port, proto), (rem, idle, est))| {
                let mut service = svc(v6, port);
                service.proto = IpProto::from_number(proto);
                let key = if client {
                    let addr = if c6 {
                        IpAddr::V6(Ipv6Addr::from(a))
                    } else {
                        IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
                    };
                    TemplateKey::client(addr, prefix, service)
                } else {
                    TemplateKey::affinity(service, k)
                };
                TemplateRecord {
                    delete,
                    key,
                    backend: BackendId(b),
                    backend_tag: (b % 3 == 0).then_some(b ^ 0x5a5a),
                    remaining_ms: rem,
                    timeout_ms: idle,
                    established: est && !delete,
                }
            },
        )
}

/// The receivers' challenge in these tests (the senders echo it).
const NONCE: u64 = 0x5eed;

/// `body` with a valid MAC.
fn sealed(body: &[u8]) -> Vec<u8> {
    seal(body, &K)
}

/// The body (without MAC) of a one-message encoding of `records` and `templates`.
fn body_of(records: &[SyncRecord], templates: &[TemplateRecord]) -> Vec<u8> {
    let mut tx = SyncSender::new(1, 1, K, 1472).unwrap();
    tx.set_echo(NONCE);
    let mut out = Vec::new();
    tx.encode_items(records, templates, 0, &mut out);
    assert_eq!(out.len(), 1);
    let m = &out[0];
    m[..m.len() - MAC_LEN].to_vec()
}

#[test]
fn sizes() {
    assert_eq!(rec(1, false, false).encoded_len(), 23);
    assert_eq!(rec(1, true, true).encoded_len(), 47 + 12);
    let with_persist = SyncRecord {
        persist: Some(24),
        ..rec(1, false, true)
    };
    assert_eq!(with_persist.encoded_len(), 23 + 1 + 12);
    // Template records: 25 to 49 bytes.
    assert_eq!(tpl(1, Some(false), false).encoded_len(), 25);
    assert_eq!(tpl(1, None, false).encoded_len(), 28);
    assert_eq!(tpl(1, None, true).encoded_len(), 40);
    assert_eq!(tpl(1, Some(true), true).encoded_len(), 49);
    assert_eq!(tpl(1, Some(true), false).encoded_len(), 37);
    for (t, len) in [
        (tpl(1, Some(false), false), 25),
        (tpl(2, Some(true), true), 49),
    ] {
        assert_eq!(body_of(&[], &[t]).len(), HEADER_LEN + len);
    }
    // The largest record fits the smallest MTU.
    let largest = SyncRecord {
        persist: Some(128),
        backend_tag: Some(7),
        nat: Some(rec(1, true, false).key),
        ..rec(1, true, false)
    };
    // (A splice record can be longer: splice_record_lengths_and_the_largest_fits_the_smallest_mtu.)
    assert_eq!(largest.encoded_len(), 88);
    assert!(SyncSender::new(1, 1, K, MIN_MTU).is_ok());
    assert!(SyncSender::new(1, 1, K, MIN_MTU - 1).is_err());
    let mut tx = SyncSender::new(1, 1, K, 1472).unwrap();
    tx.set_echo(NONCE);
    let recs: Vec<_> = (0..200).map(|i| rec(i, false, false)).collect();
    let mut out = Vec::new();
    tx.encode(&recs, &mut out);
    // (1472 - 47) / 23 = 61 records per message.
    assert_eq!(out.len(), 4);
    assert!(out.iter().all(|m| m.len() <= 1472));
    assert_eq!(out[0].len(), HEADER_LEN + 61 * 23 + MAC_LEN);
    assert!(SyncSender::new(1, 1, K, 100).is_err());
}

#[test]
fn forged_and_malformed_rejected() {
    let mut tx = SyncSender::new(1, 1, K, 1472).unwrap();
    tx.set_echo(NONCE);
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
fn bulk_end_is_an_empty_flagged_records_message() {
    let mut tx = SyncSender::new(4, 2, K, 1472).unwrap();
    tx.set_echo(NONCE);
    let m = tx.bulk_end();
    assert_eq!(m.len(), HEADER_LEN + MAC_LEN);
    let got = decode(&m, &K).unwrap();
    assert_eq!(got.header.kind, MessageKind::Records);
    assert_eq!(got.header.flags, FLAG_BULK | FLAG_BULK_END);
    assert_eq!(
        (got.header.sender, got.header.epoch, got.header.seq),
        (4, 2, 1)
    );
    assert!(got.records.is_empty() && got.templates.is_empty());
    // Sequenced like any other message: a replay is rejected.
    let mut rx = SyncReceiver::new(K, NONCE);
    assert!(rx.receive(&m).is_ok());
    assert!(rx.receive(&m).is_err());
    assert_eq!(tx.seq(), 1);
    // Ordinary and bulk messages carry no end flag.
    let mut out = Vec::new();
    tx.encode(&[rec(1, false, false)], &mut out);
    tx.encode_bulk(&[rec(1, false, false)], &mut out);
    let flags: Vec<u8> = out
        .iter()
        .map(|m| decode(m, &K).unwrap().header.flags)
        .collect();
    assert_eq!(flags, [0, FLAG_BULK]);
}

#[test]
fn records_come_before_templates_in_a_message() {
    let r = rec(1, false, false);
    let t = tpl(1, None, false);
    let body = body_of(&[r], &[t]);
    let m = decode(&sealed(&body), &K).unwrap();
    assert_eq!((m.records, m.templates), (vec![r], vec![t]));
    // The same items the other way round are rejected.
    let mut swapped = body[..HEADER_LEN].to_vec();
    swapped.extend_from_slice(&body[HEADER_LEN + r.encoded_len()..]);
    swapped.extend_from_slice(&body[HEADER_LEN..HEADER_LEN + r.encoded_len()]);
    assert_eq!(decode(&sealed(&swapped), &K), Err(SyncError::Op(1)));
}

#[test]
fn bad_values_behind_a_valid_mac_are_rejected() {
    let at = HEADER_LEN;
    let edit = |body: &[u8], i: usize, v: u8| {
        let mut b = body.to_vec();
        b[i] = v;
        decode(&sealed(&b), &K)
    };
    // Connection record: op values, reserved bit, v6 reply flag without a reply tuple.
    let body = body_of(&[rec(1, false, false)], &[]);
    for op in [0u8, 0x20 | 1] {
        assert_eq!(edit(&body, at, op), Err(SyncError::Op(op)), "op {op:#x}");
    }
    // Ops 6 and 7 are splice records: this body is no valid one.
    for op in [6u8, 7] {
        assert!(edit(&body, at, op).is_err(), "op {op:#x}");
    }
    assert_eq!(edit(&body, at + 1, 13), Err(SyncError::State(13)));
    // Remaining timeout above the maximum (bytes 15..19 of an IPv4 record).
    let mut b = body.clone();
    b[at + 19..at + 23].copy_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(decode(&sealed(&b), &K), Err(SyncError::Timeout(u32::MAX)));
    // Persistence prefix beyond the address.
    let p = SyncRecord {
        persist: Some(32),
        ..rec(1, false, false)
    };
    let body = body_of(&[p], &[]);
    assert!(decode(&sealed(&body), &K).is_ok());
    assert_eq!(edit(&body, at + 23, 33), Err(SyncError::Prefix(33)));
    // Template records: reserved bits, an established delete, v6 client flag on an affinity
    // template, prefix, masking.
    let body = body_of(&[], &[tpl(1, None, false)]);
    for op in [5u8 | 0x08, 4 | 0x20] {
        assert_eq!(edit(&body, at, op), Err(SyncError::Op(op)), "op {op:#x}");
    }
    let c = tpl(0x0001_0203, Some(false), false); // client 1.2.3.0/24
    let body = body_of(&[], &[c]);
    assert!(decode(&sealed(&body), &K).is_ok());
    let prefix_at = at + 20;
    assert_eq!(edit(&body, prefix_at, 33), Err(SyncError::Prefix(33)));
    assert_eq!(
        edit(&body, prefix_at, 16),
        Err(SyncError::Prefix(16)),
        "bits beyond /16"
    );
    assert_eq!(
        edit(&body, prefix_at + 4, 1),
        Err(SyncError::Prefix(24)),
        "bits beyond /24"
    );
    let mut b = body.clone();
    b[at + 16..at + 20].copy_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(decode(&sealed(&b), &K), Err(SyncError::Timeout(u32::MAX)));
    // A resync request carries no items; trailing bytes are rejected.
    let mut b = body.clone();
    b[3] = 2;
    assert_eq!(decode(&sealed(&b), &K), Err(SyncError::Kind(2)));
    let mut b = body.clone();
    b.push(0);
    assert_eq!(decode(&sealed(&b), &K), Err(SyncError::Trailing(1)));
    // Version 1 messages are not spoken any more.
    assert_eq!(edit(&body, 2, 1), Err(SyncError::Version(1)));
}

#[test]
fn template_record_from_info() {
    let now = Instant::from_secs(100);
    let info = crate::TemplateInfo {
        key: tpl(1, None, false).key,
        backend: BackendId(7),
        deadline: Instant::from_secs(130),
        timeout: Duration::from_secs(300),
        established: true,
    };
    let t = TemplateRecord::from_info(false, &info, now);
    assert!(t.established);
    assert_eq!(
        (t.delete, t.key, t.backend, t.remaining_ms, t.timeout_ms),
        (false, info.key, BackendId(7), 30_000, 300_000)
    );
    // Past deadlines give 0; huge timeouts are capped.
    let late = TemplateRecord::from_info(true, &info, Instant::from_secs(200));
    assert_eq!((late.delete, late.remaining_ms), (true, 0));
    let huge = crate::TemplateInfo {
        timeout: Duration::from_secs(u64::MAX / 2_000_000_000),
        ..info
    };
    let c = TemplateRecord::from_info(false, &huge, now).timeout_ms;
    assert_eq!(u128::from(c), MAX_TIMEOUT.as_millis());
}

#[test]
fn replay_gap_epoch() {
    let mut tx = SyncSender::new(7, 1, K, 1472).unwrap();
    tx.set_echo(NONCE);
    let mut out = Vec::new();
    for i in 0..4 {
        tx.encode(&[rec(i, false, false)], &mut out);
    }
    let mut rx = SyncReceiver::new(K, NONCE);
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
    tx2.set_echo(NONCE);
    let req = tx2.resync_request(NONCE);
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
fn a_replay_after_the_receiver_restarts_is_refused() {
    // The active streams to the backup, whose receiver has challenge 11.
    let mut tx = SyncSender::new(7, 1, K, 1472).unwrap();
    tx.set_echo(11);
    let mut old = Vec::new();
    for i in 0..3 {
        tx.encode(&[rec(i, false, false)], &mut old);
    }
    let mut rx = SyncReceiver::new(K, 11);
    assert!(rx.receive(&old[0]).unwrap().first_contact);
    assert!(rx.receive(&old[1]).is_ok());
    // The backup restarts with a new challenge: every captured message is refused, whatever
    // its sequence number.
    let mut rx = SyncReceiver::new(K, 22);
    for m in &old {
        assert_eq!(
            rx.receive(m),
            Err(SyncError::Unfresh {
                sender: 7,
                epoch: 1
            })
        );
    }
    // Its resync request carries the challenge; the active echoes it from then on.
    let mut back = SyncSender::new(9, 5, K, 1472).unwrap();
    let req = decode(&back.resync_request(rx.nonce()), &K).unwrap();
    assert_eq!(req.header.kind, MessageKind::ResyncRequest);
    tx.set_echo(req.header.challenge);
    let mut new = Vec::new();
    tx.encode_bulk(&[rec(5, false, false)], &mut new);
    new.push(tx.bulk_end());
    let r = rx.receive(&new[0]).unwrap();
    assert!(r.first_contact && r.needs_resync());
    let r = rx.receive(&new[1]).unwrap();
    assert!(!r.needs_resync());
    // The stream is open: the old messages are now plain replays.
    for m in &old {
        assert!(matches!(rx.receive(m), Err(SyncError::Replayed { .. })));
    }
}

#[test]
fn a_sender_restart_is_caught_up_after_a_request() {
    let mut rx = SyncReceiver::new(K, 33);
    let mut tx = SyncSender::new(7, 1, K, 1472).unwrap();
    tx.set_echo(33);
    let mut a = Vec::new();
    tx.encode(&[rec(1, false, false)], &mut a);
    tx.encode(&[rec(2, false, false)], &mut a);
    assert!(rx.receive(&a[0]).is_ok());
    // The sender restarts (epoch 2): it does not know our challenge yet.
    let mut tx2 = SyncSender::new(7, 2, K, 1472).unwrap();
    let mut b = Vec::new();
    tx2.encode(&[rec(3, false, false)], &mut b);
    assert_eq!(
        rx.receive(&b[0]),
        Err(SyncError::Unfresh {
            sender: 7,
            epoch: 2
        })
    );
    // Its own resync request (its challenge for us) is accepted and closes the old epoch.
    let req = tx2.resync_request(44);
    let r = rx.receive(&req).unwrap();
    assert!(r.first_contact);
    assert_eq!(r.message.header.challenge, 44);
    assert_eq!(
        rx.receive(&a[1]),
        Err(SyncError::StaleEpoch {
            epoch: 1,
            current: 2
        })
    );
    // Our request reaches it; it echoes; its next message opens the new epoch.
    tx2.set_echo(rx.nonce());
    tx2.encode(&[rec(4, false, false)], &mut b);
    let r = rx.receive(&b[1]).unwrap();
    assert!(r.first_contact);
    assert_eq!(r.message.records[0], rec(4, false, false));
    assert!(matches!(rx.receive(&b[0]), Err(SyncError::Replayed { .. })));
}

#[test]
fn a_replayed_request_does_not_open_the_stream() {
    // Captured from a sender's epoch: a request, then records echoing an old challenge.
    let mut tx = SyncSender::new(7, 1, K, 1472).unwrap();
    let req = tx.resync_request(99);
    tx.set_echo(55);
    let mut recs = Vec::new();
    tx.encode(&[rec(1, false, false)], &mut recs);
    // A receiver that never met the sender (restarted, challenge 66) accepts the request for
    // its challenge, and still refuses the records that follow it in sequence.
    let mut rx = SyncReceiver::new(K, 66);
    assert!(rx.receive(&req).unwrap().first_contact);
    assert!(matches!(
        rx.receive(&recs[0]),
        Err(SyncError::Unfresh { .. })
    ));
    assert!(matches!(rx.receive(&req), Err(SyncError::Replayed { .. })));
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
    tx.set_echo(NONCE);
    let mut rx = SyncReceiver::new(K, NONCE);
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
    msgs.push(tx.bulk_end());
    let mut ended = false;
    for m in &msgs {
        let r = rx.receive(m).unwrap();
        assert!(!ended, "the end marker comes last");
        assert_eq!(r.message.header.flags & FLAG_BULK, FLAG_BULK);
        ended = r.message.header.flags & FLAG_BULK_END != 0;
        apply(&mut backup, &r.message, now);
    }
    assert!(ended);
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
    tx.set_echo(NONCE);
    let mut rx = SyncReceiver::new(K, NONCE);
    let mut backup =
        ConnTable::new(Config::with_capacity(64), HashKey::from_bytes([2; 16])).unwrap();
    let ok = rec(1, false, false);
    let big = SyncRecord {
        backend: BackendId(crate::MAX_BACKEND_ID + 1),
        backend_tag: None,
        ..rec(2, false, false)
    };
    // An update moving an installed entry to such a backend is refused too, and leaves it.
    let moved = SyncRecord {
        op: RecordOp::Update,
        backend: BackendId(u32::MAX),
        backend_tag: None,
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
    fn encode_decode_is_identity(
        recs in proptest::collection::vec(arb_record(), 0..40),
        tpls in proptest::collection::vec(arb_template(), 0..40),
        mtu in MIN_MTU..1500,
        flags in 0u8..4,
    ) {
        let mut tx = SyncSender::new(3, 9, K, mtu).unwrap();
        tx.set_echo(NONCE);
        let mut out = Vec::new();
        tx.encode_items(&recs, &tpls, flags, &mut out);
        prop_assert_eq!(out.is_empty(), recs.is_empty() && tpls.is_empty());
        let (mut got, mut got_t) = (Vec::new(), Vec::new());
        let mut rx = SyncReceiver::new(K, NONCE);
        for (i, m) in out.iter().enumerate() {
            prop_assert!(m.len() <= mtu);
            let r = rx.receive(m).unwrap();
            prop_assert_eq!(r.message.header.seq, i as u64 + 1);
            prop_assert_eq!(r.message.header.flags, flags);
            prop_assert_eq!(r.gap, None);
            let len: usize = r.message.records.iter().map(SyncRecord::encoded_len).sum::<usize>()
                + r.message.templates.iter().map(TemplateRecord::encoded_len).sum::<usize>();
            prop_assert_eq!(HEADER_LEN + len + MAC_LEN, m.len());
            // Records first: a message with templates holds no record after the last one
            // received before it.
            prop_assert!(got_t.is_empty() || r.message.records.is_empty());
            got.extend(r.message.records);
            got_t.extend(r.message.templates);
        }
        prop_assert_eq!(got, recs);
        prop_assert_eq!(got_t, tpls);
    }

    #[test]
    fn any_corruption_is_rejected(
        r in arb_record(),
        t in arb_template(),
        at in any::<prop::sample::Index>(),
        x in 1u8..=255,
    ) {
        let mut tx = SyncSender::new(3, 9, K, 1472).unwrap();
        tx.set_echo(NONCE);
        let mut out = Vec::new();
        tx.encode_items(&[r], &[t], 0, &mut out);
        let mut m = out[0].clone();
        let i = at.index(m.len());
        m[i] ^= x;
        prop_assert_eq!(decode(&m, &K), Err(SyncError::BadMac));
        let cut = at.index(m.len());
        prop_assert!(decode(&out[0][..cut], &K).is_err());
        // Truncated behind a valid MAC: the parser says so.
        let body = &out[0][..out[0].len() - MAC_LEN];
        let cut = at.index(body.len());
        let truncated = matches!(
            decode(&sealed(&body[..cut]), &K),
            Err(SyncError::Truncated { .. })
        );
        prop_assert!(truncated);
    }

    #[test]
    fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode(&b, &K);
        let _ = SyncReceiver::new(K, NONCE).receive(&b);
    }

    /// Whatever mix of captured and new messages reaches a restarted receiver, in whatever
    /// order, none sent before its restart (echoing an older challenge, or none) is accepted.
    #[test]
    fn nothing_from_before_a_restart_is_accepted(
        order in proptest::collection::vec(0usize..16, 1..60),
        old_echo in prop_oneof![Just(0u64), 1u64..1000],
    ) {
        let new_nonce = 1000 + old_echo;
        let mut tx = SyncSender::new(1, 1, K, 1472).unwrap();
        tx.set_echo(old_echo);
        let mut msgs = Vec::new();
        for n in 0..16u32 {
            if n == 3 {
                msgs.push(tx.resync_request(5));
            } else if n == 8 {
                // The restarted receiver's request arrives: echoed from here on.
                tx.set_echo(new_nonce);
                msgs.push(tx.bulk_end());
            } else {
                tx.encode(&[rec(n, false, false)], &mut msgs);
            }
        }
        let mut rx = SyncReceiver::new(K, new_nonce);
        for i in order {
            if let Ok(r) = rx.receive(&msgs[i]) {
                let m = r.message;
                prop_assert!(
                    m.header.kind == MessageKind::ResyncRequest || m.header.seq > 8,
                    "accepted old message {}", m.header.seq
                );
                prop_assert!(m.header.kind == MessageKind::ResyncRequest || m.header.challenge == new_nonce);
            }
        }
    }

    #[test]
    fn replayed_or_reordered_never_roll_back(order in proptest::collection::vec(0usize..12, 1..40)) {
        // Message n sets the flow's backend to n: the backup's backend must never decrease.
        let key = rec(1, false, false).key;
        let mut tx = SyncSender::new(1, 1, K, 1472).unwrap();
        tx.set_echo(NONCE);
        let mut msgs = Vec::new();
        for n in 0..12u32 {
            let r = SyncRecord { op: RecordOp::Update, backend: BackendId(n), ..rec(1, false, false) };
            tx.encode(&[r], &mut msgs);
        }
        let now = Instant::from_secs(1);
        let mut backup = ConnTable::new(Config::with_capacity(16), HashKey::from_bytes([2; 16])).unwrap();
        let mut rx = SyncReceiver::new(K, NONCE);
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

fn arb_splice() -> impl Strategy<Value = SpliceRecord> {
    (
        (any::<bool>(), any::<u32>(), any::<bool>(), any::<bool>()),
        (any::<u32>(), proptest::option::of(any::<u32>())),
        (0u32..=MAX_TIMEOUT.as_millis() as u32, any::<u16>()),
        proptest::array::uniform5(any::<u32>()),
        (
            proptest::option::of(0u8..=14),
            proptest::option::of(0u8..=14),
            0u8..32,
        ),
    )
        .prop_map(
            |((delete, i, v6, snat6), (b, tag), (rem, port), n, (cw, bw, flags))| {
                let key = rec(i, v6, false).key;
                if delete {
                    return SpliceRecord::delete(key);
                }
                let snat = if snat6 {
                    SocketAddr::new(IpAddr::V6(Ipv6Addr::from(u128::from(b) << 3)), port)
                } else {
                    SocketAddr::new(IpAddr::V4(Ipv4Addr::from(b)), port)
                };
                SpliceRecord {
                    delete,
                    key,
                    backend: BackendId(b),
                    backend_tag: tag,
                    snat,
                    remaining_ms: rem,
                    local_isn: n[0],
                    backend_isn: n[1],
                    client_ts0: n[2],
                    backend_ts0: n[3],
                    ts_shift: n[4],
                    client_wscale: cw,
                    backend_wscale: bw,
                    flags,
                }
            },
        )
}

#[test]
fn splice_record_lengths_and_the_largest_fits_the_smallest_mtu() {
    let v4 = rec(1, false, false).key;
    let v6 = rec(1, true, false).key;
    assert_eq!(SpliceRecord::delete(v4).encoded_len(), MIN_ITEM_LEN);
    assert_eq!(SpliceRecord::delete(v6).encoded_len(), 38);
    let full = SpliceRecord {
        delete: false,
        backend: BackendId(3),
        backend_tag: Some(9),
        snat: "[2001:db8::100]:61000".parse().unwrap(),
        remaining_ms: 1000,
        local_isn: 1,
        backend_isn: 2,
        client_ts0: 3,
        backend_ts0: 4,
        ts_shift: 5,
        client_wscale: Some(7),
        backend_wscale: None,
        flags: SPLICE_TS | SPLICE_SACK,
        ..SpliceRecord::delete(v6)
    };
    assert_eq!(full.encoded_len(), MAX_RECORD_LEN);
    let mut tx = SyncSender::new(1, 1, K, MIN_MTU).unwrap();
    tx.set_echo(NONCE);
    let mut out = Vec::new();
    tx.encode_splices(&[full, full], 0, &mut out);
    assert_eq!(out.len(), 2, "one record per message at the smallest MTU");
    let m = decode(&out[0], &K).unwrap();
    assert_eq!(m.splices, vec![full]);
    assert!(m.records.is_empty() && m.templates.is_empty());
}

#[test]
fn splice_records_with_fields_out_of_range_are_refused() {
    let v4 = rec(1, false, false).key;
    let good = SpliceRecord {
        delete: false,
        snat: "198.51.100.1:61000".parse().unwrap(),
        remaining_ms: 5,
        ..SpliceRecord::delete(v4)
    };
    let mut tx = SyncSender::new(1, 1, K, 1472).unwrap();
    let mut out = Vec::new();
    tx.encode_splices(&[good], 0, &mut out);
    let body = out[0][..out[0].len() - MAC_LEN].to_vec();
    let item = HEADER_LEN;
    let len = body.len();
    let bad = |at: usize, v: u8| {
        let mut b = body.clone();
        b[at] = v;
        decode(&sealed(&b), &K)
    };
    assert!(decode(&sealed(&body), &K).is_ok());
    // Not TCP.
    assert_eq!(bad(item + 1, 17), Err(SyncError::Splice(17)));
    // A window scale above 14, unknown flags.
    assert_eq!(bad(len - 3, 15), Err(SyncError::Splice(15)));
    assert_eq!(bad(len - 1, 32), Err(SyncError::Splice(32)));
    // A reserved op bit; a delete with a tag flag.
    assert_eq!(bad(item, 6 | 0x08), Err(SyncError::Op(6 | 0x08)));
    assert_eq!(bad(item, 7 | 0x10), Err(SyncError::Op(7 | 0x10)));
    // A template after a splice record breaks the order.
    let mut tx = SyncSender::new(1, 1, K, 1472).unwrap();
    let mut b = body.clone();
    let mut t = Vec::new();
    tpl(1, Some(false), false).encode(&mut t);
    b.extend_from_slice(&t);
    b[HEADER_LEN - 2..HEADER_LEN].copy_from_slice(&2u16.to_be_bytes());
    assert!(matches!(decode(&sealed(&b), &K), Err(SyncError::Op(_))));
    let _ = tx.bulk_end();
}

proptest! {
    #[test]
    fn splice_records_round_trip(
        xs in proptest::collection::vec(arb_splice(), 0..40),
        mtu in MIN_MTU..1500,
    ) {
        let mut tx = SyncSender::new(3, 9, K, mtu).unwrap();
        tx.set_echo(NONCE);
        let mut out = Vec::new();
        tx.encode_splices(&xs, FLAG_BULK, &mut out);
        prop_assert_eq!(out.is_empty(), xs.is_empty());
        let mut rx = SyncReceiver::new(K, NONCE);
        let mut got = Vec::new();
        for m in &out {
            prop_assert!(m.len() <= mtu);
            let r = rx.receive(m).unwrap();
            let len: usize = r.message.splices.iter().map(SpliceRecord::encoded_len).sum();
            prop_assert_eq!(HEADER_LEN + len + MAC_LEN, m.len());
            got.extend(r.message.splices);
        }
        prop_assert_eq!(got, xs);
    }
}
