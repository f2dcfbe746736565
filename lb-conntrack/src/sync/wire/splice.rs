//! Splice records: TCP connections the sender splices (layer-5 delayed binding, where the
//! balancer opened the backend connection itself and translates sequence numbers), with what
//! a receiver needs to go on translating them after a takeover (layout in the parent
//! module's docs).

use std::net::SocketAddr;

use lb_core::{BackendId, FlowKey, IpProto};

use super::{push_addr, push_ports_addrs, Reader, SyncError};

/// Flag bit of [`SpliceRecord::flags`]: both sides use TCP timestamps.
pub const SPLICE_TS: u8 = 1;
/// Flag bit: both sides use SACK.
pub const SPLICE_SACK: u8 = 2;
/// Flag bit: the client sent its FIN.
pub const SPLICE_FIN_CLIENT: u8 = 4;
/// Flag bit: the backend sent its FIN.
pub const SPLICE_FIN_BACKEND: u8 = 8;
/// Flag bit: the connection is closing (both FINs or an RST seen; it lingers for the last
/// ACKs).
pub const SPLICE_CLOSING: u8 = 16;
const FLAGS_ALL: u8 = 31;
/// "No window scale" on the wire.
const NO_WSCALE: u8 = 0xff;
/// The largest window scale (RFC 7323 §2.3).
const MAX_WSCALE: u8 = 14;

/// One spliced TCP connection as synced. The numbers are those the sender's translation
/// uses, so that a receiver holding the same configuration translates every later segment
/// exactly as the sender did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpliceRecord {
    /// Remove the connection (only `key` is sent); else install or refresh it.
    pub delete: bool,
    /// The client's flow (client → service address, TCP).
    pub key: FlowKey,
    /// The backend the connection is bound to.
    pub backend: BackendId,
    /// The sender's id-independent name for that backend, as
    /// [`SyncRecord::backend_tag`](super::SyncRecord::backend_tag).
    pub backend_tag: Option<u32>,
    /// The balancer's address and port towards the backend (the backend connection's source).
    pub snat: SocketAddr,
    /// Milliseconds until the connection times out if idle (at most
    /// [`MAX_TIMEOUT`](crate::MAX_TIMEOUT)).
    pub remaining_ms: u32,
    /// The initial sequence number the balancer gave the client (its SYN-ACK's).
    pub local_isn: u32,
    /// The backend's initial sequence number (its SYN-ACK's).
    pub backend_isn: u32,
    /// The client's first timestamp value as the balancer saw it.
    pub client_ts0: u32,
    /// The backend's first timestamp value.
    pub backend_ts0: u32,
    /// Added to the client's timestamp values towards the backend.
    pub ts_shift: u32,
    /// The client's window scale, if it offered one.
    pub client_wscale: Option<u8>,
    /// The backend's window scale, if it offered one.
    pub backend_wscale: Option<u8>,
    /// [`SPLICE_TS`], [`SPLICE_SACK`], [`SPLICE_FIN_CLIENT`], [`SPLICE_FIN_BACKEND`],
    /// [`SPLICE_CLOSING`].
    pub flags: u8,
}

impl SpliceRecord {
    /// A delete of `key`'s spliced connection.
    pub fn delete(key: FlowKey) -> Self {
        SpliceRecord {
            delete: true,
            key,
            backend: BackendId(0),
            backend_tag: None,
            snat: SocketAddr::new(key.dst(), 0),
            remaining_ms: 0,
            local_isn: 0,
            backend_isn: 0,
            client_ts0: 0,
            backend_ts0: 0,
            ts_shift: 0,
            client_wscale: None,
            backend_wscale: None,
            flags: 0,
        }
    }

    /// Encoded length: 14 to 91 bytes.
    pub fn encoded_len(&self) -> usize {
        let key = if self.key.is_ipv4() { 12 } else { 36 };
        if self.delete {
            return 2 + key;
        }
        let snat = if self.snat.is_ipv4() { 6 } else { 18 };
        2 + key + 4 + 4 * usize::from(self.backend_tag.is_some()) + 4 + snat + 20 + 3
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        let mut op = if self.delete { 7 } else { 6 };
        if !self.key.is_ipv4() {
            op |= 0x40;
        }
        if !self.delete {
            if !self.snat.is_ipv4() {
                op |= 0x20;
            }
            if self.backend_tag.is_some() {
                op |= 0x10;
            }
        }
        out.push(op);
        out.push(self.key.proto().number());
        push_ports_addrs(out, &self.key);
        if self.delete {
            return;
        }
        out.extend_from_slice(&self.backend.get().to_be_bytes());
        if let Some(t) = self.backend_tag {
            out.extend_from_slice(&t.to_be_bytes());
        }
        out.extend_from_slice(&self.remaining_ms.to_be_bytes());
        out.extend_from_slice(&self.snat.port().to_be_bytes());
        push_addr(out, self.snat.ip());
        for v in [
            self.local_isn,
            self.backend_isn,
            self.client_ts0,
            self.backend_ts0,
            self.ts_shift,
        ] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.push(self.client_wscale.unwrap_or(NO_WSCALE));
        out.push(self.backend_wscale.unwrap_or(NO_WSCALE));
        out.push(self.flags & FLAGS_ALL);
    }
}

fn wscale(v: u8) -> Result<Option<u8>, SyncError> {
    match v {
        NO_WSCALE => Ok(None),
        v if v <= MAX_WSCALE => Ok(Some(v)),
        v => Err(SyncError::Splice(v)),
    }
}

/// Decodes the rest of a splice record whose op byte is `opb` (6 or 7).
pub(super) fn decode(r: &mut Reader<'_>, opb: u8) -> Result<SpliceRecord, SyncError> {
    let delete = match opb & 0x07 {
        6 => false,
        7 => true,
        _ => return Err(SyncError::Op(opb)),
    };
    // Bit 0x08 is reserved; a delete carries neither a tag nor a SNAT address.
    if opb & 0x88 != 0 || (delete && opb & 0x30 != 0) {
        return Err(SyncError::Op(opb));
    }
    let proto = IpProto::from_number(r.u8()?);
    if proto != IpProto::Tcp {
        return Err(SyncError::Splice(proto.number()));
    }
    let key = r.key(opb & 0x40 != 0, proto)?;
    if delete {
        return Ok(SpliceRecord::delete(key));
    }
    let backend = BackendId(r.u32()?);
    let backend_tag = r.opt_u32(opb & 0x10 != 0)?;
    let remaining_ms = r.timeout()?;
    let port = r.u16()?;
    let snat = SocketAddr::new(r.addr(opb & 0x20 != 0)?, port);
    let local_isn = r.u32()?;
    let backend_isn = r.u32()?;
    let client_ts0 = r.u32()?;
    let backend_ts0 = r.u32()?;
    let ts_shift = r.u32()?;
    let client_wscale = wscale(r.u8()?)?;
    let backend_wscale = wscale(r.u8()?)?;
    let flags = r.u8()?;
    if flags & !FLAGS_ALL != 0 {
        return Err(SyncError::Splice(flags));
    }
    Ok(SpliceRecord {
        delete,
        key,
        backend,
        backend_tag,
        snat,
        remaining_ms,
        local_isn,
        backend_isn,
        client_ts0,
        backend_ts0,
        ts_shift,
        client_wscale,
        backend_wscale,
        flags,
    })
}
