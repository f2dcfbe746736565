//! Admission control: connection and utilisation thresholds.
//!
//! A backend above its threshold is *overloaded*: no policy assigns it a new flow. When every
//! eligible backend is overloaded the policies answer [`Pick::Overloaded`](crate::policy::Pick)
//! so the caller can refuse the connection (and count the refusal) instead of melting a server.
//!
//! Connection thresholds follow IPVS (`ipvsadm -x upper -y lower`, `ip_vs_ctl.c` /
//! `ip_vs_conn.c`):
//! - the overload flag is set when `activeconns + inactconns >= upper` (on binding a new
//!   connection);
//! - it is cleared when the total falls below `lower`, or, when no lower threshold is set, below
//!   three quarters of `upper` (`total * 4 < upper * 3`); with no upper threshold it is never set.
//!
//! Utilisation thresholds (reported CPU / memory load, 0..=1) have no hysteresis: a backend whose
//! reported load exceeds `max_utilisation` is overloaded until it reports less.

/// Per-backend admission thresholds. `Default` means no threshold at all.
///
/// ```
/// use lb_sched::policy::admission::Thresholds;
/// let t = Thresholds { upper_conns: 100, lower_conns: 0, max_utilisation: Some(0.9) };
/// // Set at 100 connections, cleared below 75 (3/4 of upper, as IPVS).
/// assert!(t.sets_overload(100));
/// assert!(!t.clears_overload(75));
/// assert!(t.clears_overload(74));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Thresholds {
    /// Upper connection threshold (IPVS `-x`, `u_threshold`): at or above this many connections
    /// (active + inactive) the backend is overloaded. 0 = no limit.
    pub upper_conns: u32,
    /// Lower connection threshold (IPVS `-y`, `l_threshold`): the overload flag clears below it.
    /// 0 = clear below 3/4 of `upper_conns`.
    pub lower_conns: u32,
    /// Largest reported utilisation (max of CPU and memory, 0..=1) at which the backend still
    /// takes new flows. `None` = no limit.
    pub max_utilisation: Option<f32>,
}

impl Thresholds {
    /// No thresholds.
    pub const NONE: Thresholds = Thresholds {
        upper_conns: 0,
        lower_conns: 0,
        max_utilisation: None,
    };

    /// Whether `total` connections set the overload flag (IPVS `ip_vs_bind_dest`).
    #[inline]
    pub const fn sets_overload(&self, total: u64) -> bool {
        self.upper_conns != 0 && total >= self.upper_conns as u64
    }

    /// Whether `total` connections clear a set overload flag (IPVS `ip_vs_unbind_dest`).
    #[inline]
    pub const fn clears_overload(&self, total: u64) -> bool {
        if self.lower_conns != 0 {
            total < self.lower_conns as u64
        } else if self.upper_conns != 0 {
            total * 4 < self.upper_conns as u64 * 3
        } else {
            true
        }
    }

    /// Whether a reported load exceeds the utilisation threshold.
    #[inline]
    pub fn load_exceeds(&self, load: Load) -> bool {
        match self.max_utilisation {
            Some(max) => load.utilisation() > max,
            None => false,
        }
    }
}

/// Load reported by a backend (an agent, a health-check body, a feedback protocol).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Load {
    /// CPU utilisation, 0..=1.
    pub cpu: f32,
    /// Memory utilisation, 0..=1.
    pub mem: f32,
}

impl Load {
    /// A load report, each value clamped into 0..=1 (NaN counts as 1: fully loaded).
    pub fn new(cpu: f32, mem: f32) -> Self {
        Load {
            cpu: clamp01(cpu),
            mem: clamp01(mem),
        }
    }

    /// The utilisation admission control compares: the larger of CPU and memory.
    #[inline]
    pub fn utilisation(&self) -> f32 {
        self.cpu.max(self.mem)
    }
}

fn clamp01(v: f32) -> f32 {
    if v.is_nan() {
        1.0
    } else {
        v.clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hysteresis_follows_ipvs() {
        let t = Thresholds {
            upper_conns: 10,
            lower_conns: 5,
            max_utilisation: None,
        };
        assert!(!t.sets_overload(9));
        assert!(t.sets_overload(10));
        assert!(!t.clears_overload(5));
        assert!(t.clears_overload(4));
        assert!(!Thresholds::NONE.sets_overload(u64::MAX));
        assert!(Thresholds::NONE.clears_overload(u64::MAX));
    }

    #[test]
    fn load_is_clamped_and_compared() {
        let l = Load::new(f32::NAN, -3.0);
        assert_eq!(l.utilisation(), 1.0);
        assert_eq!(Load::new(2.0, 0.5).cpu, 1.0);
        let t = Thresholds {
            max_utilisation: Some(0.8),
            ..Thresholds::NONE
        };
        assert!(t.load_exceeds(Load::new(0.81, 0.1)));
        assert!(!t.load_exceeds(Load::new(0.5, 0.8)));
        assert!(!Thresholds::NONE.load_exceeds(Load::new(1.0, 1.0)));
    }
}
