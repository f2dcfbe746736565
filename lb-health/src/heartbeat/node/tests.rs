use super::*;
use crate::detector::DetectorConfig;

const MS: fn(u64) -> Duration = Duration::from_millis;

fn key() -> HashKey {
    HashKey::from_passphrase("heartbeat test secret, 20+ chars")
}

fn node(id: u32, generation: u64) -> HeartbeatNode {
    let cfg = NodeConfig {
        id: NodeId(id),
        generation,
        interval: MS(100),
        detector: DetectorConfig::Timeout(MS(350)),
    };
    HeartbeatNode::new(cfg, key(), Instant::ZERO).unwrap()
}

/// The next periodic status of `n` at `now` (skipping queued messages).
fn status_at(n: &mut HeartbeatNode, now: Instant) -> Transmit {
    loop {
        let t = n.poll_transmit(now).expect("status due");
        if t.to == Destination::All {
            return t;
        }
    }
}

/// Queued directed messages (retransmission requests and answers), skipping periodic statuses.
fn directed(n: &mut HeartbeatNode, now: Instant) -> Vec<Transmit> {
    std::iter::from_fn(|| n.poll_transmit(now))
        .filter(|t| t.to != Destination::All)
        .collect()
}

fn drain_events(n: &mut HeartbeatNode, now: Instant) -> Vec<MembershipEvent> {
    std::iter::from_fn(|| n.poll_event(now)).collect()
}

#[test]
fn join_and_view() {
    let mut a = node(1, 1);
    let mut b = node(2, 1);
    a.set_status(Role::Master, 200, 7);
    let t = status_at(&mut a, Instant::ZERO);
    assert_eq!(
        b.handle(t.bytes(), Instant::ZERO),
        Ok(Handled::Status(NodeId(1)))
    );
    assert_eq!(
        drain_events(&mut b, Instant::ZERO),
        vec![MembershipEvent::Joined {
            node: NodeId(1),
            generation: 1
        }]
    );
    let p = b.peer(NodeId(1)).unwrap();
    assert_eq!(
        (p.role, p.priority, p.load, p.alive, p.seq),
        (Role::Master, 200, 7, true, 1)
    );
    // Own messages are refused.
    assert_eq!(
        a.handle(t.bytes(), Instant::ZERO),
        Err(HealthError::FromSelf)
    );
}

#[test]
fn replays_and_forgeries_change_nothing() {
    let mut a = node(1, 5);
    let mut b = node(2, 1);
    let mut sent = Vec::new();
    for i in 0..80u64 {
        let t = status_at(&mut a, Instant::from_millis(i * 100));
        sent.push(t);
        b.handle(t.bytes(), Instant::from_millis(i * 100)).unwrap();
    }
    let _ = drain_events(&mut b, Instant::from_secs(8));
    let before: Vec<_> = b.peers().collect();
    let now = Instant::from_millis(7_950);
    // Exact duplicate, a message inside the window, one older than the window.
    for t in [sent[79], sent[70], sent[3]] {
        assert_eq!(
            b.handle(t.bytes(), now),
            Err(HealthError::Replay { node: 1 })
        );
    }
    // Forged with another key.
    let forged = Message::Status(Status {
        node: NodeId(1),
        generation: 9,
        seq: 1_000,
        role: Role::Master,
        priority: 255,
        load: 0,
    })
    .encode(&HashKey::from_bytes([0; 16]));
    assert_eq!(b.handle(forged.as_bytes(), now), Err(HealthError::BadMac));
    // Bit flip.
    let mut flipped = sent[79].bytes().to_vec();
    flipped[20] ^= 0x80;
    assert_eq!(b.handle(&flipped, now), Err(HealthError::BadMac));
    assert_eq!(b.peers().collect::<Vec<_>>(), before);
    assert!(drain_events(&mut b, now).is_empty());
    assert!(directed(&mut b, now).is_empty()); // no request queued
}

#[test]
fn gap_is_requested_and_filled_without_cascade() {
    let mut a = node(1, 1);
    let mut b = node(2, 1);
    // b must be known to a for a to answer.
    let tb = status_at(&mut b, Instant::ZERO);
    a.handle(tb.bytes(), Instant::ZERO).unwrap();
    let mut lost = Vec::new();
    for i in 0..5u64 {
        let t = status_at(&mut a, Instant::from_millis(i * 100));
        if i == 1 || i == 2 {
            lost.push(t);
        } else {
            b.handle(t.bytes(), Instant::from_millis(i * 100)).unwrap();
        }
    }
    // On seq 4 after seq 1, b asked for 2..=3 (once: seq 5 did not trigger another).
    let now = Instant::from_millis(400);
    let req = b.poll_transmit(now).unwrap();
    assert_eq!(req.to, Destination::Node(NodeId(1)));
    let Ok(Message::Retransmit(r)) = Message::decode(req.bytes(), &key()) else {
        panic!()
    };
    assert_eq!((r.target, r.from_seq, r.count), (NodeId(1), 2, 2));
    assert!(directed(&mut b, now).is_empty());
    // a answers with exactly the two lost statuses.
    assert_eq!(
        a.handle(req.bytes(), now),
        Ok(Handled::Retransmit(NodeId(2)))
    );
    let r1 = a.poll_transmit(now).unwrap();
    let r2 = a.poll_transmit(now).unwrap();
    assert_eq!(r1.bytes(), lost[0].bytes());
    assert_eq!(r2.bytes(), lost[1].bytes());
    // A replayed request within half an interval is not answered again.
    a.handle(req.bytes(), now).unwrap();
    assert!(directed(&mut a, now).is_empty());
    // Gap fills are accepted once, do not change the view and trigger nothing.
    let view = b.peer(NodeId(1));
    assert_eq!(b.handle(r1.bytes(), now), Ok(Handled::GapFilled(NodeId(1))));
    assert_eq!(b.handle(r2.bytes(), now), Ok(Handled::GapFilled(NodeId(1))));
    assert_eq!(
        b.handle(r2.bytes(), now),
        Err(HealthError::Replay { node: 1 })
    );
    assert_eq!(b.peer(NodeId(1)), view);
    assert!(directed(&mut b, now).is_empty());
}

#[test]
fn dead_restart_leave() {
    let mut a = node(1, 1);
    let mut b = node(2, 1);
    let t = status_at(&mut a, Instant::ZERO);
    b.handle(t.bytes(), Instant::ZERO).unwrap();
    let _ = drain_events(&mut b, Instant::ZERO);
    assert_eq!(b.next_deadline(), Instant::ZERO + MS(0)); // b's own first status is due
    let _ = status_at(&mut b, Instant::ZERO);
    assert_eq!(b.next_deadline(), Instant::from_millis(100));
    assert!(drain_events(&mut b, Instant::from_millis(349)).is_empty());
    assert_eq!(
        drain_events(&mut b, Instant::from_millis(350)),
        vec![MembershipEvent::Dead { node: NodeId(1) }]
    );
    // a restarts with a higher generation: joins again.
    let mut a2 = node(1, 2);
    let t = status_at(&mut a2, Instant::from_secs(1));
    b.handle(t.bytes(), Instant::from_secs(1)).unwrap();
    assert_eq!(
        drain_events(&mut b, Instant::from_secs(1)),
        vec![MembershipEvent::Joined {
            node: NodeId(1),
            generation: 2
        }]
    );
    // Old-generation messages are now replays.
    let old = status_at(&mut a, Instant::from_secs(1));
    assert_eq!(
        b.handle(old.bytes(), Instant::from_secs(1)),
        Err(HealthError::Replay { node: 1 })
    );
    // Restart while alive.
    let mut a3 = node(1, 3);
    let t = status_at(&mut a3, Instant::from_secs(1));
    b.handle(t.bytes(), Instant::from_secs(1)).unwrap();
    assert_eq!(
        drain_events(&mut b, Instant::from_secs(1)),
        vec![MembershipEvent::Restarted {
            node: NodeId(1),
            generation: 3
        }]
    );
    let leave = a3.leave();
    assert_eq!(
        b.handle(leave.bytes(), Instant::from_secs(1)),
        Ok(Handled::Leave(NodeId(1)))
    );
    assert_eq!(
        drain_events(&mut b, Instant::from_secs(1)),
        vec![MembershipEvent::Left { node: NodeId(1) }]
    );
    assert_eq!(
        b.handle(leave.bytes(), Instant::from_secs(1)),
        Err(HealthError::Replay { node: 1 })
    );
    // A replayed status of the departed generation does not resurrect it.
    assert_eq!(
        b.handle(t.bytes(), Instant::from_secs(2)),
        Err(HealthError::Replay { node: 1 })
    );
    assert!(!b.peer(NodeId(1)).unwrap().alive);
}

#[test]
fn accept_window() {
    let (mut h, mut w) = (0u64, 0u64);
    assert_eq!(accept(&mut h, &mut w, 1, 1, 1), Some(true));
    assert_eq!(accept(&mut h, &mut w, 1, 1, 1), None);
    assert_eq!(accept(&mut h, &mut w, 70, 1, 1), Some(true));
    assert_eq!(accept(&mut h, &mut w, 7, 1, 1), Some(false));
    assert_eq!(accept(&mut h, &mut w, 6, 1, 1), None); // 64 behind
    assert_eq!(accept(&mut h, &mut w, 7, 1, 1), None);
    assert_eq!(accept(&mut h, &mut w, 71, 0, 1), None); // older generation
    assert_eq!(h, 70);
}
