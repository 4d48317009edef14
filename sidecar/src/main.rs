//! `tandemd`: parse flags, set up logging, run the sidecar until SIGTERM, Ctrl-C or the
//! Shutdown RPC, then leave discovery and drain. `tandemd probe` instead asks a running
//! tandemd's admin port for /readyz (a health check for images without curl).

use clap::Parser;
use tandem_sidecar::Config;
use tandem_sidecar::config::LogFormat;
use tracing_subscriber::EnvFilter;

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
    let filter = EnvFilter::try_new(&config.log_level).unwrap_or_else(|e| {
        eprintln!("tandemd: --log-level '{}' is not a valid filter ({e}); using info", config.log_level);
        EnvFilter::new("info")
    });
    match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).init(),
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).init(),
    }

    if let Err(e) = tandem_sidecar::run(config, shutdown_signal(), |_| {}).await {
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
