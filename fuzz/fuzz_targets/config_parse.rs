#![no_main]
//! `tun-balancer`'s configuration parser (`lb_examples::config::Config::parse`) on arbitrary
//! text: a typed error or a configuration, never a panic; an error names a position inside the
//! text.

use lb_examples::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, "fuzz.toml") {
        Ok(c) => {
            assert!(!c.dataplane.services.is_empty());
            assert_eq!(c.health.len(), c.dataplane.services.len());
        }
        Err(e) => {
            assert_eq!(e.file, "fuzz.toml");
            assert!(e.line <= text.lines().count() + 1, "{e}");
            let _ = e.to_string();
        }
    }
});
