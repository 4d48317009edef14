//! `tandem-demo`: the quick start. Starts etcd, two apps and a tandemd beside each, lets the
//! apps call each other through the mesh for `--rounds` rounds, prints every round trip and a
//! latency summary, and stops everything it started, also on Ctrl-C or SIGTERM.
//!
//! Exit code: 0 on success, 1 on failure (the message says what failed), 130 after Ctrl-C
//! (SIGINT), 143 after SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use tandem_demo::{Failure, Options};

#[tokio::main]
async fn main() -> ExitCode {
    let options = Options::parse();
    match tandem_demo::run(&options, interrupted()).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(Failure::Interrupted(signal)) => {
            eprintln!("tandem-demo: interrupted by {signal}; everything it started was stopped");
            // The shell's convention: 128 + the signal's number.
            ExitCode::from(if signal == "SIGTERM" { 128 + 15 } else { 128 + 2 })
        }
        Err(Failure::Error(error)) => {
            eprintln!("tandem-demo: failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves with the signal's name on Ctrl-C (SIGINT) or SIGTERM.
async fn interrupted() -> &'static str {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}
