//! The TCP state machine, driven by the flags seen in each direction.
//!
//! The transition tables are those of Linux IPVS (`net/netfilter/ipvs/ip_vs_proto_tcp.c`,
//! `tcp_states` and `tcp_states_dos`' normal form), restricted to the states a balancer reaches
//! (IPVS' `LISTEN` and `SYNACK` are never entered from a packet and are left out). The flag that
//! selects the row is chosen with IPVS' priority: RST, then SYN, then FIN, then ACK; a segment
//! with none of them changes nothing.
//!
//! Two tables apply to packets from the client (the *original* direction): the *input* table when
//! the balancer also sees the replies (NAT modes), the *input-only* table when it does not (direct
//! routing, tunnelling: the backend answers the client directly).

use core::fmt;

/// Direction of a packet relative to the tracked connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the client towards the service (the direction the entry was created in).
    Original,
    /// From the backend back towards the client (seen only in NAT modes).
    Reply,
}

/// The TCP header flags the state machine looks at (the low byte of the TCP flags field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    /// No flags.
    pub const NONE: TcpFlags = TcpFlags(0);
    /// FIN (0x01).
    pub const FIN: TcpFlags = TcpFlags(0x01);
    /// SYN (0x02).
    pub const SYN: TcpFlags = TcpFlags(0x02);
    /// RST (0x04).
    pub const RST: TcpFlags = TcpFlags(0x04);
    /// ACK (0x10).
    pub const ACK: TcpFlags = TcpFlags(0x10);

    /// Whether every flag of `other` is set in `self`.
    #[inline]
    pub const fn contains(self, other: TcpFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// The union of two flag sets.
    #[inline]
    #[must_use]
    pub const fn with(self, other: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 | other.0)
    }
}

impl core::ops::BitOr for TcpFlags {
    type Output = TcpFlags;
    #[inline]
    fn bitor(self, rhs: TcpFlags) -> TcpFlags {
        self.with(rhs)
    }
}

/// The state of a tracked TCP connection, as IPVS names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum TcpState {
    /// Created, no segment that selects a transition seen yet.
    None = 0,
    /// Three-way handshake completed (or joined mid-stream on an ACK).
    Established = 1,
    /// A SYN was seen from the backend side.
    SynSent = 2,
    /// A SYN was seen from the client: half-open, the first victim under a flood.
    SynRecv = 3,
    /// A FIN was seen; waiting for the other side.
    FinWait = 4,
    /// Both sides closed; lingering for late segments.
    TimeWait = 5,
    /// Reset or closed.
    Close = 6,
    /// The client closed its half.
    CloseWait = 7,
    /// Waiting for the last ACK.
    LastAck = 8,
}

/// Number of TCP states.
pub(crate) const TCP_STATES: usize = 9;

use TcpState::{
    Close as CL, CloseWait as CW, Established as ES, FinWait as FW, LastAck as LA, None as NO,
    SynRecv as SR, SynSent as SS, TimeWait as TW,
};

/// Rows: syn, fin, ack, rst. Columns: the current state in `TcpState` order
/// (NO, ES, SS, SR, FW, TW, CL, CW, LA), which is IPVS' column order.
type Table = [[TcpState; TCP_STATES]; 4];

const INPUT: Table = [
    [SR, ES, ES, SR, SR, SR, SR, SR, SR],
    [CL, CW, SS, TW, TW, TW, CL, CW, LA],
    [ES, ES, SS, ES, FW, TW, CL, CW, CL],
    [CL, CL, CL, SR, CL, CL, CL, CL, LA],
];
const OUTPUT: Table = [
    [SS, ES, SS, SR, SS, SS, SS, SS, SS],
    [TW, FW, SS, TW, FW, TW, CL, TW, LA],
    [ES, ES, SS, ES, FW, TW, CL, CW, LA],
    [CL, CL, SS, CL, CL, TW, CL, CL, CL],
];
const INPUT_ONLY: Table = [
    [SR, ES, ES, SR, SR, SR, SR, SR, SR],
    [CL, FW, SS, TW, FW, TW, CL, CW, LA],
    [ES, ES, SS, ES, FW, TW, CL, CW, CL],
    [CL, CL, CL, SR, CL, CL, CL, CL, LA],
];

impl TcpState {
    /// All states, in discriminant order.
    pub const ALL: [TcpState; TCP_STATES] = [NO, ES, SS, SR, FW, TW, CL, CW, LA];

    /// The state after a segment with `flags` travelling in `dir`.
    ///
    /// `bidirectional` says whether the balancer sees the replies (NAT modes): it selects IPVS'
    /// input table rather than its input-only table for original-direction segments.
    ///
    /// ```
    /// use lb_conntrack::{Direction, TcpFlags, TcpState};
    /// let s = TcpState::None.next(Direction::Original, TcpFlags::SYN, true);
    /// assert_eq!(s, TcpState::SynRecv);
    /// let s = s.next(Direction::Original, TcpFlags::ACK, true);
    /// assert_eq!(s, TcpState::Established);
    /// // RST closes; a new SYN on a TIME_WAIT entry reuses it.
    /// assert_eq!(s.next(Direction::Reply, TcpFlags::RST, true), TcpState::Close);
    /// assert_eq!(TcpState::TimeWait.next(Direction::Original, TcpFlags::SYN, true), TcpState::SynRecv);
    /// ```
    #[inline]
    pub const fn next(self, dir: Direction, flags: TcpFlags, bidirectional: bool) -> TcpState {
        let row = if flags.contains(TcpFlags::RST) {
            3
        } else if flags.contains(TcpFlags::SYN) {
            0
        } else if flags.contains(TcpFlags::FIN) {
            1
        } else if flags.contains(TcpFlags::ACK) {
            2
        } else {
            return self;
        };
        let table = match (dir, bidirectional) {
            (Direction::Reply, _) => &OUTPUT,
            (Direction::Original, true) => &INPUT,
            (Direction::Original, false) => &INPUT_ONLY,
        };
        table[row][self as usize]
    }

    /// The state with discriminant `n`, if any.
    #[inline]
    pub const fn from_u8(n: u8) -> Option<TcpState> {
        if (n as usize) < TCP_STATES {
            Some(Self::ALL[n as usize])
        } else {
            None
        }
    }

    /// Whether the connection is half-open (no handshake completed): the entries shed first
    /// under a SYN flood.
    #[inline]
    pub const fn is_half_open(self) -> bool {
        matches!(self, TcpState::None | TcpState::SynRecv | TcpState::SynSent)
    }

    /// IPVS' name of the state.
    pub const fn name(self) -> &'static str {
        match self {
            NO => "NONE",
            ES => "ESTABLISHED",
            SS => "SYN_SENT",
            SR => "SYN_RECV",
            FW => "FIN_WAIT",
            TW => "TIME_WAIT",
            CL => "CLOSE",
            CW => "CLOSE_WAIT",
            LA => "LAST_ACK",
        }
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use Direction::{Original as O, Reply as R};

    #[test]
    fn full_handshake_and_close_nat() {
        let mut s = TcpState::None;
        for (dir, fl, want) in [
            (O, TcpFlags::SYN, SR),
            (R, TcpFlags::SYN | TcpFlags::ACK, SR),
            (O, TcpFlags::ACK, ES),
            (O, TcpFlags::FIN | TcpFlags::ACK, CW),
            (R, TcpFlags::FIN | TcpFlags::ACK, TW),
            (O, TcpFlags::ACK, TW),
        ] {
            s = s.next(dir, fl, true);
            assert_eq!(s, want, "{dir:?} {fl:?}");
        }
    }

    #[test]
    fn input_only_fin_goes_to_fin_wait() {
        assert_eq!(ES.next(O, TcpFlags::FIN, false), FW);
        assert_eq!(ES.next(O, TcpFlags::FIN, true), CW);
    }

    #[test]
    fn rst_wins_over_syn_and_no_flags_keep_state() {
        assert_eq!(ES.next(O, TcpFlags::SYN | TcpFlags::RST, true), CL);
        for s in TcpState::ALL {
            assert_eq!(s.next(O, TcpFlags::NONE, true), s);
            assert_eq!(TcpState::from_u8(s as u8), Some(s));
        }
        assert_eq!(TcpState::from_u8(9), None);
    }

    #[test]
    fn syn_reuses_time_wait_and_close() {
        assert_eq!(TW.next(O, TcpFlags::SYN, false), SR);
        assert_eq!(CL.next(O, TcpFlags::SYN, true), SR);
        // A SYN on an established connection does not reset it.
        assert_eq!(ES.next(O, TcpFlags::SYN, true), ES);
    }

    proptest! {
        #[test]
        fn transitions_are_total(s in 0u8..9, f in any::<u8>(), reply in any::<bool>(), bidir in any::<bool>()) {
            let s = TcpState::from_u8(s).unwrap_or(NO);
            let dir = if reply { R } else { O };
            let n = s.next(dir, TcpFlags(f), bidir);
            // RST always ends in a closing or half-open state, never ESTABLISHED.
            if TcpFlags(f).contains(TcpFlags::RST) {
                prop_assert_ne!(n, ES);
            }
            prop_assert!((n as usize) < TCP_STATES);
        }
    }
}
