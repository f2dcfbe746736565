//! Live load fed by traffic: connection counts from TCP states and removals, latency from
//! handshakes and responses, admission, outlier ejection, swaps, explanations.

use proptest::prelude::*;

use super::*;

const RST: u8 = 0x04;
const PSH_ACK: u8 = 0x18;
const FIN_ACK: u8 = 0x11;

const VIP: &str = "203.0.113.10:80";

fn client(port: u16) -> SocketAddr {
    SocketAddr::new("192.0.2.2".parse().unwrap(), port)
}

fn rig(sched: &str, tune: impl FnOnce(&mut DataplaneSpec)) -> Rig {
    let mut spec = nat_spec(VIP, Proto::Tcp, &B3);
    spec.services[0].scheduler = sched.parse().unwrap();
    tune(&mut spec);
    Rig::new(spec, Link::Ip)
}

impl Rig {
    /// A client segment; returns the backend it went to (`None`: dropped) and what went out.
    fn client_seg(&mut self, port: u16, flags: u8, data: &[u8]) -> Option<(SocketAddr, Vec<u8>)> {
        let (v, out) = self.run(&tcp(client(port), sa(VIP), flags, data));
        matches!(v, Verdict::Forward { .. }).then(|| {
            let p = parse(&out, Link::Ip).unwrap();
            (backend_of(&p), out)
        })
    }

    /// The backend's answer to `out` (a packet the balancer sent it) with `flags`.
    fn backend_seg(&mut self, out: &[u8], flags: u8, data: &[u8]) -> Verdict {
        let p = parse(out, Link::Ip).unwrap();
        let src = SocketAddr::new(p.key.dst(), p.key.dst_port());
        let dst = SocketAddr::new(p.key.src(), p.key.src_port());
        self.run(&tcp(src, dst, flags, data)).0
    }

    /// A full handshake from `port`; returns the backend and the SYN as the backend got it.
    fn connect(&mut self, port: u16) -> (SocketAddr, Vec<u8>) {
        let (b, out) = self.client_seg(port, SYN, b"").expect("SYN forwarded");
        assert!(matches!(
            self.backend_seg(&out, SYNACK, b""),
            Verdict::Forward { .. }
        ));
        self.client_seg(port, ACK, b"").expect("ACK forwarded");
        (b, out)
    }

    fn id(&self, b: SocketAddr) -> BackendId {
        self.cp.backend_id(sa(VIP), Proto::Tcp, b).unwrap()
    }

    fn load(&self, b: SocketAddr) -> BackendLoad {
        self.dp.backend_load(self.id(b), self.now).unwrap()
    }

    fn conns(&self) -> (u32, u32) {
        B3.iter().fold((0, 0), |(a, i), b| {
            let l = self.load(sa(b));
            (a + l.active_conns, i + l.inactive_conns)
        })
    }

    fn later(&mut self, ms: u64) {
        self.now += lb_core::Duration::from_millis(ms);
    }
}

#[test]
fn counts_follow_tcp_states_and_removals() {
    let mut r = rig("wlc", |s| {
        s.timeouts.tcp_time_wait = lb_core::Duration::from_secs(2);
        s.timeouts.tcp_close = lb_core::Duration::from_secs(2);
    });
    let (b, out) = r.client_seg(1000, SYN, b"").unwrap();
    assert_eq!(
        r.load(b).inactive_conns,
        1,
        "a SYN opens an inactive connection"
    );
    assert_eq!(r.load(b).active_conns, 0);
    r.backend_seg(&out, SYNACK, b"");
    r.client_seg(1000, ACK, b"").unwrap();
    assert_eq!((r.load(b).active_conns, r.load(b).inactive_conns), (1, 0));
    // FIN from the client: closing, inactive.
    r.client_seg(1000, FIN_ACK, b"").unwrap();
    assert_eq!((r.load(b).active_conns, r.load(b).inactive_conns), (0, 1));
    r.backend_seg(&out, FIN_ACK, b"");
    r.client_seg(1000, ACK, b"").unwrap();
    assert_eq!(r.conns(), (0, 1));
    // The entry times out: the removal closes the connection.
    r.later(3_000);
    r.dp.housekeeping(r.now, 1024);
    assert_eq!(r.conns(), (0, 0));
}

#[test]
fn an_idle_flow_leaves_its_backend_count_by_its_deadline() {
    // Established flows time out after 10 s. `b` is seen again at 1 s and then idle (due at
    // 11 s); `c`, opened at 5 s, is kept busy; `d`, opened at 9.9 s, is idle (due at 19.9 s).
    // At 10.5 s housekeeping removes `a` and moves the seen `b` and `c` behind `d` in their
    // list, where `b` would wait for `d`'s deadline; the sweep removes it at the next call.
    let mut r = rig("wlc", |s| {
        s.timeouts.tcp_established = lb_core::Duration::from_secs(10);
        s.conntrack_capacity = 1024;
    });
    r.connect(1);
    r.connect(2);
    r.later(1_000);
    r.client_seg(2, ACK, b"").expect("b seen again");
    r.later(4_000);
    r.connect(3);
    r.later(2_000);
    r.client_seg(3, ACK, b"").expect("c busy");
    r.later(2_000);
    r.client_seg(3, ACK, b"").expect("c busy");
    r.later(900);
    r.connect(4);
    assert_eq!(r.conns(), (4, 0));
    r.later(600);
    r.dp.housekeeping(r.now, 1024);
    assert_eq!(r.conns(), (3, 0), "a left at 10.5 s");
    r.later(1_000);
    r.dp.housekeeping(r.now, 1024);
    assert_eq!(r.conns(), (2, 0), "b left at 11.5 s, not at d's 19.9 s");
    assert_eq!(r.dp.table_stats().swept, 1, "the sweep removed b");
}

#[test]
fn a_reset_closes_at_once_and_reuse_counts_a_new_session() {
    let mut r = rig("wlc", |_| {});
    let (b, out) = r.connect(2000);
    assert_eq!(r.load(b).active_conns, 1);
    r.backend_seg(&out, RST, b"");
    assert_eq!(
        r.conns(),
        (0, 1),
        "a reset flow is inactive until it leaves"
    );
    // A new SYN on the same 4-tuple: the closed connection ends, a new one is scheduled
    // (WLC: the least loaded backend, which `b`, holding nothing now, may well be).
    let (b2, _) = r.client_seg(2000, SYN, b"").unwrap();
    assert_eq!(r.conns(), (0, 1));
    assert_eq!(r.load(b2).inactive_conns, 1);
    assert_eq!(r.dp.table_stats().entries, 1);
    let _ = b;
}

#[test]
fn counts_survive_table_swaps_and_steer_wlc() {
    let mut r = rig("wlc", |_| {});
    // Ten connections, then a health flap of another backend and a reload.
    let mut held = HashMap::new();
    let mut flows = Vec::new();
    for p in 0..9 {
        let (b, out) = r.connect(3000 + p);
        *held.entry(b).or_insert(0u32) += 1;
        flows.push((b, out));
    }
    let before = r.conns();
    assert_eq!(before, (9, 0));
    let other = r.id(sa(B3[2]));
    assert!(r.cp.set_healthy(other, false));
    r.rebuild();
    assert!(r.cp.set_healthy(other, true));
    r.rebuild();
    let spec = r.cp.spec().clone();
    r.cp.apply(spec).unwrap();
    r.rebuild();
    assert_eq!(r.conns(), before, "swaps keep the counts");
    for (b, n) in &held {
        assert_eq!(r.load(*b).active_conns, *n);
    }
    // WLC spread them 3 / 3 / 3; after one backend's connections end, new ones go there.
    assert!(held.values().all(|n| *n == 3), "{held:?}");
    let light = sa(B3[0]);
    for (b, out) in &flows {
        if *b == light {
            r.backend_seg(out, RST, b"");
        }
    }
    r.later(11_000);
    r.dp.housekeeping(r.now, 1024);
    assert_eq!(r.load(light).active_conns + r.load(light).inactive_conns, 0);
    for p in 0..3 {
        let (b, _) = r.connect(5000 + p);
        assert_eq!(
            b, light,
            "WLC sends new connections to the least loaded backend"
        );
    }
}

#[test]
fn admission_thresholds_drop_and_recover() {
    let mut r = rig("wlc", |s| {
        s.services[0].upper_conns = 2;
        s.services[0].lower_conns = 1;
        s.timeouts.tcp_close = lb_core::Duration::from_secs(1);
    });
    let mut flows = Vec::new();
    for p in 0..6 {
        flows.push(r.connect(6000 + p));
    }
    // Every backend is at its upper threshold: the 7th SYN is dropped as overloaded.
    assert!(r.client_seg(6100, SYN, b"").is_none());
    assert_eq!(r.dp.stats().drops_for(DropReason::Overloaded), 1);
    assert!(B3.iter().all(|b| r.load(sa(b)).overloaded));
    // Two connections of one backend reset and leave: below the lower threshold again.
    let victim = flows[0].0;
    for (b, out) in flows.iter().filter(|(b, _)| *b == victim) {
        let _ = b;
        r.backend_seg(out, RST, b"");
    }
    r.later(2_000);
    r.dp.housekeeping(r.now, 1024);
    assert!(!r.load(victim).overloaded);
    let (b, _) = r.client_seg(6101, SYN, b"").expect("accepted again");
    assert_eq!(b, victim);
}

#[test]
fn maglev_respects_admission_too() {
    let mut r = rig("maglev", |s| {
        s.services[0].upper_conns = 1;
        s.services[0].lower_conns = 0;
    });
    for p in 0..3 {
        r.connect(6500 + p);
    }
    // Whatever the hash prefers, the third backend is the only one left; then none.
    assert_eq!(r.conns(), (3, 0));
    assert!(B3.iter().all(|b| r.load(sa(b)).active_conns == 1));
    assert!(r.client_seg(6600, SYN, b"").is_none());
    assert_eq!(r.dp.stats().drops_for(DropReason::Overloaded), 1);
}

#[test]
fn peak_ewma_learns_response_times_and_avoids_the_slow_backend() {
    let mut r = rig("peak-ewma", |_| {});
    let slow = sa(B3[1]);
    // Rounds of three concurrent requests: each connection is established before the next
    // is placed (so it counts as active), then every backend answers, `slow` 20 ms late and the
    // others after 1 ms, and the connections close.
    let mut to_slow = 0;
    let mut port = 7000;
    for _ in 0..20 {
        let mut round = Vec::new();
        for _ in 0..3 {
            let (b, out) = r.client_seg(port, SYN, b"").unwrap();
            r.later(1);
            r.backend_seg(&out, SYNACK, b"");
            r.client_seg(port, ACK, b"").unwrap();
            r.client_seg(port, PSH_ACK, b"GET / HTTP/1.0\r\n\r\n")
                .unwrap();
            round.push((b, out));
            to_slow += usize::from(b == slow);
            port += 1;
        }
        r.later(1);
        for (b, out) in round.iter().filter(|(b, _)| *b != slow) {
            let _ = b;
            r.backend_seg(out, PSH_ACK, b"HTTP/1.0 200 OK\r\n\r\n");
        }
        r.later(19);
        for (b, out) in round.iter().filter(|(b, _)| *b == slow) {
            let _ = b;
            r.backend_seg(out, PSH_ACK, b"HTTP/1.0 200 OK\r\n\r\n");
        }
        for (_, out) in &round {
            r.backend_seg(out, RST, b"");
        }
    }
    let ms = r
        .load(slow)
        .observed
        .response
        .millis()
        .expect("the slow backend was timed");
    assert!((19.0..=23.0).contains(&ms), "response EWMA {ms} ms");
    let fast = r.load(sa(B3[0])).observed.response.millis().unwrap();
    assert!(fast < 2.5, "fast response EWMA {fast} ms");
    let hs = r.load(sa(B3[0])).observed.handshake.millis().unwrap();
    assert!((0.9..=1.1).contains(&hs), "handshake EWMA {hs} ms");
    // With rr it would get 20 of 60.
    assert!(
        to_slow <= 6,
        "peak-EWMA sent {to_slow} of 60 to the slow backend"
    );
}

#[test]
fn outlier_ejection_from_resets_and_unanswered_syns() {
    let mut r = rig("rr", |s| {
        s.services[0].outlier = Some(OutlierSpec {
            detector: lb_health::OutlierConfig {
                consecutive_failures: 3,
                failure_rate: None,
                max_ejection_percent: 50,
                base_ejection: lb_core::Duration::from_secs(5),
                ..lb_health::OutlierConfig::default()
            },
            syn_timeout: lb_core::Duration::from_millis(500),
        });
    });
    let bad = sa(B3[2]);
    let mut port = 8000;
    // `bad` resets every SYN; the others answer.
    while !r.load(bad).observed.ejected && port < 8100 {
        let (b, out) = r.client_seg(port, SYN, b"").unwrap();
        let flags = if b == bad { RST } else { SYNACK };
        r.backend_seg(&out, flags, b"");
        port += 1;
    }
    let l = r.load(bad);
    assert!(l.observed.ejected && l.observed.ejections == 1, "{l:?}");
    assert_eq!(l.observed.failures, 3);
    assert!(matches!(r.dp.poll_event(), Some(LoadEvent::Ejected { .. })));
    for p in 0..20 {
        let (b, _) = r.client_seg(8200 + p, SYN, b"").unwrap();
        assert_ne!(b, bad, "an ejected backend gets no new flow");
    }
    // Back after the ejection time.
    r.later(5_100);
    r.dp.housekeeping(r.now, 1024);
    assert!(!r.load(bad).observed.ejected);
    assert!(matches!(
        r.dp.poll_event(),
        Some(LoadEvent::Returned { .. })
    ));
    let back = (0..6).any(|p| r.client_seg(8300 + p, SYN, b"").unwrap().0 == bad);
    assert!(back, "a returned backend takes flows again");
    // SYNs nobody answers are failures too (after syn_timeout, found by housekeeping).
    let silent = sa(B3[0]);
    let mut unanswered = 0;
    for p in 0..30 {
        if let Some((b, _)) = r.client_seg(8400 + p, SYN, b"") {
            unanswered += usize::from(b == silent);
        }
    }
    assert!(unanswered >= 3);
    r.later(600);
    for _ in 0..8 {
        r.dp.housekeeping(r.now, 1024);
    }
    assert!(r.load(silent).observed.failures >= 3);
    // A backend that accepts and resets before answering fails too; one that answers does not.
    let mut r = rig("rr", |s| {
        s.services[0].outlier = Some(OutlierSpec {
            detector: lb_health::OutlierConfig {
                consecutive_failures: 2,
                failure_rate: None,
                max_ejection_percent: 50,
                ..lb_health::OutlierConfig::default()
            },
            syn_timeout: lb_core::Duration::from_secs(5),
        });
    });
    let rude = sa(B3[1]);
    for p in 0..9 {
        let (b, out) = r.connect(8600 + p);
        r.client_seg(8600 + p, PSH_ACK, b"hello").unwrap();
        if b == rude {
            r.backend_seg(&out, RST, b"");
        } else {
            r.backend_seg(&out, PSH_ACK, b"hi");
        }
    }
    assert!(r.load(rude).observed.ejected);
    assert!(B3
        .iter()
        .filter(|b| sa(b) != rude)
        .all(|b| !r.load(sa(b)).observed.ejected));
}

#[test]
fn explain_names_the_backend_of_a_flow_and_of_the_next_syn() {
    for sched in ["rr", "wlc", "maglev", "peak-ewma", "p2c"] {
        let mut r = rig(sched, |_| {});
        let (b, _) = r.connect(9000);
        let key = |port| FlowKey::new(client(port).ip(), port, sa(VIP).ip(), 80, IpProto::Tcp);
        let e = r.dp.explain(&key(9000).unwrap(), r.now);
        assert_eq!(e.decision, Decision::Flow(r.id(b)));
        assert_eq!(e.flow.unwrap().backend, r.id(b));
        assert_eq!(e.backends.len(), 3);
        for p in 0..8 {
            let port = 9100 + p;
            let e = r.dp.explain(&key(port).unwrap(), r.now);
            let Decision::Scheduler(want) = e.decision else {
                panic!("{sched}: {:?}", e.decision)
            };
            let stats_before = r.dp.stats().clone();
            let (got, _) = r.connect(port);
            assert_eq!(r.id(got), want, "{sched}: explain must not change state");
            assert!(r.dp.stats().forwarded > stats_before.forwarded);
        }
    }
    let r = rig("rr", |_| {});
    let off = FlowKey::new(
        client(1).ip(),
        1,
        "203.0.113.99".parse().unwrap(),
        80,
        IpProto::Tcp,
    );
    assert_eq!(
        r.dp.explain(&off.unwrap(), r.now).decision,
        Decision::NoService
    );
}

/// One step of the random traffic of `counts_match_the_table`.
#[derive(Debug, Clone)]
enum Step {
    Client { flow: u8, flags: u8 },
    Backend { flow: u8, flags: u8 },
    Wait { ms: u16 },
    Health { backend: u8, up: bool },
}

fn step() -> impl Strategy<Value = Step> {
    let flags = prop::sample::select(vec![SYN, SYNACK, ACK, FIN_ACK, RST, PSH_ACK]);
    prop_oneof![
        (0u8..12, flags.clone()).prop_map(|(flow, flags)| Step::Client { flow, flags }),
        (0u8..12, flags).prop_map(|(flow, flags)| Step::Backend { flow, flags }),
        (0u16..5000).prop_map(|ms| Step::Wait { ms }),
        (0u8..3, any::<bool>()).prop_map(|(backend, up)| Step::Health { backend, up }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Whatever the traffic, each backend's active / inactive counts are exactly what the flow
    /// table holds (IPVS semantics), across expiry, resets, reuse and table swaps.
    #[test]
    fn counts_match_the_table(steps in prop::collection::vec(step(), 1..120), sched in 0usize..3) {
        let mut r = rig(["wlc", "maglev", "sed"][sched], |s| {
            s.timeouts.tcp_close = lb_core::Duration::from_secs(1);
            s.timeouts.tcp_time_wait = lb_core::Duration::from_secs(2);
            s.timeouts.tcp_syn_recv = lb_core::Duration::from_secs(3);
            s.timeouts.tcp_none = lb_core::Duration::from_secs(1);
        });
        let mut sent: HashMap<u8, Vec<u8>> = HashMap::new();
        for s in steps {
            match s {
                Step::Client { flow, flags } => {
                    if let Some((_, out)) = r.client_seg(10_000 + u16::from(flow), flags, b"x") {
                        sent.entry(flow).or_insert(out);
                    }
                }
                Step::Backend { flow, flags } => {
                    if let Some(out) = sent.get(&flow).cloned() {
                        let _ = r.backend_seg(&out, flags, b"");
                    }
                }
                Step::Wait { ms } => {
                    r.later(u64::from(ms));
                    r.dp.housekeeping(r.now, 1024);
                }
                Step::Health { backend, up } => {
                    let id = r.id(sa(B3[usize::from(backend)]));
                    if r.cp.set_healthy(id, up) {
                        r.rebuild();
                    }
                }
            }
            // Reclaim what timed out, so that the table holds exactly its live entries.
            r.dp.housekeeping(r.now, 4096);
            let mut want: HashMap<BackendId, (u32, u32)> = HashMap::new();
            for e in r.dp.ct4.entries(r.now) {
                let c = want.entry(e.backend).or_default();
                if e.state.is_active() { c.0 += 1 } else { c.1 += 1 }
            }
            prop_assert_eq!(r.dp.ct4.len(), r.dp.ct4.entries(r.now).len());
            for b in B3 {
                let id = r.id(sa(b));
                let l = r.load(sa(b));
                let got = (l.active_conns, l.inactive_conns);
                let want = want.get(&id).copied().unwrap_or_default();
                prop_assert_eq!(got, want, "{}", b);
            }
        }
        r.later(3_600_000);
        for _ in 0..4 {
            r.dp.housekeeping(r.now, 4096);
        }
        prop_assert_eq!(r.dp.ct4.len(), 0);
        prop_assert_eq!(r.conns(), (0, 0));
    }
}

#[test]
fn the_removal_log_reports_what_left_and_drops_the_oldest_unread() {
    let mut r = rig("wlc", |s| {
        s.timeouts.tcp_close = lb_core::Duration::from_secs(1)
    });
    let spec = r.cp.spec().clone();
    let key = HashKey::from_bytes([9; 16]);
    let mut opts = DataplaneOptions::new(key);
    opts.removal_log = 2;
    r.dp = Dataplane::new(&spec, r.cp.build().unwrap(), opts).unwrap();
    let mut outs = Vec::new();
    for p in 0..3 {
        let (b, out) = r.connect(11_000 + p);
        r.backend_seg(&out, RST, b"");
        outs.push(b);
    }
    r.later(1_500);
    r.dp.housekeeping(r.now, 1024);
    // Three left; the log keeps the last two, the first is counted as unread.
    assert_eq!(r.dp.stats().removals_unread, 1);
    let got: Vec<Removal> = std::iter::from_fn(|| r.dp.poll_removal()).collect();
    assert_eq!(got.len(), 2);
    for (x, port) in got.iter().zip([11_001u16, 11_002]) {
        assert_eq!(x.key.src_port(), port);
        assert_eq!(x.reason, lb_conntrack::RemovalReason::Closed);
        assert_eq!(x.backend, r.id(outs[usize::from(port - 11_000)]));
        assert_eq!(x.packets, 4, "SYN, SYN-ACK, ACK, RST");
    }
    // The same stream fed the session statistics and the live load.
    assert_eq!(r.dp.table_stats().sessions.packets.count(), 3);
    assert_eq!(r.conns(), (0, 0));
}

#[test]
fn slow_start_ramps_a_recovered_backend() {
    let share_of_recovered = |slow: bool| {
        let mut r = rig("wlc", |s| {
            if slow {
                s.services[0].slow_start = lb_core::Duration::from_secs(10);
            }
        });
        r.later(60_000); // past any ramp of the start
        let b3 = r.id(sa(B3[2]));
        assert!(r.cp.set_healthy(b3, false));
        r.rebuild();
        r.later(1_000);
        assert!(r.cp.set_healthy(b3, true));
        r.rebuild();
        (0..30)
            .filter(|p| r.connect(12_000 + p).0 == sa(B3[2]))
            .count()
    };
    let (ramped, plain) = (share_of_recovered(true), share_of_recovered(false));
    assert!(plain >= 9, "without slow start: {plain} of 30");
    assert!(
        ramped <= 3,
        "with slow start: {ramped} of 30 (10 % weight at first)"
    );
}

#[test]
fn panic_threshold_ignores_health_when_too_few_are_healthy() {
    let spread = |panic: u8| {
        let mut r = rig("rr", |s| s.services[0].panic_threshold_percent = panic);
        for b in &B3[..2] {
            let id = r.id(sa(b));
            assert!(r.cp.set_healthy(id, false));
        }
        r.rebuild();
        let mut seen = std::collections::HashSet::new();
        for p in 0..9 {
            seen.insert(r.client_seg(13_000 + p, SYN, b"").unwrap().0);
        }
        seen.len()
    };
    assert_eq!(spread(0), 1, "no panic: only the healthy backend");
    assert_eq!(
        spread(50),
        3,
        "1 of 3 healthy is under 50 %: health is ignored"
    );
}

/// Regression (found by the dataplane fuzz target): in a burst, a flow evicted by one packet
/// must reach the live load before the next packet is scheduled, as with `process`.
#[test]
fn bursts_see_evictions_before_scheduling_the_next_packet() {
    let spec = |_: ()| {
        let mut s = nat_spec("203.0.113.10:53", Proto::Udp, &B3);
        s.services[0].scheduler = "wlc".parse().unwrap();
        s.conntrack_capacity = 16;
        s
    };
    let mut one = Rig::new(spec(()), Link::Ip);
    let mut burst = Rig::new(spec(()), Link::Ip);
    let pkts: Vec<Vec<u8>> = (0..60)
        .map(|i| udp(client(20_000 + i), sa("203.0.113.10:53"), b"q"))
        .collect();
    let singles: Vec<Vec<u8>> = pkts.iter().map(|p| one.run(p).1).collect();
    let mut batched = Vec::new();
    for pair in pkts.chunks(2) {
        let mut bufs: Vec<Vec<u8>> = pair
            .iter()
            .map(|p| {
                let mut b = vec![0u8; 2048];
                b[HEADROOM..HEADROOM + p.len()].copy_from_slice(p);
                b
            })
            .collect();
        let lens: Vec<usize> = pair.iter().map(Vec::len).collect();
        let mut out = vec![Verdict::Drop(DropReason::Malformed); pair.len()];
        burst
            .dp
            .process_batch(&mut bufs, HEADROOM, &lens, burst.now, &mut out);
        for (b, v) in bufs.iter().zip(out) {
            batched.push(match v {
                Verdict::Forward { start, len } => b[start..start + len].to_vec(),
                _ => Vec::new(),
            });
        }
    }
    assert_eq!(singles, batched);
    assert!(one.dp.table_stats().evicted_half_open + one.dp.table_stats().evicted_lru > 0);
}
