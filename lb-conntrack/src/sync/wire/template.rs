//! Template records: persistence templates and layer-5 affinity bindings (SIP Call-IDs) as
//! synced (layout in the parent module's docs).

use lb_core::{BackendId, Instant, IpProto};

use super::{max_prefix, push_addr, Reader, SyncError};
use crate::persist::{mask_addr, Service, TemplateInfo, TemplateKey};
use crate::timeout::MAX_TIMEOUT;

/// One persistence template as synced: a client-affinity template
/// ([`TemplateKey::Client`]) or an affinity-key binding such as a SIP Call-ID's
/// ([`TemplateKey::Affinity`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplateRecord {
    /// Remove the template (else install or refresh it).
    pub delete: bool,
    /// The template. A client key is sent masked to its prefix (as [`TemplateKey::client`]
    /// builds it); other client keys are normalised so.
    pub key: TemplateKey,
    /// The backend it names.
    pub backend: BackendId,
    /// The sender's id-independent name for that backend, as
    /// [`SyncRecord::backend_tag`](super::SyncRecord::backend_tag) (op flag `0x10`).
    pub backend_tag: Option<u32>,
    /// Milliseconds until it times out if not used again (at most [`MAX_TIMEOUT`]).
    pub remaining_ms: u32,
    /// Its idle timeout in milliseconds: how long it lives after each later use (at most
    /// [`MAX_TIMEOUT`]).
    pub timeout_ms: u32,
    /// Used more than once on the sender ([`TemplateInfo::established`]): the receiver's
    /// eviction spares it too (op flag `0x08`).
    pub established: bool,
}

/// `d` in milliseconds, capped at [`MAX_TIMEOUT`].
fn capped_ms(d: lb_core::Duration) -> u32 {
    let ms = d.as_millis().min(MAX_TIMEOUT.as_millis());
    u32::try_from(ms).unwrap_or(u32::MAX)
}

impl TemplateRecord {
    /// A record of a template as seen at `now` (from [`crate::PersistTable::get`] or
    /// [`crate::PersistTable::export_chunk`]); `delete` makes it a removal.
    pub fn from_info(delete: bool, info: &TemplateInfo, now: Instant) -> Self {
        TemplateRecord {
            delete,
            key: info.key,
            backend: info.backend,
            backend_tag: None,
            remaining_ms: capped_ms(info.deadline - now),
            timeout_ms: capped_ms(info.timeout),
            established: info.established,
        }
    }

    /// Encoded length: 25 to 49 bytes.
    pub fn encoded_len(&self) -> usize {
        let (service, tail) = match self.key {
            TemplateKey::Client {
                client, service, ..
            } => (service, 1 + if client.is_ipv4() { 4 } else { 16 }),
            TemplateKey::Affinity { service, .. } => (service, 8),
        };
        let vip = if service.vip.is_ipv4() { 4 } else { 16 };
        4 + vip + 12 + 4 * usize::from(self.backend_tag.is_some()) + tail
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        let (service, client) = match self.key {
            TemplateKey::Client {
                client,
                prefix,
                service,
            } => (service, Some((client, prefix.min(max_prefix(&client))))),
            TemplateKey::Affinity { service, .. } => (service, None),
        };
        let mut op = if self.delete { 5 } else { 4 };
        if !service.vip.is_ipv4() {
            op |= 0x40;
        }
        if self.established && !self.delete {
            op |= 0x08;
        }
        if self.backend_tag.is_some() {
            op |= 0x10;
        }
        if let Some((c, _)) = client {
            op |= 0x80;
            if !c.is_ipv4() {
                op |= 0x20;
            }
        }
        out.push(op);
        out.push(service.proto.number());
        out.extend_from_slice(&service.port.to_be_bytes());
        push_addr(out, service.vip);
        out.extend_from_slice(&self.backend.get().to_be_bytes());
        if let Some(t) = self.backend_tag {
            out.extend_from_slice(&t.to_be_bytes());
        }
        out.extend_from_slice(&self.remaining_ms.to_be_bytes());
        out.extend_from_slice(&self.timeout_ms.to_be_bytes());
        match (client, self.key) {
            (Some((c, prefix)), _) => {
                out.push(prefix);
                push_addr(out, mask_addr(c, prefix));
            }
            (None, TemplateKey::Affinity { key, .. }) => out.extend_from_slice(&key.to_be_bytes()),
            (None, TemplateKey::Client { .. }) => {}
        }
    }
}

/// Decodes the rest of a template record whose op byte is `opb` (4 or 5).
pub(super) fn decode(r: &mut Reader<'_>, opb: u8) -> Result<TemplateRecord, SyncError> {
    let delete = match opb & 0x07 {
        4 => false,
        5 => true,
        _ => return Err(SyncError::Op(opb)),
    };
    // 0x08 (established) is for installs only; an IPv6 client address needs a client
    // template.
    let established = opb & 0x08 != 0;
    if (established && delete) || opb & 0xa0 == 0x20 {
        return Err(SyncError::Op(opb));
    }
    let proto = IpProto::from_number(r.u8()?);
    let port = r.u16()?;
    let vip = r.addr(opb & 0x40 != 0)?;
    let service = Service { vip, port, proto };
    let backend = BackendId(r.u32()?);
    let backend_tag = r.opt_u32(opb & 0x10 != 0)?;
    let remaining_ms = r.timeout()?;
    let timeout_ms = r.timeout()?;
    let key = if opb & 0x80 != 0 {
        let prefix = r.u8()?;
        let client = r.addr(opb & 0x20 != 0)?;
        if prefix > max_prefix(&client) || mask_addr(client, prefix) != client {
            return Err(SyncError::Prefix(prefix));
        }
        TemplateKey::Client {
            client,
            prefix,
            service,
        }
    } else {
        TemplateKey::Affinity {
            service,
            key: u64::from_be_bytes(r.arr()?),
        }
    };
    Ok(TemplateRecord {
        delete,
        key,
        backend,
        backend_tag,
        remaining_ms,
        timeout_ms,
        established,
    })
}
