#![no_main]
//! Message::decode on arbitrary bytes: never panics; whatever authenticates re-encodes to the same
//! bytes; a message re-encoded from decoded fields decodes to the same message. The second half
//! builds a valid message from the input's fields and checks that any single-byte corruption of it
//! is rejected.

use lb_core::HashKey;
use lb_health::heartbeat::{Leave, Message, NodeId, RetransmitRequest, Role, Status};
use libfuzzer_sys::fuzz_target;

fn u64_at(d: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, x) in b.iter_mut().enumerate() {
        *x = d.get(at + i).copied().unwrap_or(0);
    }
    u64::from_be_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let key = HashKey::from_bytes(*b"fuzz-heartbeat-k");
    if let Ok(m) = Message::decode(data, &key) {
        assert_eq!(m.encode(&key).as_bytes(), data);
    }
    // Structured: fields from the input, then a corruption chosen by the input.
    let node = NodeId(u64_at(data, 0) as u32);
    let generation = u64_at(data, 4);
    let seq = u64_at(data, 12);
    let sel = data.get(20).copied().unwrap_or(0);
    let role = [Role::Init, Role::Backup, Role::Master][usize::from(sel % 3)];
    let msg = match sel % 3 {
        0 => Message::Status(Status {
            node,
            generation,
            seq,
            role,
            priority: sel,
            load: seq as u16,
        }),
        1 => Message::Retransmit(RetransmitRequest {
            node,
            generation,
            target: NodeId(seq as u32),
            target_generation: generation ^ seq,
            from_seq: seq,
            count: u16::from(sel),
        }),
        _ => Message::Leave(Leave {
            node,
            generation,
            seq,
        }),
    };
    let enc = msg.encode(&key);
    assert!(enc.as_bytes().len() <= 150);
    assert_eq!(Message::decode(enc.as_bytes(), &key), Ok(msg));
    let mut bad = enc.as_bytes().to_vec();
    let pos = usize::from(data.get(21).copied().unwrap_or(0)) % bad.len();
    let flip = data.get(22).copied().unwrap_or(1).max(1);
    bad[pos] ^= flip;
    assert!(Message::decode(&bad, &key).is_err());
    let cut = usize::from(data.get(23).copied().unwrap_or(0)) % bad.len();
    assert!(Message::decode(&enc.as_bytes()[..cut], &key).is_err());
});
