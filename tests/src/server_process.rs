//! What the harness's server processes (etcd, nats-server) share: their output in a log file of
//! their temp dir, waiting until a just-started one passes its health check, and restarts that
//! retry while the old process's ports are released.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::Child;

/// How long a server may take to become healthy.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// stdout and stderr appending to the log file at `path`.
pub fn log_to(path: &Path) -> Result<(Stdio, Stdio), String> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| e.to_string())?;
    Ok((log.try_clone().map_err(|e| e.to_string())?.into(), log.into()))
}

/// The last 15 lines of the log file at `path`.
pub fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Waits until `healthy` holds for the just-started `child` named `name`, whose log is at
/// `log`; kills it and says why when it exits or is not healthy in time.
pub async fn until_healthy<F, Fut>(mut child: Child, name: &str, log: &Path, mut healthy: F) -> Result<Child, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{name} exited with {status}; log: {}", log_tail(log)));
        }
        if healthy().await {
            return Ok(child);
        }
        if started.elapsed() > START_TIMEOUT {
            let _ = child.kill().await;
            return Err(format!("{name} not healthy after {START_TIMEOUT:?}; log: {}", log_tail(log)));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Calls `launch` until it succeeds (20 tries, 250 ms apart: the old process's ports may take
/// a moment to be released); panics naming `name` after the last.
pub async fn relaunch(name: &str, mut launch: impl AsyncFnMut() -> Result<(), String>) {
    let mut last_error = String::new();
    for _ in 0..20 {
        match launch().await {
            Ok(()) => return,
            Err(e) => last_error = e,
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("{name} did not restart: {last_error}");
}
