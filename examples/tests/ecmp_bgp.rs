//! Active-active balancing, the BGP side: several balancers announce one VIP to a router
//! (BIRD 2, ECMP, BFD) from their own BIRD, switched over its control socket by
//! `lb_examples::bgp::Bird` (topology: `ha_lab::ecmp`). Root only; each test takes turns with
//! the others of this file (they measure times on a 2-core machine).
//!
//! - `announce_and_withdraw`: the router installs a 3-way multipath route once the three
//!   BIRDs announce; `Bird::disable` on one removes its next hop and `enable` brings it back
//!   (both timed); the flows the router's hash moves between the *surviving* balancers at each
//!   change are counted with `ip route get` over 2000 source ports.
//! - `dead_balancer_bfd_and_hold_timer`: a balancer isolated (switch ports down, BIRD still
//!   running): time until the router's route loses it with BFD (100 ms × 3) and, in the same
//!   run, for a session without BFD (hold time 3 s); and a `kill -9` of BIRD alone (links up).
//! - `traffic_spreads`: 30 short connections from the client land on more than one balancer
//!   (nftables counters on each `front0`), all answered; 30 bare SYNs from a raw socket land
//!   exactly where `ip route get` says the 5-tuple hash (`fib_multipath_hash_policy = 1`)
//!   puts them; after a withdrawal no connection reaches the withdrawn balancer.
//! - `tun_balancer_exit_withdraws`: with the VIP anchored on `lb0` (`via "lb0"`), three
//!   tun-balancers in mode `nat` behind the ECMP route serve the client; `kill -9` of one makes
//!   BIRD withdraw its route by itself (the device is gone), with no control-socket call.
#![allow(missing_docs)]

mod common;
mod ha_lab;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::{need_root, need_tool};
use ha_lab::ecmp::{
    balancer_config, balancer_role, ms, Anchor, EcmpLab, EcmpOpts, UPLINK_PROTOCOL, VIP_PROTOCOL,
};

/// The tests take turns: each measures convergence times.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn ready() -> bool {
    need_root() && need_tool("bird") && need_tool("nft") && need_tool("curl")
}

/// Builds the lab, starts every BIRD, and waits for the router's route to name every balancer;
/// returns the lab and the time from the first BIRD's start to that route.
fn lab_up(test: &str, opts: EcmpOpts) -> (EcmpLab, Duration) {
    let mut e = EcmpLab::new(test, opts);
    e.forward_kernel_all();
    let t = Instant::now();
    e.start_birds();
    let all = e.nodes();
    let up = e.wait_next_hops(&all, t, Duration::from_secs(20));
    assert!(
        up.is_some(),
        "the router never had all {} next hops:\n{}\n{}",
        all.len(),
        e.bird_report(),
        e.log("bird-router")
    );
    (e, up.unwrap_or_default())
}

fn without(all: &BTreeSet<u8>, n: u8) -> BTreeSet<u8> {
    all.iter().copied().filter(|&m| m != n).collect()
}

/// Of the flows that `before` placed on a balancer other than `gone`, the share `after` places
/// elsewhere (flows moved between surviving balancers).
fn moved_share(before: &[Option<u8>], after: &[Option<u8>], gone: u8) -> f64 {
    let mut kept = 0usize;
    let mut moved = 0usize;
    for (b, a) in before.iter().zip(after) {
        if *b != Some(gone) {
            kept += 1;
            if a != b {
                moved += 1;
            }
        }
    }
    moved as f64 / kept.max(1) as f64
}

fn sorted<K: Ord + Clone, V: Clone>(m: &HashMap<K, V>) -> Vec<(K, V)> {
    let mut v: Vec<_> = m.iter().map(|(k, x)| (k.clone(), x.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn shares(choices: &[Option<u8>]) -> String {
    let mut m: HashMap<Option<u8>, usize> = HashMap::new();
    for c in choices {
        *m.entry(*c).or_default() += 1;
    }
    let mut v: Vec<_> = m.into_iter().collect();
    v.sort();
    v.iter()
        .map(|(n, k)| match n {
            Some(n) => format!("l{n} {:.0}%", 100.0 * *k as f64 / choices.len() as f64),
            None => format!("none {k}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn announce_and_withdraw() {
    if !ready() {
        return;
    }
    let _turn = serial();
    let (mut e, converged) = lab_up("ecmpa", EcmpOpts::default());
    let all = e.nodes();
    e.monitor_routes();
    println!("3 next hops {} after the BIRDs started", ms(converged));

    let sports: Vec<u16> = (20_000..22_000).collect();
    let base = e.route_choices(&sports);
    assert!(
        base.iter().all(|c| c.is_some()),
        "ip route get found no next hop for some flows"
    );
    println!("2000 flows over 3 next hops: {}", shares(&base));

    for n in all.clone() {
        let role = balancer_role(n);
        let mut bird = e.bird(&role).expect("control socket");
        assert!(bird.protocol_up(VIP_PROTOCOL).expect("show vip"));

        let t = Instant::now();
        bird.disable(VIP_PROTOCOL).expect("disable");
        let gone = e.wait_next_hops(&without(&all, n), t, Duration::from_secs(5));
        assert!(
            gone.is_some(),
            "{role}'s next hop stayed after disable:\n{}",
            e.bird_report()
        );
        // Idempotent, and the session stays up: a withdrawal is an UPDATE, not a teardown.
        bird.disable(VIP_PROTOCOL).expect("disable again");
        assert!(!bird.protocol_up(VIP_PROTOCOL).expect("show vip"));
        assert!(bird.protocol_up(UPLINK_PROTOCOL).expect("show up0"));
        assert!(e.established().contains(&n), "{}", e.bird_report());
        let during = e.route_choices(&sports);
        assert!(during.iter().all(|c| c.is_some() && *c != Some(n)));

        let t = Instant::now();
        bird.enable(VIP_PROTOCOL).expect("enable");
        let back = e.wait_next_hops(&all, t, Duration::from_secs(5));
        assert!(
            back.is_some(),
            "{role}'s next hop did not return after enable:\n{}",
            e.bird_report()
        );
        bird.enable(VIP_PROTOCOL).expect("enable again");
        let after = e.route_choices(&sports);
        println!(
            "{role}: disable -> next hop gone in {}, enable -> back in {}; while withdrawn \
             {:.1}% of the other balancers' flows moved between them ({}); after the return \
             {} of 2000 flows differ from before",
            ms(gone.unwrap_or_default()),
            ms(back.unwrap_or_default()),
            100.0 * moved_share(&base, &during, n),
            shares(&during),
            base.iter().zip(&after).filter(|(a, b)| a != b).count()
        );
        let (gone, back) = (gone.unwrap_or_default(), back.unwrap_or_default());
        assert!(
            gone < Duration::from_secs(2),
            "withdrawal took {}",
            ms(gone)
        );
        assert!(
            back < Duration::from_secs(2),
            "announcement took {}",
            ms(back)
        );
    }

    // BIRD changes the multipath route in place: the VIP never lacks a route in between.
    let events = e.route_events();
    println!("router's route changes: {events:#?}");
    assert!(events.len() >= 6, "{events:?}");
    assert!(
        events.iter().all(|l| !l.contains("Deleted")),
        "the route was deleted during a change: {events:#?}"
    );

    // Errors come back as errors, with BIRD's message, and leave the connection usable.
    let mut bird = e.bird("l1").expect("control socket");
    let err = bird.enable("nosuch").expect_err("no such protocol");
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
    println!("BIRD error as io::Error: {err}");
    assert!(bird.protocol_up(VIP_PROTOCOL).expect("still usable"));
    assert!(
        bird.greeting().starts_with("BIRD 2."),
        "{}",
        bird.greeting()
    );
}

#[test]
fn dead_balancer_bfd_and_hold_timer() {
    if !ready() {
        return;
    }
    let _turn = serial();
    // l3's session runs without BFD: the hold timer (3 s, keepalives every 1 s) is all it has.
    let opts = EcmpOpts {
        without_bfd: vec![3],
        ..EcmpOpts::default()
    };
    let (e, _) = lab_up("ecmpb", opts);
    let mut e = e;
    let all = e.nodes();

    // Back to normal after each fault: the sessions re-establish (error wait 1-4 s).
    let heal = |e: &EcmpLab, n: u8| {
        e.reconnect(n);
        let t = Instant::now();
        let ok = e.wait_next_hops(&all, t, Duration::from_secs(20));
        assert!(
            ok.is_some(),
            "l{n} did not come back after reconnection:\n{}",
            e.bird_report()
        );
    };

    let mut bfd = Vec::new();
    for n in [1u8, 2, 1] {
        let t = e.isolate(n);
        let d = e.wait_next_hops(&without(&all, n), t, Duration::from_secs(10));
        let d = d.unwrap_or_else(|| panic!("l{n} isolated, still routed:\n{}", e.bird_report()));
        println!(
            "BFD 100 ms x 3: l{n} isolated -> next hop gone in {}",
            ms(d)
        );
        bfd.push(d);
        heal(&e, n);
    }

    let mut hold = Vec::new();
    for _ in 0..2 {
        let t = e.isolate(3);
        let d = e.wait_next_hops(&without(&all, 3), t, Duration::from_secs(10));
        let d = d.unwrap_or_else(|| panic!("l3 isolated, still routed:\n{}", e.bird_report()));
        println!(
            "no BFD, hold time 3 s: l3 isolated -> next hop gone in {}",
            ms(d)
        );
        hold.push(d);
        heal(&e, 3);
    }

    // BIRD killed, links up: its kernel closes the TCP session, the router sees it at once.
    let t = e.kill_bird(2);
    let d = e.wait_next_hops(&without(&all, 2), t, Duration::from_secs(10));
    let d = d.unwrap_or_else(|| panic!("l2's BIRD killed, still routed:\n{}", e.bird_report()));
    println!(
        "kill -9 of l2's BIRD (links up) -> next hop gone in {}",
        ms(d)
    );
    e.start_bird(2);
    let t = Instant::now();
    let back = e.wait_next_hops(&all, t, Duration::from_secs(20));
    assert!(back.is_some(), "l2's restarted BIRD: {}", e.bird_report());
    println!(
        "l2's BIRD restarted -> next hop back in {}",
        ms(back.unwrap_or_default())
    );

    let max = |v: &[Duration]| v.iter().max().copied().unwrap_or_default();
    println!(
        "summary: BFD (100 ms x 3) {:?} ms; hold timer (3 s) {:?} ms; kill -9 BIRD {} ms",
        bfd.iter().map(|d| d.as_millis()).collect::<Vec<_>>(),
        hold.iter().map(|d| d.as_millis()).collect::<Vec<_>>(),
        d.as_millis()
    );
    assert!(
        max(&bfd) < Duration::from_secs(1),
        "BFD took {}",
        ms(max(&bfd))
    );
    assert!(
        hold.iter().all(|d| *d > Duration::from_secs(1)),
        "without BFD the hold timer decides (2-3 s), not {hold:?}"
    );
    assert!(max(&hold) < Duration::from_secs(5), "{hold:?}");
    assert!(d < Duration::from_secs(1), "kill -9 of BIRD took {}", ms(d));
}

#[test]
fn traffic_spreads() {
    if !ready() || !need_tool("hping3") {
        return;
    }
    let _turn = serial();
    let (mut e, _) = lab_up("ecmpc", EcmpOpts::default());
    e.start_servers();
    e.count_syns();

    // Real connections: the router's choice follows the client socket's own flow hash.
    let answers = e
        .fetch(30)
        .unwrap_or_else(|err| panic!("fetch: {err}\n{}", e.bird_report()));
    assert_eq!(answers.len(), 30, "{answers:?}");
    let syns = e.syns();
    println!(
        "30 connections: SYNs per balancer {:?}; answering backends {:?}",
        sorted(&syns),
        sorted(&common::Lab::tally(&answers))
    );
    assert!(
        syns.values().sum::<u64>() >= 30,
        "SYNs seen by the balancers: {syns:?}"
    );
    assert!(
        syns.values().filter(|&&c| c > 0).count() > 1,
        "every connection went to one balancer: {syns:?}"
    );

    // Bare SYNs from a raw socket carry no flow hash: the router hashes their 5-tuple
    // (fib_multipath_hash_policy = 1), exactly as `ip route get` predicts for each port.
    let sports: Vec<u16> = (40_000..40_030).collect();
    let predicted = e.route_choices(&sports);
    let before = e.syns();
    e.lab
        .try_sh_timeout(
            e.ns("client"),
            &format!(
                "hping3 -q -S -p 80 -s {} -i u20000 -c 30 {}",
                sports[0],
                ha_lab::VIP4
            ),
            Duration::from_secs(20),
        )
        .or_else(|err| {
            if err.contains("packets transmitted") {
                Ok(err)
            } else {
                Err(err)
            }
        })
        .unwrap_or_else(|err| panic!("hping3: {err}"));
    let after = e.syns();
    let got: HashMap<u8, u64> = after.iter().map(|(n, c)| (*n, c - before[n])).collect();
    let mut want: HashMap<u8, u64> = e.nodes().iter().map(|&n| (n, 0)).collect();
    for c in predicted.iter().flatten() {
        *want.entry(*c).or_default() += 1;
    }
    println!(
        "30 raw SYNs, source ports {}..{}: per balancer {:?}, predicted by ip route get {:?}",
        sports[0],
        sports[29],
        sorted(&got),
        sorted(&want)
    );
    assert_eq!(
        got, want,
        "the 5-tuple hash did not place the SYNs as predicted"
    );
    assert!(got.values().filter(|&&c| c > 0).count() > 1, "{got:?}");

    // Withdrawn: nothing new reaches l1; the others serve everything.
    let t = Instant::now();
    e.withdraw(1);
    let gone = e.wait_next_hops(&without(&e.nodes(), 1), t, Duration::from_secs(5));
    assert!(gone.is_some(), "{}", e.bird_report());
    let before = e.syns();
    let answers = e.fetch(30).unwrap_or_else(|err| panic!("fetch: {err}"));
    assert_eq!(answers.len(), 30, "{answers:?}");
    let after = e.syns();
    let got: HashMap<u8, u64> = after.iter().map(|(n, c)| (*n, c - before[n])).collect();
    println!(
        "30 more connections with l1 withdrawn: SYNs per balancer {:?}",
        sorted(&got)
    );
    assert_eq!(got[&1], 0, "l1 got SYNs after its withdrawal");
    assert!(got.values().sum::<u64>() >= 30, "{got:?}");
}

#[test]
fn tun_balancer_exit_withdraws() {
    if !ready() {
        return;
    }
    let _turn = serial();
    let opts = EcmpOpts {
        anchor: Anchor::Device("lb0".to_owned()),
        ..EcmpOpts::default()
    };
    let mut e = EcmpLab::new("ecmpd", opts);
    e.start_servers();
    e.start_birds();
    let all = e.nodes();
    assert!(
        e.wait_established(&all, Duration::from_secs(20)),
        "{}",
        e.bird_report()
    );
    // Sessions up, every `vip` protocol enabled, but no lb0 yet: nothing announced.
    assert!(e.next_hops().is_empty(), "{}", e.bird_report());

    let backends = e.backends.clone();
    for n in all.clone() {
        e.start_balancer(n, &balancer_config(n, &backends));
    }
    e.count_syns();
    let t = Instant::now();
    let up = e.wait_next_hops(&all, t, Duration::from_secs(5));
    assert!(up.is_some(), "{}", e.bird_report());
    // Health checks (200 ms, rise 1) must pass before every connection is served.
    let served = e.lab.wait_for(Duration::from_secs(10), || {
        e.fetch(30).ok().filter(|a| a.len() == 30)
    });
    let answers = served.unwrap_or_else(|| {
        panic!(
            "the tun-balancers did not serve 30 connections: {}",
            e.log("balancer-l1")
        )
    });
    let syns = e.syns();
    println!(
        "3 tun-balancers (nat) behind the ECMP route: SYNs per balancer {:?} (the tries while \
         health checks rise included), answering backends {:?}",
        sorted(&syns),
        sorted(&common::Lab::tally(&answers))
    );
    assert!(syns.values().filter(|&&c| c > 0).count() > 1, "{syns:?}");

    let t = e.kill9("balancer-l2");
    let d = e.wait_next_hops(&without(&all, 2), t, Duration::from_secs(10));
    let d = d.unwrap_or_else(|| {
        panic!(
            "l2's tun-balancer killed, still routed:\n{}",
            e.bird_report()
        )
    });
    println!(
        "kill -9 of l2's tun-balancer (lb0 gone, BIRD and BGP untouched) -> next hop gone in {}",
        ms(d)
    );
    assert!(d < Duration::from_secs(1), "took {}", ms(d));
    assert!(e.established().contains(&2), "{}", e.bird_report());
    let before = e.syns();
    let answers = e
        .fetch(30)
        .unwrap_or_else(|err| panic!("after the kill: {err}"));
    assert_eq!(answers.len(), 30, "{answers:?}");
    let after = e.syns();
    assert_eq!(
        after[&2], before[&2],
        "l2 got SYNs after its tun-balancer died"
    );
}
