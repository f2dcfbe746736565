//! Placement of spliced connections: the weights and the live load (admission) count, as
//! for the other modes' schedulers.

use super::*;

/// Connections opened with no rule and no affinity: how many each backend got.
fn spread(r: &mut Rig, n: u16) -> std::collections::HashMap<SocketAddr, u32> {
    let mut got = std::collections::HashMap::new();
    for i in 0..n {
        let client = SocketAddr::new("192.0.2.7".parse().unwrap(), 1024 + i);
        let (_, _, syn) = open(r, client, &get("other.example", "/"), false);
        *got.entry(syn.dst).or_insert(0) += 1;
    }
    got
}

#[test]
fn weights_set_each_backends_share() {
    let mut r = Rig::new(Affinity::None, |s| {
        s.splice_capacity = 4096;
        s.services[0].splice.as_mut().unwrap().rules.clear();
        s.services[0].backends[2].weight = lb_core::Weight::new(2);
    });
    let got = spread(&mut r, 4000);
    let share = |b: &str| f64::from(got[&sa(b)]) / 4000.0;
    // 1 : 1 : 2 (binomial sd ~0.7 %: 5 % is far out).
    for (b, want) in [(BACKENDS[0], 0.25), (BACKENDS[1], 0.25), (BACKENDS[2], 0.5)] {
        assert!(
            (share(b) - want).abs() < 0.05,
            "{b}: {:.3} {got:?}",
            share(b)
        );
    }
}

#[test]
fn a_backend_at_its_admission_threshold_takes_no_new_connection() {
    let mut r = Rig::new(Affinity::None, |s| {
        s.services[0].splice.as_mut().unwrap().rules.clear();
        s.services[0].backends[0].upper_conns = Some(2);
    });
    let got = spread(&mut r, 30);
    assert_eq!(got.get(&sa(BACKENDS[0])).copied(), Some(2), "{got:?}");
    assert_eq!(got.values().sum::<u32>(), 30);
}

#[test]
fn reserved_slots_let_a_reload_add_the_first_spliced_service() {
    // Built with no spliced service but `splice_reserve`: the service is plain NAT first.
    let mut r = Rig::new(Affinity::None, |s| {
        s.services[0].splice = None;
        s.splice_reserve = true;
    });
    let vip = sa(VIP);
    let (out, _) = r.send(&seg(sa("192.0.2.8:1000"), vip, 7, 0, flags::SYN, b""));
    let out = out.expect("NATed SYN");
    assert!(
        BACKENDS.iter().any(|b| sa(b) == out.dst),
        "a plain NAT service forwards the SYN: {out:?}"
    );
    assert_eq!(r.dp.splice_stats().cookies_sent, 0);
    // A reload makes it splice: new connections are answered with a cookie and spliced.
    let mut spec = r.spec.clone();
    spec.services[0].splice = Some(SpliceSpec {
        rules: rules(),
        head_max: 512,
        ..SpliceSpec::default()
    });
    assert_eq!(r.dp.set_splice(&spec), Ok(()));
    let (_, _, syn) = open(&mut r, sa("192.0.2.8:1001"), &get("api.example", "/"), true);
    assert_eq!(syn.dst, sa(BACKENDS[0]));
    assert_eq!(r.dp.splice_stats().cookies_ok, 1);
}
