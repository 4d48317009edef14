//! `tandem-bench`: what the mesh costs. It starts a real etcd, an app B serving the
//! callback API, tandemd for B and tandemd for a caller A, then calls B's `echo` with a
//! 1 KiB payload two ways, directly over gRPC and through both sidecars, and compares:
//! sequential latency (p50, p99), throughput with many calls in flight, and tandemd's
//! resident memory idle and at its peak. It prints a markdown report with the targets
//! (PASS/MISS) and, with `--write BENCHMARKS.md`, keeps that file up to date.
//!
//! Build tandemd into the same target directory first: the harness runs the `tandemd` that
//! sits next to this executable.
//!
//! ```text
//! cargo build --release -p tandem-bench -p tandem-sidecar
//! target/release/tandem-bench --write BENCHMARKS.md
//! ```
//!
//! Modules, one per concern:
//! - [`invoke`]: the scenario: the processes, the two routes, the load, CPU use meanwhile.
//! - [`stats`]: percentiles (nearest rank), throughput, ratios.
//! - [`procfs`]: resident memory and CPU time from `/proc/<pid>/{status,stat}`, and how busy
//!   the machine was from `/proc/stat`.
//! - [`machine`]: where and when: CPUs, load, build profile, date, commit, tandemd's workers.
//! - [`report`]: the markdown tables, the targets, and the marker-delimited section of
//!   BENCHMARKS.md.

mod invoke;
mod machine;
mod procfs;
mod report;
mod stats;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use clap::Parser;

use crate::invoke::{CALLEE, CALLER, Mesh, Settings};
use crate::machine::RunContext;
use crate::report::{InvokeReport, SidecarMemory};

/// Direct gRPC against the same call through two tandemd sidecars.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Sequential calls timed for the latency percentiles, per route.
    #[arg(long, default_value_t = 2000)]
    calls: usize,
    /// Sequential warm-up calls before timing, per route.
    #[arg(long, default_value_t = 500)]
    warmup_calls: usize,
    /// Seconds of load for the throughput figure, per route.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Calls kept in flight during the throughput run.
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// Rounds both phases are split into, taking the routes in turn.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Also write the report into this markdown file (BENCHMARKS.md), replacing only this
    /// benchmark's section.
    #[arg(long, value_name = "FILE")]
    write: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    // One worker per CPU, set here rather than left to tokio, which would read
    // TOKIO_WORKER_THREADS from the environment.
    let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    ensure!(args.calls > 0, "--calls must be at least 1");
    ensure!(args.in_flight > 0, "--in-flight must be at least 1");
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    ensure!(args.seconds.is_finite() && args.seconds > 0.0, "--seconds must be a positive number");
    let duration = Duration::from_secs_f64(args.seconds);
    let settings = Settings {
        payload_bytes: 1024,
        warmup_calls: args.warmup_calls,
        calls: args.calls,
        in_flight: args.in_flight,
        warmup_duration: duration.min(Duration::from_secs(1)),
        duration,
        rounds: args.rounds,
    };
    let context = RunContext::detect();
    if context.profile != "release" {
        eprintln!("warning: a {} build; figures from it say little about a release build", context.profile);
    }

    eprintln!("starting etcd, app {CALLEE}, tandemd {CALLEE} and tandemd {CALLER} ...");
    let mesh = Mesh::start().await?;
    let idle = mesh.sidecar_memory()?;
    let [(caller_id, caller_pid), (callee_id, callee_pid)] = mesh.sidecar_pids()?;
    let watched = vec![
        (format!("bench process (caller + app {CALLEE})"), std::process::id()),
        (format!("tandemd {caller_id}"), caller_pid),
        (format!("tandemd {callee_id}"), callee_pid),
    ];

    eprintln!(
        "measuring direct and mesh in {} rounds: {} sequential calls, then {} in flight for {:?}, per route ...",
        settings.rounds, settings.calls, settings.in_flight, duration
    );
    let direct = mesh.direct_route().await?;
    let figures = invoke::measure(&[&direct, &mesh.mesh_route()], &settings, &watched).await?;
    let [direct, through_mesh]: [_; 2] = figures.try_into().expect("one set of figures per route");
    let after_load = mesh.sidecar_memory()?;
    drop(mesh);

    let memory = idle
        .into_iter()
        .zip(after_load)
        .map(|((app_id, idle), (_, after_load))| SidecarMemory {
            app_id: app_id.to_string(),
            role: if app_id == CALLER { "caller's sidecar" } else { "callee's sidecar" },
            idle,
            after_load,
        })
        .collect();
    let report = InvokeReport { context, settings, direct, mesh: through_mesh, memory };
    let others = [&report.direct, &report.mesh]
        .iter()
        .flat_map(|f| [f.latency_cpu.others_cores(), f.throughput_cpu.others_cores()])
        .fold(0.0, f64::max);
    if others > 0.25 {
        eprintln!(
            "warning: other processes kept up to {others:.2} of {} cores busy during the measurements; \
             the figures are pessimistic and the ratios noisier than on a quiet machine",
            report.context.cpus
        );
    }
    let block = report.to_markdown();
    println!("{block}");

    if let Some(path) = &args.write {
        let existing = match std::fs::read_to_string(path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let text = report::splice(existing.as_deref(), &block)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("updating {}", path.display()))?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
