//! SIGINT (Ctrl-C), SIGTERM and SIGHUP (the terminal closed), caught from the start of
//! `tandem up` so that none kills it before it has stopped its children.

use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::error::CliError;

pub struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl Signals {
    pub fn install() -> Result<Signals, CliError> {
        let install = |kind: SignalKind, name: &str| {
            signal(kind).map_err(|e| CliError::failed(format!("cannot handle {name}: {e}")))
        };
        Ok(Signals {
            interrupt: install(SignalKind::interrupt(), "SIGINT")?,
            terminate: install(SignalKind::terminate(), "SIGTERM")?,
            hangup: install(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    /// Waits for the next SIGINT, SIGTERM or SIGHUP; returns its number.
    pub async fn next(&mut self) -> i32 {
        tokio::select! {
            _ = self.interrupt.recv() => libc::SIGINT,
            _ = self.terminate.recv() => libc::SIGTERM,
            _ = self.hangup.recv() => libc::SIGHUP,
        }
    }
}

/// The signal's name, for messages.
pub fn name(signal: i32) -> &'static str {
    match signal {
        libc::SIGINT => "SIGINT (Ctrl-C)",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP (terminal closed)",
        _ => "a signal",
    }
}
