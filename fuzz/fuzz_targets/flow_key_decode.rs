#![no_main]
//! FlowKey::decode on arbitrary bytes: never panics, and whatever it accepts re-encodes to the
//! same bytes and survives reversal and canonicalisation.

use lb_core::FlowKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(k) = FlowKey::decode(data) {
        assert_eq!(&k.encode()[..], data);
        assert_eq!(k.reversed().reversed(), k);
        assert_eq!(k.canonical(), k.reversed().canonical());
        let _ = k.to_string();
    }
});
