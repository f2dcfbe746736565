//! A packet buffer with headroom, so encapsulation prepends headers without moving the payload.

use crate::error::{Layer, PacketError};

/// A packet inside a caller-owned buffer, with free space (headroom) before it.
///
/// `B` is anything that derefs to bytes: `&mut [u8]`, `[u8; N]`, `Vec<u8>`. The packet occupies
/// `buf[start..end]`; [`PacketBuf::prepend`] moves `start` back (encapsulation) and
/// [`PacketBuf::advance`] moves it forward (decapsulation). Nothing allocates.
///
/// ```
/// use lb_packet::PacketBuf;
/// let mut storage = [0u8; 128];
/// let mut pb = PacketBuf::new(&mut storage[..], 64, 20).unwrap();
/// assert_eq!(pb.headroom(), 64);
/// pb.prepend(20).unwrap().fill(0xAB);
/// assert_eq!(pb.len(), 40);
/// assert_eq!(pb.data()[0], 0xAB);
/// pb.advance(20).unwrap();
/// assert_eq!(pb.len(), 20);
/// ```
#[derive(Debug, Clone)]
pub struct PacketBuf<B> {
    buf: B,
    start: usize,
    end: usize,
}

fn room(need: usize, have: usize) -> PacketError {
    PacketError::NoRoom { need, have }
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> PacketBuf<B> {
    /// A packet of `len` bytes at `buf[headroom..headroom + len]`.
    ///
    /// # Errors
    /// [`PacketError::NoRoom`] if `headroom + len` exceeds the buffer.
    pub fn new(buf: B, headroom: usize, len: usize) -> Result<Self, PacketError> {
        let cap = buf.as_ref().len();
        let end = headroom.checked_add(len).ok_or(room(usize::MAX, cap))?;
        if end > cap {
            return Err(room(end, cap));
        }
        Ok(PacketBuf {
            buf,
            start: headroom,
            end,
        })
    }

    /// The packet bytes.
    #[inline]
    pub fn data(&self) -> &[u8] {
        self.buf.as_ref().get(self.start..self.end).unwrap_or(&[])
    }

    /// The packet bytes, mutable.
    #[inline]
    pub fn data_mut(&mut self) -> &mut [u8] {
        let (s, e) = (self.start, self.end);
        self.buf.as_mut().get_mut(s..e).unwrap_or(&mut [])
    }

    /// Packet length.
    #[inline]
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether the packet is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Free bytes before the packet.
    #[inline]
    pub fn headroom(&self) -> usize {
        self.start
    }

    /// Free bytes after the packet.
    #[inline]
    pub fn tailroom(&self) -> usize {
        self.buf.as_ref().len() - self.end
    }

    /// Grows the packet by `n` bytes at the front and returns them (contents unspecified: the
    /// caller writes the new header).
    ///
    /// # Errors
    /// [`PacketError::NoRoom`] if the headroom is smaller than `n`.
    #[inline]
    pub fn prepend(&mut self, n: usize) -> Result<&mut [u8], PacketError> {
        if n > self.start {
            return Err(room(n, self.start));
        }
        self.start -= n;
        let s = self.start;
        self.buf.as_mut().get_mut(s..s + n).ok_or(room(n, 0))
    }

    /// Removes `n` bytes from the front (they become headroom).
    ///
    /// # Errors
    /// [`PacketError::Truncated`] if the packet is shorter than `n`.
    #[inline]
    pub fn advance(&mut self, n: usize) -> Result<(), PacketError> {
        if n > self.len() {
            return Err(PacketError::Truncated {
                layer: Layer::Buffer,
                need: n,
                have: self.len(),
            });
        }
        self.start += n;
        Ok(())
    }

    /// Shortens the packet to `len` bytes (no-op if already shorter).
    #[inline]
    pub fn truncate(&mut self, len: usize) {
        if len < self.len() {
            self.end = self.start + len;
        }
    }

    /// Gives the underlying buffer back.
    #[inline]
    pub fn into_inner(self) -> B {
        self.buf
    }

    /// Offset of the packet inside the underlying buffer.
    #[inline]
    pub fn offset(&self) -> usize {
        self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds() {
        assert!(PacketBuf::new([0u8; 8], 4, 5).is_err());
        assert!(PacketBuf::new([0u8; 8], usize::MAX, 5).is_err());
        let mut pb = PacketBuf::new([0u8; 8], 4, 4).unwrap();
        assert_eq!(pb.prepend(5), Err(PacketError::NoRoom { need: 5, have: 4 }));
        assert_eq!(pb.len(), 4);
        assert!(pb.advance(5).is_err());
        pb.prepend(4).unwrap();
        assert_eq!((pb.headroom(), pb.len(), pb.tailroom()), (0, 8, 0));
        pb.truncate(3);
        assert_eq!(pb.data().len(), 3);
        pb.advance(3).unwrap();
        assert!(pb.is_empty());
    }
}
