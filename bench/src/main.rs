//! `tandem-bench`: what the mesh and the state API cost, measured on real processes, printed
//! as a markdown report with the targets (PASS/MISS) and, with `--write BENCHMARKS.md`, kept
//! in that file, each benchmark between its own markers.
//!
//! - `invoke`: starts a real etcd, an app B serving the callback API, tandemd for B and
//!   tandemd for a caller A, then calls B's `echo` with a 1 KiB payload three ways, directly
//!   over gRPC, through both sidecars from A's gRPC API and from A's Dapr HTTP API, and compares sequential latency (p50, p99),
//!   throughput with many calls in flight, and tandemd's resident memory idle and at its peak.
//! - `state`: starts a real etcd and one tandemd with two state stores (`state.sled` and
//!   `state.etcd`), and times GetState and durable SaveState of 1 KiB in each against
//!   GetMetadata, a sidecar round trip that touches no store.
//! - `tracing`: the invocation through two sidecars on two meshes side by side, one exporting
//!   every span over OTLP/gRPC to a collector inside the bench, one exporting nothing; their
//!   throughput compared.
//! - `mtls`: the same two meshes side by side, one with mutual TLS between its sidecars
//!   ([`mtls`]), one plaintext; throughput and p50 compared.
//! - `pubsub`: starts etcd, `nats-server -js` and two tandemds, and measures durable publish
//!   to delivery of 1 KiB events for `pubsub.embedded` and `pubsub.jetstream` (each delivered
//!   through `OnTopicEvent` and through a streaming subscription) against NATS JetStream used
//!   directly with async-nats: delivered events/s, and p50/p99 latency at a paced 1,000 events/s.
//! - `serving`: open loop at a latency SLO (see [`serving_slo`]): the highest Poisson rate
//!   `serve` holds at p99 <= 10 ms with dynamic batching and with batch size 1 (digits and a
//!   compute-bound MLP), p2c against round robin with one slow replica, and shedding under
//!   twice the sustainable rate; needs the pipeline binaries built in the same target
//!   directory (`cargo build --release --workspace`).
//! - `serving-closed-loop`: the earlier closed-loop comparison, 64 clients, dynamic batching
//!   against batch size 1 (see [`serving`]), kept as a reference.
//! - `training`: trains tandem-model's MLP on digits with burn and the same MLP with PyTorch
//!   (installed from PyPI into target/bench-venv; scikit-learn when torch cannot be installed)
//!   and compares training throughput in samples/s.
//! - `training-scale`: data-parallel training through the mesh, one replica against two on
//!   the synthetic dataset with a compute-bound MLP, one compute thread each, and the recovery
//!   after a kill -9 of a replica (see [`training_scale`]); needs the pipeline binaries.
//! - `data`: rows/s from a Parquet file to training-ready feature batches in train's store
//!   through ingest, 2 preprocess replicas and train, against the same read and standardization
//!   in one process, and every process's peak memory (see [`data`]); needs the pipeline binaries.
//! - `all` (the default): invoke, state, tracing and pubsub, one after the other (not serving
//!   or training, which need the pipeline binaries or a PyTorch install).
//!
//! Build tandemd into the same target directory first: the harness runs the `tandemd` that
//! sits next to this executable.
//!
//! ```text
//! cargo build --release -p tandem-bench -p tandem-sidecar
//! target/release/tandem-bench --write BENCHMARKS.md          # both
//! target/release/tandem-bench state --write BENCHMARKS.md    # only the state benchmark
//! target/release/tandem-bench tracing --write BENCHMARKS.md  # only the tracing benchmark
//! cargo build --release --workspace
//! target/release/tandem-bench serving --write BENCHMARKS.md  # the serving benchmark (open loop)
//! ```
//!
//! Modules, one per concern:
//! - [`invoke`]: the invocation scenario: the processes and the two routes.
//! - [`state`]: the state scenario: the processes, the operations, and its report.
//! - [`tracing`]: the tracing scenario: a traced and an untraced mesh, and its report.
//! - [`mtls`]: the mTLS scenario: a plaintext and an mTLS mesh, and its report.
//! - [`pubsub`]: the pub/sub scenario: the processes, the five routes, and its report.
//! - [`load`]: the load both apply: warm-up, sequential calls, calls in flight, rounds that
//!   take the routes in turn, CPU use meanwhile.
//! - [`stats`]: percentiles (nearest rank), throughput, ratios.
//! - [`prometheus`]: samples read from tandemd's `/metrics`.
//! - [`procfs`]: resident memory and CPU time from `/proc/<pid>/{status,stat}`, and how busy
//!   the machine was from `/proc/stat`.
//! - [`training`]: the training scenario (burn against PyTorch) and its report.
//! - [`training_scale`]: the training-scale scenario (1 against 2 replicas, recovery) and its report.
//! - [`machine`]: where and when: CPUs, load, build profile, date, commit, tandemd's workers.
//! - [`serving`]: the closed-loop serving scenario: the pipeline, the batching settings, its report.
//! - [`serving_slo`]: the open-loop serving scenario at a latency SLO and its report.
//! - [`data`]: the data scenario (Parquet through the pipeline against one process) and its report.
//! - [`report`]: the invocation report, the shared number formats, and the marker-delimited
//!   sections of BENCHMARKS.md.

mod data;
mod invoke;
mod load;
mod machine;
mod mtls;
mod procfs;
mod prometheus;
mod pubsub;
mod report;
mod serving;
mod serving_slo;
mod state;
mod stats;
mod tracing;
mod training;
mod training_scale;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use clap::{Parser, ValueEnum};

use crate::invoke::{CALLEE, CALLER, Mesh};
use crate::load::{CpuWindow, RouteFigures, Settings};
use crate::machine::RunContext;
use crate::report::{INVOKE_SECTION, InvokeReport, PUBSUB_SECTION, STATE_SECTION, Section, SidecarMemory};

/// Which benchmarks to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    /// Direct gRPC against the same call through two sidecars, from the gRPC and the HTTP API.
    Invoke,
    /// GetState and SaveState in a sled and an etcd store against GetMetadata.
    State,
    /// The invocation through two sidecars with every span exported against none.
    Tracing,
    /// The invocation through two sidecars with mutual TLS between them against plaintext.
    Mtls,
    /// Durable publish to delivery: pubsub.embedded and pubsub.jetstream against JetStream direct.
    Pubsub,
    /// Training throughput of the pipeline's MLP in burn against PyTorch on the CPU.
    Training,
    /// Data-parallel training through the mesh: 1 against 2 replicas, and recovery after a kill.
    TrainingScale,
    /// Invoke, state, tracing and pubsub, one after the other (not serving or training).
    All,
    /// The pipeline's serve in open loop: rates held at a p99 SLO, a slow replica, overload.
    Serving,
    /// The pipeline's serve in closed loop: dynamic batching against batch size 1, 64 clients.
    ServingClosedLoop,
    /// A Parquet file through ingest, 2 preprocess and train's store against one process.
    Data,
}

/// What the mesh and the state API cost, against direct calls and a bare sidecar round trip.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Which benchmark(s) to run.
    #[arg(value_enum, default_value_t = Which::All)]
    which: Which,
    /// Sequential calls timed for the latency percentiles, per route (or state operation).
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
    /// Deliveries in flight per subscriber in the pub/sub benchmark, the same for every route:
    /// the sidecars' maxInFlight/maxAckPending and the direct consumer's max_ack_pending. Every
    /// route runs at each (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [64usize, 1000])]
    delivery_windows: Vec<usize>,
    /// Seconds of the paced (1,000 events/s) latency run of the pub/sub benchmark, per route.
    #[arg(long, default_value_t = 5.0)]
    paced_seconds: f64,
    /// Closed-loop clients of the serving benchmark.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Rounds of the serving benchmark (each restarts serve once per setting).
    #[arg(long, default_value_t = 2)]
    serving_rounds: usize,
    /// serve's --max-batch-size for the batching setting.
    #[arg(long, default_value_t = 64)]
    max_batch_size: u32,
    /// serve's --max-batch-wait-ms (0, serve's default: a batch takes what is queued).
    #[arg(long, default_value_t = 0)]
    max_batch_wait_ms: u64,
    /// Open-loop serving benchmark: seconds each offered rate is held.
    #[arg(long, default_value_t = 3.0)]
    serving_seconds: f64,
    /// Open-loop serving benchmark: the first rate tried (requests/s).
    #[arg(long, default_value_t = 200.0)]
    serving_start_rate: f64,
    /// Open-loop serving benchmark: extra milliseconds per forward pass of the slowed replica.
    #[arg(long, default_value_t = 20)]
    slow_ms: u64,
    /// Training runs per framework in the training benchmark (alternating burn and Python).
    #[arg(long, default_value_t = 3)]
    training_runs: usize,
    /// Training-scale benchmark: the synthetic dataset's rows (ROWS of synthetic:ROWS:64:10).
    #[arg(long, default_value_t = 60_000)]
    scale_rows: usize,
    /// Training-scale benchmark: hidden layer widths, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1024usize, 1024])]
    scale_hidden: Vec<usize>,
    /// Training-scale benchmark: the global batches, each measured on its own (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [512usize, 4096])]
    scale_batch_sizes: Vec<usize>,
    /// Training-scale benchmark: steps measured per run (after 5 warm-up steps).
    #[arg(long, default_value_t = 30)]
    scale_steps: u64,
    /// Training-scale benchmark: rounds (each one replica, then two).
    #[arg(long, default_value_t = 2)]
    scale_rounds: usize,
    /// Data benchmark: rows of the Parquet file (64 features, 10 classes).
    #[arg(long, default_value_t = 200_000)]
    data_rows: usize,
    /// Data benchmark: ingest's --batch-size, each measured on its own (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1024u32, 64])]
    data_batch_sizes: Vec<u32>,
    /// Also write the report into this markdown file (BENCHMARKS.md), replacing only the
    /// sections of the benchmarks that ran.
    #[arg(long, value_name = "FILE")]
    write: Option<PathBuf>,
}

/// mimalloc, as tandemd and the services use: the load this process generates (gRPC clients,
/// the subscriber app, burn's training) shares the machine's cores with what it measures.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let args = Args::parse();
    if args.which == Which::Serving {
        // The compute-bound model's registry entry is over tandemd's default --max-body-size;
        // every sidecar the benchmark starts inherits this. Set before any thread exists.
        // SAFETY: single-threaded here: the runtime is built below.
        unsafe { std::env::set_var("TANDEM_MAX_BODY_SIZE", serving_slo::MAX_BODY_SIZE) };
    }
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
    if matches!(args.which, Which::Invoke | Which::All) {
        let block = run_invoke(&settings).await?;
        println!("{block}");
        write_section(args.write.as_deref(), &INVOKE_SECTION, &block)?;
    }
    if matches!(args.which, Which::State | Which::All) {
        let context = detect_context();
        let report = state::run(&settings, context).await?;
        warn_if_busy(report.cpu_windows(), report.context.cpus);
        let block = report.to_markdown();
        println!("{block}");
        write_section(args.write.as_deref(), &STATE_SECTION, &block)?;
    }
    if matches!(args.which, Which::Tracing | Which::All) {
        let report = tracing::run(&settings, detect_context()).await?;
        warn_if_busy(report.cpu_windows(), report.context.cpus);
        let block = report.to_markdown();
        println!("{block}");
        write_section(args.write.as_deref(), &tracing::TRACING_SECTION, &block)?;
    }
    if matches!(args.which, Which::Mtls) {
        let report = mtls::run(&settings, detect_context()).await?;
        warn_if_busy(report.cpu_windows(), report.context.cpus);
        let block = report.to_markdown();
        println!("{block}");
        write_section(args.write.as_deref(), &mtls::MTLS_SECTION, &block)?;
    }
    if matches!(args.which, Which::Pubsub | Which::All) {
        ensure!(args.paced_seconds.is_finite() && args.paced_seconds > 0.0, "--paced-seconds must be positive");
        ensure!(
            !args.delivery_windows.is_empty() && args.delivery_windows.iter().all(|w| *w > 0),
            "--delivery-windows must list windows of at least 1"
        );
        let context = detect_context();
        let pubsub_settings = pubsub::PubSubSettings {
            seconds: args.seconds,
            in_flight: args.in_flight,
            paced_seconds: args.paced_seconds,
            delivery_windows: args.delivery_windows.clone(),
        };
        let report = pubsub::run(&pubsub_settings, context).await?;
        let block = report.to_markdown();
        println!("{block}");
        write_section(args.write.as_deref(), &PUBSUB_SECTION, &block)?;
    }
    if args.which == Which::Serving {
        ensure!(
            args.serving_seconds.is_finite() && args.serving_seconds > 0.0,
            "--serving-seconds must be a positive number"
        );
        let slo_settings = serving_slo::SloSettings {
            duration: Duration::from_secs_f64(args.serving_seconds),
            slow_ms: args.slow_ms,
            start_rate: args.serving_start_rate,
        };
        let block = serving_slo::run(slo_settings, detect_context()).await?;
        println!("{block}");
        write_section(args.write.as_deref(), &serving_slo::SERVING_SLO_SECTION, &block)?;
    }
    if args.which == Which::ServingClosedLoop {
        ensure!(args.clients > 0 && args.serving_rounds > 0, "--clients and --serving-rounds must be at least 1");
        let serving_settings = serving::ServingSettings {
            clients: args.clients,
            duration,
            rounds: args.serving_rounds,
            max_batch_size: args.max_batch_size,
            max_batch_wait_ms: args.max_batch_wait_ms,
        };
        let block = serving::run(serving_settings, detect_context()).await?;
        println!("{block}");
        write_section(args.write.as_deref(), &serving::SERVING_SECTION, &block)?;
    }
    if args.which == Which::TrainingScale {
        ensure!(args.scale_steps > 0 && args.scale_rounds > 0, "--scale-steps and --scale-rounds must be at least 1");
        ensure!(
            !args.scale_batch_sizes.is_empty() && args.scale_batch_sizes.iter().all(|b| *b > 0),
            "--scale-batch-sizes must list batches of at least 1"
        );
        let settings = training_scale::ScaleSettings {
            rows: args.scale_rows,
            features: 64,
            classes: 10,
            hidden: args.scale_hidden.clone(),
            batch_size: args.scale_batch_sizes[0],
            warmup_steps: 5,
            measured_steps: args.scale_steps,
            rounds: args.scale_rounds,
        };
        let block = training_scale::run(settings, &args.scale_batch_sizes, detect_context()).await?;
        println!("{block}");
        write_section(args.write.as_deref(), &training_scale::TRAINING_SCALE_SECTION, &block)?;
    }
    if args.which == Which::Data {
        ensure!(
            !args.data_batch_sizes.is_empty() && args.data_batch_sizes.iter().all(|b| *b > 0),
            "--data-batch-sizes must list sizes of at least 1"
        );
        let settings = data::DataSettings { rows: args.data_rows, batch_sizes: args.data_batch_sizes.clone() };
        let block = data::run(settings, detect_context()).await?;
        println!("{block}");
        write_section(args.write.as_deref(), &data::DATA_SECTION, &block)?;
    }
    if matches!(args.which, Which::Training) {
        let context = detect_context();
        let training_runs = args.training_runs;
        let report = tokio::task::spawn_blocking(move || training::run(training_runs, context)).await??;
        let block = report.to_markdown();
        println!("{block}");
        write_section(args.write.as_deref(), &training::TRAINING_SECTION, &block)?;
    }
    Ok(())
}

/// Where and when, taken as a benchmark starts (the load average then is its own).
fn detect_context() -> RunContext {
    let context = RunContext::detect();
    if context.profile != "release" {
        eprintln!("warning: a {} build; figures from it say little about a release build", context.profile);
    }
    context
}

/// The invocation benchmark; returns its markdown.
async fn run_invoke(settings: &Settings) -> Result<String> {
    let context = detect_context();
    let duration = settings.duration;
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
        "measuring direct, mesh and mesh over HTTP in {} rounds: {} sequential calls, then {} in flight for {:?}, per route ...",
        settings.rounds, settings.calls, settings.in_flight, duration
    );
    let direct = mesh.direct_route().await?;
    let routes = [&direct, &mesh.mesh_route(), &mesh.http_route()];
    let figures: Vec<RouteFigures> = load::measure(&routes, settings, &watched)
        .await?
        .into_iter()
        .zip(["direct", "mesh", "mesh over the HTTP API"])
        .map(|(measured, route)| measured.into_figures().with_context(|| format!("the {route} route")))
        .collect::<Result<_>>()?;
    let [direct, through_mesh, over_http]: [_; 3] = figures.try_into().expect("one set of figures per route");
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
    let report = InvokeReport { context, settings: *settings, direct, mesh: through_mesh, http: over_http, memory };
    warn_if_busy(
        [&report.direct, &report.mesh, &report.http].into_iter().flat_map(|f| [&f.latency_cpu, &f.throughput_cpu]),
        report.context.cpus,
    );
    Ok(report.to_markdown())
}

/// Warns when other processes took a noticeable share of the machine during the measurements.
fn warn_if_busy<'a>(windows: impl IntoIterator<Item = &'a CpuWindow>, cpus: usize) {
    let others = windows.into_iter().map(CpuWindow::others_cores).fold(0.0, f64::max);
    if others > 0.25 {
        eprintln!(
            "warning: other processes kept up to {others:.2} of {cpus} cores busy during the measurements; \
             the figures are pessimistic and the ratios noisier than on a quiet machine"
        );
    }
}

/// With `--write`, puts `block` between `section`'s markers in that file.
fn write_section(path: Option<&Path>, section: &Section, block: &str) -> Result<()> {
    let Some(path) = path else { return Ok(()) };
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let text = report::splice(existing.as_deref(), section, block)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("updating {}", path.display()))?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {} ({})", path.display(), section.start_marker);
    Ok(())
}
