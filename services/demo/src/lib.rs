//! tandem-demo: the quick-start demo. It starts a real etcd, two apps ("ping" and "pong")
//! served in this process, and a `tandemd` sidecar process beside each app; then the apps
//! call each other through the mesh (app -> its sidecar -> the peer's sidecar -> peer app)
//! for a number of rounds, printing every round trip and a latency summary.
//!
//! Everything it starts is private to the run (free loopback ports, temp dirs) and stopped
//! when it ends, whether it succeeds, fails or is interrupted.
//!
//! Modules:
//! - [`mesh`]: starting and stopping etcd, the two apps and their sidecars.
//! - [`rally`]: the apps calling each other, round by round, and checking every answer.
//! - [`stats`]: latency summaries (count, p50, max).

/// `println!` that returns an error when stdout is closed (e.g. piped into `head`) instead of
/// panicking, so the demo still stops everything it started.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*).map_err(|e| anyhow::anyhow!("writing to stdout: {e}"))
    }};
}

pub mod mesh;
pub mod rally;
pub mod stats;

use std::future::Future;
use std::time::Duration;

use clap::Parser;

pub use mesh::Mesh;
pub use rally::RoundTrip;

/// Flags of `tandem-demo`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "tandem-demo",
    version,
    about = "Two apps calling each other through two tandemd sidecars and a real etcd"
)]
pub struct Options {
    /// Number of rounds; in each, ping calls pong and pong calls ping back.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rounds: u32,

    /// Deadline of each call through the mesh (e.g. 500ms, 5s).
    #[arg(long, default_value = "5s", value_parser = tandem_sidecar::config::parse_duration)]
    pub call_timeout: Duration,
}

/// How a run ended when it did not succeed.
#[derive(Debug)]
pub enum Failure {
    /// Interrupted by the named signal; everything was stopped.
    Interrupted(&'static str),
    /// Something went wrong; the message says what.
    Error(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure::Error(error)
    }
}

/// Runs the demo until it is done or `interrupt` resolves (with the signal's name), then stops
/// everything it started before returning. Returns the round trips played.
pub async fn run(options: &Options, interrupt: impl Future<Output = &'static str>) -> Result<Vec<RoundTrip>, Failure> {
    tokio::pin!(interrupt);
    mesh::check_prerequisites()?;

    say!("tandem demo: etcd, apps 'ping' and 'pong', and a tandemd beside each")?;
    // If interrupted while starting, dropping the half-started mesh kills what it started.
    let mesh = tokio::select! {
        mesh = Mesh::start() => mesh?,
        signal = &mut interrupt => return Err(Failure::Interrupted(signal)),
    };
    let outcome = tokio::select! {
        outcome = async {
            mesh.print_addresses()?;
            rally::play(&mesh, options.rounds, options.call_timeout).await
        } => outcome.map_err(Failure::Error),
        signal = &mut interrupt => Err(Failure::Interrupted(signal)),
    };
    if let Err(Failure::Error(_)) = &outcome {
        mesh.print_sidecar_logs();
    }
    mesh.stop().await;
    let _ = say!("stopped both sidecars, both apps and etcd");
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_default_to_ten_and_zero_is_refused() {
        assert_eq!(Options::try_parse_from(["tandem-demo"]).unwrap().rounds, 10);
        assert_eq!(Options::try_parse_from(["tandem-demo", "--rounds", "3"]).unwrap().rounds, 3);
        assert!(Options::try_parse_from(["tandem-demo", "--rounds", "0"]).is_err());
    }
}
