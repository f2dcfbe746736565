#![no_main]
//! The heartbeat node state machine under an adversarial sequence of *authenticated* messages
//! (any node id, generation, sequence number, role; retransmission requests; leaves) and random
//! time steps: never panics, its queues stay bounded, and a peer's generation and highest
//! sequence number never go backwards.

use lb_core::{Duration, HashKey, Instant};
use lb_health::detector::{DetectorConfig, PhiConfig};
use lb_health::heartbeat::{Leave, Message, NodeId, RetransmitRequest, Role, Status};
use lb_health::{HeartbeatNode, NodeConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = HashKey::from_bytes(*b"fuzz-heartbeat-k");
    let detector = if data.first().is_some_and(|b| b & 1 == 1) {
        DetectorConfig::Phi(PhiConfig::default())
    } else {
        DetectorConfig::Timeout(Duration::from_millis(350))
    };
    let cfg = NodeConfig {
        id: NodeId(0),
        generation: 1,
        interval: Duration::from_millis(100),
        detector,
    };
    let Ok(mut node) = HeartbeatNode::new(cfg, key, Instant::ZERO) else {
        return;
    };
    let mut now = Instant::ZERO;
    for op in data.chunks_exact(6) {
        now += Duration::from_millis(u64::from(op[0]));
        let peer = NodeId(u32::from(op[1] % 4));
        let generation = u64::from(op[2] % 4);
        let seq = u64::from(u16::from_be_bytes([op[3], op[4]]));
        let msg = match op[5] % 4 {
            0 | 1 => Message::Status(Status {
                node: peer,
                generation,
                seq,
                role: [Role::Init, Role::Backup, Role::Master][usize::from(op[5] % 3)],
                priority: op[5],
                load: 0,
            }),
            2 => Message::Retransmit(RetransmitRequest {
                node: peer,
                generation,
                target: NodeId(0),
                target_generation: 1,
                from_seq: seq,
                count: u16::from(op[5]),
            }),
            _ => Message::Leave(Leave {
                node: peer,
                generation,
                seq,
            }),
        };
        let before = node.peer(peer);
        let _ = node.handle(msg.encode(&key).as_bytes(), now);
        if let (Some(b), Some(a)) = (before, node.peer(peer)) {
            assert!(a.generation >= b.generation);
            if a.generation == b.generation {
                assert!(a.seq >= b.seq);
            }
        }
        let mut sent = 0;
        while node.poll_transmit(now).is_some() {
            sent += 1;
            assert!(sent <= 300, "outbox unbounded");
        }
        let mut events = 0;
        while node.poll_event(now).is_some() {
            events += 1;
            assert!(events <= 100);
        }
    }
});
