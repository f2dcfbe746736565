//! The heartbeat protocol between balancers: authenticated status messages with sequence numbers,
//! gap detection with retransmission requests, replay protection and membership events.
//!
//! [`wire`] holds the message format, [`node`] the state machine of one node.

pub mod node;
pub mod wire;

pub use node::{
    Destination, Handled, HeartbeatNode, MembershipEvent, NodeConfig, PeerStatus, Transmit, HISTORY,
};
pub use wire::{Encoded, Leave, Message, NodeId, RetransmitRequest, Role, Status, MAX_MESSAGE_LEN};
