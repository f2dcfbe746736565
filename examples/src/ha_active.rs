//! Active-active mode of the HA thread (`[ha] mode = "active-active"`): every node forwards
//! (the router spreads flows over them by ECMP), streams its flows to every peer, and holds the
//! floating addresses it owns plus those of peers that do not serve.
//!
//! - **Streams**: each peer gets its own sync stream (its own sequence numbers): the live
//!   records go to every peer, a bulk dump or a resync request to one, and no peer sees
//!   another's messages as a gap. (With one shared sequence, every dump to a joining node was a
//!   gap at every other peer, which asked for a dump of its own: a cascade of bulk syncs.)
//! - **Joining**: a node starts as `backup`: it asks every peer it hears for a bulk dump and
//!   becomes `active` once each live peer's dump has ended (or, alone, after the master-down
//!   interval), so that it forwards the flows ECMP may move to it the way their owners did.
//! - **Addresses**: each `[[ha.address]]` names its node (in mode `nat`, the next hop through
//!   which the backends reach that node's SNAT address). It is held by that node while it serves
//!   (`active` or `draining`), else by the lowest-numbered serving node, which thereby takes over
//!   the replies of the dead node's synced flows. Peers are judged by the heartbeat's failure
//!   detector and by the role they announce.
//! - **BGP**: with `bgp_socket`, the node's BIRD announces the VIPs (the configured protocol is
//!   enabled) only while the node is `active`: withdrawn while joining, when its data path
//!   stalls (`fault`), and first thing on SIGTERM (`draining`: the runtime forwards on until
//!   nothing came for 2 s, at most `drain_s`, then stops).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use lb_core::{Duration, Instant};
use lb_health::{Role, WatchdogEvent};

use super::{netlink, role, Ha, REANNOUNCE};
use crate::config::HaMode;

/// A joining node that has not heard every live peer's bulk dump by then serves anyway.
const JOIN_LIMIT: Duration = Duration::from_secs(5);

impl Ha<'_> {
    pub(super) fn aa(&self) -> bool {
        self.cfg.mode == HaMode::ActiveActive
    }

    /// Whether this node serves (forwards, holds its addresses).
    fn aa_serving(&self) -> bool {
        matches!(self.role, role::ACTIVE | role::DRAINING)
    }

    /// Heartbeat status: `Master` while serving, so peers know who holds what.
    fn aa_status(&mut self) {
        let r = match self.role {
            role::ACTIVE | role::DRAINING => Role::Master,
            role::FAULT => Role::Init,
            _ => Role::Backup,
        };
        self.hb.set_status(r, self.el.priority(), 0);
    }

    /// The live peers' addresses (heard, not judged dead).
    fn aa_live_peers(&self) -> Vec<SocketAddr> {
        self.hb
            .peers()
            .filter(|(_, p)| p.alive)
            .filter_map(|(n, _)| self.peer_addr.get(&n).copied())
            .collect()
    }

    pub(super) fn aa_roles(&mut self, t: Instant) {
        if self.sh.draining.load(Ordering::Acquire) && self.role != role::DRAINING {
            self.aa_withdraw("draining (SIGTERM): withdrawn, forwarding until stopped");
            self.set_role(role::DRAINING, "draining (SIGTERM)");
            self.aa_status();
            return;
        }
        if self.role == role::BACKUP {
            let live = self.aa_live_peers();
            let waited = t - self.joined_at;
            let all = !live.is_empty() && live.iter().all(|a| self.bulk_from.contains(a));
            let alone = live.is_empty() && waited >= self.el.master_down_interval();
            let why = if all {
                Some("every live peer's bulk sync is in")
            } else if alone {
                Some("no peer heard: serving alone")
            } else if waited >= JOIN_LIMIT {
                Some("a peer's bulk sync did not end in time: serving anyway")
            } else {
                None
            };
            if let Some(why) = why {
                self.synced = true;
                self.set_role(role::ACTIVE, why);
                self.sh.first_forward_armed.store(true, Ordering::Release);
                self.takeover_unix_ms = Some(super::unix_ms());
                self.aa_status();
            }
        }
    }

    /// Holds exactly the addresses this node owns now (see the module docs).
    pub(super) fn aa_addresses(&mut self, t: Instant) {
        let me = self.cfg.node_id;
        let serving_peers: Vec<u8> = self
            .hb
            .peers()
            .filter(|(_, p)| p.alive && p.role == Role::Master)
            .filter_map(|(n, _)| u8::try_from(n.0).ok())
            .collect();
        let me_serving = self.aa_serving();
        let serving = |k: u8| {
            if k == me {
                me_serving
            } else {
                serving_peers.contains(&k)
            }
        };
        let lowest = serving_peers
            .iter()
            .copied()
            .chain(me_serving.then_some(me))
            .min();
        let mut added = false;
        for i in 0..self.cfg.addresses.len() {
            let Some(a) = self.cfg.addresses.get(i).cloned() else {
                continue;
            };
            let owner = match a.node {
                Some(k) if serving(k) => Some(k),
                _ => lowest,
            };
            let want = me_serving && owner == Some(me);
            let held = self.held.get(i).copied().unwrap_or(false);
            if want && !held {
                if let Err(e) = netlink::add_addr(&a.dev, a.addr, a.prefix) {
                    tracing::error!(dev = %a.dev, addr = %a.addr, "ha: cannot add floating address: {e}");
                    continue;
                }
                if let Err(e) = self.announcer.announce(&a.dev, a.addr) {
                    tracing::warn!(dev = %a.dev, addr = %a.addr, "ha: announcement failed: {e}");
                }
                tracing::warn!(
                    addr = %a.addr,
                    owner = a.node.unwrap_or(0),
                    "ha: holding a floating address{}",
                    if a.node == Some(me) { "" } else { " (its node does not serve)" }
                );
                added = true;
            } else if !want && held {
                if let Err(e) = netlink::del_addr(&a.dev, a.addr, a.prefix) {
                    tracing::error!(dev = %a.dev, addr = %a.addr, "ha: cannot remove floating address: {e}");
                }
                tracing::info!(addr = %a.addr, "ha: released a floating address");
            }
            if let Some(h) = self.held.get_mut(i) {
                *h = want;
            }
        }
        if added {
            self.reannounce = REANNOUNCE.iter().map(|d| t + *d).collect();
        }
    }

    pub(super) fn aa_announce_due(&mut self, t: Instant) {
        let mut due = false;
        while self.reannounce.front().is_some_and(|d| *d <= t) {
            self.reannounce.pop_front();
            due = true;
        }
        if due {
            for i in 0..self.cfg.addresses.len() {
                if !self.held.get(i).copied().unwrap_or(false) {
                    continue;
                }
                if let Some(a) = self.cfg.addresses.get(i) {
                    let _ = self.announcer.announce(&a.dev, a.addr);
                }
            }
        }
    }

    pub(super) fn aa_watchdog(&mut self, t: Instant) {
        let kick = self.sh.oldest_kick();
        self.watchdog.kick(Instant::from_millis(kick).min(t));
        match self.watchdog.poll(t) {
            Some(WatchdogEvent::Expired { .. }) if self.aa_serving() => {
                self.aa_withdraw("the data path stalled (watchdog)");
                self.set_role(role::FAULT, "the data path stalled (watchdog)");
                self.aa_status();
                self.aa_addresses(t);
            }
            Some(WatchdogEvent::Recovered) if self.role == role::FAULT => {
                self.aa_join(t, "the data path runs again: joining");
            }
            _ => {}
        }
    }

    /// Back to joining: peers hold our addresses meanwhile; a fresh bulk sync from each.
    fn aa_join(&mut self, t: Instant, why: &str) {
        self.bulk_from.clear();
        self.joined_at = t;
        self.synced = false;
        self.set_role(role::BACKUP, why);
        self.aa_status();
        self.aa_addresses(t);
    }

    /// The process was frozen longer than peers wait: they took our addresses and flows.
    pub(super) fn aa_rejoin(&mut self, t: Instant, frozen: Duration) {
        if self.role == role::DRAINING {
            return;
        }
        self.aa_withdraw("frozen");
        self.aa_join(
            t,
            &format!(
                "this process did not run for {} ms: joining again",
                frozen.as_millis()
            ),
        );
    }

    /// Asks the BGP speaker to withdraw the VIPs (when configured).
    pub(super) fn aa_withdraw(&mut self, why: &str) {
        if self.cfg.bgp.is_some() && self.announced != Some(false) {
            match self.bgp_set(false) {
                Ok(()) => tracing::warn!(reason = why, "ha: VIPs withdrawn"),
                Err(e) => tracing::error!(reason = why, "ha: cannot withdraw the VIPs: {e}"),
            }
        }
    }

    /// Announces while active, withdraws otherwise; reconnects to BIRD at most once a second.
    pub(super) fn aa_bgp(&mut self, t: Instant) {
        if self.cfg.bgp.is_none() {
            return;
        }
        let want = self.role == role::ACTIVE;
        // Re-asserted every second even when nothing changed (enable / disable are idempotent):
        // a BIRD that restarted comes up with the protocol disabled.
        if self
            .last_bgp_attempt
            .is_some_and(|l| t - l < Duration::from_secs(1))
            && self.announced == Some(want)
        {
            return;
        }
        if self.announced != Some(want)
            && self
                .last_bgp_attempt
                .is_some_and(|l| t - l < Duration::from_millis(100))
        {
            return;
        }
        self.last_bgp_attempt = Some(t);
        let was = self.announced;
        match self.bgp_set(want) {
            Ok(()) if was != Some(want) => {
                tracing::warn!(announce = want, "ha: BGP announcement changed")
            }
            Ok(()) => {}
            Err(e) => tracing::error!(announce = want, "ha: BGP speaker: {e}"),
        }
    }

    fn bgp_set(&mut self, announce: bool) -> std::io::Result<()> {
        let Some(cfg) = self.cfg.bgp.as_ref() else {
            return Ok(());
        };
        if self.bird.is_none() {
            // A short timeout: the HA thread's heartbeats wait while BIRD answers.
            self.bird = Some(crate::bgp::Bird::connect_timeout(
                &cfg.socket,
                std::time::Duration::from_millis(100),
            )?);
        }
        let r = match self.bird.as_mut() {
            Some(b) if announce => b.enable(&cfg.protocol),
            Some(b) => b.disable(&cfg.protocol),
            None => Ok(()),
        };
        match r {
            Ok(()) => {
                self.announced = Some(announce);
                Ok(())
            }
            Err(e) => {
                self.bird = None;
                Err(e)
            }
        }
    }
}
