#![no_main]
//! Sync message decoding on arbitrary bytes: never panics. The input is tried as a whole message
//! (almost always rejected by the MAC) and, sealed with a valid MAC, as a message body, so the
//! parser behind the MAC is explored. Whatever decodes re-encodes to the same connection and
//! template records, and applies to a full-NAT table (backup and merge modes) without leaking a
//! SNAT reservation or a template pin once every entry has left.
//!
//! Freshness: a fresh receiver accepts a records message only when it echoes its challenge
//! ([`NONCE`]; a resync request always); the rest of the checks run with a receiver whose
//! challenge the message echoes.
//!
//! The same bytes also drive a structured round trip (records and templates of every op and
//! family built from them, encoded at an arbitrary MTU, decoded back), so template records
//! are covered even before the corpus finds them behind the MAC.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use arbitrary::{Result, Unstructured};
use lb_conntrack::sync::{
    apply, apply_record, apply_template, decode, seal, MessageKind, RecordOp, SpliceRecord,
    SyncError, SyncMessage, SyncReceiver, SyncRecord, SyncSender, TemplateRecord, HEADER_LEN,
    MAC_LEN,
};
use lb_conntrack::{
    Config, ConnTable, FlowState, Service, SnatPool, TcpState, TemplateKey, MAX_TIMEOUT,
};
use lb_core::{BackendId, Duration, FlowKey, HashKey, Instant, IpProto};
use libfuzzer_sys::fuzz_target;

const KEY: HashKey = HashKey::from_bytes(*b"fuzz-sync-key-01");
/// The challenge of the first receiver (the seed corpus's records message echoes it).
const NONCE: u64 = 0x5eed;
/// SNAT pool of the table messages are applied to: two addresses × ports 40000..=40003, for
/// backends 0..4 (0 and 1 at one server address, so sharing one pool).
const PAIRS: usize = 8;

fn snat_addrs(v6: bool) -> Vec<IpAddr> {
    if v6 {
        vec![
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2)),
        ]
    } else {
        vec![
            IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)),
            IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2)),
        ]
    }
}

fn nat_table(v6: bool) -> ConnTable {
    let cfg = Config {
        nat: true,
        persist_capacity: 8,
        ..Config::with_capacity(16)
    };
    let mut t = ConnTable::new(cfg, HashKey::from_bytes([4; 16])).unwrap();
    let mut pool = SnatPool::new(snat_addrs(v6), 40_000..=40_003).unwrap();
    // Backends 0 and 1 are one server behind two services (one shared pool), 2 another
    // server, 3 registered without an address (a pool of its own).
    let server = |b: u8| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, b)), 80);
    pool.add_backend_at(BackendId(0), server(1));
    pool.add_backend_at(BackendId(1), server(1));
    pool.add_backend_at(BackendId(2), server(2));
    pool.add_backend(BackendId(3));
    t.set_snat_pool(pool);
    t
}

/// Applies `msg` to a table per family, in both modes, then lets everything time out: every
/// reserved pair must be back in its pool and no template left pinned.
fn apply_and_drain(msg: &SyncMessage) {
    let now = Instant::from_secs(1);
    for v6 in [false, true] {
        for merge in [false, true] {
            let mut t = nat_table(v6);
            if merge {
                for r in &msg.records {
                    let _ = apply_record(&mut t, r, now, true);
                }
                for r in &msg.templates {
                    let _ = apply_template(&mut t, r, now, true);
                }
            } else {
                let _ = apply(&mut t, msg, now);
            }
            assert!(t.len() <= t.capacity());
            let end = now + MAX_TIMEOUT + Duration::from_secs(1);
            while t.expire(end, 1_000) > 0 {
                t.drain_removals().for_each(drop);
            }
            t.drain_removals().for_each(drop);
            assert!(t.is_empty());
            let pool = t.snat_pool_mut().unwrap();
            for b in 0..4 {
                assert_eq!(pool.available(BackendId(b)), PAIRS, "a reservation leaked");
            }
            for r in &msg.templates {
                assert_eq!(t.persist().refs(&r.key), 0, "a template is still pinned");
            }
            for r in &msg.records {
                if let Some(p) = r.persist {
                    let tk = TemplateKey::client(r.key.src(), p, Service::of_flow(&r.key));
                    assert_eq!(t.persist().refs(&tk), 0, "a template is still pinned");
                }
            }
        }
    }
}

fn addr(u: &mut Unstructured<'_>, v6: bool) -> Result<IpAddr> {
    Ok(if v6 {
        IpAddr::V6(Ipv6Addr::from(u.arbitrary::<u128>()?))
    } else {
        IpAddr::V4(Ipv4Addr::from(u.arbitrary::<u32>()?))
    })
}

fn flow_key(u: &mut Unstructured<'_>, v6: bool, proto: IpProto) -> Result<FlowKey> {
    let (s, d) = (addr(u, v6)?, addr(u, v6)?);
    let (sp, dp) = (u.arbitrary()?, u.arbitrary()?);
    Ok(FlowKey::new(s, sp, d, dp, proto).unwrap())
}

fn millis(u: &mut Unstructured<'_>) -> Result<u32> {
    u.int_in_range(0..=MAX_TIMEOUT.as_millis() as u32)
}

fn record(u: &mut Unstructured<'_>) -> Result<SyncRecord> {
    let op = *u.choose(&[RecordOp::New, RecordOp::Update, RecordOp::Delete])?;
    let proto = IpProto::from_number(u.arbitrary()?);
    let v6 = u.arbitrary()?;
    let key = flow_key(u, v6, proto)?;
    let state = *u.choose(&[
        FlowState::Tcp(TcpState::SynRecv),
        FlowState::Tcp(TcpState::Established),
        FlowState::Tcp(TcpState::TimeWait),
        FlowState::UdpUnconfirmed,
        FlowState::Udp,
        FlowState::Icmp,
        FlowState::Other,
    ])?;
    let nat = if u.arbitrary()? {
        let nat6 = u.arbitrary()?;
        Some(flow_key(u, nat6, proto)?)
    } else {
        None
    };
    let persist = if u.arbitrary()? {
        Some(u.int_in_range(0..=if v6 { 128 } else { 32 })?)
    } else {
        None
    };
    Ok(SyncRecord {
        op,
        key,
        backend: BackendId(u.arbitrary()?),
        backend_tag: None,
        state,
        remaining_ms: millis(u)?,
        nat,
        persist,
    })
}

fn template(u: &mut Unstructured<'_>) -> Result<TemplateRecord> {
    let vip6 = u.arbitrary()?;
    let service = Service {
        vip: addr(u, vip6)?,
        port: u.arbitrary()?,
        proto: IpProto::from_number(u.arbitrary()?),
    };
    let key = if u.arbitrary()? {
        let client6 = u.arbitrary()?;
        let client = addr(u, client6)?;
        TemplateKey::client(client, u.arbitrary()?, service)
    } else {
        TemplateKey::affinity(service, u.arbitrary()?)
    };
    let delete = u.arbitrary()?;
    Ok(TemplateRecord {
        delete,
        key,
        backend: BackendId(u.arbitrary()?),
        backend_tag: None,
        remaining_ms: millis(u)?,
        timeout_ms: millis(u)?,
        established: !delete && u.arbitrary()?,
    })
}

/// A splice record of arbitrary values (within what the wire allows).
fn splice(u: &mut Unstructured<'_>) -> Result<SpliceRecord> {
    let v6: bool = u.arbitrary()?;
    let key = if v6 {
        FlowKey::v6(
            u.arbitrary::<u128>()?.into(),
            u.arbitrary()?,
            u.arbitrary::<u128>()?.into(),
            u.arbitrary()?,
            IpProto::Tcp,
        )
    } else {
        FlowKey::v4(
            u.arbitrary::<u32>()?.into(),
            u.arbitrary()?,
            u.arbitrary::<u32>()?.into(),
            u.arbitrary()?,
            IpProto::Tcp,
        )
    };
    if u.arbitrary()? {
        return Ok(SpliceRecord::delete(key));
    }
    let snat_v6 = u.arbitrary()?;
    let ws = |u: &mut Unstructured<'_>| -> Result<Option<u8>> {
        Ok(if u.arbitrary()? {
            Some(u.int_in_range(0..=14)?)
        } else {
            None
        })
    };
    Ok(SpliceRecord {
        delete: false,
        key,
        backend: BackendId(u.arbitrary()?),
        backend_tag: u.arbitrary()?,
        snat: std::net::SocketAddr::new(addr(u, snat_v6)?, u.arbitrary()?),
        remaining_ms: millis(u)?,
        local_isn: u.arbitrary()?,
        backend_isn: u.arbitrary()?,
        client_ts0: u.arbitrary()?,
        backend_ts0: u.arbitrary()?,
        ts_shift: u.arbitrary()?,
        client_wscale: ws(u)?,
        backend_wscale: ws(u)?,
        flags: u.int_in_range(0..=31)?,
    })
}

/// Records and templates built from `data` survive encode → decode, in MTU-sized messages.
fn structured(data: &[u8]) -> Result<()> {
    let mut u = Unstructured::new(data);
    let mtu = u.int_in_range(lb_conntrack::sync::MIN_MTU..=1500)?;
    let flags = u.arbitrary()?;
    let records: Vec<SyncRecord> = (0..u.int_in_range(0..=8)?)
        .map(|_| record(&mut u))
        .collect::<Result<_>>()?;
    let templates: Vec<TemplateRecord> = (0..u.int_in_range(0..=8)?)
        .map(|_| template(&mut u))
        .collect::<Result<_>>()?;
    let splices: Vec<SpliceRecord> = (0..u.int_in_range(0..=8)?)
        .map(|_| splice(&mut u))
        .collect::<Result<_>>()?;
    let echo: u64 = u.arbitrary()?;
    let mut tx = SyncSender::new(2, 3, KEY, mtu).unwrap();
    tx.set_echo(echo);
    let mut out = Vec::new();
    tx.encode_items(&records, &templates, flags, &mut out);
    tx.encode_splices(&splices, flags, &mut out);
    let (mut got, mut got_t, mut got_s) = (Vec::new(), Vec::new(), Vec::new());
    for m in &out {
        assert!(m.len() <= mtu);
        let d = decode(m, &KEY).unwrap();
        assert_eq!(d.header.flags, flags);
        assert_eq!(d.header.challenge, echo);
        got.extend(d.records);
        got_t.extend(d.templates);
        got_s.extend(d.splices);
    }
    assert_eq!(got, records);
    assert_eq!(got_t, templates);
    assert_eq!(got_s, splices);
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = decode(data, &KEY);
    let sealed = seal(data, &KEY);
    let decoded = decode(&sealed, &KEY).ok();
    let request = |m: &SyncMessage| m.header.kind == MessageKind::ResyncRequest;
    // A fresh receiver: only a request or an echo of its challenge gets in.
    let mut rx = SyncReceiver::new(KEY, NONCE);
    match (&decoded, rx.receive(&sealed)) {
        (Some(m), Ok(r)) => {
            assert_eq!(&r.message, m);
            assert!(request(m) || m.header.challenge == NONCE);
        }
        (Some(m), Err(e)) => {
            assert!(matches!(e, SyncError::Unfresh { .. }), "{e}");
            assert!(!request(m) && m.header.challenge != NONCE);
        }
        (None, r) => assert!(r.is_err()),
    }
    // The rest with a receiver whose challenge the message echoes (0 is never one).
    let echo = decoded.as_ref().map_or(0, |m| m.header.challenge);
    let mut rx = SyncReceiver::new(KEY, echo);
    let first = rx.receive(&sealed);
    let expect = decoded.filter(|m| request(m) || echo != 0);
    assert_eq!(first.as_ref().ok().map(|r| &r.message), expect.as_ref());
    if let Ok(r) = first {
        // A replay of an accepted message is always rejected.
        assert!(rx.receive(&sealed).is_err());
        let msg = &r.message;
        let len: usize = msg.records.iter().map(|x| x.encoded_len()).sum::<usize>()
            + msg.templates.iter().map(|x| x.encoded_len()).sum::<usize>()
            + msg.splices.iter().map(|x| x.encoded_len()).sum::<usize>();
        assert_eq!(HEADER_LEN + len + MAC_LEN, sealed.len());
        let empty = msg.records.is_empty() && msg.templates.is_empty() && msg.splices.is_empty();
        if msg.header.kind == MessageKind::Records && !empty {
            let mut tx = SyncSender::new(1, 1, KEY, 65_507).unwrap();
            let mut out = Vec::new();
            tx.encode_items(&msg.records, &msg.templates, msg.header.flags, &mut out);
            tx.encode_splices(&msg.splices, msg.header.flags, &mut out);
            let mut back = (Vec::new(), Vec::new(), Vec::new());
            for m in &out {
                let d = decode(m, &KEY).unwrap();
                back.0.extend(d.records);
                back.1.extend(d.templates);
                back.2.extend(d.splices);
            }
            assert_eq!(
                back,
                (
                    msg.records.clone(),
                    msg.templates.clone(),
                    msg.splices.clone()
                )
            );
            apply_and_drain(msg);
        }
    }
    let _ = structured(data);
});
