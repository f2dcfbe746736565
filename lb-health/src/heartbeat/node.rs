//! The heartbeat protocol state machine of one balancer node.
//!
//! # Protocol
//! - Every `interval` the node multicasts a [`Status`] (node id, generation, sequence number, role,
//!   priority, load), authenticated with the cluster key.
//! - A receiver accepts a message only if its MAC verifies and it is not a replay: its generation is
//!   not older than the last one seen from that node, and within the generation its sequence
//!   number is new and within a 64-message sliding window (the anti-replay window of IPsec,
//!   RFC 4303 §3.4.3). A higher generation means the sender restarted: the window resets.
//! - A status whose sequence number jumps past the next expected one reveals a gap; the receiver
//!   asks the sender (at most once per interval per peer) to resend the missing range with a
//!   [`RetransmitRequest`]. Requests carry no sequence number, are never answered with requests,
//!   and resent messages fill the gap without moving the window forward, so nothing cascades.
//!   Senders keep the last [`HISTORY`] statuses to answer, and answer each peer at most once per
//!   half interval.
//! - Each peer is watched by a failure detector ([`DetectorConfig`]); membership changes are
//!   reported as [`MembershipEvent`]s: `Joined` (first valid message, or back from dead),
//!   `Restarted` (higher generation), `Left` (graceful [`Leave`]) and `Dead` (detector timeout).
//! - Peers are remembered after they leave or die, so replayed old messages cannot resurrect them.
//!   A receiver that itself restarts forgets everything and accepts the first message of each peer;
//!   a replay of an old one is then superseded as soon as the live peer's next message arrives.
//!
//! # Drive loop
//! ```text
//! on datagram:  node.handle(bytes, now)   (errors: count and drop)
//! loop: while let Some(t) = node.poll_transmit(now) { send t.bytes() to t.to }
//!       while let Some(e) = node.poll_event(now)    { react to membership }
//!       wake at node.next_deadline()
//! ```

use std::collections::{BTreeMap, VecDeque};

use lb_core::{Duration, HashKey, Instant};

use super::wire::{Encoded, Leave, Message, NodeId, RetransmitRequest, Role, Status};
use crate::detector::{Detector, DetectorConfig, FailureDetector};
use crate::HealthError;

/// Statuses kept for retransmission, and the width of the anti-replay window.
pub const HISTORY: usize = 64;

/// The most messages resent for one request.
const MAX_RESEND: u64 = 16;

/// The most queued outgoing messages; beyond it new retransmissions are dropped.
const MAX_OUTBOX: usize = 256;

/// Configuration of a heartbeat node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NodeConfig {
    /// This node's id.
    pub id: NodeId,
    /// This node's generation: must increase every time the node restarts (for example a boot
    /// counter kept on disk, or the wall-clock seconds at start).
    pub generation: u64,
    /// Time between status messages. Non-zero.
    pub interval: Duration,
    /// How peers are judged dead.
    pub detector: DetectorConfig,
}

/// A membership change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MembershipEvent {
    /// A peer was heard for the first time, or again after it had died or left.
    Joined {
        /// The peer.
        node: NodeId,
        /// Its generation.
        generation: u64,
    },
    /// A peer restarted (its generation increased) without having been declared dead.
    Restarted {
        /// The peer.
        node: NodeId,
        /// Its new generation.
        generation: u64,
    },
    /// A peer left gracefully.
    Left {
        /// The peer.
        node: NodeId,
    },
    /// A peer's failure detector suspects it.
    Dead {
        /// The peer.
        node: NodeId,
    },
}

/// Where to send a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Destination {
    /// Every peer (multicast or one unicast per configured peer).
    All,
    /// One peer.
    Node(NodeId),
}

/// A message to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// Destination.
    pub to: Destination,
    /// The encoded, authenticated message.
    pub msg: Encoded,
}

impl Transmit {
    /// The bytes to send.
    pub fn bytes(&self) -> &[u8] {
        self.msg.as_bytes()
    }
}

/// What a node knows about a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerStatus {
    /// The peer's current generation.
    pub generation: u64,
    /// Highest sequence number received in that generation.
    pub seq: u64,
    /// Its announced role.
    pub role: Role,
    /// Its announced priority.
    pub priority: u8,
    /// Its announced load.
    pub load: u16,
    /// Whether it is considered alive.
    pub alive: bool,
}

#[derive(Debug, Clone)]
struct Peer {
    status: PeerStatus,
    window: u64,
    detector: Detector,
    last_request: Option<Instant>,
    last_served: Option<Instant>,
}

/// What [`HeartbeatNode::handle`] did with a valid message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Handled {
    /// A new status: the peer's view was updated.
    Status(NodeId),
    /// A gap-filling (older) status: recorded, view unchanged.
    GapFilled(NodeId),
    /// A retransmission request (answered if addressed to us and allowed by the rate limit).
    Retransmit(NodeId),
    /// A graceful leave.
    Leave(NodeId),
}

/// One node of the heartbeat protocol. See the [module documentation](self).
#[derive(Debug, Clone)]
pub struct HeartbeatNode {
    cfg: NodeConfig,
    key: HashKey,
    seq: u64,
    role: Role,
    priority: u8,
    load: u16,
    next_send: Instant,
    /// The last statuses sent, indexed by `seq % HISTORY`.
    history: [Option<Status>; HISTORY],
    peers: BTreeMap<NodeId, Peer>,
    events: VecDeque<MembershipEvent>,
    outbox: VecDeque<Transmit>,
}

impl HeartbeatNode {
    /// A node that sends its first status at `now`.
    pub fn new(cfg: NodeConfig, key: HashKey, now: Instant) -> Result<Self, HealthError> {
        if cfg.interval.is_zero() {
            return Err(HealthError::InvalidConfig {
                field: "interval",
                reason: "must be non-zero",
            });
        }
        cfg.detector.build(now)?; // validate once
        Ok(HeartbeatNode {
            cfg,
            key,
            seq: 0,
            role: Role::Init,
            priority: 100,
            load: 0,
            next_send: now,
            history: [None; HISTORY],
            peers: BTreeMap::new(),
            events: VecDeque::new(),
            outbox: VecDeque::new(),
        })
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.cfg.id
    }

    /// Sets what the next statuses announce.
    pub fn set_status(&mut self, role: Role, priority: u8, load: u16) {
        self.role = role;
        self.priority = priority;
        self.load = load;
    }

    /// Makes the next [`poll_transmit`](Self::poll_transmit) send a status immediately (for
    /// example an election advertisement after a role change).
    pub fn send_now(&mut self, now: Instant) {
        self.next_send = self.next_send.min(now);
    }

    /// What this node knows about `peer`.
    pub fn peer(&self, peer: NodeId) -> Option<PeerStatus> {
        self.peers.get(&peer).map(|p| p.status)
    }

    /// All known peers (alive or not), in id order.
    pub fn peers(&self) -> impl Iterator<Item = (NodeId, PeerStatus)> + '_ {
        self.peers.iter().map(|(n, p)| (*n, p.status))
    }

    /// Decodes, authenticates and applies one received datagram.
    ///
    /// # Errors
    /// Decoding errors ([`HealthError::BadMac`] for forgeries), [`HealthError::Replay`] for
    /// duplicates, replays and stale generations, [`HealthError::FromSelf`]. A rejected message
    /// changes nothing.
    pub fn handle(&mut self, bytes: &[u8], now: Instant) -> Result<Handled, HealthError> {
        let msg = Message::decode(bytes, &self.key)?;
        self.handle_message(msg, now)
    }

    /// Applies an already authenticated message (as [`handle`](Self::handle) does after decoding).
    pub fn handle_message(&mut self, msg: Message, now: Instant) -> Result<Handled, HealthError> {
        let from = msg.node();
        if from == self.cfg.id {
            return Err(HealthError::FromSelf);
        }
        match msg {
            Message::Status(s) => self.on_status(s, now),
            Message::Leave(l) => self.on_leave(l, now),
            Message::Retransmit(r) => {
                self.on_retransmit(r, now)?;
                Ok(Handled::Retransmit(from))
            }
        }
    }

    fn on_status(&mut self, s: Status, now: Instant) -> Result<Handled, HealthError> {
        let detector = self.cfg.detector;
        let Some(p) = self.peers.get_mut(&s.node) else {
            let mut det = detector.build(now)?;
            det.heartbeat(now);
            self.peers.insert(
                s.node,
                Peer {
                    status: PeerStatus {
                        generation: s.generation,
                        seq: s.seq,
                        role: s.role,
                        priority: s.priority,
                        load: s.load,
                        alive: true,
                    },
                    window: 1,
                    detector: det,
                    last_request: None,
                    last_served: None,
                },
            );
            self.events.push_back(MembershipEvent::Joined {
                node: s.node,
                generation: s.generation,
            });
            return Ok(Handled::Status(s.node));
        };
        let restarted = s.generation > p.status.generation;
        let newest = if restarted {
            p.status.generation = s.generation;
            p.status.seq = s.seq;
            p.window = 1;
            p.last_request = None;
            true
        } else {
            let prev = p.status.seq;
            let newest = accept(
                &mut p.status.seq,
                &mut p.window,
                s.seq,
                s.generation,
                p.status.generation,
            )
            .ok_or(HealthError::Replay { node: s.node.0 })?;
            // Gap: ask for [prev + 1, s.seq - 1], once per interval.
            if newest && s.seq > prev.saturating_add(1) {
                let allowed = p.last_request.is_none_or(|t| now - t >= self.cfg.interval);
                if allowed && self.outbox.len() < MAX_OUTBOX {
                    p.last_request = Some(now);
                    let from_seq = prev
                        .saturating_add(1)
                        .max(s.seq.saturating_sub(HISTORY as u64));
                    let count = (s.seq - from_seq).min(u64::from(u16::MAX));
                    let req = Message::Retransmit(RetransmitRequest {
                        node: self.cfg.id,
                        generation: self.cfg.generation,
                        target: s.node,
                        target_generation: s.generation,
                        from_seq,
                        count: count as u16,
                    });
                    self.outbox.push_back(Transmit {
                        to: Destination::Node(s.node),
                        msg: req.encode(&self.key),
                    });
                }
            }
            newest
        };
        if !newest {
            return Ok(Handled::GapFilled(s.node));
        }
        p.status.role = s.role;
        p.status.priority = s.priority;
        p.status.load = s.load;
        if restarted {
            // A restart resets the arrival statistics: the old gaps say nothing about the new
            // process.
            p.detector = detector.build(now)?;
        }
        p.detector.heartbeat(now);
        if !p.status.alive {
            p.status.alive = true;
            self.events.push_back(MembershipEvent::Joined {
                node: s.node,
                generation: s.generation,
            });
        } else if restarted {
            self.events.push_back(MembershipEvent::Restarted {
                node: s.node,
                generation: s.generation,
            });
        }
        Ok(Handled::Status(s.node))
    }

    fn on_leave(&mut self, l: Leave, _now: Instant) -> Result<Handled, HealthError> {
        let replay = HealthError::Replay { node: l.node.0 };
        let p = self.peers.get_mut(&l.node).ok_or(replay)?;
        if l.generation > p.status.generation {
            p.status.generation = l.generation;
            p.status.seq = l.seq;
            p.window = 1;
        } else {
            accept(
                &mut p.status.seq,
                &mut p.window,
                l.seq,
                l.generation,
                p.status.generation,
            )
            .ok_or(replay)?;
        }
        if p.status.alive {
            p.status.alive = false;
            p.status.role = Role::Init;
            self.events
                .push_back(MembershipEvent::Left { node: l.node });
        }
        Ok(Handled::Leave(l.node))
    }

    fn on_retransmit(&mut self, r: RetransmitRequest, now: Instant) -> Result<(), HealthError> {
        if r.target != self.cfg.id || r.target_generation != self.cfg.generation {
            return Ok(()); // for someone else, or for a previous incarnation of us
        }
        // Only known, current-generation requesters; at most once per half interval each.
        let half = self.cfg.interval / 2;
        let Some(p) = self.peers.get_mut(&r.node) else {
            return Ok(());
        };
        if r.generation != p.status.generation {
            return Err(HealthError::Replay { node: r.node.0 });
        }
        if p.last_served.is_some_and(|t| now - t < half) {
            return Ok(());
        }
        p.last_served = Some(now);
        let oldest = self.seq.saturating_sub(HISTORY as u64 - 1).max(1);
        let from = r.from_seq.max(oldest);
        let end = r
            .from_seq
            .saturating_add(u64::from(r.count))
            .min(self.seq.saturating_add(1))
            .min(from.saturating_add(MAX_RESEND));
        for seq in from..end {
            if self.outbox.len() >= MAX_OUTBOX {
                break;
            }
            let slot = (seq % HISTORY as u64) as usize;
            if let Some(Some(s)) = self.history.get(slot) {
                if s.seq == seq {
                    self.outbox.push_back(Transmit {
                        to: Destination::Node(r.node),
                        msg: Message::Status(*s).encode(&self.key),
                    });
                }
            }
        }
        Ok(())
    }

    /// The next message to send at `now`: queued retransmission requests and answers first, then the
    /// periodic status when due. Call until `None`.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if let Some(t) = self.outbox.pop_front() {
            return Some(t);
        }
        if now < self.next_send {
            return None;
        }
        self.seq = self.seq.saturating_add(1);
        let s = Status {
            node: self.cfg.id,
            generation: self.cfg.generation,
            seq: self.seq,
            role: self.role,
            priority: self.priority,
            load: self.load,
        };
        if let Some(slot) = self.history.get_mut((self.seq % HISTORY as u64) as usize) {
            *slot = Some(s);
        }
        // Keep the cadence; after a long stall, restart it from now.
        let next = self.next_send + self.cfg.interval;
        self.next_send = if next <= now {
            now + self.cfg.interval
        } else {
            next
        };
        Some(Transmit {
            to: Destination::All,
            msg: Message::Status(s).encode(&self.key),
        })
    }

    /// The next membership event at `now` (declaring dead any peer whose detector suspects it).
    /// Call until `None`.
    #[must_use]
    pub fn poll_event(&mut self, now: Instant) -> Option<MembershipEvent> {
        if let Some(e) = self.events.pop_front() {
            return Some(e);
        }
        let (node, p) = self
            .peers
            .iter_mut()
            .find(|(_, p)| p.status.alive && !p.detector.is_available(now))?;
        p.status.alive = false;
        Some(MembershipEvent::Dead { node: *node })
    }

    /// A graceful-leave message to send before shutting down (the node keeps working if it is
    /// not sent).
    pub fn leave(&mut self) -> Transmit {
        self.seq = self.seq.saturating_add(1);
        let msg = Message::Leave(Leave {
            node: self.cfg.id,
            generation: self.cfg.generation,
            seq: self.seq,
        });
        Transmit {
            to: Destination::All,
            msg: msg.encode(&self.key),
        }
    }

    /// When the node next needs [`poll_transmit`](Self::poll_transmit) or
    /// [`poll_event`](Self::poll_event): the next status or the earliest suspicion of a live
    /// peer; [`Instant::ZERO`] (immediately) while messages or events are queued.
    pub fn next_deadline(&self) -> Instant {
        if !self.outbox.is_empty() || !self.events.is_empty() {
            return Instant::ZERO;
        }
        self.peers
            .values()
            .filter(|p| p.status.alive)
            .map(|p| p.detector.suspect_at())
            .fold(self.next_send, Instant::min)
    }
}

/// The anti-replay check of RFC 4303 §3.4.3 on a 64-bit window. Returns `Some(true)` for a new
/// highest sequence number (the window slides), `Some(false)` for a new one inside the window,
/// `None` for a duplicate, one too old, or one of an older generation.
fn accept(
    highest: &mut u64,
    window: &mut u64,
    seq: u64,
    generation: u64,
    current: u64,
) -> Option<bool> {
    if generation < current {
        return None;
    }
    if seq > *highest {
        let shift = seq - *highest;
        *window = if shift >= HISTORY as u64 {
            0
        } else {
            *window << shift
        };
        *window |= 1;
        *highest = seq;
        return Some(true);
    }
    let off = *highest - seq;
    if off >= HISTORY as u64 {
        return None;
    }
    let bit = 1u64 << off;
    if *window & bit != 0 {
        return None;
    }
    *window |= bit;
    Some(false)
}

#[cfg(test)]
mod tests;
