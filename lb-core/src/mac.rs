//! Message authentication for the balancers' own protocols (heartbeat, state sync): a keyed
//! 128-bit SipHash-2-4 tag over the message, checked in constant time.
//!
//! SipHash-2-4 is a pseudorandom function under its 128-bit key; a 128-bit output makes a
//! forged tag a 2^-128 guess. Replay protection (sequence numbers, epochs) belongs to each
//! protocol: the tag only says the sender knew the key.
//!
//! ```
//! use lb_core::{mac, HashKey};
//! let key = HashKey::from_passphrase("pair secret of the balancers").derive("sync");
//! let tag = mac::tag(&key, b"hello");
//! assert!(mac::verify(&key, b"hello", &tag));
//! assert!(!mac::verify(&key, b"hellO", &tag));
//! ```

use siphasher::sip128::{Hasher128, SipHasher24};

use crate::HashKey;

/// Bytes in a tag.
pub const TAG_LEN: usize = 16;

/// The tag of `data` under `key`.
pub fn tag(key: &HashKey, data: &[u8]) -> [u8; TAG_LEN] {
    use core::hash::Hasher as _;
    let mut h = SipHasher24::new_with_key(&key.to_bytes());
    h.write(data);
    h.finish128().as_bytes()
}

/// Whether `tag` is `data`'s tag under `key`; compares every byte (no early exit on the first
/// difference, so the time taken says nothing about how much of a forgery was right).
pub fn verify(key: &HashKey, data: &[u8], tag: &[u8]) -> bool {
    let want = self::tag(key, data);
    want.len() == tag.len() && want.iter().zip(tag).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_answer() {
        // SipHash-2-4-128 of the empty message under key 00 01 .. 0f (the reference
        // implementation's test vector 0).
        let key = HashKey::from_bytes(core::array::from_fn(|i| i as u8));
        assert_eq!(
            tag(&key, b""),
            [
                0xa3, 0x81, 0x7f, 0x04, 0xba, 0x25, 0xa8, 0xe6, 0x6d, 0xf6, 0x72, 0x14, 0xc7, 0x55,
                0x02, 0x93
            ]
        );
    }

    proptest! {
        #[test]
        fn any_change_is_refused(data in prop::collection::vec(any::<u8>(), 0..64), k in any::<[u8; 16]>(), flip in any::<usize>()) {
            let key = HashKey::from_bytes(k);
            let t = tag(&key, &data);
            prop_assert!(verify(&key, &data, &t));
            let mut bad = t;
            bad[flip % TAG_LEN] ^= 1 << (flip % 8);
            prop_assert!(!verify(&key, &data, &bad));
            prop_assert!(!verify(&key, &data, &t[..TAG_LEN - 1]));
            let other = HashKey::from_bytes(k.map(|b| b ^ 0x5a));
            prop_assert!(!verify(&other, &data, &t));
        }
    }
}
