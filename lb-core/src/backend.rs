//! Backends: the servers a service spreads its flows over.

use core::fmt;
use std::net::SocketAddr;

/// Identifier of a backend, unique within a balancer's configuration.
///
/// A small integer so that tables (Maglev slots, conntrack entries) can store it compactly. Ids are
/// chosen by the caller; schedulers order backends by id, so the same set of backends produces the
/// same tables whatever order they were listed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BackendId(pub u32);

impl BackendId {
    /// The raw id.
    #[inline]
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl From<u32> for BackendId {
    #[inline]
    fn from(v: u32) -> Self {
        BackendId(v)
    }
}

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// The relative share of new flows a backend should receive. Zero means drained: never chosen for
/// a new flow, while existing flows keep going to it.
///
/// Weights are plain `u32`s; code that sums them does so in `u64`, so no set of weights overflows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Weight(u32);

impl Weight {
    /// Weight zero: drained.
    pub const ZERO: Weight = Weight(0);
    /// Weight one, the default.
    pub const ONE: Weight = Weight(1);

    /// A weight of `w`.
    #[inline]
    pub const fn new(w: u32) -> Self {
        Weight(w)
    }

    /// The raw weight.
    #[inline]
    pub const fn get(self) -> u32 {
        self.0
    }

    /// Whether this weight is zero (the backend is drained).
    #[inline]
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl Default for Weight {
    fn default() -> Self {
        Weight::ONE
    }
}

impl From<u32> for Weight {
    #[inline]
    fn from(v: u32) -> Self {
        Weight(v)
    }
}

impl fmt::Display for Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An Ethernet MAC address (used by direct-routing mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The six octets.
    #[inline]
    pub const fn octets(self) -> [u8; 6] {
        self.0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// A backend server of a service.
///
/// ```
/// use lb_core::{Backend, BackendId, Weight};
/// let b = Backend::new(BackendId(7), "198.51.100.11:80".parse().unwrap()).with_weight(Weight::new(3));
/// assert_eq!(b.weight.get(), 3);
/// assert!(b.is_eligible());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Backend {
    /// Unique id.
    pub id: BackendId,
    /// Address (and port, for the NAT modes) of the backend. Port 0 means "keep the service's
    /// destination port" (tunnel and direct-routing modes, which do not rewrite ports).
    pub addr: SocketAddr,
    /// Share of new flows.
    pub weight: Weight,
    /// MAC address on the balancer's segment, for direct routing.
    pub mac: Option<MacAddr>,
}

impl Backend {
    /// A backend with weight 1 and no MAC address.
    #[inline]
    pub const fn new(id: BackendId, addr: SocketAddr) -> Self {
        Backend {
            id,
            addr,
            weight: Weight::ONE,
            mac: None,
        }
    }

    /// The same backend with another weight.
    #[inline]
    #[must_use]
    pub const fn with_weight(mut self, weight: Weight) -> Self {
        self.weight = weight;
        self
    }

    /// The same backend with a MAC address.
    #[inline]
    #[must_use]
    pub const fn with_mac(mut self, mac: MacAddr) -> Self {
        self.mac = Some(mac);
        self
    }

    /// Whether the backend may receive new flows (weight > 0). Health is tracked elsewhere.
    #[inline]
    pub const fn is_eligible(&self) -> bool {
        !self.weight.is_zero()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_defaults() {
        assert_eq!(BackendId(3).to_string(), "#3");
        assert_eq!(Weight::default(), Weight::ONE);
        assert!(Weight::ZERO.is_zero());
        assert_eq!(
            MacAddr([0, 0x1b, 0x2c, 0xff, 1, 2]).to_string(),
            "00:1b:2c:ff:01:02"
        );
        let b = Backend::new(BackendId(1), "[2001:db8::1]:0".parse().unwrap())
            .with_weight(Weight::ZERO)
            .with_mac(MacAddr([2; 6]));
        assert!(!b.is_eligible());
        assert_eq!(b.mac, Some(MacAddr([2; 6])));
    }
}
