//! `tandemd`: parse flags, set up logging and tracing, run the sidecar until SIGTERM, Ctrl-C or
//! the Shutdown RPC, then leave discovery, drain, and send the spans still queued. `tandemd probe`
//! instead asks a running tandemd's admin port for /readyz (a health check for images without curl).

use std::time::Duration;

use clap::Parser;
use tandem_sidecar::Config;
use tandem_sidecar::telemetry::{self, TraceSettings};

/// mimalloc rather than glibc's malloc: a sidecar copies every request and event through many
/// short-lived buffers, and under load glibc's allocator was a quarter of tandemd's CPU time
/// (see BENCHMARKS.md, pub/sub).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long the exit waits for the collector to take the spans still queued.
const SPAN_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

fn main() {
    if std::env::args_os().nth(1).is_some_and(|first| first == "probe") {
        let args = std::iter::once("tandemd probe".into()).chain(std::env::args_os().skip(2));
        std::process::exit(tandem_sidecar::probe::run(args.collect::<Vec<std::ffi::OsString>>()));
    }
    let config = Config::parse();
    let runtime = match config.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(usize::from(n)).enable_all().build(),
    };
    match runtime {
        Ok(runtime) => runtime.block_on(run(config)),
        Err(e) => {
            eprintln!("tandemd: cannot start the async runtime: {e}");
            std::process::exit(2);
        }
    }
}

async fn run(config: Config) {
    let telemetry = TraceSettings::from_vars(&config.app_id, |name| std::env::var(name).ok())
        .and_then(|settings| telemetry::init(&config.log_level, config.log_format, &settings));
    let telemetry = match telemetry {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("tandemd: {e}");
            std::process::exit(2);
        }
    };

    let result = tandem_sidecar::run(config, shutdown_signal(), |_| {}).await;
    // Off the runtime thread: the export thread may need a moment to reach the collector.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown(SPAN_FLUSH_TIMEOUT)).await;
    if let Err(e) = result {
        tracing::error!("{e}");
        eprintln!("tandemd: {e}");
        std::process::exit(2);
    }
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT).
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler cannot fail on Unix");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
