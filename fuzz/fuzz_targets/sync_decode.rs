#![no_main]
//! Sync message decoding on arbitrary bytes: never panics. The input is tried as a whole message
//! (almost always rejected by the MAC) and, sealed with a valid MAC, as a message body, so the
//! parser behind the MAC is explored. Whatever decodes re-encodes to the same records.

use lb_conntrack::sync::{
    decode, seal, MessageKind, SyncReceiver, SyncSender, HEADER_LEN, MAC_LEN,
};
use lb_core::HashKey;
use libfuzzer_sys::fuzz_target;

const KEY: HashKey = HashKey::from_bytes(*b"fuzz-sync-key-01");

fuzz_target!(|data: &[u8]| {
    let _ = decode(data, &KEY);
    let sealed = seal(data, &KEY);
    let mut rx = SyncReceiver::new(KEY);
    let first = rx.receive(&sealed);
    assert_eq!(
        first.as_ref().ok().map(|r| &r.message),
        decode(&sealed, &KEY).ok().as_ref()
    );
    if let Ok(r) = first {
        // A replay of an accepted message is always rejected.
        assert!(rx.receive(&sealed).is_err());
        let len: usize = r.message.records.iter().map(|x| x.encoded_len()).sum();
        assert_eq!(HEADER_LEN + len + MAC_LEN, sealed.len());
        if r.message.header.kind == MessageKind::Records && !r.message.records.is_empty() {
            let mut tx = SyncSender::new(1, 1, KEY, 65_507).unwrap();
            let mut out = Vec::new();
            tx.encode(&r.message.records, &mut out);
            let back: Vec<_> = out
                .iter()
                .flat_map(|m| decode(m, &KEY).unwrap().records)
                .collect();
            assert_eq!(back, r.message.records);
        }
    }
});
