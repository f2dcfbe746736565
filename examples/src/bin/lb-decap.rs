//! `lb-decap --device NAME --allow PREFIX[,PREFIX...] [--gue-port PORT]`: the backend side of
//! `tun-balancer`'s tunnel mode on kernels without `ipip` / `ip6tnl` / `fou`. Receives IPIP (IPv4
//! protocol 4), IPv6-in-IPv6 and IPv4-in-IPv6 (IPv6 next headers 41 and 4) on raw sockets, and
//! optionally GUE on a UDP port, each read up to 32 packets per `recvmmsg` into an 8 MiB socket
//! buffer; removes the outer headers with lb-packet and writes the inner packets to a local TUN
//! device, so that the backend's own kernel receives them as if they had arrived directly (put
//! the VIP on `lo` and turn `rp_filter` off). Exits on SIGTERM / SIGINT, printing its counters.
//!
//! The device is opened and written through the `tun-rs` crate with its offloads on: each
//! batch's inner packets go to `send_multiple`, which coalesces a flow's consecutive TCP
//! segments (and UDP datagrams, where the kernel takes USO) into one GSO super-packet per
//! write, as a kernel tunnel endpoint's GRO would. A tunnel endpoint receives segments, which is
//! the case that design is made for (`tun-balancer` keeps super-packets whole instead; see the
//! README, "Why not the tun-rs crate").
//!
//! Only tunnel packets whose outer source is in `--allow` (the balancers' `snat_addrs`) are
//! delivered; the others are dropped and counted as `refused`. The list is required: a decapsulator
//! open to anyone lets anyone inject packets with any source into the backend. To accept every
//! sender anyway, say so: `--allow 0.0.0.0/0,::/0`.

use std::net::{IpAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Parser;
use ipnet::IpNet;
use lb_examples::decap::{gue_inner, ipv4_source, AllowList};
use lb_examples::sys::{
    poll_readable, set_buffer, set_link_up, RawSocket, RecvBatch, SocketBuffer,
};
use lb_packet::{parse, tunnel, Link, PacketBuf};
use tun_rs::{DeviceBuilder, GROTable, SyncDevice, VIRTIO_NET_HDR_LEN};

#[derive(Debug, Parser)]
#[command(
    name = "lb-decap",
    about = "Decapsulates IPIP / IP6IP6 / GUE into a local TUN device."
)]
struct Cli {
    /// The TUN device to create (or attach to) and write inner packets to.
    #[arg(long, short)]
    device: String,
    /// Also accept GUE on this UDP port.
    #[arg(long)]
    gue_port: Option<u16>,
    /// Outer source addresses allowed to send tunnel packets (the balancers): prefixes or
    /// addresses, comma-separated or repeated. Required; `0.0.0.0/0,::/0` accepts anyone.
    #[arg(long, required = true, value_delimiter = ',', value_parser = AllowList::parse_prefix)]
    allow: Vec<IpNet>,
}

/// Packets read per `recvmmsg`.
const BATCH: usize = 32;

/// Each socket's receive buffer (bytes; root may exceed `rmem_max`): room for the bursts a
/// balancer sends while this loop writes to the TUN device.
const RCVBUF: usize = 8 << 20;

/// What a socket's packets hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carried {
    /// An IPv4 raw socket's: the outer IPv4 header, then the inner packet.
    OuterIpv4,
    /// An IPv6 raw socket's: the inner packet (the kernel removed the outer header; its source
    /// is the sender's address).
    Inner,
    /// A UDP socket's: the GUE header, then the inner packet.
    Gue,
}

#[derive(Debug, Default)]
struct Counters {
    received: u64,
    delivered: u64,
    bad: u64,
    /// From a source outside `--allow`.
    refused: u64,
}

/// Counts the packet; whether its outer source may send tunnel packets (counted as refused
/// when not).
fn admit(allow: &AllowList, src: Option<IpAddr>, c: &mut Counters) -> bool {
    c.received += 1;
    let ok = src.is_some_and(|a| allow.allows(a));
    if !ok {
        c.refused += 1;
    }
    ok
}

/// The TUN side: a batch's inner packets, each at `VIRTIO_NET_HDR_LEN` in its own buffer
/// (room for the header `send_multiple` writes in front, and capacity for the segments it
/// appends when it coalesces).
struct Out {
    dev: SyncDevice,
    gro: GROTable,
    bufs: Vec<Vec<u8>>,
    n: usize,
}

impl Out {
    fn new(dev: SyncDevice) -> Out {
        Out {
            dev,
            gro: GROTable::default(),
            bufs: (0..BATCH)
                .map(|_| Vec::with_capacity(VIRTIO_NET_HDR_LEN + 65_536))
                .collect(),
            n: 0,
        }
    }

    /// Queues an inner packet (a valid IP packet, else counted as bad).
    fn push(&mut self, inner: &[u8], c: &mut Counters) {
        let Some(b) = self.bufs.get_mut(self.n) else {
            c.bad += 1;
            return;
        };
        if parse(inner, Link::Ip).is_err() {
            c.bad += 1;
            return;
        }
        b.clear();
        b.resize(VIRTIO_NET_HDR_LEN, 0);
        b.extend_from_slice(inner);
        self.n += 1;
    }

    /// Writes what is queued. `send_multiple` tries every packet and reports the last
    /// failure, so a failed call counts its packets as bad.
    fn flush(&mut self, c: &mut Counters) {
        let n = std::mem::take(&mut self.n);
        if n == 0 {
            return;
        }
        match self
            .dev
            .send_multiple(&mut self.gro, &mut self.bufs[..n], VIRTIO_NET_HDR_LEN)
        {
            Ok(_) => c.delivered += n as u64,
            Err(_) => c.bad += n as u64,
        }
    }
}

/// Reads `sock` a batch per system call until it is empty, delivering what is admitted.
fn drain(
    sock: &(impl AsRawFd + ?Sized),
    carried: Carried,
    batch: &mut RecvBatch,
    allow: &AllowList,
    tun: &mut Out,
    c: &mut Counters,
) {
    loop {
        // An error (none is expected) ends this round, as an empty socket does; the next poll
        // tries again.
        let n = batch.recv(sock).unwrap_or(0);
        for i in 0..n {
            let Some((data, from)) = batch.get_mut(i) else {
                break;
            };
            // The outer source: an IPv4 raw socket's packet starts with the outer header.
            let from = match carried {
                Carried::OuterIpv4 => data.as_deref().and_then(ipv4_source),
                Carried::Inner | Carried::Gue => from,
            };
            if !admit(allow, from, c) {
                continue;
            }
            let inner = data.and_then(|d| match carried {
                Carried::OuterIpv4 => {
                    let n = d.len();
                    let mut pb = PacketBuf::new(d, 0, n).ok()?;
                    tunnel::decap(&mut pb, None).ok()?;
                    let (start, len) = (pb.offset(), pb.len());
                    let whole: &[u8] = pb.into_inner();
                    whole.get(start..start + len)
                }
                Carried::Inner => Some(&*d),
                Carried::Gue => gue_inner(d).and_then(|off| d.get(off..)),
            });
            match inner {
                Some(inner) => tun.push(inner, c),
                None => c.bad += 1,
            }
        }
        tun.flush(c);
        if n < batch.capacity() {
            break;
        }
    }
}

fn main() {
    lb_examples::runtime::abort_on_panic();
    let cli = Cli::parse();
    let allow = AllowList::new(cli.allow.clone());
    let fail = |what: &str, e: std::io::Error| -> ! {
        eprintln!("lb-decap: {what}: {e}");
        std::process::exit(1);
    };
    let dev = DeviceBuilder::new()
        .name(&cli.device)
        .offload(true)
        .build_sync()
        .unwrap_or_else(|e| fail("open TUN", e));
    let name = dev.name().unwrap_or_else(|e| fail("TUN name", e));
    let mut tun = Out::new(dev);
    set_link_up(&cli.device).unwrap_or_else(|e| fail("set device up", e));
    let v4 = RawSocket::open(false, 4).unwrap_or_else(|e| fail("raw socket (IPv4, protocol 4)", e));
    let v6 =
        RawSocket::open(true, 41).unwrap_or_else(|e| fail("raw socket (IPv6, next header 41)", e));
    let v4in6 =
        RawSocket::open(true, 4).unwrap_or_else(|e| fail("raw socket (IPv6, next header 4)", e));
    let gue = cli.gue_port.map(|p| {
        let s = UdpSocket::bind(("::", p)).unwrap_or_else(|e| fail("bind GUE port", e));
        s.set_nonblocking(true)
            .unwrap_or_else(|e| fail("GUE socket", e));
        s
    });
    let fds: [Option<&dyn AsRawFd>; 4] = [
        Some(&v4),
        Some(&v6),
        Some(&v4in6),
        gue.as_ref().map(|g| g as &dyn AsRawFd),
    ];
    for (fd, what) in fds
        .iter()
        .zip(["IPv4 raw", "IPv6 raw", "IPv4-in-IPv6 raw", "GUE"])
    {
        if let Some(fd) = fd {
            if let Err(e) = set_buffer(*fd, SocketBuffer::Receive, RCVBUF) {
                eprintln!("lb-decap: {what} socket receive buffer: {e} (kept the default)");
            }
        }
    }
    let mut batch = RecvBatch::new(BATCH);
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).unwrap_or_else(|e| fail("signal", e));
    }
    let nets: Vec<String> = allow.nets().iter().map(ToString::to_string).collect();
    println!(
        "lb-decap: decapsulating into {} (gue port {:?}) from {}",
        name,
        cli.gue_port,
        nets.join(",")
    );
    let mut c = Counters::default();
    while !stop.load(Ordering::Acquire) {
        let mut fds: Vec<&dyn AsRawFd> = vec![&v4, &v6, &v4in6];
        if let Some(g) = &gue {
            fds.push(g);
        }
        let ready = match poll_readable(&fds, 100) {
            Ok(m) => m,
            Err(e) => fail("poll", e),
        };
        // (`recvmmsg` does not wait: each socket is read until empty, then polled again.)
        let socks: [(u64, &dyn AsRawFd, Carried); 3] = [
            (1, &v4, Carried::OuterIpv4),
            (2, &v6, Carried::Inner),
            (4, &v4in6, Carried::Inner),
        ];
        for (bit, sock, carried) in socks {
            if ready & bit != 0 {
                drain(sock, carried, &mut batch, &allow, &mut tun, &mut c);
            }
        }
        if let (Some(g), true) = (&gue, ready & 8 != 0) {
            drain(g, Carried::Gue, &mut batch, &allow, &mut tun, &mut c);
        }
    }
    println!(
        "lb-decap: received {} delivered {} bad {} refused {}",
        c.received, c.delivered, c.bad, c.refused
    );
}
