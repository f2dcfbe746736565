//! The fast path (module `fast`) against the locked path: same verdicts, bytes and counters.

use proptest::prelude::*;

use super::*;

const FIN: u8 = 0x01;
const RST: u8 = 0x04;
const PSHACK: u8 = 0x18;
const FINACK: u8 = 0x11;

/// Four services: NAT TCP (IPv4 and IPv6), DNAT UDP, NAT UDP.
fn fast_spec() -> DataplaneSpec {
    let mut s = nat_spec("203.0.113.10:80", Proto::Tcp, &B3);
    let mut v6 = ServiceSpec::new(sa("[2001:db8::10]:80"), Proto::Tcp, Mode::Nat);
    for b in ["[2001:db8:1::11]:8080", "[2001:db8:1::12]:8080"] {
        v6 = v6.with_backend(sa(b), 1);
    }
    let mut dnat = ServiceSpec::new(sa("203.0.113.20:53"), Proto::Udp, Mode::Dnat);
    for b in ["198.51.100.21:5353", "198.51.100.22:5353"] {
        dnat = dnat.with_backend(sa(b), 1);
    }
    let mut udp_nat = ServiceSpec::new(sa("203.0.113.30:4000"), Proto::Udp, Mode::Nat);
    for b in ["198.51.100.31:4000", "198.51.100.32:4000"] {
        udp_nat = udp_nat.with_backend(sa(b), 1);
    }
    s.services.extend([v6, dnat, udp_nat]);
    // Closing states shorter than a plan's life (`FAST_PATH_TTL`): a plan made while a flow
    // was established must not outlive what it became.
    s.timeouts.tcp_close = lb_core::Duration::from_millis(500);
    s.timeouts.tcp_close_wait = lb_core::Duration::from_millis(700);
    s
}

/// The clients: (client, VIP, TCP?).
fn clients() -> Vec<(SocketAddr, SocketAddr, bool)> {
    let mut v = Vec::new();
    for c in 0..12u16 {
        v.push((
            SocketAddr::new("192.0.2.2".parse().unwrap(), 30_000 + c),
            sa("203.0.113.10:80"),
            true,
        ));
        v.push((
            SocketAddr::new("2001:db8:2::2".parse().unwrap(), 30_000 + c),
            sa("[2001:db8::10]:80"),
            true,
        ));
        v.push((
            SocketAddr::new("192.0.2.3".parse().unwrap(), 31_000 + c),
            sa("203.0.113.20:53"),
            false,
        ));
        v.push((
            SocketAddr::new("192.0.2.4".parse().unwrap(), 32_000 + c),
            sa("203.0.113.30:4000"),
            false,
        ));
    }
    v
}

/// One packet of the workload: from client `flow`'s side or its backend's, of `kind`.
#[derive(Debug, Clone, Copy)]
enum Pkt {
    Client(usize, u8),
    Backend(usize, u8),
    Garbage,
}

/// Between bursts.
#[derive(Debug, Clone, Copy)]
enum Step {
    Burst,
    /// The clock moves by this many milliseconds.
    Advance(u64),
    Housekeeping,
    /// A backend goes down or comes back (new tables).
    Health(usize),
}

fn tcp_flags_of(kind: u8, client: bool) -> (u8, &'static [u8]) {
    match (kind % 8, client) {
        (0, true) => (SYN, b""),
        (0, false) => (SYNACK, b""),
        (1..=3, _) => (PSHACK, b"data"),
        (4, _) => (ACK, b""),
        (5, _) => (FINACK, b""),
        (6, _) => (RST, b""),
        _ => (FIN, b""),
    }
}

/// What happens between bursts: mostly nothing.
fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        20 => Just(Step::Burst),
        2 => prop_oneof![Just(10u64), Just(300), Just(2_000), Just(400_000)].prop_map(Step::Advance),
        1 => Just(Step::Housekeeping),
        1 => (0usize..3).prop_map(Step::Health),
    ]
}

/// Does `step` to both rigs (`down`: which of the first service's backends, at `backend(b)`,
/// are down); `false` for [`Step::Burst`], which is the caller's.
fn between(
    step: Step,
    locked: &mut Rig,
    fast: &mut FastRig,
    down: &mut [bool; 3],
    backend: impl Fn(usize) -> SocketAddr,
) -> bool {
    match step {
        Step::Advance(ms) => {
            locked.now += lb_core::Duration::from_millis(ms);
            fast.rig.now = locked.now;
        }
        Step::Housekeeping => {
            locked.dp.housekeeping(locked.now, 64);
            fast.flush();
            fast.rig.dp.housekeeping(fast.rig.now, 64);
        }
        Step::Health(b) => {
            down[b] = !down[b];
            let id = locked
                .cp
                .backend_id(sa("203.0.113.10:80"), Proto::Tcp, backend(b))
                .unwrap();
            for r in [&mut *locked, &mut fast.rig] {
                r.cp.set_healthy(id, !down[b]);
                r.rebuild();
            }
        }
        Step::Burst => return false,
    }
    true
}

/// A packet kind for `tcp_flags_of`: mostly data and ACKs, some opening and closing.
fn kind() -> impl Strategy<Value = u8> {
    prop_oneof![
        2 => Just(0u8),
        8 => 1u8..4,
        6 => Just(4u8),
        1 => 5u8..8,
    ]
}

/// A rig fed through a classifier with a fast path, as tun-balancer's queue threads do.
struct FastRig {
    rig: Rig,
    cl: Classifier,
}

impl FastRig {
    fn new(spec: DataplaneSpec, entries: usize) -> FastRig {
        FastRig::on(spec, entries, Link::Ip)
    }

    fn on(spec: DataplaneSpec, entries: usize, link: Link) -> FastRig {
        let rig = Rig::new(spec, link);
        let mut cl = rig.dp.classifier(64);
        cl.enable_fast_path(entries);
        FastRig { rig, cl }
    }

    /// One burst: classified, forwarded from the cache where it can be, the rest (if any)
    /// under the "lock". Returns the verdicts with their bytes, and how many went the fast way.
    fn burst(
        &mut self,
        pkts: &[Vec<u8>],
        hdrs: Option<&mut [VnetHdr]>,
    ) -> (Vec<(Verdict, Vec<u8>)>, usize) {
        let mut bufs = to_bufs(pkts);
        let lens: Vec<usize> = pkts.iter().map(Vec::len).collect();
        let mut out = vec![Verdict::Drop(DropReason::Malformed); pkts.len()];
        let now = self.rig.now;
        self.cl.classify(&bufs, HEADROOM, &lens);
        let mut hdrs = hdrs;
        let left = self
            .cl
            .forward_cached(&mut bufs, &lens, hdrs.as_deref_mut(), now, &mut out);
        // As tun-balancer does: no lock when nothing is left.
        if left > 0 {
            self.rig.dp.process_batch_classified(
                &mut self.cl,
                &mut bufs,
                &lens,
                hdrs,
                now,
                &mut out,
            );
        }
        (outputs(&bufs, &out), pkts.len() - left)
    }

    /// Hands back what the fast path forwarded (an empty burst under the lock).
    fn flush(&mut self) {
        let no: [Vec<u8>; 0] = [];
        self.cl.classify(&no, HEADROOM, &[]);
        let now = self.rig.now;
        self.rig.dp.process_batch_classified(
            &mut self.cl,
            &mut [] as &mut [Vec<u8>],
            &[],
            None,
            now,
            &mut [],
        );
    }
}

fn to_bufs(pkts: &[Vec<u8>]) -> Vec<Vec<u8>> {
    pkts.iter()
        .map(|p| {
            let mut b = vec![0u8; HEADROOM + p.len() + 64];
            b[HEADROOM..HEADROOM + p.len()].copy_from_slice(p);
            b
        })
        .collect()
}

fn outputs(bufs: &[Vec<u8>], out: &[Verdict]) -> Vec<(Verdict, Vec<u8>)> {
    bufs.iter()
        .zip(out)
        .map(|(b, v)| {
            let bytes = match *v {
                Verdict::Forward { start, len } | Verdict::Reply { start, len } => {
                    b[start..start + len].to_vec()
                }
                _ => Vec::new(),
            };
            (*v, bytes)
        })
        .collect()
}

/// The same burst through the locked path alone (`locked`) and through a fast path (`r`):
/// asserts the same verdicts and bytes; returns them and how many went the fast way.
fn lockstep(
    pkts: &[Vec<u8>],
    r: &mut FastRig,
    locked: &mut Rig,
) -> (Vec<(Verdict, Vec<u8>)>, usize) {
    let mut bufs = to_bufs(pkts);
    let lens: Vec<usize> = pkts.iter().map(Vec::len).collect();
    let mut out = vec![Verdict::Held; pkts.len()];
    locked
        .dp
        .process_batch(&mut bufs, HEADROOM, &lens, locked.now, &mut out);
    let want = outputs(&bufs, &out);
    let (got, n) = r.burst(pkts, None);
    assert_eq!(got, want);
    (got, n)
}

/// A TCP connection from `client` to `vip` opened in lockstep (SYN, the backend's SYN-ACK):
/// (backend, the source the backend sees).
fn open_tcp(
    r: &mut FastRig,
    locked: &mut Rig,
    client: SocketAddr,
    vip: SocketAddr,
) -> (SocketAddr, SocketAddr) {
    let (out, _) = lockstep(&[tcp(client, vip, SYN, b"")], r, locked);
    let (backend, snat) = ends(&out[0].1);
    lockstep(&[tcp(backend, snat, SYNACK, b"")], r, locked);
    (backend, snat)
}

/// Where a forwarded client packet went: (backend, the source the backend sees).
fn ends(out: &[u8]) -> (SocketAddr, SocketAddr) {
    let p = parse(out, Link::Ip).unwrap();
    (
        SocketAddr::new(p.key.dst(), p.key.dst_port()),
        SocketAddr::new(p.key.src(), p.key.src_port()),
    )
}

/// The locked path's counters with the fast path's own zeroed, for comparison.
fn comparable(s: &Stats) -> String {
    let mut s = s.clone();
    s.fast_path = 0;
    s.fast_path_locked = 0;
    s.fast_path_plans = 0;
    for b in &mut s.backends {
        b.fast_packets = 0;
    }
    format!("{s:?}")
}

/// The table's view of every flow (both directions' keys) and its counters.
fn table_view(dp: &Dataplane, now: Instant) -> String {
    let keys = clients().into_iter().flat_map(|(c, vip, _)| {
        [IpProto::Tcp, IpProto::Udp]
            .map(|proto| FlowKey::new(c.ip(), c.port(), vip.ip(), vip.port(), proto).unwrap())
    });
    view_of(dp, now, keys)
}

/// The entries of `keys` and the tables' counters.
fn view_of(dp: &Dataplane, now: Instant, keys: impl IntoIterator<Item = FlowKey>) -> String {
    let mut v = String::new();
    for k in keys {
        let ct = if k.is_ipv4() { &dp.ct4 } else { &dp.ct6 };
        v += &format!("{:?}\n", ct.get(&k, now));
    }
    v + &format!("{:?} {:?}", dp.ct4.counters(), dp.ct6.counters())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Whatever the traffic (handshakes, data both ways, FIN, RST, garbage), the clock (idle
    /// timeouts expire flows) and the tables (backends going down and up), a data path fed
    /// through a fast path forwards every packet with the verdict and the bytes the locked
    /// path alone gives, and once the fast path has handed back what it forwarded, the data
    /// path's counters and every flow's entry (state, packets, bytes, last-seen, deadline)
    /// and the tables' counters are the same; also with a table of 16 entries, where new
    /// flows evict established ones (in the same burst as their next packets, too).
    #[test]
    fn the_fast_path_forwards_as_the_locked_path_does(
        script in proptest::collection::vec(
            (
                step(),
                proptest::collection::vec(
                    prop_oneof![
                        8 => (0usize..48, kind()).prop_map(|(f, k)| Pkt::Client(f, k)),
                        6 => (0usize..48, kind()).prop_map(|(f, k)| Pkt::Backend(f, k)),
                        1 => Just(Pkt::Garbage),
                    ],
                    1..40,
                ),
            ),
            1..40,
        ),
        entries in prop_oneof![Just(4usize), Just(256)],
        small in any::<bool>(),
        tight in any::<bool>(),
    ) {
        let flows = clients();
        let mut spec = fast_spec();
        if small {
            spec.conntrack_capacity = 16;
        }
        let mut locked = Rig::new(spec.clone(), Link::Ip);
        let mut fast = FastRig::new(spec, entries);
        // A margin the 16-entry tables reach (their spare counts half-open entries), with
        // bursts no longer than it: plans used after packets that took the lock while new
        // flows evict half-open ones, and in burst order once established flows are next.
        let longest = if tight {
            fast.rig.dp.fast_room = 16;
            16
        } else {
            usize::MAX
        };
        // Where each flow's packets went (backend, and the source the backend saw), as the
        // backends learn it.
        let mut peer: HashMap<usize, (SocketAddr, SocketAddr)> = HashMap::new();
        let mut down = [false; 3];
        let mut by_fast = 0;
        for (step, burst) in &script {
            if between(*step, &mut locked, &mut fast, &mut down, |b| sa(B3[b])) {
                continue;
            }
            let (sent, pkts): (Vec<Pkt>, Vec<Vec<u8>>) = burst
                .iter()
                .take(longest)
                .filter_map(|p| Some((*p, match *p {
                    Pkt::Garbage => Some(vec![0x45, 0, 0, 8, 1, 2]),
                    Pkt::Client(f, k) => {
                        let (c, vip, is_tcp) = flows[f];
                        Some(if is_tcp {
                            let (fl, data) = tcp_flags_of(k, true);
                            tcp(c, vip, fl, data)
                        } else {
                            udp(c, vip, b"q")
                        })
                    }
                    Pkt::Backend(f, k) => {
                        let (_, _, is_tcp) = flows[f];
                        let &(backend, seen) = peer.get(&f)?;
                        Some(if is_tcp {
                            let (fl, data) = tcp_flags_of(k, false);
                            tcp(backend, seen, fl, data)
                        } else {
                            udp(backend, seen, b"a")
                        })
                    }
                }?)))
                .unzip();
            let want: Vec<(Verdict, Vec<u8>)> = {
                let mut bufs = to_bufs(&pkts);
                let lens: Vec<usize> = pkts.iter().map(Vec::len).collect();
                let mut out = vec![Verdict::Drop(DropReason::Malformed); pkts.len()];
                locked.dp.process_batch(&mut bufs, HEADROOM, &lens, locked.now, &mut out);
                outputs(&bufs, &out)
            };
            let (got, n) = fast.burst(&pkts, None);
            by_fast += n;
            prop_assert_eq!(&got, &want);
            // The backends learn where each flow's packets reach them from.
            for ((v, out), p) in want.iter().zip(&sent) {
                if let (Verdict::Forward { .. }, Pkt::Client(f, _)) = (v, p) {
                    peer.insert(*f, ends(out));
                }
            }
        }
        fast.flush();
        prop_assert_eq!(comparable(locked.dp.stats()), comparable(fast.rig.dp.stats()));
        prop_assert_eq!(fast.rig.dp.stats().fast_path as usize, by_fast);
        // (Per backend too: no super-packets here, one segment each.)
        let per_backend: u64 = fast.rig.dp.stats().backends.iter().map(|b| b.fast_packets).sum();
        prop_assert_eq!(per_backend as usize, by_fast);
        prop_assert_eq!(fast.rig.dp.stats().fast_path_orphaned, 0);
        prop_assert_eq!(table_view(&locked.dp, locked.now), table_view(&fast.rig.dp, fast.rig.now));
    }
}

/// Packets of an established flow go the fast way in both directions once the locked path has
/// seen one of each; a FIN sends the flow back to the lock for good (the plans' generation
/// moves), and a flow's plan is used for at most `FAST_PATH_TTL`.
#[test]
fn established_flows_go_the_fast_way_until_they_close() {
    let mut r = FastRig::new(fast_spec(), 64);
    let client = sa("192.0.2.2:40000");
    let vip = sa("203.0.113.10:80");
    let (out, n) = r.burst(&[tcp(client, vip, SYN, b"")], None);
    assert_eq!(n, 0);
    let (backend, snat) = ends(&out[0].1);
    r.burst(&[tcp(backend, snat, SYNACK, b"")], None);
    // The handshake's last ACK makes the flow established: remembered, not yet fast. The
    // flow is timed (its first request and response go through the lock, each ending a
    // phase of the timing).
    for (pkt, way) in [
        (tcp(client, vip, ACK, b""), "established"),
        (tcp(client, vip, PSHACK, b"get"), "request"),
        (tcp(backend, snat, PSHACK, b"hello"), "response"),
    ] {
        let (_, n) = r.burst(&[pkt], None);
        assert_eq!(n, 0, "{way}");
    }
    // Now both directions: 3 + 3 packets in one burst, all fast, rewritten as before.
    let burst: Vec<Vec<u8>> = (0..3)
        .flat_map(|_| {
            [
                tcp(client, vip, PSHACK, b"get"),
                tcp(backend, snat, ACK, b""),
            ]
        })
        .collect();
    let (out, n) = r.burst(&burst, None);
    assert_eq!(n, 6);
    let q = parse(&out[0].1, Link::Ip).unwrap();
    assert_eq!((q.key.src(), q.key.src_port()), (snat.ip(), snat.port()));
    assert_eq!(q.key.dst(), backend.ip());
    let q = parse(&out[1].1, Link::Ip).unwrap();
    assert_eq!((q.key.src(), q.key.dst()), (vip.ip(), client.ip()));
    for (_, o) in &out {
        assert_checksums(o, Link::Ip);
    }
    // Not yet handed back...
    assert_eq!(r.rig.dp.stats().fast_path, 0);
    r.flush();
    let st = r.rig.dp.stats();
    assert_eq!(st.fast_path, 6);
    assert_eq!(st.forwarded, 11);
    let k = FlowKey::new(
        client.ip(),
        client.port(),
        vip.ip(),
        vip.port(),
        IpProto::Tcp,
    )
    .unwrap();
    let e = r.rig.dp.ct4.get(&k, r.rig.now).unwrap();
    assert_eq!(e.packets, 11);
    // The plan lasts at most FAST_PATH_TTL: past it the locked path sees the flow (and
    // remembers it again).
    r.rig.now += FAST_PATH_TTL;
    let (_, n) = r.burst(&[tcp(client, vip, ACK, b"")], None);
    assert_eq!(n, 0);
    let (_, n) = r.burst(&[tcp(client, vip, ACK, b"")], None);
    assert_eq!(n, 1);
    // A FIN goes under the lock, and after it nothing of the flow is fast any more.
    let (_, n) = r.burst(&[tcp(client, vip, FINACK, b"")], None);
    assert_eq!(n, 0);
    let (_, n) = r.burst(
        &[tcp(client, vip, ACK, b""), tcp(backend, snat, ACK, b"")],
        None,
    );
    assert_eq!(n, 0);
    let (_, n) = r.burst(&[tcp(client, vip, ACK, b"")], None);
    assert_eq!(n, 0);
}

/// Whatever leaves a table (here: an idle flow expired by housekeeping) makes every cached
/// plan unusable, and so does a table change; a reply whose flow is being timed for the
/// response-time estimates is not cached.
#[test]
fn a_departure_retires_its_flows_plans_and_a_reload_every_plan() {
    let mut r = FastRig::new(fast_spec(), 64);
    let vip = sa("203.0.113.30:4000");
    let a = sa("192.0.2.4:1000");
    let b = sa("192.0.2.4:1001");
    let reply_of = |r: &mut FastRig, c: SocketAddr| {
        let (out, _) = r.burst(&[udp(c, vip, b"1")], None);
        let (backend, snat) = ends(&out[0].1);
        r.burst(&[udp(backend, snat, b"2")], None);
        r.burst(&[udp(c, vip, b"3")], None); // confirmed: remembered
    };
    reply_of(&mut r, a);
    let (_, n) = r.burst(&[udp(a, vip, b"4")], None);
    assert_eq!(n, 1);
    // Flow b opened at a later time; a expires first.
    r.rig.now += lb_core::Duration::from_millis(900);
    reply_of(&mut r, b);
    let (_, n) = r.burst(&[udp(b, vip, b"5")], None);
    assert_eq!(n, 1);
    // Housekeeping far enough on to expire a: b's plan stays (only a's flow's epoch moves).
    let udp_timeout = r.rig.dp.ct4.timeouts().udp;
    r.rig.now += udp_timeout - lb_core::Duration::from_millis(500);
    // (b's plan is out of time by now: b's next packet takes the lock and leaves a new one.)
    let (_, n) = r.burst(&[udp(b, vip, b"5")], None);
    assert_eq!(n, 0);
    r.flush();
    // (a was last seen 900 ms before b.)
    assert_eq!(r.rig.dp.housekeeping(r.rig.now, 64), 1);
    let (_, n) = r.burst(&[udp(b, vip, b"6")], None);
    assert_eq!(n, 1);
    // A departure whose record the data path never read (as when its removal queue was
    // full): the flows concerned are unknown, so every plan goes.
    let t = r.rig.now + udp_timeout;
    r.flush();
    let key = lb_core::FlowKey::new(b.ip(), b.port(), vip.ip(), vip.port(), IpProto::Udp);
    assert!(r.rig.dp.ct4.remove(&key.unwrap(), t));
    while r.rig.dp.ct4.poll_removal().is_some() {}
    r.rig.dp.housekeeping(r.rig.now, 0);
    let (_, n) = r.burst(&[udp(b, vip, b"7")], None);
    assert_eq!(n, 0, "b is a new flow now");
    reply_of(&mut r, b);
    let (_, n) = r.burst(&[udp(b, vip, b"7")], None);
    assert_eq!(n, 1);
    // New tables (a backend down): every plan retired.
    let id = r
        .rig
        .cp
        .backend_id(vip, Proto::Udp, sa("198.51.100.31:4000"))
        .unwrap();
    r.rig.cp.set_healthy(id, false);
    r.rig.rebuild();
    let (_, n) = r.burst(&[udp(b, vip, b"8")], None);
    assert_eq!(n, 0);
    assert_eq!(r.rig.dp.stats().fast_path_orphaned, 0);
}

/// A GSO super-packet (offloads on, partial checksum) goes the fast way with the bytes, the
/// offload header and the segment counts the locked path gives it.
#[test]
fn super_packets_go_the_fast_way_whole() {
    let mut locked = Rig::new(fast_spec(), Link::Ip);
    let mut r = FastRig::new(fast_spec(), 64);
    let client = sa("192.0.2.2:40000");
    let vip = sa("203.0.113.10:80");
    let open = |rig: &mut Rig| {
        let out = rig.forward(&tcp(client, vip, SYN, b""));
        let (backend, snat) = ends(&out);
        rig.forward(&tcp(backend, snat, SYNACK, b""));
        rig.forward(&tcp(client, vip, ACK, b""));
    };
    open(&mut locked);
    open(&mut r.rig);
    let big = vec![7u8; 4000];
    let mut results = Vec::new();
    for _ in 0..3 {
        let mut pkt = tcp(client, vip, PSHACK, &big);
        let hdr = offloaded(&mut pkt, Some(1400));
        let mut h1 = [hdr];
        let mut bufs = to_bufs(&[pkt.clone()]);
        let mut out = [Verdict::Held];
        locked.dp.process_batch_offload(
            &mut bufs,
            HEADROOM,
            &[pkt.len()],
            &mut h1,
            locked.now,
            &mut out,
        );
        let want = outputs(&bufs, &out);
        let mut h2 = [hdr];
        let (got, n) = r.burst(&[pkt], Some(&mut h2));
        assert_eq!(got, want);
        assert_eq!(h1, h2);
        results.push(n);
    }
    // The first super-packet under the lock (it makes the plan), the others fast.
    assert_eq!(results, [0, 1, 1]);
    r.flush();
    assert_eq!(comparable(locked.dp.stats()), comparable(r.rig.dp.stats()));
    assert_eq!(r.rig.dp.stats().gso_segments, 9);
}

/// A plan made while its flow was established does not outlive what the flow became: after a
/// RST (CLOSE, 500 ms here, shorter than `FAST_PATH_TTL`) and 600 ms of silence, the flow's
/// next packet is judged by the table (its entry timed out), not forwarded from the cache.
#[test]
fn a_plan_does_not_outlive_its_flows_state() {
    let mut locked = Rig::new(fast_spec(), Link::Ip);
    let mut r = FastRig::new(fast_spec(), 64);
    let client = sa("192.0.2.2:40000");
    let vip = sa("203.0.113.10:80");
    let (backend, snat) = open_tcp(&mut r, &mut locked, client, vip);
    lockstep(&[tcp(client, vip, PSHACK, b"get")], &mut r, &mut locked);
    lockstep(&[tcp(backend, snat, PSHACK, b"ok")], &mut r, &mut locked);
    let (_, n) = lockstep(&[tcp(client, vip, ACK, b"")], &mut r, &mut locked);
    assert_eq!(n, 1, "established: fast");
    lockstep(&[tcp(client, vip, RST, b"")], &mut r, &mut locked);
    for rig in [&mut locked, &mut r.rig] {
        rig.now += lb_core::Duration::from_millis(600);
    }
    let (out, n) = lockstep(&[tcp(client, vip, ACK, b"")], &mut r, &mut locked);
    assert_eq!(n, 0);
    assert!(matches!(out[0].0, Verdict::Drop(_)), "{:?}", out[0].0);
}

/// A flow evicted by a new flow earlier in the same burst is not forwarded by its plan: the
/// packets after the first one that needs the lock are forwarded by their plans only in their
/// turn under the lock, and only if nothing left the table before them.
#[test]
fn a_flow_evicted_earlier_in_the_burst_is_not_forwarded_by_its_plan() {
    let mut spec = fast_spec();
    spec.conntrack_capacity = 16;
    let mut locked = Rig::new(spec.clone(), Link::Ip);
    let mut r = FastRig::new(spec, 4096);
    let vip = sa("203.0.113.30:4000");
    let client = |i: u16| SocketAddr::new("192.0.2.4".parse().unwrap(), 1000 + i);
    // 16 confirmed UDP flows fill the table (flow 0 the least recently used).
    for i in 0..16 {
        let (out, _) = lockstep(&[udp(client(i), vip, b"1")], &mut r, &mut locked);
        let (backend, snat) = ends(&out[0].1);
        lockstep(&[udp(backend, snat, b"2")], &mut r, &mut locked);
        lockstep(&[udp(client(i), vip, b"3")], &mut r, &mut locked);
        for rig in [&mut locked, &mut r.rig] {
            rig.now += lb_core::Duration::from_millis(10);
        }
    }
    assert_eq!(r.rig.dp.ct4.len(), 16);
    // A packet for no service (it needs the lock, changes nothing), then every flow: each
    // goes by its plan, in its turn under the lock.
    let mut burst = vec![udp(client(50), sa("203.0.113.99:9"), b"x")];
    burst.extend((0..16).map(|i| udp(client(i), vip, b"4")));
    let (out, _) = lockstep(&burst, &mut r, &mut locked);
    assert!(out[1..]
        .iter()
        .all(|(v, _)| matches!(v, Verdict::Forward { .. })));
    assert_eq!(r.rig.dp.stats().fast_path_locked, 16);
    // A new flow, then every flow again: the new flow evicts one of them, whose datagram then
    // starts a flow of its own (another SNAT port) instead of going out by its old plan; the
    // others go by their plans.
    let mut burst = vec![udp(client(99), vip, b"new")];
    burst.extend((0..16).map(|i| udp(client(i), vip, b"5")));
    let (out, _) = lockstep(&burst, &mut r, &mut locked);
    assert!(out
        .iter()
        .all(|(v, _)| matches!(v, Verdict::Forward { .. })));
    assert_eq!(r.rig.dp.ct4.counters().evicted_lru, 1);
    // (The eviction moved only the evicted flow's epoch.)
    assert_eq!(r.rig.dp.stats().fast_path_locked, 16 + 15);
}

/// A cloned classifier's fast path starts empty: what the original forwarded is handed back
/// once, by the original.
#[test]
fn a_cloned_classifier_hands_nothing_back_twice() {
    let mut r = FastRig::new(fast_spec(), 64);
    let vip = sa("203.0.113.30:4000");
    let c = sa("192.0.2.4:1000");
    let (out, _) = r.burst(&[udp(c, vip, b"1")], None);
    let (backend, snat) = ends(&out[0].1);
    r.burst(&[udp(backend, snat, b"2")], None);
    r.burst(&[udp(c, vip, b"3")], None);
    let (_, n) = r.burst(&[udp(c, vip, b"4")], None);
    assert_eq!(n, 1);
    let mut twin = r.cl.clone();
    r.flush();
    let no: [Vec<u8>; 0] = [];
    twin.classify(&no, HEADROOM, &[]);
    let now = r.rig.now;
    r.rig.dp.process_batch_classified(
        &mut twin,
        &mut [] as &mut [Vec<u8>],
        &[],
        None,
        now,
        &mut [],
    );
    let st = r.rig.dp.stats();
    assert_eq!((st.fast_path, st.rx_packets), (1, 4));
}

/// With room in the tables a packet goes by plan even after packets that took the lock, but
/// not after one of its own flow's: a timed flow's first request (which starts its response
/// clock) and the backend's answer in one burst. The answer has a plan (made while the request
/// was not yet awaited), yet goes in its turn, under the lock, and ends the clock as the
/// locked path does; by plan, handed back before the request, its sample would be lost.
#[test]
fn an_answer_after_its_own_flows_request_in_a_burst_waits_its_turn() {
    let mut locked = Rig::new(fast_spec(), Link::Ip);
    let mut r = FastRig::new(fast_spec(), 64);
    let client = sa("192.0.2.2:40000");
    let vip = sa("203.0.113.10:80");
    let (backend, snat) = open_tcp(&mut r, &mut locked, client, vip);
    lockstep(&[tcp(client, vip, ACK, b"")], &mut r, &mut locked);
    // The backend's pure ACK leaves a reply plan: its data is not awaited yet.
    lockstep(&[tcp(backend, snat, ACK, b"")], &mut r, &mut locked);
    let (_, n) = lockstep(&[tcp(backend, snat, ACK, b"")], &mut r, &mut locked);
    assert_eq!(n, 1, "the reply plan is in place");
    let key = FlowKey::new(
        client.ip(),
        client.port(),
        vip.ip(),
        vip.port(),
        IpProto::Tcp,
    );
    let key = key.unwrap();
    assert_eq!(r.rig.dp.timing.phase(&key), timing::Phase::Request);
    assert!(r.rig.dp.gen.room(), "the tables have room");
    let burst = [
        tcp(client, vip, PSHACK, b"GET / HTTP/1.0\r\n\r\n"),
        tcp(backend, snat, PSHACK, b"HTTP/1.0 200 OK\r\n\r\n"),
    ];
    let (_, n) = lockstep(&burst, &mut r, &mut locked);
    assert_eq!(n, 0);
    let phase = r.rig.dp.timing.phase(&key);
    assert_eq!(phase, locked.dp.timing.phase(&key));
    assert_ne!(phase, timing::Phase::Response, "the answer ended the clock");
}

/// Services whose replies go straight from the backends to the clients, in `mode` (`Tunnel`:
/// IPIP for TCP, GUE for UDP, with a path MTU of 1 400 bytes; `Dr`: MAC addresses): TCP over
/// IPv4 and IPv6, UDP over IPv4.
fn one_way_spec(mode: Mode) -> DataplaneSpec {
    let mut s = nat_spec(
        "203.0.113.10:80",
        Proto::Tcp,
        &["198.51.100.11:0", "198.51.100.12:0", "198.51.100.13:0"],
    );
    let mut v6 = ServiceSpec::new(sa("[2001:db8::10]:80"), Proto::Tcp, mode);
    for b in ["[2001:db8:1::11]:0", "[2001:db8:1::12]:0"] {
        v6 = v6.with_backend(sa(b), 1);
    }
    let mut udp = ServiceSpec::new(sa("203.0.113.30:4000"), Proto::Udp, mode);
    for b in ["198.51.100.31:0", "198.51.100.32:0"] {
        udp = udp.with_backend(sa(b), 1);
    }
    if mode == Mode::Tunnel {
        udp.tunnel = TunnelKind::Gue { port: 6080 };
    }
    s.services.extend([v6, udp]);
    for (i, svc) in s.services.iter_mut().enumerate() {
        svc.mode = mode;
        for (j, b) in svc.backends.iter_mut().enumerate() {
            b.mac = Some(MacAddr([2, 0, 0, 0, i as u8, j as u8]));
        }
    }
    s.mtu = 1400;
    s.timeouts.tcp_close = lb_core::Duration::from_millis(500);
    s
}

/// The clients of `one_way_spec`: (client, VIP, TCP?).
fn one_way_clients() -> Vec<(SocketAddr, SocketAddr, bool)> {
    let mut v = Vec::new();
    for c in 0..12u16 {
        v.push((sa("192.0.2.2:30000"), sa("203.0.113.10:80"), true));
        v.push((sa("[2001:db8:2::2]:30000"), sa("[2001:db8::10]:80"), true));
        v.push((sa("192.0.2.4:32000"), sa("203.0.113.30:4000"), false));
        for f in v.iter_mut().rev().take(3) {
            f.0.set_port(f.0.port() + c);
        }
    }
    v
}

/// An IP packet as the device delivers it: framed for `link` (an Ethernet header from a router
/// to the balancer), and with an offload header saying its TCP checksum is partial if
/// `partial` (IPv4 TCP only), a super-packet of 2-byte segments if `gso` too.
fn delivered(link: Link, mut ip: Vec<u8>, partial: bool, gso: bool) -> (Vec<u8>, VnetHdr) {
    let v4_tcp = ip[0] >> 4 == 4 && ip[9] == 6;
    let mut hdr = if partial && v4_tcp {
        offloaded(&mut ip, gso.then_some(2))
    } else {
        VnetHdr::NONE
    };
    if link == Link::Ethernet && hdr.needs_csum {
        // (Offsets in the frame.)
        hdr.csum_start += 14;
    }
    (super::place::frame(link, &ip), hdr)
}

/// The table's view of every `one_way_clients` flow and its counters.
fn one_way_view(dp: &Dataplane, now: Instant) -> String {
    let keys = one_way_clients().into_iter().map(|(c, vip, tcp)| {
        let proto = if tcp { IpProto::Tcp } else { IpProto::Udp };
        FlowKey::new(c.ip(), c.port(), vip.ip(), vip.port(), proto).unwrap()
    });
    view_of(dp, now, keys)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Modes `tunnel` (on a TUN device) and `dr` (on a TAP device), whose replies do not come
    /// back: whatever the traffic (handshakes, data, FIN, RST, packets too big for the tunnel's
    /// path MTU, partial checksums and super-packets from a device with offloads, garbage),
    /// the clock, the tables and evictions, the fast path forwards every packet with the
    /// verdict, bytes and offload header the locked path alone gives, and leaves the same
    /// counters and flow entries.
    #[test]
    fn the_fast_path_tunnels_and_routes_directly_as_the_locked_path_does(
        dr in any::<bool>(),
        script in proptest::collection::vec(
            (
                step(),
                proptest::collection::vec(
                    prop_oneof![
                        12 => (0usize..36, kind(), any::<bool>(), any::<bool>())
                            .prop_map(|(f, k, partial, gso)| (Some(f), k, partial, gso)),
                        1 => Just((None, 0u8, false, false)),
                    ],
                    1..40,
                ),
            ),
            1..40,
        ),
        entries in prop_oneof![Just(4usize), Just(256)],
        small in any::<bool>(),
        tight in any::<bool>(),
    ) {
        let (mode, link) = if dr { (Mode::Dr, Link::Ethernet) } else { (Mode::Tunnel, Link::Ip) };
        let flows = one_way_clients();
        let mut spec = one_way_spec(mode);
        if small {
            spec.conntrack_capacity = 16;
        }
        let mut locked = Rig::new(spec.clone(), link);
        let mut fast = FastRig::on(spec, entries, link);
        // As in the NAT test: a margin the small tables reach, bursts no longer than it.
        let longest = if tight {
            fast.rig.dp.fast_room = 16;
            16
        } else {
            usize::MAX
        };
        let mut down = [false; 3];
        let mut by_fast = 0;
        for (step, burst) in &script {
            let backend = |b: usize| sa(&format!("198.51.100.1{}:0", b + 1));
            if between(*step, &mut locked, &mut fast, &mut down, backend) {
                continue;
            }
            let (pkts, mut hdrs): (Vec<Vec<u8>>, Vec<VnetHdr>) = burst
                .iter()
                .take(longest)
                .map(|&(f, k, partial, gso)| {
                    let Some(f) = f else {
                        return (vec![0x45, 0, 0, 8, 1, 2], VnetHdr::NONE);
                    };
                    let (c, vip, is_tcp) = flows[f];
                    let ip = if is_tcp {
                        let (fl, data) = tcp_flags_of(k, true);
                        // Kind 3: too big for the tunnel's path MTU (1 400) once encapsulated.
                        let big = [7u8; 1_390];
                        tcp(c, vip, fl, if k % 8 == 3 { &big[..] } else { data })
                    } else {
                        udp(c, vip, if k % 8 == 3 { &[7u8; 1_390][..] } else { b"q" })
                    };
                    delivered(link, ip, partial, gso && k % 8 != 0)
                })
                .unzip();
            let want = {
                let mut bufs = to_bufs(&pkts);
                let lens: Vec<usize> = pkts.iter().map(Vec::len).collect();
                let mut out = vec![Verdict::Drop(DropReason::Malformed); pkts.len()];
                let mut h = hdrs.clone();
                let now = locked.now;
                locked.dp.process_batch_offload(&mut bufs, HEADROOM, &lens, &mut h, now, &mut out);
                (outputs(&bufs, &out), h)
            };
            let (got, n) = fast.burst(&pkts, Some(&mut hdrs));
            by_fast += n;
            prop_assert_eq!(&got, &want.0);
            prop_assert_eq!(&hdrs, &want.1);
        }
        fast.flush();
        prop_assert_eq!(comparable(locked.dp.stats()), comparable(fast.rig.dp.stats()));
        prop_assert_eq!(fast.rig.dp.stats().fast_path as usize, by_fast);
        prop_assert_eq!(fast.rig.dp.stats().fast_path_orphaned, 0);
        prop_assert_eq!(
            one_way_view(&locked.dp, locked.now),
            one_way_view(&fast.rig.dp, fast.rig.now)
        );
    }
}

/// Modes `tunnel` and `dr`: a flow's packets go the fast way once it is established, encapsulated
/// (IPIP, GUE) or with the backend's MAC address as the locked path does it; a packet too big
/// for the tunnel takes the lock, which answers it; a partial checksum is completed first.
#[test]
fn tunnel_and_dr_flows_go_the_fast_way() {
    for (mode, link) in [(Mode::Tunnel, Link::Ip), (Mode::Dr, Link::Ethernet)] {
        let mut r = FastRig::on(one_way_spec(mode), 64, link);
        for (client, vip, is_tcp) in [
            (sa("192.0.2.2:40000"), sa("203.0.113.10:80"), true),
            (sa("[2001:db8:2::2]:40000"), sa("[2001:db8::10]:80"), true),
            (sa("192.0.2.4:40000"), sa("203.0.113.30:4000"), false),
        ] {
            let pkt = |fl: u8, data: &[u8]| {
                if is_tcp {
                    tcp(client, vip, fl, data)
                } else {
                    udp(client, vip, data)
                }
            };
            let (first, n) = r.burst(&[delivered(link, pkt(SYN, b""), false, false).0], None);
            assert_eq!(n, 0, "{mode:?} {vip}: a new flow takes the lock");
            // TCP: the handshake's ACK makes it established (one way: the balancer sees the
            // client's side only); UDP: its second datagram confirms it.
            let (_, n) = r.burst(&[delivered(link, pkt(ACK, b""), false, false).0], None);
            assert_eq!(n, 0, "{mode:?} {vip}: the plan is made under the lock");
            let data: Vec<(Vec<u8>, VnetHdr)> = (0..4)
                .map(|i| delivered(link, pkt(PSHACK, b"data"), i % 2 == 1, false))
                .collect();
            let (pkts, mut hdrs): (Vec<_>, Vec<_>) = data.into_iter().unzip();
            let (out, n) = r.burst(&pkts, Some(&mut hdrs));
            assert_eq!(n, 4, "{mode:?} {vip}: established packets go the fast way");
            let want_backend = &first[0].1;
            for ((v, o), inner) in out.iter().zip(&pkts) {
                assert!(matches!(v, Verdict::Forward { .. }), "{v:?}");
                match mode {
                    Mode::Dr => {
                        assert_eq!(o[..12], want_backend[..12], "the same MACs");
                        assert_eq!(&o[12..], &inner[12..], "the IP packet untouched");
                    }
                    _ => {
                        // The backend's address outside, the packet (its checksum complete)
                        // inside.
                        let outer = parse(o, Link::Ip).unwrap();
                        let was = parse(want_backend, Link::Ip).unwrap();
                        assert_eq!(outer.key.dst(), was.key.dst());
                        assert_eq!(outer.proto, was.proto);
                        let plain = pkt(PSHACK, b"data");
                        assert!(o.ends_with(&plain), "{mode:?} {vip}: the inner packet");
                        let ip = if vip.is_ipv4() { 20 } else { 40 };
                        let gue = if is_tcp { 0 } else { 12 };
                        assert_eq!(o.len(), inner.len() + ip + gue);
                    }
                }
            }
            assert!(hdrs.iter().all(|h| mode == Mode::Dr || *h == VnetHdr::NONE));
            // Too big for the tunnel once encapsulated: through the lock, answered there.
            let (big, n) = r.burst(
                &[delivered(link, pkt(PSHACK, &[7; 1_390]), false, false).0],
                None,
            );
            if mode == Mode::Tunnel {
                assert_eq!(n, 0);
                assert!(matches!(big[0].0, Verdict::Reply { .. }), "{:?}", big[0].0);
            } else {
                assert_eq!(n, 1);
            }
        }
        r.flush();
        let s = r.rig.dp.stats();
        assert_eq!(
            s.fast_path,
            if mode == Mode::Dr { 15 } else { 12 },
            "{mode:?}"
        );
        assert_eq!(s.fast_path_orphaned, 0);
        if mode == Mode::Tunnel {
            assert_eq!(s.csum_completed, 2, "the IPv4 TCP flow's partial checksums");
        }
    }
}

/// What the fast path forwarded is handed back oldest first: a flow whose packets went by plan
/// before the clock moved keeps its own last-seen time, although another flow's packets went
/// by plan later and were handed back at the same lock (the table's clock never goes back, so
/// the other order dated the first flow by the second's time; found by the tunnel / DR
/// property test).
#[test]
fn handed_back_flows_keep_their_own_last_seen_times() {
    let mut r = FastRig::new(fast_spec(), 64);
    let vip = sa("203.0.113.30:4000");
    let (a, b) = (sa("192.0.2.4:40000"), sa("192.0.2.4:40001"));
    // Two datagrams each: the second confirms the flow and leaves its plan.
    for c in [a, b] {
        for _ in 0..2 {
            assert_eq!(r.burst(&[udp(c, vip, b"q")], None).1, 0);
        }
    }
    let t0 = r.rig.now;
    assert_eq!(r.burst(&[udp(a, vip, b"q")], None).1, 1);
    r.rig.now += lb_core::Duration::from_millis(10);
    assert_eq!(r.burst(&[udp(b, vip, b"q")], None).1, 1);
    r.flush();
    let now = r.rig.now;
    let seen = |c: SocketAddr| {
        let k = FlowKey::new(c.ip(), c.port(), vip.ip(), vip.port(), IpProto::Udp).unwrap();
        r.rig.dp.ct4.get(&k, now).unwrap().last_seen
    };
    assert_eq!(seen(a), t0);
    assert_eq!(seen(b), now);
}

/// More flows than places, each back only after the others: the plans pay nothing (each is
/// pushed out before its flow's next packet), so once the slack is spent only one locked
/// packet in `ADMIT_SAMPLE` leaves one; a flow that then comes back often gets a place within
/// a few packets, and the plans pay again.
#[test]
fn plans_are_sampled_while_they_do_not_pay() {
    let mut r = FastRig::new(fast_spec(), 4);
    let mut locked = Rig::new(fast_spec(), Link::Ip);
    let vip = sa("203.0.113.10:80");
    let flows: Vec<SocketAddr> = (0..256)
        .map(|i| SocketAddr::new("192.0.2.9".parse().unwrap(), 20_000 + i))
        .collect();
    for &c in &flows {
        open_tcp(&mut r, &mut locked, c, vip);
    }
    let made = |r: &FastRig| r.rig.dp.stats().fast_path_plans;
    let (plans0, mut sent, mut by_plan) = (made(&r), 0u64, 0u64);
    for _ in 0..8 {
        for &c in &flows {
            by_plan += r.burst(&[tcp(c, vip, ACK, b"")], None).1 as u64;
            sent += 1;
        }
    }
    let plans = made(&r) - plans0;
    assert!(by_plan < sent / 20, "{by_plan} of {sent} by plan");
    assert!(
        plans < sent / 8,
        "{plans} plans made for {sent} packets (all would be {sent})"
    );
    // One flow alone: within a few dozen packets it has a plan (and then pays for the
    // plans made before).
    let c = flows[7];
    let mut first = None;
    for i in 0..256 {
        if r.burst(&[tcp(c, vip, ACK, b"")], None).1 == 1 {
            first = first.or(Some(i));
        }
    }
    assert!(
        first.is_some_and(|i| i < 48),
        "the busy flow's first packet by plan: {first:?}"
    );
    // The plans pay again: a flow that comes back gets one at once.
    let (d, e) = (flows[100], flows[200]);
    r.burst(&[tcp(d, vip, ACK, b"")], None);
    r.burst(&[tcp(e, vip, ACK, b"")], None);
    assert_eq!(r.burst(&[tcp(d, vip, ACK, b"")], None).1, 1);
}
