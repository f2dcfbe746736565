//! The operating-system edge: TUN/TAP devices and raw IP sockets, through `ioctl`/`socket`.
//!
//! Its `unsafe` is system calls whose arguments are plain `repr(C)` structs built here:
//! `ioctl` to attach a TUN/TAP queue, to set its offloads and to set interface flags, `writev`
//! for a virtio-net header and its packet, `socket` for raw IP sockets, `recvmmsg` for a batch
//! of datagrams (or raw packets) and their senders, `setsockopt` for socket buffers beyond
//! `rmem_max` / `wmem_max`, `poll` for a timed wait, and `mmap` / `madvise` / `munmap` for the
//! huge-page allocator. A TUN crate would hide the same calls behind a larger dependency; these
//! are the whole of what the examples need. Reads and writes go through [`std::fs::File`].
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The address in a `sockaddr_storage` the kernel filled (IPv4 or IPv6), if it is one.
fn address_of(sa: &libc::sockaddr_storage) -> Option<std::net::IpAddr> {
    match libc::c_int::from(sa.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a `sockaddr_in` (family AF_INET), which fits in and is
            // no more aligned than `sockaddr_storage`.
            let a = unsafe { &*(sa as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(std::net::IpAddr::from(
                u32::from_be(a.sin_addr.s_addr).to_be_bytes(),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, a `sockaddr_in6` (family AF_INET6).
            let a = unsafe { &*(sa as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(std::net::IpAddr::from(a.sin6_addr.s6_addr))
        }
        _ => None,
    }
}

/// A socket buffer [`set_buffer`] sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketBuffer {
    /// `SO_RCVBUF` (root: `SO_RCVBUFFORCE`).
    Receive,
    /// `SO_SNDBUF` (root: `SO_SNDBUFFORCE`).
    Send,
}

/// Sets the socket's receive or send buffer to `bytes`. The kernel caps `SO_RCVBUF` /
/// `SO_SNDBUF` at `rmem_max` / `wmem_max`; the root-only `…FORCE` variant, tried first, does not.
///
/// # Errors
/// Neither option could be set.
pub fn set_buffer(
    sock: &(impl AsRawFd + ?Sized),
    which: SocketBuffer,
    bytes: usize,
) -> std::io::Result<()> {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let opts = match which {
        SocketBuffer::Receive => [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF],
        SocketBuffer::Send => [libc::SO_SNDBUFFORCE, libc::SO_SNDBUF],
    };
    for opt in opts {
        // SAFETY: a valid socket and a pointer to a c_int of the size given.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
    }
    Err(std::io::Error::last_os_error())
}

/// Receives datagrams a batch per system call (`recvmmsg`), each with its sender: the receive
/// side of a socket that must keep up with a packet rate (`lb-decap`'s GUE port and raw
/// tunnel sockets).
pub struct RecvBatch {
    bufs: Vec<u8>,
    /// Bytes per place.
    slot: usize,
    addrs: Vec<libc::sockaddr_storage>,
    /// One per place; pointed into `bufs` at each call.
    iov: Vec<libc::iovec>,
    /// One per place; pointed at its `iov` and `addrs` entries at each call.
    hdrs: Vec<libc::mmsghdr>,
    lens: Vec<usize>,
    truncated: Vec<bool>,
    got: usize,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("batch", &self.lens.len())
            .field("got", &self.got)
            .finish()
    }
}

impl RecvBatch {
    /// Room for the largest UDP payload in each place.
    const SLOT: usize = 65_536;

    /// Up to `batch` datagrams per call (at least 1), each up to 64 KiB (any UDP payload).
    pub fn new(batch: usize) -> RecvBatch {
        Self::with_slot(batch, Self::SLOT)
    }

    /// Up to `batch` datagrams per call (at least 1), each up to `slot` bytes (at least 1);
    /// a longer one is read truncated, and [`RecvBatch::get`] reports it as such.
    pub fn with_slot(batch: usize, slot: usize) -> RecvBatch {
        let (batch, slot) = (batch.max(1), slot.max(1));
        let iov = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        RecvBatch {
            bufs: vec![0; batch * slot],
            slot,
            // SAFETY: all-zero bytes are a valid `sockaddr_storage` (a plain C struct of integers).
            addrs: vec![unsafe { std::mem::zeroed() }; batch],
            iov: vec![iov; batch],
            // SAFETY: `mmsghdr` is plain data; all-zero is a valid empty header.
            hdrs: vec![unsafe { std::mem::zeroed() }; batch],
            lens: vec![0; batch],
            truncated: vec![false; batch],
            got: 0,
        }
    }

    /// Reads the datagrams waiting on `sock`, up to the batch, without waiting: how many
    /// (0 when none was waiting).
    ///
    /// # Errors
    /// `recvmmsg` failed other than for want of data or by a signal.
    pub fn recv(&mut self, sock: &(impl AsRawFd + ?Sized)) -> io::Result<usize> {
        self.recv_flags(sock, libc::MSG_DONTWAIT)
    }

    /// As [`RecvBatch::recv`], but waits for the first datagram (`MSG_WAITFORONE`), as long
    /// as the socket's receive timeout (`SO_RCVTIMEO`) allows if it has one: 0 when that
    /// passed with nothing to read (or a signal came).
    ///
    /// # Errors
    /// As [`RecvBatch::recv`].
    pub fn recv_wait(&mut self, sock: &(impl AsRawFd + ?Sized)) -> io::Result<usize> {
        self.recv_flags(sock, libc::MSG_WAITFORONE)
    }

    fn recv_flags(
        &mut self,
        sock: &(impl AsRawFd + ?Sized),
        flags: libc::c_int,
    ) -> io::Result<usize> {
        self.got = 0;
        let slot = self.slot;
        let batch = self.hdrs.len();
        // Nothing allocates per call: the headers and iovecs were allocated once and are
        // pointed afresh at the buffers (pointers taken now, for this call).
        let bufs = self.bufs.as_mut_ptr();
        for (i, ((h, v), a)) in self
            .hdrs
            .iter_mut()
            .zip(self.iov.iter_mut())
            .zip(self.addrs.iter_mut())
            .enumerate()
        {
            *v = libc::iovec {
                iov_base: bufs.wrapping_add(i * slot).cast(),
                iov_len: slot,
            };
            h.msg_hdr.msg_iov = v;
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_name = (a as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        // SAFETY: `self.hdrs` holds `batch` headers whose iovecs (`self.iov`) point into
        // `self.bufs` (`slot` bytes each, `batch` places) and whose names point into
        // `self.addrs`, all owned by `self`, taken just above and not otherwise used during
        // the call; the descriptor is open.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                batch as libc::c_uint,
                flags,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(0),
                _ => Err(e),
            };
        }
        let n = (n as usize).min(batch);
        for (i, h) in self.hdrs.iter().take(n).enumerate() {
            self.lens[i] = (h.msg_len as usize).min(slot);
            self.truncated[i] = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        }
        self.got = n;
        Ok(n)
    }

    /// How many datagrams one call reads at most.
    pub fn capacity(&self) -> usize {
        self.hdrs.len()
    }

    /// Where datagram `i` of the last call lies in `bufs` (inner `None`: it was truncated).
    fn place(&self, i: usize) -> Option<Option<std::ops::Range<usize>>> {
        if i >= self.got {
            return None;
        }
        let start = i * self.slot;
        let whole = !*self.truncated.get(i)?;
        Some(whole.then(|| start..start + self.lens.get(i).copied().unwrap_or(0)))
    }

    /// The bytes read of datagram `i` of the last call (of a truncated one, what fit).
    pub fn received(&self, i: usize) -> Option<usize> {
        (i < self.got).then(|| self.lens.get(i).copied()).flatten()
    }

    /// Datagram `i` of the last [`RecvBatch::recv`]: its bytes (`None` if it was truncated)
    /// and its sender (`None` if not an IP address).
    pub fn get(&self, i: usize) -> Option<(Option<&[u8]>, Option<std::net::IpAddr>)> {
        let place = self.place(i)?;
        let from = address_of(self.addrs.get(i)?);
        Some((place.and_then(|r| self.bufs.get(r)), from))
    }

    /// [`RecvBatch::get`], the bytes writable (to decapsulate in place).
    pub fn get_mut(&mut self, i: usize) -> Option<(Option<&mut [u8]>, Option<std::net::IpAddr>)> {
        let place = self.place(i)?;
        let from = address_of(self.addrs.get(i)?);
        Some((place.and_then(|r| self.bufs.get_mut(r)), from))
    }
}

/// Kind of virtual device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// Layer 3: each read is one IP packet.
    Tun,
    /// Layer 2: each read is one Ethernet frame.
    Tap,
}

// The TUN/TAP interface of <linux/if_tun.h> as libc exports it for the target (the ioctl number
// `TUNSETIFF` = `_IOW('T', 202, int)` differs between architectures). The flags are ints there but
// go in the `short` flags member of `struct ifreq`; they all fit, as the assertion checks.
const IFNAMSIZ: usize = libc::IFNAMSIZ;
const IFF_TUN: libc::c_short = libc::IFF_TUN as libc::c_short;
const IFF_TAP: libc::c_short = libc::IFF_TAP as libc::c_short;
const IFF_NO_PI: libc::c_short = libc::IFF_NO_PI as libc::c_short;
const IFF_MULTI_QUEUE: libc::c_short = libc::IFF_MULTI_QUEUE as libc::c_short;
const IFF_VNET_HDR: libc::c_short = libc::IFF_VNET_HDR as libc::c_short;
const _: () = assert!(
    IFF_TUN as libc::c_int == libc::IFF_TUN
        && IFF_TAP as libc::c_int == libc::IFF_TAP
        && IFF_NO_PI as libc::c_int == libc::IFF_NO_PI
        && IFF_MULTI_QUEUE as libc::c_int == libc::IFF_MULTI_QUEUE
        && IFF_VNET_HDR as libc::c_int == libc::IFF_VNET_HDR
);
const TUNSETIFF: libc::Ioctl = libc::TUNSETIFF;
const TUNSETOFFLOAD: libc::Ioctl = libc::TUNSETOFFLOAD;

/// The offloads asked for: checksum, TCP segmentation (v4, v6, with ECN) and, where the kernel
/// has it (Linux 6.2+), UDP segmentation.
const OFFLOADS: libc::c_uint =
    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
const OFFLOADS_USO: libc::c_uint = libc::TUN_F_USO4 | libc::TUN_F_USO6;

/// `struct ifreq` with the flags member of its union (40 bytes on Linux).
#[repr(C)]
struct IfReqFlags {
    name: [u8; IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

impl IfReqFlags {
    fn new(name: &str, flags: i16) -> io::Result<Self> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= IFNAMSIZ || bytes.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad interface name {name:?}"),
            ));
        }
        let mut req = IfReqFlags {
            name: [0; IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        req.name[..bytes.len()].copy_from_slice(bytes);
        Ok(req)
    }
}

/// One queue of a TUN or TAP device, opened without packet information headers (`IFF_NO_PI`).
///
/// A device that does not exist is created (and disappears when its last queue is closed, unless it
/// was created persistent with `ip tuntap add`).
#[derive(Debug)]
pub struct TunQueue {
    file: File,
    name: String,
    /// Opened with `IFF_VNET_HDR`: every packet read or written starts with a virtio-net header.
    vnet: bool,
    /// The kernel took the UDP segmentation offloads too.
    uso: bool,
}

impl AsRawFd for TunQueue {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

impl AsRawFd for RawSocket {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

impl TunQueue {
    /// Opens one queue of device `name`. With `multi_queue`, the device must be (or is created)
    /// multi-queue and further queues may be opened by calling this again.
    ///
    /// # Errors
    /// Opening `/dev/net/tun` or the `TUNSETIFF` ioctl failed (not root, a device of another kind or
    /// queue mode with that name exists, ...).
    pub fn open(
        name: &str,
        kind: DeviceKind,
        multi_queue: bool,
        offload: bool,
    ) -> io::Result<TunQueue> {
        use std::os::unix::fs::OpenOptionsExt;
        // Non-blocking: the data path drains what is queued, then waits in `poll`.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")?;
        let mut flags = IFF_NO_PI
            | match kind {
                DeviceKind::Tun => IFF_TUN,
                DeviceKind::Tap => IFF_TAP,
            };
        if multi_queue {
            flags |= IFF_MULTI_QUEUE;
        }
        if offload {
            flags |= IFF_VNET_HDR;
        }
        let mut req = IfReqFlags::new(name, flags)?;
        // SAFETY: `req` is a valid, initialised `struct ifreq` that outlives the call; TUNSETIFF
        // reads and writes only within its 40 bytes. The fd is open.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                TUNSETIFF as _,
                &mut req as *mut IfReqFlags,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let len = req.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        let name = String::from_utf8_lossy(&req.name[..len]).into_owned();
        let mut uso = false;
        if offload {
            // The header size stays the kernel's default (`struct virtio_net_hdr`, 10 bytes).
            uso = set_offload(&file, OFFLOADS | OFFLOADS_USO).is_ok();
            if !uso {
                set_offload(&file, OFFLOADS)?;
            }
        }
        Ok(TunQueue {
            file,
            name,
            vnet: offload,
            uso,
        })
    }

    /// Whether packets carry a virtio-net header ([`lb_packet::offload`]).
    pub fn vnet(&self) -> bool {
        self.vnet
    }

    /// Whether the kernel took the UDP segmentation offloads (Linux 6.2+).
    pub fn uso(&self) -> bool {
        self.uso
    }

    /// Writes a virtio-net header and a packet in one system call.
    ///
    /// # Errors
    /// The write failed.
    pub fn send_vnet(&mut self, hdr: &[u8], pkt: &[u8]) -> io::Result<usize> {
        let iov = [
            libc::iovec {
                iov_base: hdr.as_ptr() as *mut libc::c_void,
                iov_len: hdr.len(),
            },
            libc::iovec {
                iov_base: pkt.as_ptr() as *mut libc::c_void,
                iov_len: pkt.len(),
            },
        ];
        // SAFETY: both iovecs point into live slices of the given lengths, read-only for the
        // kernel; the fd is open for the call.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Opens `n` queues of a multi-queue device (one queue without `IFF_MULTI_QUEUE` when `n == 1`).
    ///
    /// # Errors
    /// As [`TunQueue::open`].
    pub fn open_queues(
        name: &str,
        kind: DeviceKind,
        n: usize,
        offload: bool,
    ) -> io::Result<Vec<TunQueue>> {
        if n <= 1 {
            return Ok(vec![TunQueue::open(name, kind, false, offload)?]);
        }
        (0..n)
            .map(|_| TunQueue::open(name, kind, true, offload))
            .collect()
    }

    /// The device name the kernel gave.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one packet (or frame); returns its length.
    ///
    /// # Errors
    /// The read failed; `WouldBlock` when no packet is queued (the device is non-blocking).
    pub fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one packet (or frame).
    ///
    /// # Errors
    /// The write failed (the kernel rejects malformed packets with `EINVAL`).
    pub fn send(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    /// The queue's file descriptor (for io_uring submissions).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }

    /// Waits up to `timeout_ms` for a packet to read; `Ok(false)` on timeout.
    ///
    /// # Errors
    /// `poll` failed other than by a signal.
    pub fn wait_readable(&self, timeout_ms: i32) -> io::Result<bool> {
        wait_readable(self.file.as_raw_fd(), timeout_ms)
    }
}

/// `TUNSETOFFLOAD` with `flags`.
fn set_offload(file: &File, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long of flags); the fd is
    // an attached TUN/TAP queue.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            TUNSETOFFLOAD as _,
            libc::c_ulong::from(flags),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn wait_readable(fd: i32, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, count 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(rc > 0)
}

/// Waits up to `timeout_ms` until one of `fds` is readable; returns a bit mask of the readable
/// ones (bit `i` for `fds[i]`, at most 64 descriptors), 0 on timeout or signal.
///
/// # Errors
/// `poll` failed other than by a signal, or more than 64 descriptors.
pub fn poll_readable(fds: &[&dyn AsRawFd], timeout_ms: i32) -> io::Result<u64> {
    if fds.len() > 64 {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|f| libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs that outlives the call.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    let mut mask = 0u64;
    for (i, p) in pfds.iter().enumerate() {
        if p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0 {
            mask |= 1 << i;
        }
    }
    Ok(mask)
}

/// Sets an interface up (`IFF_UP`), as `ip link set NAME up` does.
///
/// # Errors
/// The interface does not exist or the caller lacks `CAP_NET_ADMIN`.
pub fn set_link_up(name: &str) -> io::Result<()> {
    // SAFETY: plain socket(2) call; the result is checked and owned immediately.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReqFlags::new(name, 0)?;
    // SAFETY: `req` is a valid `struct ifreq`; SIOCGIFFLAGS writes the flags member only.
    if unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCGIFFLAGS as _,
            &mut req as *mut IfReqFlags,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    req.flags |= libc::IFF_UP as i16;
    // SAFETY: as above; SIOCSIFFLAGS reads the flags member.
    if unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCSIFFLAGS as _,
            &mut req as *mut IfReqFlags,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A raw IP socket receiving every packet of one IP protocol (4 = IPIP, 41 = IPv6-in-IP).
///
/// For IPv4 (`AF_INET`) each packet read (with [`RecvBatch`]) includes the outer IPv4 header;
/// for IPv6 (`AF_INET6`) the kernel strips the outer IPv6 header and returns the payload only,
/// the outer source being the sender's address.
#[derive(Debug)]
pub struct RawSocket {
    file: File,
}

impl RawSocket {
    /// Opens a raw socket for `protocol` on IPv4 (`ipv6 == false`) or IPv6.
    ///
    /// # Errors
    /// Needs `CAP_NET_RAW`.
    pub fn open(ipv6: bool, protocol: u8) -> io::Result<RawSocket> {
        let family = if ipv6 { libc::AF_INET6 } else { libc::AF_INET };
        // SAFETY: plain socket(2) call; the result is checked and owned immediately.
        let fd = unsafe {
            libc::socket(
                family,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::c_int::from(protocol),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(RawSocket {
            file: File::from(fd),
        })
    }
}

/// Whether the process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_layout_and_names() {
        assert_eq!(core::mem::size_of::<IfReqFlags>(), 40);
        assert_eq!(
            core::mem::size_of::<IfReqFlags>(),
            core::mem::size_of::<libc::ifreq>()
        );
        assert!(IfReqFlags::new("", 0).is_err());
        assert!(IfReqFlags::new("sixteen-chars-xx", 0).is_err());
        assert!(IfReqFlags::new("lb0", 0).is_ok());
    }
}

/// A global allocator that backs large allocations (4 MiB and more) with transparent huge pages:
/// anonymous `mmap`s aligned to 2 MiB and marked `MADV_HUGEPAGE`, and everything else with the
/// system allocator.
///
/// Why: a connection table of a million flows spans tens of MiB and every lookup lands on a
/// random page, so with 4 KiB pages nearly every access also misses the TLB, and under a
/// hypervisor each page walk is two-dimensional. On machines whose transparent huge pages are
/// in `madvise` mode (a common default) huge pages come only to memory that asks for them.
/// `tun-balancer` and the benchmarks install it with
/// `#[global_allocator] static A: HugePageAlloc = HugePageAlloc;`. The advice is only a hint:
/// where it is refused (THP `never`, no free huge page) the memory is ordinary.
#[derive(Debug, Clone, Copy, Default)]
pub struct HugePageAlloc;

const HUGE_PAGE: usize = 2 << 20;
const HUGE_THRESHOLD: usize = 4 << 20;

#[inline]
fn huge_len(size: usize) -> usize {
    size.div_ceil(HUGE_PAGE).saturating_mul(HUGE_PAGE)
}

#[inline]
fn is_huge(layout: std::alloc::Layout) -> bool {
    layout.size() >= HUGE_THRESHOLD && layout.align() <= HUGE_PAGE
}

/// Maps `len` (a multiple of 2 MiB) bytes aligned to 2 MiB, zeroed, advised for huge pages.
fn map_huge(len: usize) -> *mut u8 {
    let Some(span) = len.checked_add(HUGE_PAGE) else {
        return std::ptr::null_mut();
    };
    // SAFETY: an anonymous private mapping at a kernel-chosen address touches no existing memory.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return std::ptr::null_mut();
    }
    let start = p as usize;
    let aligned = start.div_ceil(HUGE_PAGE) * HUGE_PAGE;
    let head = aligned - start;
    let tail = span - head - len;
    // SAFETY: both ranges lie inside the mapping just made and outside the part handed out; the
    // advice only changes how the kernel backs the range it names.
    unsafe {
        if head > 0 {
            libc::munmap(p, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
        libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
    aligned as *mut u8
}

// SAFETY: every block comes either from `System` (and goes back to it) or from `map_huge` (and is
// unmapped with the same length); which one is decided by the layout alone, which callers must
// pass unchanged to `dealloc`, so the two never mix. Mapped memory is zeroed and 2 MiB aligned,
// which satisfies any layout `is_huge` admits.
unsafe impl std::alloc::GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if is_huge(layout) {
            map_huge(huge_len(layout.size()))
        } else {
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { std::alloc::System.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if is_huge(layout) {
            map_huge(huge_len(layout.size()))
        } else {
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { std::alloc::System.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        if is_huge(layout) {
            // SAFETY: `ptr` came from `map_huge` with this length (see the impl's comment).
            unsafe {
                libc::munmap(ptr.cast(), huge_len(layout.size()));
            }
        } else {
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { std::alloc::System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        let Ok(new_layout) = std::alloc::Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        if !is_huge(layout) && !is_huge(new_layout) {
            // SAFETY: forwarded with the caller's guarantees.
            return unsafe { std::alloc::System.realloc(ptr, layout, new_size) };
        }
        if is_huge(layout) && is_huge(new_layout) && huge_len(new_size) == huge_len(layout.size()) {
            return ptr;
        }
        // SAFETY: a fresh block of the new layout, the old contents copied (the shorter of the two
        // lengths), then the old block released by the path that made it.
        unsafe {
            let new = self.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

#[cfg(test)]
mod huge_tests {
    use super::*;
    use std::alloc::{GlobalAlloc, Layout};

    #[test]
    fn large_blocks_are_aligned_zeroed_and_reallocate() {
        let a = HugePageAlloc;
        let l = Layout::from_size_align(5 << 20, 64).expect("layout");
        // SAFETY: the layout is non-zero; every block is released with its layout.
        unsafe {
            let p = a.alloc_zeroed(l);
            assert!(!p.is_null());
            assert_eq!(p as usize % HUGE_PAGE, 0);
            assert!(std::slice::from_raw_parts(p, l.size())
                .iter()
                .all(|&b| b == 0));
            p.write_bytes(7, l.size());
            // Grow across the 2 MiB boundary, shrink below the threshold: contents survive.
            let q = a.realloc(p, l, 9 << 20);
            assert!(!q.is_null());
            assert_eq!(*q.add(l.size() - 1), 7);
            let l2 = Layout::from_size_align(9 << 20, 64).expect("layout");
            let r = a.realloc(q, l2, 1000);
            assert!(!r.is_null());
            assert_eq!(*r.add(999), 7);
            a.dealloc(r, Layout::from_size_align(1000, 64).expect("layout"));
            // Small blocks go to the system allocator.
            let s = a.alloc(Layout::from_size_align(100, 8).expect("layout"));
            assert!(!s.is_null());
            a.dealloc(s, Layout::from_size_align(100, 8).expect("layout"));
        }
    }
}

#[cfg(test)]
mod recv_batch_tests {
    use super::RecvBatch;
    use std::net::{IpAddr, Ipv4Addr, UdpSocket};

    /// Over loopback: a batch reads what is waiting, up to its size, each datagram whole and
    /// with its sender; an empty socket gives 0 without waiting.
    #[test]
    fn reads_waiting_datagrams_a_batch_at_a_time() {
        let rx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        rx.set_nonblocking(true).expect("nonblocking");
        let tx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let to = rx.local_addr().expect("addr");
        let mut b = RecvBatch::new(8);
        assert_eq!(b.recv(&rx).expect("empty"), 0);
        assert!(b.get(0).is_none());
        let sizes: Vec<usize> = (0..11).map(|i| 1 + i * 997).collect();
        for (i, &n) in sizes.iter().enumerate() {
            tx.send_to(&vec![i as u8; n], to).expect("send");
        }
        // Loopback delivers within the send; the pause only makes sure all 11 are waiting.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut got = Vec::new();
        let mut reads = Vec::new();
        for _ in 0..50 {
            let n = b.recv(&rx).expect("recv");
            reads.push(n);
            for i in 0..n {
                let (data, from) = b.get(i).expect("datagram");
                assert_eq!(from, Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
                got.push(data.expect("whole").to_vec());
            }
            assert!(b.get(n).is_none());
            if got.len() == sizes.len() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert_eq!(got.len(), sizes.len());
        assert_eq!(reads, [8, 3], "a full batch, then the rest");
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d.len(), sizes[i]);
            assert!(d.iter().all(|&x| x == i as u8));
        }
    }

    /// Small places: a datagram longer than its place is reported truncated (bytes `None`,
    /// `received` what fit); the waiting read returns what is queued, and 0 once the receive
    /// timeout passes with nothing.
    #[test]
    fn small_places_truncate_and_the_waiting_read_times_out() {
        let rx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        rx.set_read_timeout(Some(std::time::Duration::from_millis(50)))
            .expect("timeout");
        let tx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let to = rx.local_addr().expect("addr");
        let mut b = RecvBatch::with_slot(4, 100);
        for n in [100, 101, 40] {
            tx.send_to(&vec![n as u8; n], to).expect("send");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(b.recv_wait(&rx).expect("recv"), 3);
        assert_eq!(b.get(0).and_then(|(d, _)| d).map(<[u8]>::len), Some(100));
        assert_eq!(b.get(1).map(|(d, _)| d.is_none()), Some(true), "truncated");
        assert_eq!(b.received(1), Some(100));
        assert_eq!(b.get(2).and_then(|(d, _)| d).map(<[u8]>::len), Some(40));
        assert_eq!(b.received(3), None);
        let t = std::time::Instant::now();
        assert_eq!(b.recv_wait(&rx).expect("timeout is not an error"), 0);
        assert!(
            t.elapsed() >= std::time::Duration::from_millis(40),
            "it waited"
        );
        assert!(b.get(0).is_none());
    }
}
