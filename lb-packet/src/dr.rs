//! Direct routing (`dr` mode): the frame goes to the backend's MAC address unchanged above
//! layer 2; the backend owns the VIP on a non-ARPing interface and answers the client directly.

use lb_core::MacAddr;

use crate::error::{Layer, PacketError};

/// Rewrites the destination MAC address of the Ethernet frame `frame` (and the source MAC, when
/// `src` is given: the balancer's own interface address). Returns the previous destination and
/// source, so the rewrite can be reversed.
///
/// # Errors
/// [`PacketError::Truncated`] if `frame` is shorter than the 14-byte Ethernet header.
#[inline]
pub fn set_macs(
    frame: &mut [u8],
    dst: MacAddr,
    src: Option<MacAddr>,
) -> Result<(MacAddr, MacAddr), PacketError> {
    let have = frame.len();
    let hdr = frame.get_mut(..14).ok_or(PacketError::Truncated {
        layer: Layer::Ethernet,
        need: 14,
        have,
    })?;
    let mut old_dst = [0u8; 6];
    let mut old_src = [0u8; 6];
    old_dst.copy_from_slice(&hdr[..6]);
    old_src.copy_from_slice(&hdr[6..12]);
    hdr[..6].copy_from_slice(&dst.0);
    if let Some(s) = src {
        hdr[6..12].copy_from_slice(&s.0);
    }
    Ok((MacAddr(old_dst), MacAddr(old_src)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn short_frame_is_an_error() {
        assert!(set_macs(&mut [0u8; 13], MacAddr([1; 6]), None).is_err());
    }

    proptest! {
        #[test]
        fn rewrite_then_reverse(frame in proptest::collection::vec(any::<u8>(), 14..80), d: [u8; 6], s: [u8; 6]) {
            let mut f = frame.clone();
            let (od, os) = set_macs(&mut f, MacAddr(d), Some(MacAddr(s))).unwrap();
            prop_assert_eq!(&f[..6], &d[..]);
            prop_assert_eq!(&f[6..12], &s[..]);
            prop_assert_eq!(&f[12..], &frame[12..]);
            set_macs(&mut f, od, Some(os)).unwrap();
            prop_assert_eq!(f, frame);
        }
    }
}
