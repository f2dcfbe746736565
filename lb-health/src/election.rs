//! Active/backup election with VRRP semantics (RFC 5798 §6.4), deciding which balancer holds the
//! virtual IP.
//!
//! The election does not send anything itself: it asks the caller to
//! [`SendAdvert`](ElectionAction::SendAdvert) (typically a heartbeat status with role `Master` and
//! the priority, see [`crate::heartbeat`]), to [`TakeOver`](ElectionAction::TakeOver) the VIP (add
//! the address, send gratuitous ARP / unsolicited neighbour advertisements) or to
//! [`Release`](ElectionAction::Release) it. Advertisements received from other nodes are fed to
//! [`Election::handle_advert`].
//!
//! Timers, as in RFC 5798 §6.1:
//! - `Skew_Time = ((256 − Priority) × Advertisement_Interval) / 256`
//! - `Master_Down_Interval = 3 × Advertisement_Interval + Skew_Time`
//!
//! Rules (RFC 5798 §6.4.2 / §6.4.3), with node ids in the role of the primary IP addresses:
//! - A backup that hears no advertisement for `Master_Down_Interval` becomes master. A backup that
//!   hears a priority-0 advertisement (the master resigning) waits only `Skew_Time`. With
//!   preemption on, a backup ignores advertisements of a lower priority than its own, so it takes
//!   over from a lower-priority master; with preemption off it never displaces a live master.
//! - A master that hears an advertisement of a higher priority, or of an equal priority from a
//!   higher node id, yields (releases the VIP and becomes backup). Otherwise it ignores it, and it
//!   answers a priority-0 advertisement with its own at once. So when two masters see each other
//!   (after a partition heals), exactly one of them yields: the order on (priority, id) is total.
//! - Priority 255 means the node owns the address: it becomes master at once on start.

use std::collections::VecDeque;

use lb_core::{Duration, Instant};

use crate::heartbeat::NodeId;
use crate::HealthError;

/// Election parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ElectionConfig {
    /// This node's id (the deterministic tie-break: on equal priority the higher id wins).
    pub id: NodeId,
    /// Priority 1..=255; 255 = address owner.
    pub priority: u8,
    /// Whether a higher-priority backup takes over from a lower-priority master.
    pub preempt: bool,
    /// Advertisement interval, in (0, 1 h].
    pub advert_interval: Duration,
}

impl Default for ElectionConfig {
    /// Node 0, priority 100, preemption on, 1 s adverts (VRRP's defaults).
    fn default() -> Self {
        ElectionConfig {
            id: NodeId(0),
            priority: 100,
            preempt: true,
            advert_interval: Duration::from_secs(1),
        }
    }
}

/// The node's election state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElectionState {
    /// Not participating (after [`Election::shutdown`]).
    Initialize,
    /// Watching the master.
    Backup,
    /// Holding the VIP.
    Master,
}

/// What the caller must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElectionAction {
    /// Send an advertisement with this priority to the other nodes.
    SendAdvert {
        /// The priority to announce (0 = resigning).
        priority: u8,
    },
    /// Take over the virtual IP: configure it and announce it (gratuitous ARP / unsolicited NA).
    TakeOver,
    /// Release the virtual IP.
    Release,
}

/// A VRRP-like election state machine. See the [module documentation](self).
///
/// # Drive loop
/// `handle_advert(from, priority, now)` for each advertisement received; `poll(now)` until `None`
/// and carry out the actions in order; wake at `next_deadline()`.
#[derive(Debug, Clone)]
pub struct Election {
    cfg: ElectionConfig,
    state: ElectionState,
    /// Master: next advertisement. Backup: master down timer.
    timer: Instant,
    master: Option<NodeId>,
    actions: VecDeque<ElectionAction>,
}

impl Election {
    /// Starts the election at `now` (RFC 5798 §6.4.1: the owner becomes master at once, others
    /// start as backup with the master down timer armed).
    pub fn new(cfg: ElectionConfig, now: Instant) -> Result<Self, HealthError> {
        if cfg.priority == 0 {
            return Err(HealthError::InvalidConfig {
                field: "priority",
                reason: "must be 1..=255",
            });
        }
        if cfg.advert_interval.is_zero() || cfg.advert_interval > Duration::from_secs(3600) {
            return Err(HealthError::InvalidConfig {
                field: "advert_interval",
                reason: "must be in (0, 1 h]",
            });
        }
        let mut e = Election {
            cfg,
            state: ElectionState::Initialize,
            timer: now,
            master: None,
            actions: VecDeque::with_capacity(4),
        };
        e.start(now);
        Ok(e)
    }

    fn start(&mut self, now: Instant) {
        if self.cfg.priority == 255 {
            self.become_master(now);
        } else {
            self.state = ElectionState::Backup;
            self.timer = now + self.master_down_interval();
        }
    }

    /// `Skew_Time` for this node's priority.
    pub fn skew_time(&self) -> Duration {
        self.cfg.advert_interval * (256 - u32::from(self.cfg.priority)) / 256
    }

    /// `Master_Down_Interval` for this node's priority.
    pub fn master_down_interval(&self) -> Duration {
        self.cfg.advert_interval * 3 + self.skew_time()
    }

    /// The current state.
    pub fn state(&self) -> ElectionState {
        self.state
    }

    /// Whether this node holds the VIP.
    pub fn is_master(&self) -> bool {
        self.state == ElectionState::Master
    }

    /// The node believed to be master (this node's id when it is master), if known.
    pub fn master(&self) -> Option<NodeId> {
        self.master
    }

    /// This node's priority.
    pub fn priority(&self) -> u8 {
        self.cfg.priority
    }

    /// Changes the priority (for example lowered when the node's own backends fail, keepalived's
    /// `track_script`). Takes effect with the next advertisement or timer.
    pub fn set_priority(&mut self, priority: u8) -> Result<(), HealthError> {
        if priority == 0 {
            return Err(HealthError::InvalidConfig {
                field: "priority",
                reason: "must be 1..=255",
            });
        }
        self.cfg.priority = priority;
        Ok(())
    }

    /// Whether this node preempts a lower-priority master. A node that has just joined or
    /// restarted sets `false` until its state is synced, then the configured value: it then
    /// takes over only once it holds the connections it would have to forward.
    pub fn set_preempt(&mut self, preempt: bool) {
        self.cfg.preempt = preempt;
    }

    /// Whether this node preempts a lower-priority master.
    pub fn preempt(&self) -> bool {
        self.cfg.preempt
    }

    fn become_master(&mut self, now: Instant) {
        self.state = ElectionState::Master;
        self.master = Some(self.cfg.id);
        self.timer = now + self.cfg.advert_interval;
        self.actions.push_back(ElectionAction::SendAdvert {
            priority: self.cfg.priority,
        });
        self.actions.push_back(ElectionAction::TakeOver);
    }

    /// Handles an advertisement from `from` with `priority` received at `now`.
    pub fn handle_advert(&mut self, from: NodeId, priority: u8, now: Instant) {
        if from == self.cfg.id {
            return;
        }
        match self.state {
            ElectionState::Initialize => {}
            ElectionState::Backup => {
                if priority == 0 {
                    // RFC 5798 §6.4.2: "Set the Master_Down_Timer to Skew_Time".
                    self.master = None;
                    self.timer = now + self.skew_time();
                } else if !self.cfg.preempt || priority >= self.cfg.priority {
                    self.master = Some(from);
                    self.timer = now + self.master_down_interval();
                }
                // else: preempting a lower-priority master: discard, let the timer fire.
            }
            ElectionState::Master => {
                if priority == 0 {
                    self.timer = now + self.cfg.advert_interval;
                    self.actions.push_back(ElectionAction::SendAdvert {
                        priority: self.cfg.priority,
                    });
                } else if (priority, from) > (self.cfg.priority, self.cfg.id) {
                    // §6.4.3: higher priority, or equal priority and greater address: yield.
                    self.state = ElectionState::Backup;
                    self.master = Some(from);
                    self.timer = now + self.master_down_interval();
                    self.actions.push_back(ElectionAction::Release);
                }
            }
        }
    }

    /// The next action at `now`; call until `None`.
    #[must_use]
    pub fn poll(&mut self, now: Instant) -> Option<ElectionAction> {
        if let Some(a) = self.actions.pop_front() {
            return Some(a);
        }
        if now < self.timer {
            return None;
        }
        match self.state {
            ElectionState::Initialize => None,
            ElectionState::Backup => {
                self.become_master(now);
                self.actions.pop_front()
            }
            ElectionState::Master => {
                self.timer = now + self.cfg.advert_interval;
                Some(ElectionAction::SendAdvert {
                    priority: self.cfg.priority,
                })
            }
        }
    }

    /// When [`poll`](Self::poll) next has work ([`Instant::ZERO`] if actions are queued; `None`
    /// when stopped).
    pub fn next_deadline(&self) -> Option<Instant> {
        if !self.actions.is_empty() {
            return Some(Instant::ZERO);
        }
        match self.state {
            ElectionState::Initialize => None,
            _ => Some(self.timer),
        }
    }

    /// Leaves the election (RFC 5798 §6.4.3 "Shutdown"): a master queues a priority-0 advertisement
    /// and a release, so that a backup takes over after only its skew time.
    pub fn shutdown(&mut self) {
        if self.state == ElectionState::Master {
            self.actions
                .push_back(ElectionAction::SendAdvert { priority: 0 });
            self.actions.push_back(ElectionAction::Release);
        }
        self.state = ElectionState::Initialize;
        self.master = None;
    }

    /// Rejoins after [`shutdown`](Self::shutdown).
    pub fn restart(&mut self, now: Instant) {
        if self.state == ElectionState::Initialize {
            self.start(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn el(id: u32, priority: u8, preempt: bool) -> Election {
        let cfg = ElectionConfig {
            id: NodeId(id),
            priority,
            preempt,
            advert_interval: Duration::from_secs(1),
        };
        Election::new(cfg, Instant::ZERO).unwrap()
    }

    fn drain(e: &mut Election, now: Instant) -> Vec<ElectionAction> {
        std::iter::from_fn(|| e.poll(now)).collect()
    }

    #[test]
    fn timers_follow_rfc() {
        let e = el(1, 100, true);
        // Skew = 156/256 s = 609.375 ms.
        assert_eq!(e.skew_time(), Duration::from_micros(609_375));
        assert_eq!(e.master_down_interval(), Duration::from_micros(3_609_375));
        assert!(Election::new(
            ElectionConfig {
                priority: 0,
                ..ElectionConfig::default()
            },
            Instant::ZERO
        )
        .is_err());
    }

    #[test]
    fn backup_takes_over_when_master_silent() {
        let mut e = el(1, 100, true);
        assert_eq!(e.state(), ElectionState::Backup);
        let down = Instant::ZERO + e.master_down_interval();
        assert_eq!(e.next_deadline(), Some(down));
        e.handle_advert(NodeId(2), 150, Instant::from_secs(2));
        assert_eq!(e.master(), Some(NodeId(2)));
        assert!(drain(&mut e, down).is_empty()); // the advert reset the timer
        let down = Instant::from_secs(2) + e.master_down_interval();
        assert_eq!(
            drain(&mut e, down),
            vec![
                ElectionAction::SendAdvert { priority: 100 },
                ElectionAction::TakeOver
            ]
        );
        assert!(e.is_master());
        assert_eq!(
            drain(&mut e, down + Duration::from_secs(1)),
            vec![ElectionAction::SendAdvert { priority: 100 }]
        );
    }

    #[test]
    fn owner_starts_master() {
        let mut e = el(1, 255, false);
        assert_eq!(
            drain(&mut e, Instant::ZERO),
            vec![
                ElectionAction::SendAdvert { priority: 255 },
                ElectionAction::TakeOver
            ]
        );
    }

    #[test]
    fn preemption() {
        // Preempt on: a backup ignores a lower-priority master and takes over.
        let mut e = el(1, 150, true);
        for s in 0..10 {
            e.handle_advert(NodeId(2), 100, Instant::from_secs(s));
        }
        assert!(drain(&mut e, Instant::from_secs(4)).contains(&ElectionAction::TakeOver));
        // Preempt off: it keeps deferring.
        let mut e = el(1, 150, false);
        for s in 0..10 {
            e.handle_advert(NodeId(2), 100, Instant::from_secs(s));
            assert!(drain(&mut e, Instant::from_secs(s)).is_empty());
        }
    }

    #[test]
    fn split_brain_exactly_one_yields() {
        for (pa, pb) in [(100, 100), (100, 200), (200, 100)] {
            let mut a = el(1, pa, true);
            let mut b = el(2, pb, true);
            let t = Instant::from_secs(10);
            let _ = drain(&mut a, t);
            let _ = drain(&mut b, t);
            assert!(a.is_master() && b.is_master());
            a.handle_advert(NodeId(2), pb, t);
            b.handle_advert(NodeId(1), pa, t);
            assert!(a.is_master() ^ b.is_master(), "{pa} {pb}");
            let loser = if a.is_master() { &mut b } else { &mut a };
            assert_eq!(drain(loser, t), vec![ElectionAction::Release]);
            // Equal priority: the higher id wins.
            if pa == pb {
                assert!(b.is_master());
            }
        }
    }

    #[test]
    fn shutdown_resigns_and_backup_waits_only_skew() {
        let mut m = el(2, 200, true);
        let _ = drain(&mut m, Instant::from_secs(10));
        assert!(m.is_master());
        m.shutdown();
        assert_eq!(
            drain(&mut m, Instant::from_secs(10)),
            vec![
                ElectionAction::SendAdvert { priority: 0 },
                ElectionAction::Release
            ]
        );
        assert_eq!(m.next_deadline(), None);
        let mut b = el(1, 100, true);
        b.handle_advert(NodeId(2), 0, Instant::from_secs(10));
        assert_eq!(
            b.next_deadline(),
            Some(Instant::from_secs(10) + b.skew_time())
        );
        // A master answers a resignation with its own advert at once.
        let mut other = el(3, 100, true);
        let _ = drain(&mut other, Instant::from_secs(10));
        other.handle_advert(NodeId(2), 0, Instant::from_secs(10));
        assert_eq!(
            drain(&mut other, Instant::from_secs(10)),
            vec![ElectionAction::SendAdvert { priority: 100 }]
        );
        m.restart(Instant::from_secs(20));
        assert_eq!(m.state(), ElectionState::Backup);
    }

    #[test]
    fn preemption_waits_for_set_preempt() {
        // A returning higher-priority node that is not yet synced accepts the lower master.
        let mut e = el(2, 200, false);
        let mut t = Instant::ZERO;
        for _ in 0..10 {
            t += Duration::from_secs(1);
            e.handle_advert(NodeId(1), 100, t);
            assert_eq!(drain(&mut e, t), vec![]);
        }
        assert_eq!(e.state(), ElectionState::Backup);
        assert!(!e.preempt());
        // Synced: it now lets the lower master's adverts pass and takes over.
        e.set_preempt(true);
        e.handle_advert(NodeId(1), 100, t);
        let later = t + e.master_down_interval();
        assert!(drain(&mut e, later).contains(&ElectionAction::TakeOver));
        assert!(e.is_master());
    }
}
