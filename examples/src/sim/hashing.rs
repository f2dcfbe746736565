//! Consistent-hashing simulator (lb-sched part 1): `lb-sim hash`.
//!
//! For N = 10, 100, 1000 backends of equal weight and `opts.flows` random IPv4 flows (keyed
//! SipHash-1-3 flow hashes), every scheme of [`lb_sched::hash`] is measured on:
//! - **balance**: max / mean flows per backend (1.0 is perfect);
//! - **remove** / **add**: the fraction of flows that change backend when backend N/2 is
//!   removed, or a backend added, with a rebuild (ideal: 1/N, printed as a multiple of it);
//! - **drain**: the fraction that moves when backend N/2 is marked down through health state
//!   only (no rebuild: lookups walk the preference list past it);
//! - **lookup**: ns per lookup (flow hash precomputed), **build**: µs per build, **memory**: heap
//!   bytes of the structure.
//!
//! Plus consistent hashing with bounded loads (c = 1.25) on Maglev and the ring: flows placed one
//! by one against live loads. The same numbers are written to `hashing.svg` under `opts.out_dir`.

use std::hint::black_box;
use std::io;
use std::time::Instant;

use lb_core::{Backend, BackendId, FlowHasher, FlowKey, HashKey, IpProto};
use lb_sched::hash::{AnyHash, BackendLoads, ConsistentHash, HashAlgorithm, LoadBound};
use plotters::prelude::*;
use rand::{Rng, SeedableRng};

use super::SimOptions;

/// One line of the table.
#[derive(Debug, Clone)]
struct Row {
    name: String,
    algo: Option<HashAlgorithm>,
    n: u32,
    flows: usize,
    balance: f64,
    remove: Option<f64>,
    add: Option<f64>,
    drain: Option<f64>,
    lookup_ns: Option<f64>,
    build_us: Option<f64>,
    memory: Option<usize>,
}

fn backends(n: u32) -> Vec<Backend> {
    (0..n)
        .map(|i| {
            let addr = std::net::SocketAddr::from(([10, 2, (i >> 8) as u8, i as u8], 80));
            Backend::new(BackendId(i), addr)
        })
        .collect()
}

fn flow_hashes(n: usize, seed: u64, hasher: &FlowHasher) -> Vec<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let k = FlowKey::v4(
                rng.random::<u32>().into(),
                rng.random(),
                [203, 0, 113, 10].into(),
                80,
                IpProto::Tcp,
            );
            hasher.hash_flow(&k)
        })
        .collect()
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn assign(t: &AnyHash, hashes: &[u64], out: &mut Vec<u32>) {
    out.clear();
    out.extend(
        hashes
            .iter()
            .map(|&h| t.lookup(h).map_or(u32::MAX, |id| id.0)),
    );
}

fn moved(a: &[u32], b: &[u32]) -> f64 {
    let m = a.iter().zip(b).filter(|(x, y)| x != y).count();
    m as f64 / a.len().max(1) as f64
}

fn balance(assigned: &[u32], n: u32) -> f64 {
    let mut counts = vec![0u64; n as usize + 1];
    for &a in assigned {
        if let Some(c) = counts.get_mut(a as usize) {
            *c += 1;
        }
    }
    let max = counts.iter().copied().max().unwrap_or(0) as f64;
    max / (assigned.len() as f64 / f64::from(n))
}

fn measure(algo: HashAlgorithm, n: u32, hashes: &[u64], key: HashKey) -> io::Result<Row> {
    let bs = backends(n);
    let mut build_us = f64::INFINITY;
    let mut table = None;
    for _ in 0..3 {
        let t0 = Instant::now();
        let t = AnyHash::build(algo, &bs, key).map_err(other)?;
        build_us = build_us.min(t0.elapsed().as_secs_f64() * 1e6);
        table = Some(t);
    }
    let table = table.ok_or_else(|| other("no table"))?;
    let mut base = Vec::with_capacity(hashes.len());
    let t0 = Instant::now();
    assign(&table, black_box(hashes), &mut base);
    let lookup_ns = t0.elapsed().as_secs_f64() * 1e9 / hashes.len().max(1) as f64;

    let victim = BackendId(n / 2);
    let less: Vec<Backend> = bs.iter().copied().filter(|b| b.id != victim).collect();
    let mut after = Vec::with_capacity(hashes.len());
    assign(
        &AnyHash::build(algo, &less, key).map_err(other)?,
        hashes,
        &mut after,
    );
    let remove = moved(&base, &after);
    let mut more = bs.clone();
    more.extend(backends(n + 1).last().copied());
    assign(
        &AnyHash::build(algo, &more, key).map_err(other)?,
        hashes,
        &mut after,
    );
    let add = moved(&base, &after);
    after.clear();
    after.extend(hashes.iter().map(|&h| {
        table
            .lookup_eligible(h, |id| id != victim)
            .map_or(u32::MAX, |id| id.0)
    }));
    let drain = moved(&base, &after);
    Ok(Row {
        name: algo.name().to_string(),
        algo: Some(algo),
        n,
        flows: hashes.len(),
        balance: balance(&base, n),
        remove: Some(remove),
        add: Some(add),
        drain: Some(drain),
        lookup_ns: Some(lookup_ns),
        build_us: Some(build_us),
        memory: Some(table.heap_bytes()),
    })
}

fn bounded(algo: HashAlgorithm, n: u32, hashes: &[u64], key: HashKey) -> io::Result<Row> {
    let table = AnyHash::build(algo, &backends(n), key).map_err(other)?;
    let bound = LoadBound::new(1.25).map_err(other)?;
    let mut loads = BackendLoads::new(n as usize);
    let mut assigned = Vec::with_capacity(hashes.len());
    let t0 = Instant::now();
    for &h in hashes {
        let i = table.lookup_bounded(h, &loads, bound).unwrap_or(0);
        loads.add(i);
        assigned.push(table.backends().get(i).map_or(u32::MAX, |b| b.id.0));
    }
    let ns = t0.elapsed().as_secs_f64() * 1e9 / hashes.len().max(1) as f64;
    Ok(Row {
        name: format!("{}+bounded(1.25)", algo.name()),
        algo: None,
        n,
        flows: hashes.len(),
        balance: balance(&assigned, n),
        remove: None,
        add: None,
        drain: None,
        lookup_ns: Some(ns),
        build_us: None,
        memory: None,
    })
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "-".to_string(), f)
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<22} {:>5} {:>9} {:>8} {:>16} {:>16} {:>16} {:>9} {:>10} {:>10}",
        "scheme",
        "N",
        "flows",
        "max/mean",
        "remove (x 1/N)",
        "add (x 1/N)",
        "drain (x 1/N)",
        "lookup ns",
        "build us",
        "memory KiB"
    );
    for r in rows {
        let n = f64::from(r.n);
        let frac = |v: f64| format!("{:.4} ({:.2})", v, v * n);
        println!(
            "{:<22} {:>5} {:>9} {:>8.3} {:>16} {:>16} {:>16} {:>9} {:>10} {:>10}",
            r.name,
            r.n,
            r.flows,
            r.balance,
            opt(r.remove, frac),
            opt(r.add, frac),
            opt(r.drain, frac),
            opt(r.lookup_ns, |v| format!("{v:.1}")),
            opt(r.build_us, |v| format!("{v:.0}")),
            r.memory
                .map_or_else(|| "-".to_string(), |m| format!("{:.1}", m as f64 / 1024.0)),
        );
    }
}

fn plot(rows: &[Row], path: &std::path::Path) -> io::Result<()> {
    let root = SVGBackend::new(path, (1200, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(other)?;
    let panels = root.split_evenly((1, 3));
    type Metric = fn(&Row) -> Option<f64>;
    let metrics: [(&str, Metric, f64); 3] = [
        (
            "flows moved on removal, x ideal 1/N (clipped at 8)",
            |r| r.remove.map(|v| v * f64::from(r.n)),
            8.0,
        ),
        (
            "balance: max/mean flows per backend",
            |r| Some(r.balance),
            f64::INFINITY,
        ),
        ("lookup ns (clipped at 200)", |r| r.lookup_ns, 200.0),
    ];
    let colors = [RED, BLUE, GREEN, MAGENTA, BLACK];
    for ((title, metric, cap), area) in metrics.iter().zip(panels.iter()) {
        // Modulo's and jump's removal disruption (up to N x ideal) and rendezvous' O(N)
        // lookups would flatten the others: those axes are clipped.
        let ymax = rows
            .iter()
            .filter(|r| r.algo.is_some())
            .filter_map(metric)
            .fold(1.0f64, f64::max)
            .min(*cap)
            * 1.2;
        let mut chart = ChartBuilder::on(area)
            .caption(*title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(45)
            .build_cartesian_2d(0.8f64..3.2f64, 0f64..ymax)
            .map_err(other)?;
        chart
            .configure_mesh()
            .x_desc("log10 N")
            .draw()
            .map_err(other)?;
        for (algo, color) in HashAlgorithm::ALL.iter().zip(colors.iter()) {
            let pts: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.algo == Some(*algo))
                .filter_map(|r| metric(r).map(|v| (f64::from(r.n).log10(), v.min(ymax))))
                .collect();
            let color = *color;
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(other)?
                .label(algo.name())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(other)?;
    }
    root.present().map_err(other)?;
    Ok(())
}

/// Runs the simulation, prints its table and writes its plot under `opts.out_dir`.
///
/// # Errors
/// I/O errors writing the plot.
pub fn run(opts: &SimOptions) -> io::Result<()> {
    let ns: &[u32] = if opts.quick {
        &[10, 100]
    } else {
        &[10, 100, 1000]
    };
    let flows = if opts.quick {
        opts.flows.min(20_000)
    } else {
        opts.flows
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let key = HashKey::from_bytes(rng.random());
    let hashes = flow_hashes(
        flows,
        opts.seed ^ 0x5eed,
        &FlowHasher::new(key.derive("flow")),
    );
    println!(
        "lb-sim hash: {flows} flows, seed {}, Maglev M = 65537, ring 160 points per backend",
        opts.seed
    );
    let mut rows = Vec::new();
    for &n in ns {
        for algo in HashAlgorithm::ALL {
            // Rendezvous is O(N) per lookup: sample fewer flows at large N.
            let sample = if algo == HashAlgorithm::Rendezvous && n >= 1000 {
                &hashes[..hashes.len().min(200_000)]
            } else {
                &hashes[..]
            };
            rows.push(measure(algo, n, sample, key)?);
        }
        for algo in [HashAlgorithm::Maglev, HashAlgorithm::Ring] {
            rows.push(bounded(algo, n, &hashes, key)?);
        }
    }
    print_table(&rows);
    let path = opts.out_dir.join("hashing.svg");
    plot(&rows, &path)?;
    println!("plot: {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_run_measures_sane_numbers() {
        let key = HashKey::from_bytes([7; 16]);
        let hashes = flow_hashes(20_000, 1, &FlowHasher::new(key));
        let m = measure(HashAlgorithm::Maglev, 10, &hashes, key).unwrap();
        assert!(m.balance < 1.1, "{m:?}");
        let remove = m.remove.unwrap();
        assert!(remove > 0.05 && remove < 0.2, "{m:?}");
        let modulo = measure(HashAlgorithm::Modulo, 10, &hashes, key).unwrap();
        assert!(modulo.remove.unwrap() > 0.5, "{modulo:?}");
        let b = bounded(HashAlgorithm::Ring, 10, &hashes, key).unwrap();
        assert!(b.balance <= 1.26, "{b:?}");
    }
}
