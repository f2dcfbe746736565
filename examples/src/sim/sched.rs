//! Scheduling-policy simulator (lb-sched part 2).

use super::SimOptions;

/// Runs the simulation, prints its table and writes its plot under `opts.out_dir`.
///
/// # Errors
/// I/O errors writing the plot.
pub fn run(opts: &SimOptions) -> std::io::Result<()> {
    let _ = opts;
    println!("(this simulation is not built yet)");
    Ok(())
}
