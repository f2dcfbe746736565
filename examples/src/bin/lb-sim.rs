//! `lb-sim`: compares the consistent-hashing schemes (balance, disruption, speed, memory) and the
//! scheduling policies (response time, throughput, fairness) in deterministic simulations.
//! Needs no privileges.
//!
//! Usage: `lb-sim [hash|sched|all] [--flows N] [--seed S] [--out DIR] [--quick]`

use lb_examples::sim::{self, SimOptions};

fn main() {
    let mut opts = SimOptions::default();
    let mut what = String::from("all");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> u64 {
            match args.next().map(|v| v.parse::<u64>()) {
                Some(Ok(v)) => v,
                _ => {
                    eprintln!("lb-sim: {name} needs a number");
                    std::process::exit(2);
                }
            }
        };
        match a.as_str() {
            "hash" | "sched" | "all" => what = a,
            "--flows" => opts.flows = num("--flows") as usize,
            "--seed" => opts.seed = num("--seed"),
            "--quick" => opts.quick = true,
            "--out" => match args.next() {
                Some(d) => opts.out_dir = d.into(),
                None => {
                    eprintln!("lb-sim: --out needs a directory");
                    std::process::exit(2);
                }
            },
            "-h" | "--help" => {
                println!(
                    "usage: lb-sim [hash|sched|all] [--flows N] [--seed S] [--out DIR] [--quick]"
                );
                return;
            }
            other => {
                eprintln!("lb-sim: unknown argument {other:?} (try --help)");
                std::process::exit(2);
            }
        }
    }
    if let Err(e) = std::fs::create_dir_all(&opts.out_dir) {
        eprintln!("lb-sim: cannot create {}: {e}", opts.out_dir.display());
        std::process::exit(1);
    }
    let mut ok = true;
    if what == "hash" || what == "all" {
        ok &= report(sim::hashing::run(&opts));
    }
    if what == "sched" || what == "all" {
        ok &= report(sim::sched::run(&opts));
    }
    if !ok {
        std::process::exit(1);
    }
}

fn report(r: std::io::Result<()>) -> bool {
    match r {
        Ok(()) => true,
        Err(e) => {
            eprintln!("lb-sim: {e}");
            false
        }
    }
}
