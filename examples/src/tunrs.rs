//! `balancer.io = "tun-rs"`: the data path reading and writing its TUN device through the
//! `tun-rs` crate instead of this crate's own device code, kept so that the two designs can be
//! measured against each other in the same runs (issue 19 asked to start from `tun-rs`, or to
//! show with numbers why not; `benches/results/throughput.md`, "tun-rs").
//!
//! `tun-rs` follows wireguard-go: with offloads on, `recv_multiple` reads one packet and cuts a
//! GSO super-packet into MTU-sized packets with full checksums, and `send_multiple` coalesces a
//! batch's TCP segments and UDP datagrams of a flow into super-packets again before writing them
//! one `write` each. The data path then sees plain packets only (no `Verdict::Segment`, no
//! partial checksums). One queue, TUN only, no io_uring: the configuration refuses the rest.
//!
//! A thread here does what [`super::datapath`] does around the device: it reads until a batch
//! is full or nothing is queued, processes the batch under the data path's lock (with the same
//! housekeeping every 10 ms), and writes what was forwarded.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant as StdInstant};

use lb_dataplane::{DropReason, Verdict, HEADROOM};
use tun_rs::{DeviceBuilder, GROTable, SyncDevice, VIRTIO_NET_HDR_LEN};

use super::{at, log_events, LockClock, Shared};
use crate::sys::poll_readable;

/// Packets per batch: room for the segments of two reads.
const BATCH: usize = 256;

/// A read is attempted only while this many places are free: one super-packet of 64 KiB cut
/// at an MSS of 536 bytes gives 123 segments, and a UDP one holds at most 128 datagrams (the
/// kernel's `UDP_MAX_SEGMENTS` for a sender's UDP GSO: 129 are refused with `EINVAL` on the
/// kernel this was tested on; UDP GRO forwarding stops at 64). A kernel that made larger ones
/// would have them refused by `recv_multiple`, counted as read errors: a limit of this
/// comparison mode only, as the default path keeps super-packets whole.
const PER_READ: usize = 128;

/// Opens (creating if missing) TUN device `name` through `tun-rs`, with its offloads when
/// `offload` (checksum, TSO4/6, and USO4/6 where the kernel has them), non-blocking.
///
/// # Errors
/// The device could not be opened or configured.
pub(super) fn open(name: &str, offload: bool) -> std::io::Result<SyncDevice> {
    let dev = DeviceBuilder::new()
        .name(name)
        .offload(offload)
        .build_sync()?;
    dev.set_nonblocking(true)?;
    Ok(dev)
}

/// The data-path thread of a `tun-rs` device, until told to stop.
pub(super) fn datapath(dev: SyncDevice, sh: &Shared, epoch: StdInstant, mtu: usize) {
    // Each place holds one packet at `HEADROOM` (a tunnel's outer headers go in front of it),
    // up to the larger of the device's MTU (what the kernel hands it unsegmented) and the
    // configured one; capacity for a whole super-packet, which `send_multiple` builds by
    // appending the segments it coalesces to the first one's place.
    let dev_mtu = dev.mtu().map_or(0, usize::from);
    let room = HEADROOM + mtu.max(dev_mtu).max(1500) + 64;
    let place = || {
        let mut v = Vec::with_capacity(HEADROOM + 65_536 + 64);
        v.resize(room, 0);
        v
    };
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| place()).collect();
    let mut original = vec![0u8; VIRTIO_NET_HDR_LEN + 65_536];
    let mut sizes = vec![0usize; BATCH];
    let mut verdicts = vec![Verdict::Drop(DropReason::NoService); BATCH];
    // The batch's packets to write (moved out of `bufs`, put back after the write) and where
    // each came from.
    let mut out: Vec<Vec<u8>> = Vec::with_capacity(BATCH);
    let mut from: Vec<usize> = Vec::with_capacity(BATCH);
    let mut gro = GROTable::default();
    let mut emit = vec![0u8; 2048];
    // The place a packet the splice timers originate is written from (one at a time).
    let mut emitted = vec![place()];
    let mut last_housekeeping = StdInstant::now();
    let mut lock = LockClock::default();
    // As in the default path: parsing, classifying and hashing before the lock.
    let mut cl = sh.dp.lock().classifier(BATCH);
    let mut read_errors = 0u64;
    let mut full = false;
    while !sh.stop.load(Ordering::Acquire) {
        sh.ha.kick(0, crate::ha::mono_ms(epoch));
        if !full {
            if let Err(e) = poll_readable(&[&dev], 100) {
                tracing::error!("poll failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        let mut n = 0;
        while BATCH - n >= PER_READ {
            match dev.recv_multiple(&mut original, &mut bufs[n..], &mut sizes[n..], HEADROOM) {
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // A packet `tun-rs` could not take (a header it rejects, a cut that failed, one
                // longer than a place): lost, as a malformed packet is. The round ends, so a
                // device that keeps failing is polled again, not spun on.
                Err(e) => {
                    read_errors += 1;
                    if read_errors.is_power_of_two() {
                        tracing::warn!(errors = read_errors, "tun-rs read failed: {e}");
                    }
                    break;
                }
            }
        }
        full = BATCH - n < PER_READ;
        if n > 0 {
            cl.classify(&bufs[..n], HEADROOM, &sizes[..n]);
        }
        let asked = StdInstant::now();
        let housekeeping = asked.duration_since(last_housekeeping) >= Duration::from_millis(10);
        if n == 0 && !housekeeping {
            continue;
        }
        verdicts[..n].fill(Verdict::Drop(DropReason::NoService));
        let got;
        {
            let mut dp = sh.dp.lock();
            got = StdInstant::now();
            let t = at(epoch, got);
            dp.process_batch_classified(
                &mut cl,
                &mut bufs[..n],
                &sizes[..n],
                None,
                t,
                &mut verdicts[..n],
            );
            if housekeeping {
                dp.housekeeping(t, 1024);
                while let Some(len) = dp.splice_poll(&mut emit, t) {
                    if let Some(v) = emitted.first_mut() {
                        v.truncate(HEADROOM);
                        v.extend_from_slice(&emit[..len]);
                    }
                    write(&dev, &mut gro, &mut emitted, sh);
                }
                log_events(&mut dp, t);
            }
        }
        let released = StdInstant::now();
        lock.add(asked, got, released);
        if housekeeping {
            last_housekeeping = released;
            lock.flush(&sh.lock);
        }
        for (k, v) in verdicts[..n].iter().enumerate() {
            let (Verdict::Forward { start, len } | Verdict::Reply { start, len }) = *v else {
                continue;
            };
            let mut b = std::mem::take(&mut bufs[k]);
            // `send_multiple` takes every packet at one offset: one the data path moved (a
            // tunnel's headers put in front) moves back to `HEADROOM`.
            if start != HEADROOM && start.checked_add(len).is_some_and(|e| e <= b.len()) {
                b.copy_within(start..start + len, HEADROOM);
            }
            b.truncate(HEADROOM + len);
            out.push(b);
            from.push(k);
        }
        if sh.has_ha && !out.is_empty() {
            sh.ha.forwarded();
        }
        write(&dev, &mut gro, &mut out, sh);
        for (k, mut b) in from.drain(..).zip(out.drain(..)) {
            b.resize(room, 0);
            bufs[k] = b;
        }
    }
    lock.flush(&sh.lock);
}

/// Writes `pkts` (each at `HEADROOM`) through `send_multiple`, counting a failure.
fn write(dev: &SyncDevice, gro: &mut GROTable, pkts: &mut [Vec<u8>], sh: &Shared) {
    if pkts.is_empty() {
        return;
    }
    if let Err(e) = dev.send_multiple(gro, pkts, HEADROOM) {
        let before = sh.tx_errors.fetch_add(1, Ordering::Relaxed);
        if (before + 1).is_power_of_two() {
            tracing::warn!(errors = before + 1, "tun-rs write failed: {e}");
        }
    }
}
