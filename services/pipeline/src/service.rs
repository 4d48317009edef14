//! What every pipeline service's `main` does the same way: the common flags, logging, waiting
//! for the sidecar, serving the callback API until a shutdown signal.

/// The allocator every pipeline service declares (`#[global_allocator]` in its `main`):
/// mimalloc, as in tandemd; serve's request path spent about a sixth of its time in glibc's
/// malloc and free under load.
pub use mimalloc::MiMalloc as Allocator;

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use tandem_sdk::{AppServer, SidecarClient};
use tokio::net::TcpListener;

/// Flags every service takes (the contract's `--app-port`, `--app-host`, `--sidecar`).
#[derive(Debug, Clone, Args)]
pub struct ServiceArgs {
    /// Port to serve the AppCallback gRPC API on (give tandemd the same as --app-port).
    #[arg(long, env = "APP_PORT")]
    pub app_port: u16,
    /// Address to serve on (0.0.0.0 in containers).
    #[arg(long, env = "APP_HOST", default_value = "127.0.0.1")]
    pub app_host: String,
    /// The own tandemd's gRPC API.
    #[arg(long, env = "TANDEM_SIDECAR", default_value = "http://127.0.0.1:50001")]
    pub sidecar: String,
    /// How long to wait for the sidecar to answer at start, in seconds.
    #[arg(long, env = "TANDEM_SIDECAR_WAIT_SECS", default_value_t = 120)]
    pub sidecar_wait_secs: u64,
}

/// Why a service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("--sidecar '{0}' is not a valid http://HOST:PORT URL")]
    BadSidecarUrl(String),
    #[error("the sidecar at {url} did not answer within {waited:?} (last error: {last_error})")]
    SidecarUnreachable { url: String, waited: Duration, last_error: String },
    #[error("cannot listen on {address}: {source}")]
    Bind { address: String, source: std::io::Error },
}

/// Logs to stderr; `RUST_LOG` filters (default `info`).
/// A service's whole `main`: parses its options (`O`), sets up logging and runs `run` on a
/// multi-threaded tokio runtime. An error ends the process with exit code 1, the error and its
/// causes on stderr after the service's `name`.
pub fn run_main<O, F, E>(name: &str, run: impl FnOnce(O) -> F) -> ExitCode
where
    O: clap::Parser,
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let options = O::parse();
    init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{name}: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{name}: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: logs kept in files (tandem up's run dir) stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).try_init();
}

impl ServiceArgs {
    pub fn sidecar_wait(&self) -> Duration {
        Duration::from_secs(self.sidecar_wait_secs)
    }
}

/// A client of the sidecar at `url` (`http://HOST:PORT` or `HOST:PORT`); connects on first use.
pub fn sidecar_client(url: &str) -> Result<SidecarClient, StartError> {
    let address = url.strip_prefix("http://").unwrap_or(url).trim_end_matches('/');
    if address.is_empty() || address.contains('/') {
        return Err(StartError::BadSidecarUrl(url.to_string()));
    }
    SidecarClient::new(address).map_err(|_| StartError::BadSidecarUrl(url.to_string()))
}

/// Waits until the sidecar answers, with a log line every few seconds, for at most `wait`: the
/// services need no start order.
pub async fn wait_for_sidecar(client: &SidecarClient, url: &str, wait: Duration) -> Result<(), StartError> {
    let start = Instant::now();
    let mut logged = Instant::now() - Duration::from_secs(60);
    loop {
        match client.metadata().await {
            Ok(metadata) => {
                tracing::info!(sidecar = %url, app_id = %metadata.id, "connected to the sidecar");
                return Ok(());
            }
            Err(status) => {
                if start.elapsed() >= wait {
                    return Err(StartError::SidecarUnreachable {
                        url: url.to_string(),
                        waited: wait,
                        last_error: status.message().to_string(),
                    });
                }
                if logged.elapsed() >= Duration::from_secs(5) {
                    tracing::info!(sidecar = %url, error = %status.message(), "waiting for the sidecar to answer");
                    logged = Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Binds the callback server's listener.
pub async fn bind(args: &ServiceArgs) -> Result<TcpListener, StartError> {
    let address = format!("{}:{}", args.app_host, args.app_port);
    TcpListener::bind(&address).await.map_err(|source| StartError::Bind { address, source })
}

/// Serves `server` on `listener` until SIGINT or SIGTERM.
pub async fn serve_until_signal(server: AppServer, listener: TcpListener) {
    let address: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?address, "serving the app-callback API");
    server.serve(listener, shutdown_signal()).await
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown signal received");
}

/// RFC 3339 UTC timestamp of now, to the second (`2026-11-25T22:40:00Z`).
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    rfc3339(secs)
}

/// Civil-from-days (Howard Hinnant's algorithm): no calendar crate for one timestamp.
fn rfc3339(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_764_110_400), "2025-11-25T22:40:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn a_bad_sidecar_url_is_named() {
        let err = sidecar_client("http://a/b").unwrap_err();
        assert!(err.to_string().contains("'http://a/b'"), "{err}");
    }
}
