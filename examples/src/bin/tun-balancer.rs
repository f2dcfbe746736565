//! `tun-balancer --config FILE [--check]`: a layer-4 load balancer over a TUN device (TAP for
//! direct routing), built on the lb crates. Reloads its configuration on SIGHUP (a bad new file is
//! rejected and the running configuration kept), exits cleanly on SIGTERM / SIGINT, logs with
//! `tracing` (`RUST_LOG=debug` for more). Needs `CAP_NET_ADMIN` to open the device.

use clap::Parser;
use lb_examples::config::Config;
use lb_examples::runtime::{abort_on_panic, run, Cli, RunOptions};
use lb_examples::sys::HugePageAlloc;

/// The connection tables and scheduler tables on transparent huge pages (see [`HugePageAlloc`]).
#[global_allocator]
static ALLOC: HugePageAlloc = HugePageAlloc;

/// Test hooks from the environment: debug builds only, so a release binary ignores them.
fn test_options() -> RunOptions {
    let mut o = RunOptions::default();
    if cfg!(debug_assertions) {
        o.test_panic_after = std::env::var("LB_TEST_PANIC_AFTER")
            .ok()
            .and_then(|v| v.parse().ok());
    }
    o
}

fn main() {
    abort_on_panic();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours for a terminal only: logs redirected to a file stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if cli.check {
        match Config::load(&cli.config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} services, {} backends)",
                    cli.config.display(),
                    c.dataplane.services.len(),
                    c.dataplane
                        .services
                        .iter()
                        .map(|s| s.backends.len())
                        .sum::<usize>()
                );
                return;
            }
            Err(e) => {
                eprintln!("tun-balancer: {e}");
                std::process::exit(2);
            }
        }
    }
    let options = test_options();
    if let Some(n) = options.test_panic_after {
        tracing::warn!(
            packets = n,
            "LB_TEST_PANIC_AFTER: the data path will panic after this many packets"
        );
    }
    if let Err(e) = run(&cli.config, &options) {
        eprintln!("tun-balancer: {e}");
        std::process::exit(1);
    }
}
