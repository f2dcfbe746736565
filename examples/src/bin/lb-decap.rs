//! `lb-decap --device NAME --allow PREFIX[,PREFIX...] [--gue-port PORT]`: the backend side of
//! `tun-balancer`'s tunnel mode on kernels without `ipip` / `ip6tnl` / `fou`. Receives IPIP (IPv4
//! protocol 4), IPv6-in-IPv6 and IPv4-in-IPv6 (IPv6 next headers 41 and 4) on raw sockets, and
//! optionally GUE on a UDP port (read 32 datagrams per `recvmmsg`), removes the outer headers
//! with lb-packet and writes the inner
//! packet to a local TUN device, so that the backend's own kernel receives it as if it had arrived
//! directly (put the VIP on `lo` and turn `rp_filter` off). Exits on SIGTERM / SIGINT, printing
//! its counters.
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
    poll_readable, set_buffer, set_link_up, DeviceKind, RawSocket, RecvBatch, SocketBuffer,
    TunQueue,
};
use lb_packet::{parse, tunnel, Link, PacketBuf};

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

/// GUE datagrams read per `recvmmsg`.
const GUE_BATCH: usize = 32;

/// The GUE socket's receive buffer (bytes; root may exceed `rmem_max`).
const GUE_RCVBUF: usize = 8 << 20;

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

fn deliver(tun: &mut TunQueue, inner: &[u8], c: &mut Counters) {
    if parse(inner, Link::Ip).is_ok() && tun.send(inner).is_ok() {
        c.delivered += 1;
    } else {
        c.bad += 1;
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
    let mut tun = TunQueue::open(&cli.device, DeviceKind::Tun, false, false)
        .unwrap_or_else(|e| fail("open TUN", e));
    set_link_up(&cli.device).unwrap_or_else(|e| fail("set device up", e));
    let mut v4 =
        RawSocket::open(false, 4).unwrap_or_else(|e| fail("raw socket (IPv4, protocol 4)", e));
    let mut v6 =
        RawSocket::open(true, 41).unwrap_or_else(|e| fail("raw socket (IPv6, next header 41)", e));
    let mut v4in6 =
        RawSocket::open(true, 4).unwrap_or_else(|e| fail("raw socket (IPv6, next header 4)", e));
    let gue = cli.gue_port.map(|p| {
        let s = UdpSocket::bind(("::", p)).unwrap_or_else(|e| fail("bind GUE port", e));
        s.set_nonblocking(true)
            .unwrap_or_else(|e| fail("GUE socket", e));
        // Room for the bursts a balancer sends while this loop writes to the TUN device.
        if let Err(e) = set_buffer(&s, SocketBuffer::Receive, GUE_RCVBUF) {
            eprintln!("lb-decap: GUE receive buffer: {e} (kept the default)");
        }
        s
    });
    let mut batch = RecvBatch::new(GUE_BATCH);
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).unwrap_or_else(|e| fail("signal", e));
    }
    let nets: Vec<String> = allow.nets().iter().map(ToString::to_string).collect();
    println!(
        "lb-decap: decapsulating into {} (gue port {:?}) from {}",
        tun.name(),
        cli.gue_port,
        nets.join(",")
    );
    let mut c = Counters::default();
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Acquire) {
        let mut fds: Vec<&dyn AsRawFd> = vec![&v4, &v6, &v4in6];
        if let Some(g) = &gue {
            fds.push(g);
        }
        let ready = match poll_readable(&fds, 100) {
            Ok(m) => m,
            Err(e) => fail("poll", e),
        };
        if ready & 1 != 0 {
            // IPv4 raw sockets return the outer header too: its source, then decapsulate with
            // lb-packet.
            if let Ok(n) = v4.recv(&mut buf) {
                if admit(&allow, ipv4_source(&buf[..n]), &mut c) {
                    match PacketBuf::new(&mut buf[..n], 0, n) {
                        Ok(mut pb) => match tunnel::decap(&mut pb, None) {
                            Ok(_) => deliver(&mut tun, pb.data(), &mut c),
                            Err(_) => c.bad += 1,
                        },
                        Err(_) => c.bad += 1,
                    }
                }
            }
        }
        // IPv6 raw sockets return the payload after the outer header: the inner packet.
        for (bit, sock) in [(2u64, &mut v6), (4, &mut v4in6)] {
            if ready & bit != 0 {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    if admit(&allow, Some(from), &mut c) {
                        deliver(&mut tun, &buf[..n], &mut c);
                    }
                }
            }
        }
        if ready & 8 != 0 {
            if let Some(g) = &gue {
                // A batch of datagrams per system call, until the socket is empty.
                loop {
                    // An error (none is expected on an unconnected socket) ends this round,
                    // as an empty socket does; the next poll tries again.
                    let n = batch.recv(g).unwrap_or(0);
                    for i in 0..n {
                        let Some((data, from)) = batch.get(i) else {
                            break;
                        };
                        if !admit(&allow, from, &mut c) {
                            continue;
                        }
                        match data.and_then(|d| gue_inner(d).and_then(|off| d.get(off..))) {
                            Some(inner) => deliver(&mut tun, inner, &mut c),
                            None => c.bad += 1,
                        }
                    }
                    if n < GUE_BATCH {
                        break;
                    }
                }
            }
        }
    }
    println!(
        "lb-decap: received {} delivered {} bad {} refused {}",
        c.received, c.delivered, c.bad, c.refused
    );
}
