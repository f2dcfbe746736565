//! Idle timeouts per protocol and per TCP state, and the flow classes they apply to.

use lb_core::{Duration, IpProto};

use crate::tcp_state::{Direction, TcpFlags, TcpState, TCP_STATES};
use crate::ConntrackError;

/// The longest timeout accepted: 24 days. Entries keep their last-seen time as 32-bit
/// milliseconds, which tell ages apart up to 49 days; half of that is the safe limit.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 86_400);

/// What an entry is, for the purpose of its timeout and of eviction: a TCP state, or a
/// UDP/ICMP/other flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlowState {
    /// A TCP connection in the given state.
    Tcp(TcpState),
    /// A UDP flow that has seen a single packet from the client and no reply: half-open, shed
    /// first under a flood.
    UdpUnconfirmed,
    /// A UDP flow that has seen a reply or a second client packet.
    Udp,
    /// ICMP / ICMPv6 (echo identifiers in the ports).
    Icmp,
    /// Any other protocol.
    Other,
}

/// Number of flow classes (one intrusive list each).
pub(crate) const CLASSES: usize = TCP_STATES + 4;
pub(crate) const CLASS_UDP_UNCONFIRMED: u8 = TCP_STATES as u8;
pub(crate) const CLASS_UDP: u8 = TCP_STATES as u8 + 1;
pub(crate) const CLASS_ICMP: u8 = TCP_STATES as u8 + 2;
pub(crate) const CLASS_OTHER: u8 = TCP_STATES as u8 + 3;

impl FlowState {
    /// The class index (0..CLASSES).
    #[inline]
    pub(crate) const fn class(self) -> u8 {
        match self {
            FlowState::Tcp(s) => s as u8,
            FlowState::UdpUnconfirmed => CLASS_UDP_UNCONFIRMED,
            FlowState::Udp => CLASS_UDP,
            FlowState::Icmp => CLASS_ICMP,
            FlowState::Other => CLASS_OTHER,
        }
    }

    /// The state of class `c` (`None` for an out-of-range class).
    #[inline]
    pub(crate) const fn from_class(c: u8) -> Option<FlowState> {
        if (c as usize) < CLASSES {
            Some(STATE_OF_CLASS[c as usize])
        } else {
            None
        }
    }

    /// [`FlowState::from_class`] as a `match` (builds the table it reads).
    const fn from_class_slow(c: u8) -> Option<FlowState> {
        match c {
            CLASS_UDP_UNCONFIRMED => Some(FlowState::UdpUnconfirmed),
            CLASS_UDP => Some(FlowState::Udp),
            CLASS_ICMP => Some(FlowState::Icmp),
            CLASS_OTHER => Some(FlowState::Other),
            c => match TcpState::from_u8(c) {
                Some(s) => Some(FlowState::Tcp(s)),
                None => None,
            },
        }
    }

    /// The state a new entry of protocol `proto` starts in.
    #[inline]
    pub const fn initial(proto: IpProto) -> FlowState {
        match proto {
            IpProto::Tcp => FlowState::Tcp(TcpState::None),
            IpProto::Udp => FlowState::UdpUnconfirmed,
            IpProto::Icmp | IpProto::Icmpv6 => FlowState::Icmp,
            _ => FlowState::Other,
        }
    }

    /// Whether the flow counts as an active connection, with IPVS' semantics (`activeconns`
    /// vs `inactconns`): a TCP connection is active only when ESTABLISHED; UDP (confirmed or
    /// not), ICMP and other protocols are active for as long as they live.
    #[inline]
    pub const fn is_active(self) -> bool {
        match self {
            FlowState::Tcp(s) => matches!(s, TcpState::Established),
            FlowState::UdpUnconfirmed | FlowState::Udp | FlowState::Icmp | FlowState::Other => true,
        }
    }

    /// Whether the entry is half-open (TCP without a completed handshake, unconfirmed UDP).
    #[inline]
    pub const fn is_half_open(self) -> bool {
        match self {
            FlowState::Tcp(s) => s.is_half_open(),
            FlowState::UdpUnconfirmed => true,
            _ => false,
        }
    }
}

/// The state of each class, by class.
const STATE_OF_CLASS: [FlowState; CLASSES] = {
    let mut t = [FlowState::Other; CLASSES];
    let mut c = 0;
    while c < CLASSES {
        if let Some(s) = FlowState::from_class_slow(c as u8) {
            t[c] = s;
        }
        c += 1;
    }
    t
};

/// The class after a packet, indexed by the class (bits 0..4), the segment's FIN, SYN, RST
/// and ACK flags (4..8), whether replies are seen (8), whether it is a reply (9) and whether
/// it created the entry (10): the TCP state machine and the UDP confirmation rule folded
/// into one table, so that a hit reads one byte where it would convert its class to a
/// [`FlowState`], run the machine and convert back. Classes 13..16 (none) stay
/// [`CLASS_OTHER`].
static NEXT_CLASS: [u8; 2048] = {
    let mut t = [CLASS_OTHER; 2048];
    let mut i = 0;
    while i < 2048 {
        let c = i & 15;
        let bidirectional = i & 0x100 != 0;
        let reply = i & 0x200 != 0;
        let first = i & 0x400 != 0;
        let dir = if reply {
            Direction::Reply
        } else {
            Direction::Original
        };
        if c < TCP_STATES {
            // Index bits 4..8 back to the flag bits they came from (ACK is 0x10).
            let f = (i >> 4) & 7 | ((i >> 4) & 8) << 1;
            t[i] = TcpState::ALL[c].next(dir, TcpFlags(f as u8), bidirectional) as u8;
        } else if c == CLASS_UDP_UNCONFIRMED as usize && (reply || !first) {
            t[i] = CLASS_UDP;
        } else if c < CLASSES {
            t[i] = c as u8;
        }
        i += 1;
    }
    t
};

/// The class of an entry of class `class` after a packet with TCP `flags` (ignored by
/// other classes), travelling as a `reply` or not, on an entry whose replies are seen
/// (`bidirectional`), `first` if the packet created the entry: what
/// [`TcpState::next`] and the UDP rule (a second packet or a reply confirms) give, in one
/// lookup. A class out of range gives [`CLASS_OTHER`].
#[inline(always)]
pub(crate) fn next_class(
    class: u8,
    reply: bool,
    bidirectional: bool,
    first: bool,
    flags: TcpFlags,
) -> u8 {
    if usize::from(class) >= CLASSES {
        return CLASS_OTHER;
    }
    let f = usize::from(flags.0);
    let i = usize::from(class)
        | ((f & 7) | ((f >> 1) & 8)) << 4
        | usize::from(bidirectional) << 8
        | usize::from(reply) << 9
        | usize::from(first) << 10;
    NEXT_CLASS.get(i).copied().unwrap_or(CLASS_OTHER)
}

/// Idle timeouts: how long an entry lives after its last packet, by state.
///
/// Defaults are those of Linux IPVS (`ip_vs_proto_tcp.c`, `ip_vs_proto_udp.c`,
/// `ip_vs_proto_icmp.c`), except `udp_unconfirmed`, which IPVS does not have and which takes
/// nf_conntrack's 30 s for unreplied UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP NONE (2 s).
    pub tcp_none: Duration,
    /// TCP ESTABLISHED (15 min).
    pub tcp_established: Duration,
    /// TCP SYN_SENT (2 min).
    pub tcp_syn_sent: Duration,
    /// TCP SYN_RECV (1 min).
    pub tcp_syn_recv: Duration,
    /// TCP FIN_WAIT (2 min).
    pub tcp_fin_wait: Duration,
    /// TCP TIME_WAIT (2 min).
    pub tcp_time_wait: Duration,
    /// TCP CLOSE (10 s).
    pub tcp_close: Duration,
    /// TCP CLOSE_WAIT (1 min).
    pub tcp_close_wait: Duration,
    /// TCP LAST_ACK (30 s).
    pub tcp_last_ack: Duration,
    /// UDP before confirmation (30 s).
    pub udp_unconfirmed: Duration,
    /// UDP (5 min).
    pub udp: Duration,
    /// ICMP / ICMPv6 (1 min).
    pub icmp: Duration,
    /// Other protocols (1 min).
    pub other: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        let s = Duration::from_secs;
        Timeouts {
            tcp_none: s(2),
            tcp_established: s(15 * 60),
            tcp_syn_sent: s(2 * 60),
            tcp_syn_recv: s(60),
            tcp_fin_wait: s(2 * 60),
            tcp_time_wait: s(2 * 60),
            tcp_close: s(10),
            tcp_close_wait: s(60),
            tcp_last_ack: s(30),
            udp_unconfirmed: s(30),
            udp: s(5 * 60),
            icmp: s(60),
            other: s(60),
        }
    }
}

impl Timeouts {
    /// The timeout of an entry in `state`.
    pub const fn get(&self, state: FlowState) -> Duration {
        match state {
            FlowState::Tcp(t) => match t {
                TcpState::None => self.tcp_none,
                TcpState::Established => self.tcp_established,
                TcpState::SynSent => self.tcp_syn_sent,
                TcpState::SynRecv => self.tcp_syn_recv,
                TcpState::FinWait => self.tcp_fin_wait,
                TcpState::TimeWait => self.tcp_time_wait,
                TcpState::Close => self.tcp_close,
                TcpState::CloseWait => self.tcp_close_wait,
                TcpState::LastAck => self.tcp_last_ack,
            },
            FlowState::UdpUnconfirmed => self.udp_unconfirmed,
            FlowState::Udp => self.udp,
            FlowState::Icmp => self.icmp,
            FlowState::Other => self.other,
        }
    }

    /// Checks every timeout is at least 1 ms and at most [`MAX_TIMEOUT`].
    ///
    /// # Errors
    /// [`ConntrackError::InvalidTimeout`] naming the first offending state.
    pub fn validate(&self) -> Result<(), ConntrackError> {
        for c in 0..CLASSES as u8 {
            if let Some(st) = FlowState::from_class(c) {
                let d = self.get(st);
                if d < Duration::from_millis(1) || d > MAX_TIMEOUT {
                    return Err(ConntrackError::InvalidTimeout { state: st });
                }
            }
        }
        Ok(())
    }

    /// The timeouts in milliseconds, indexed by class.
    pub(crate) fn class_millis(&self) -> [u32; CLASSES] {
        let mut out = [0u32; CLASSES];
        for (c, o) in out.iter_mut().enumerate() {
            if let Some(st) = FlowState::from_class(c as u8) {
                *o = u32::try_from(self.get(st).as_millis()).unwrap_or(u32::MAX);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_trip() {
        for c in 0..CLASSES as u8 {
            let s = FlowState::from_class(c).map(FlowState::class);
            assert_eq!(s, Some(c));
        }
        assert_eq!(FlowState::from_class(CLASSES as u8), None);
    }

    /// The folded table is the state machine and the UDP rule, for every class (and some out
    /// of range), both directions, both tables, first packet or not, and all 256 flag bytes.
    #[test]
    fn next_class_is_the_state_machine() {
        for c in 0..=(CLASSES as u8 + 2) {
            for reply in [false, true] {
                for bidirectional in [false, true] {
                    for first in [false, true] {
                        for f in 0..=255u8 {
                            let flags = TcpFlags(f);
                            let dir = if reply {
                                Direction::Reply
                            } else {
                                Direction::Original
                            };
                            let want =
                                match FlowState::from_class_slow(c).unwrap_or(FlowState::Other) {
                                    FlowState::Tcp(t) => {
                                        FlowState::Tcp(t.next(dir, flags, bidirectional))
                                    }
                                    FlowState::UdpUnconfirmed if !first || reply => FlowState::Udp,
                                    other => other,
                                };
                            assert_eq!(
                                next_class(c, reply, bidirectional, first, flags),
                                want.class(),
                                "class {c} reply {reply} bidirectional {bidirectional} first {first} flags {f:#x}"
                            );
                        }
                    }
                }
            }
            assert_eq!(FlowState::from_class(c), FlowState::from_class_slow(c));
        }
    }

    #[test]
    fn ipvs_defaults_and_validation() {
        let t = Timeouts::default();
        assert_eq!(t.get(FlowState::Tcp(TcpState::Established)).as_secs(), 900);
        assert_eq!(t.get(FlowState::Udp).as_secs(), 300);
        assert!(t.validate().is_ok());
        let bad = Timeouts {
            tcp_close: Duration::ZERO,
            ..t
        };
        assert_eq!(
            bad.validate(),
            Err(ConntrackError::InvalidTimeout {
                state: FlowState::Tcp(TcpState::Close)
            })
        );
        let bad = Timeouts {
            udp: MAX_TIMEOUT + Duration::from_secs(1),
            ..t
        };
        assert!(bad.validate().is_err());
        assert_eq!(t.class_millis()[CLASS_UDP as usize], 300_000);
    }
}
