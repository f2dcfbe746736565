//! Batched writes to the TUN/TAP device through io_uring (`[balancer] io_uring = true`): a
//! data-path thread hands the kernel a whole batch's forwarded packets with one system call
//! (`io_uring_enter`) instead of one `writev` each.
//!
//! Only the write side: reads stay `read()` calls on the non-blocking queue, which stop at the
//! first `EAGAIN`. Batching them too (a batch of `RWF_NOWAIT` reads in one submission) measured
//! no gain over batching the writes alone (benches/results/throughput.md). The packets are
//! written in batch order; the call returns once every entry has completed, so the buffers the
//! entries point at are the caller's again (a TUN write never waits for room).
//!
//! `unsafe` is limited to pushing submission entries: the kernel reads the buffers they point
//! at until their completions are reaped, which happens before `write_all` returns.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, types, IoUring};
use lb_packet::offload::{VnetHdr, VNET_HDR_LEN};

/// Submission queue entries: one batch.
const ENTRIES: u32 = 64;

/// A ring for one data-path thread, with room for one batch's headers and iovecs.
pub struct UringTx {
    ring: IoUring,
    hdrs: Vec<[u8; VNET_HDR_LEN]>,
    iovs: Vec<[libc::iovec; 2]>,
}

impl std::fmt::Debug for UringTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringTx").finish_non_exhaustive()
    }
}

/// What a batch write did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// Packets the kernel took.
    pub ok: u64,
    /// Packets it refused (the errno of the last one in `last_error`).
    pub failed: u64,
    /// The last refusal's errno.
    pub last_error: i32,
}

impl UringTx {
    /// A ring of 64 entries (two batches' worth).
    ///
    /// # Errors
    /// `io_uring_setup` failed (a kernel without io_uring, or with it disabled).
    pub fn new() -> io::Result<UringTx> {
        let n = ENTRIES as usize;
        Ok(UringTx {
            ring: IoUring::new(ENTRIES)?,
            hdrs: vec![[0u8; VNET_HDR_LEN]; n],
            iovs: vec![
                [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; 2];
                n
            ],
        })
    }

    /// Writes `packets` (each with its virtio-net header when `vnet`) to `fd` in order, as
    /// many per system call as the ring holds, and waits until the kernel has taken them all.
    ///
    /// # Errors
    /// Submitting failed (the ring itself, not a packet: those are counted in [`Written`]).
    pub fn write_all<'a>(
        &mut self,
        fd: RawFd,
        vnet: bool,
        packets: impl Iterator<Item = (&'a VnetHdr, &'a [u8])>,
    ) -> io::Result<Written> {
        let mut out = Written::default();
        let mut packets = packets.peekable();
        while packets.peek().is_some() {
            let mut queued = 0usize;
            while queued < ENTRIES as usize {
                let Some((hdr, pkt)) = packets.next() else {
                    break;
                };
                let sqe = if vnet {
                    let h = &mut self.hdrs[queued];
                    let _ = hdr.encode(h);
                    self.iovs[queued] = [
                        libc::iovec {
                            iov_base: h.as_mut_ptr().cast(),
                            iov_len: VNET_HDR_LEN,
                        },
                        libc::iovec {
                            iov_base: pkt.as_ptr() as *mut libc::c_void,
                            iov_len: pkt.len(),
                        },
                    ];
                    opcode::Writev::new(types::Fd(fd), self.iovs[queued].as_ptr(), 2).build()
                } else {
                    let len = u32::try_from(pkt.len()).unwrap_or(u32::MAX);
                    opcode::Write::new(types::Fd(fd), pkt.as_ptr(), len).build()
                };
                // SAFETY: the entry points into `self.hdrs` / `self.iovs` (not touched again
                // until this chunk's completions are reaped below) and into `pkt`, borrowed for
                // 'a, which outlives this call; the queue has room (at most ENTRIES pushed
                // per chunk, all reaped before the next).
                let pushed = unsafe { self.ring.submission().push(&sqe) };
                if pushed.is_err() {
                    // (Cannot happen: the ring is empty at the start of a chunk.)
                    out.failed += 1;
                    break;
                }
                queued += 1;
            }
            if queued == 0 {
                break;
            }
            // Every entry must complete before its buffers are touched again: a signal only
            // interrupts the wait. After a hard error (the ring itself failing) the ring is
            // replaced, and the entries it never took go with it.
            let mut reaped = 0;
            let mut wait = queued;
            loop {
                match self.ring.submit_and_wait(wait) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        self.ring = IoUring::new(ENTRIES)?;
                        return Err(e);
                    }
                }
                for cqe in self.ring.completion() {
                    reaped += 1;
                    if cqe.result() < 0 {
                        out.failed += 1;
                        out.last_error = -cqe.result();
                    } else {
                        out.ok += 1;
                    }
                }
                if reaped >= queued {
                    break;
                }
                wait = queued - reaped;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixDatagram;

    /// Every packet arrives once, in order, as one datagram; with `vnet` behind its header.
    #[test]
    fn a_batch_arrives_whole_and_in_order() {
        let Ok(mut u) = UringTx::new() else {
            println!("io_uring unavailable here: not tested");
            return;
        };
        for vnet in [false, true] {
            let (a, b) = UnixDatagram::pair().unwrap();
            b.set_nonblocking(true).unwrap();
            // More than one ring's worth, so the chunking is exercised.
            let pkts: Vec<Vec<u8>> = (0..150u32)
                .map(|i| i.to_be_bytes().repeat(1 + i as usize % 7))
                .collect();
            let hdr = VnetHdr {
                csum_start: 7,
                ..VnetHdr::NONE
            };
            let w = u
                .write_all(a.as_raw_fd(), vnet, pkts.iter().map(|p| (&hdr, &p[..])))
                .unwrap();
            assert_eq!((w.ok, w.failed), (150, 0));
            let mut want_hdr = [0u8; VNET_HDR_LEN];
            hdr.encode(&mut want_hdr).unwrap();
            for p in &pkts {
                let mut got = [0u8; 128];
                let n = b.recv(&mut got).unwrap();
                let body = if vnet {
                    assert_eq!(&got[..VNET_HDR_LEN], &want_hdr);
                    &got[VNET_HDR_LEN..n]
                } else {
                    &got[..n]
                };
                assert_eq!(body, &p[..]);
            }
            assert!(b.recv(&mut [0u8; 8]).is_err(), "nothing more");
        }
    }

    /// A write the kernel refuses is counted, the others go through.
    #[test]
    fn refused_writes_are_counted() {
        let Ok(mut u) = UringTx::new() else {
            println!("io_uring unavailable here: not tested");
            return;
        };
        let (a, b) = UnixDatagram::pair().unwrap();
        drop(b);
        let pkt = [1u8; 10];
        let w = u
            .write_all(
                a.as_raw_fd(),
                false,
                std::iter::repeat_n((&VnetHdr::NONE, &pkt[..]), 3),
            )
            .unwrap();
        assert_eq!((w.ok, w.failed), (0, 3));
        assert_ne!(w.last_error, 0);
    }
}
