#![no_main]
//! sip::call_id on arbitrary payloads: never panics; whatever it returns is a non-empty,
//! trimmed sub-slice of the header section within the scan limit.

use lb_packet::sip;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(v) = sip::call_id(data) {
        assert!(!v.is_empty());
        let start = v.as_ptr() as usize - data.as_ptr() as usize;
        assert!(start + v.len() <= data.len().min(sip::SCAN_LIMIT));
        assert!(!matches!(v[0], b' ' | b'\t' | b'\r' | b'\n'));
        assert!(!matches!(v[v.len() - 1], b' ' | b'\t' | b'\r' | b'\n'));
        let mut out = [0u8; 256];
        let _ = sip::fold_into(v, &mut out);
    }
});
