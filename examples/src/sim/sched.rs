//! Scheduling-policy simulator (lb-sched part 2): which policy to use when.
//!
//! A seeded, deterministic discrete-event simulation. Six FCFS servers of speeds 1×, 1×, 2×, 2×,
//! 4×, 4× (weights set to their speeds, as an operator would) receive Poisson arrivals at 50 %,
//! 80 % and 95 % of their total capacity. Service demands (at speed 1×, mean 10 ms) are
//! exponential, heavy-tailed Pareto (α = 1.5), or a mix of short requests and long sessions
//! (90 % exponential short, 10 % ten times longer). Every policy sees the same arrivals and the
//! same demands (common random numbers), and the pool is updated as a balancer would update it:
//! connection opened / request started on assignment, connection closed / request finished with
//! its observed response time on completion.
//!
//! For each policy it reports mean and p99 response time, throughput, the highest server
//! utilisation, Jain's fairness index of the utilisations (1 = load spread in proportion to
//! capacity), and the share of arrivals refused by admission control. A policy that ignores the
//! servers' speeds (RR, LC) overloads the slow ones already at 50 %: its queues grow without
//! bound, its response times explode and its throughput falls behind the offered load.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;

use lb_core::{Backend, BackendId, Duration, Instant, Weight};
use lb_sched::policy::admission::Thresholds;
use lb_sched::policy::{
    ewma, lc, least_request, p2c, random, rr, sed, sh, wrr, Pick, Policy, Request,
};
use lb_sched::pool::{ConnPhase, Pool, PoolConfig};
use plotters::prelude::*;
use rand::{Rng, SeedableRng};

use super::SimOptions;

/// Server speeds (and weights).
const SPEEDS: [u32; 6] = [1, 1, 2, 2, 4, 4];
/// Mean service demand at speed 1, in nanoseconds (10 ms).
const MEAN_SERVICE_NS: f64 = 10e6;
/// Offered loads, as a fraction of total capacity.
const LOADS: [f64; 3] = [0.5, 0.8, 0.95];
/// Distinct clients (for source hashing).
const CLIENTS: u64 = 10_000;

/// Service-demand distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Exponential, mean 10 ms.
    Exponential,
    /// Pareto, α = 1.5, mean 10 ms (infinite variance: a heavy tail).
    Pareto,
    /// 90 % short (exponential) requests, 10 % long sessions ten times longer; mean 10 ms.
    Mixed,
}

impl Workload {
    const ALL: [Workload; 3] = [Workload::Exponential, Workload::Pareto, Workload::Mixed];

    fn name(self) -> &'static str {
        match self {
            Workload::Exponential => "exp",
            Workload::Pareto => "pareto",
            Workload::Mixed => "mixed",
        }
    }

    /// One service demand at speed 1, in ns.
    fn draw<R: Rng>(self, rng: &mut R) -> f64 {
        let u: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
        match self {
            Workload::Exponential => -u.ln() * MEAN_SERVICE_NS,
            Workload::Pareto => {
                let alpha = 1.5;
                let xm = MEAN_SERVICE_NS * (alpha - 1.0) / alpha;
                xm / u.powf(1.0 / alpha)
            }
            Workload::Mixed => {
                // 0.9 * s + 0.1 * 10 s = 1.9 s = mean
                let short = MEAN_SERVICE_NS / 1.9;
                let long = rng.random::<f64>() < 0.1;
                -u.ln() * if long { 10.0 * short } else { short }
            }
        }
    }
}

/// The policies compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SimPolicy {
    Plain(&'static str),
    /// WLC with an upper connection threshold of 4 × speed per server.
    WlcAdmission,
}

const POLICIES: [SimPolicy; 14] = [
    SimPolicy::Plain("random"),
    SimPolicy::Plain("rr"),
    SimPolicy::Plain("wrr"),
    SimPolicy::Plain("swrr"),
    SimPolicy::Plain("sh"),
    SimPolicy::Plain("lc"),
    SimPolicy::Plain("wlc"),
    SimPolicy::Plain("sed"),
    SimPolicy::Plain("nq"),
    SimPolicy::Plain("p2c"),
    SimPolicy::Plain("p2c-ewma"),
    SimPolicy::Plain("peak-ewma"),
    SimPolicy::Plain("least-request"),
    SimPolicy::WlcAdmission,
];

impl SimPolicy {
    fn name(self) -> &'static str {
        match self {
            SimPolicy::Plain(n) => n,
            SimPolicy::WlcAdmission => "wlc+admission",
        }
    }

    fn build(self) -> io::Result<Policy> {
        Ok(match self {
            SimPolicy::Plain("random") => Policy::Random(random::WeightedRandom::new()),
            SimPolicy::Plain("rr") => Policy::RoundRobin(rr::RoundRobin::new()),
            SimPolicy::Plain("wrr") => Policy::IpvsWrr(wrr::IpvsWrr::new()),
            SimPolicy::Plain("swrr") => Policy::SmoothWrr(wrr::SmoothWrr::new()),
            SimPolicy::Plain("sh") => {
                Policy::SourceHash(sh::SourceHash::new(10, true).map_err(other)?)
            }
            SimPolicy::Plain("lc") => Policy::LeastConn(lc::LeastConn::new()),
            SimPolicy::Plain("sed") => Policy::Sed(sed::Sed::new()),
            SimPolicy::Plain("nq") => Policy::Nq(sed::Nq::new()),
            SimPolicy::Plain("p2c") => Policy::P2c(p2c::P2c::new(p2c::P2cLoad::Connections)),
            SimPolicy::Plain("p2c-ewma") => Policy::P2c(p2c::P2c::new(p2c::P2cLoad::PeakEwma)),
            SimPolicy::Plain("peak-ewma") => Policy::PeakEwma(ewma::PeakEwma::new()),
            SimPolicy::Plain("least-request") => {
                Policy::LeastRequest(least_request::LeastRequest::default())
            }
            SimPolicy::Plain(_) | SimPolicy::WlcAdmission => Policy::Wlc(lc::Wlc::new()),
        })
    }
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// One simulated (workload, load, policy).
#[derive(Debug, Clone)]
pub struct Row {
    /// Workload name.
    pub workload: &'static str,
    /// Offered load (fraction of capacity).
    pub load: f64,
    /// Policy name.
    pub policy: &'static str,
    /// Mean response time, ms.
    pub mean_ms: f64,
    /// 99th-percentile response time, ms.
    pub p99_ms: f64,
    /// Completed requests per second.
    pub throughput: f64,
    /// Offered requests per second.
    pub offered: f64,
    /// Highest server utilisation (busy time / elapsed time).
    pub max_util: f64,
    /// Jain's fairness index of the utilisations (1 = proportional to capacity).
    pub jain: f64,
    /// Share of arrivals refused (admission control), in percent.
    pub refused_pct: f64,
}

fn pool(admission: bool) -> io::Result<Pool> {
    let cfg = PoolConfig {
        peak_ewma_decay: Duration::from_millis(500),
        default_rtt: Duration::from_millis(10),
        ..PoolConfig::default()
    };
    let backends = SPEEDS.iter().enumerate().map(|(i, &s)| {
        Backend::new(BackendId(i as u32), ([10, 0, 0, i as u8 + 1], 80).into())
            .with_weight(Weight::new(s))
    });
    let mut p = Pool::with_backends(cfg, backends, Instant::ZERO).map_err(other)?;
    if admission {
        for (i, &s) in SPEEDS.iter().enumerate() {
            let t = Thresholds {
                upper_conns: 4 * s,
                ..Thresholds::NONE
            };
            p.set_thresholds(BackendId(i as u32), t).map_err(other)?;
        }
    }
    Ok(p)
}

/// Simulates `requests` arrivals of one scenario under one policy.
fn simulate(
    policy: SimPolicy,
    workload: Workload,
    load: f64,
    requests: usize,
    seed: u64,
) -> io::Result<Row> {
    let mut pool = pool(policy == SimPolicy::WlcAdmission)?;
    let mut sched = policy.build()?;
    // Common random numbers: arrivals and demands depend on the scenario only.
    let scenario = seed ^ ((load * 1000.0) as u64) << 8 ^ workload as u64;
    let mut traffic = rand::rngs::StdRng::seed_from_u64(scenario);
    let mut prng = rand::rngs::SmallRng::seed_from_u64(seed ^ 0x9011c7);
    let capacity: f64 = SPEEDS.iter().map(|&s| f64::from(s)).sum();
    let mean_gap = MEAN_SERVICE_NS / (load * capacity);

    let mut busy_until = [0f64; SPEEDS.len()];
    let mut busy = [0f64; SPEEDS.len()];
    // Completions: (time ns, server, arrival ns).
    let mut done: BinaryHeap<Reverse<(u64, usize, u64)>> = BinaryHeap::new();
    let mut latencies: Vec<u64> = Vec::with_capacity(requests);
    let mut refused = 0usize;
    let mut t = 0f64;
    let mut end = 0f64;
    for _ in 0..requests {
        let u: f64 = 1.0 - traffic.random::<f64>();
        t += -u.ln() * mean_gap;
        let demand = workload.draw(&mut traffic);
        let client = traffic.random_range(0..CLIENTS);
        let now = Instant::from_nanos(t as u64);
        while let Some(Reverse((ct, srv, at))) = done.peek().copied() {
            if ct > now.as_nanos() {
                break;
            }
            done.pop();
            let id = BackendId(srv as u32);
            let at_done = Instant::from_nanos(ct);
            let latency = Duration::from_nanos(ct.saturating_sub(at));
            pool.conn_closed(id, ConnPhase::Active).map_err(other)?;
            pool.request_finished(id, latency, at_done).map_err(other)?;
        }
        let req = Request::at(now).with_src_hash(client.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        match sched.pick(&pool, &req, &mut prng) {
            Pick::Backend(id) => {
                let s = id.get() as usize;
                let speed = f64::from(SPEEDS.get(s).copied().unwrap_or(1));
                let service = demand / speed;
                let start = t.max(busy_until.get(s).copied().unwrap_or(0.0));
                let finish = start + service;
                if let (Some(b), Some(u)) = (busy_until.get_mut(s), busy.get_mut(s)) {
                    *b = finish;
                    *u += service;
                }
                end = end.max(finish);
                latencies.push((finish - t) as u64);
                done.push(Reverse((finish as u64, s, t as u64)));
                pool.conn_opened(id).map_err(other)?;
                pool.request_started(id).map_err(other)?;
            }
            _ => refused += 1,
        }
    }
    let elapsed = end.max(t).max(1.0);
    latencies.sort_unstable();
    let n = latencies.len().max(1);
    let mean = latencies.iter().map(|&l| l as f64).sum::<f64>() / n as f64;
    let p99 = latencies
        .get((n * 99 / 100).min(n - 1))
        .copied()
        .unwrap_or(0) as f64;
    let utils: Vec<f64> = busy.iter().map(|b| b / elapsed).collect();
    let sum: f64 = utils.iter().sum();
    let sq: f64 = utils.iter().map(|u| u * u).sum();
    Ok(Row {
        workload: workload.name(),
        load,
        policy: policy.name(),
        mean_ms: mean / 1e6,
        p99_ms: p99 / 1e6,
        throughput: latencies.len() as f64 / (elapsed / 1e9),
        offered: requests as f64 / (t.max(1.0) / 1e9),
        max_util: utils.iter().copied().fold(0.0, f64::max),
        jain: if sq > 0.0 {
            sum * sum / (utils.len() as f64 * sq)
        } else {
            0.0
        },
        refused_pct: refused as f64 * 100.0 / requests.max(1) as f64,
    })
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<7} {:>5} {:<14} {:>10} {:>11} {:>9} {:>9} {:>8} {:>6} {:>8}",
        "work",
        "load",
        "policy",
        "mean ms",
        "p99 ms",
        "tput/s",
        "offered",
        "max util",
        "jain",
        "refused"
    );
    for r in rows {
        println!(
            "{:<7} {:>4.0}% {:<14} {:>10.1} {:>11.1} {:>9.0} {:>9.0} {:>8.3} {:>6.3} {:>7.2}%",
            r.workload,
            r.load * 100.0,
            r.policy,
            r.mean_ms,
            r.p99_ms,
            r.throughput,
            r.offered,
            r.max_util,
            r.jain,
            r.refused_pct
        );
    }
}

fn plot(rows: &[Row], path: &std::path::Path) -> io::Result<()> {
    let root = SVGBackend::new(path, (1500, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(other)?;
    let panels = root.split_evenly((1, Workload::ALL.len()));
    let colors = [
        RGBColor(230, 25, 75),
        RGBColor(60, 180, 75),
        RGBColor(255, 170, 0),
        RGBColor(0, 130, 200),
        RGBColor(245, 130, 48),
        RGBColor(145, 30, 180),
        RGBColor(70, 200, 200),
        RGBColor(240, 50, 230),
        RGBColor(150, 150, 0),
        RGBColor(0, 128, 128),
        RGBColor(170, 110, 40),
        RGBColor(128, 0, 0),
        RGBColor(0, 0, 128),
        RGBColor(0, 0, 0),
    ];
    let ymax = rows
        .iter()
        .map(|r| r.p99_ms.max(0.01).log10())
        .fold(1.0f64, f64::max)
        + 0.2;
    for (w, area) in Workload::ALL.iter().zip(panels.iter()) {
        let title = format!("{}: log10 p99 response ms vs load %", w.name());
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d(45f64..100f64, 0f64..ymax)
            .map_err(other)?;
        chart
            .configure_mesh()
            .x_desc("offered load %")
            .draw()
            .map_err(other)?;
        for (p, color) in POLICIES.iter().zip(colors.iter()) {
            let pts: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.workload == w.name() && r.policy == p.name())
                .map(|r| (r.load * 100.0, r.p99_ms.max(0.01).log10().clamp(0.0, ymax)))
                .collect();
            let color = *color;
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(other)?
                .label(p.name())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(other)?;
    }
    root.present().map_err(other)?;
    Ok(())
}

/// Simulates every (workload, load, policy): `requests` arrivals each.
///
/// # Errors
/// Only if the pool or a policy rejects its (fixed, valid) configuration.
pub fn simulate_all(requests: usize, seed: u64) -> io::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for w in Workload::ALL {
        for load in LOADS {
            for p in POLICIES {
                rows.push(simulate(p, w, load, requests, seed)?);
            }
        }
    }
    Ok(rows)
}

/// Runs the simulation, prints its table and writes its plot under `opts.out_dir`.
///
/// # Errors
/// I/O errors writing the plot.
pub fn run(opts: &SimOptions) -> io::Result<()> {
    let requests = if opts.quick {
        opts.flows.min(5_000)
    } else {
        opts.flows.min(200_000)
    };
    println!(
        "lb-sim sched: {requests} requests per run, seed {}, servers at speeds {SPEEDS:?} \
         (weights = speeds), mean demand 10 ms at 1x, FCFS",
        opts.seed
    );
    let rows = simulate_all(requests, opts.seed)?;
    print_table(&rows);
    let path = opts.out_dir.join("sched.svg");
    plot(&rows, &path)?;
    println!("plot: {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find<'a>(rows: &'a [Row], w: &str, load: f64, p: &str) -> &'a Row {
        rows.iter()
            .find(|r| r.workload == w && r.load == load && r.policy == p)
            .unwrap()
    }

    #[test]
    fn quick_run_is_deterministic_and_sane() {
        let rows = simulate_all(4_000, 3).unwrap();
        assert_eq!(
            rows.len(),
            Workload::ALL.len() * LOADS.len() * POLICIES.len()
        );
        let again = simulate(SimPolicy::Plain("p2c"), Workload::Pareto, 0.8, 4_000, 3).unwrap();
        let first = find(&rows, "pareto", 0.8, "p2c");
        assert_eq!(again.p99_ms, first.p99_ms);
        // Weight-blind RR overloads the 1x servers; WLC keeps them in proportion.
        let rr = find(&rows, "exp", 0.8, "rr");
        let wlc = find(&rows, "exp", 0.8, "wlc");
        assert!(rr.max_util > 0.97, "{rr:?}");
        assert!(wlc.p99_ms * 3.0 < rr.p99_ms, "{wlc:?} {rr:?}");
        assert!(wlc.jain > rr.jain, "{wlc:?} {rr:?}");
        // Admission control refuses rather than queue without bound, and only the policies
        // with thresholds refuse anything.
        for r in &rows {
            if r.policy != "wlc+admission" {
                assert_eq!(r.refused_pct, 0.0, "{r:?}");
            }
            assert!(r.mean_ms > 0.0 && r.p99_ms >= r.mean_ms * 0.5, "{r:?}");
        }
    }
}
