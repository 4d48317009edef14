//! A workspace service binary (e.g. `tandem-ingest`) as a real process: its output kept in a
//! file in its own temp dir and shown when a test fails, killed when dropped.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::{eventually, workspace_binary};

/// Builder of a service process.
#[derive(Debug, Clone)]
pub struct Service {
    binary: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Service {
    /// The workspace binary `binary` (built into `target/<profile>/`).
    pub fn new(binary: &str) -> Service {
        Service { binary: binary.into(), args: Vec::new(), env: Vec::new() }
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    fn command(&self) -> Command {
        let mut command = Command::new(workspace_binary(&self.binary));
        command
            .args(&self.args)
            .env("RUST_LOG", "info")
            .env_remove("APP_PORT")
            .env_remove("TANDEM_SIDECAR")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// Starts the process.
    pub async fn spawn(self) -> RunningService {
        let dir = tempfile::Builder::new().prefix(&format!("{}-", self.binary)).tempdir().expect("temp dir");
        let mut child = self
            .command()
            .current_dir(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.binary));
        let log = dir.path().join("output.log");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let copiers = vec![tokio::spawn(copy_lines(stdout, log.clone())), tokio::spawn(copy_lines(stderr, log))];
        RunningService { name: self.binary, dir, child: Some(child), copiers }
    }

    /// Runs the process until it exits by itself (bounded by `timeout`), with its output.
    pub async fn run_to_exit(self, timeout: Duration) -> std::process::Output {
        let output = self.command().stdout(Stdio::piped()).stderr(Stdio::piped()).output();
        tokio::time::timeout(timeout, output)
            .await
            .unwrap_or_else(|_| panic!("{} did not exit within {timeout:?}", self.binary))
            .unwrap_or_else(|e| panic!("running {}: {e}", self.binary))
    }
}

async fn copy_lines(output: impl tokio::io::AsyncRead + Unpin, path: std::path::PathBuf) {
    let Ok(mut file) = tokio::fs::OpenOptions::new().create(true).append(true).open(&path).await else { return };
    let mut lines = BufReader::new(output).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let _ = file.write_all(format!("{line}\n").as_bytes()).await;
        let _ = file.flush().await;
    }
}

/// A running service; killed when dropped (its output is printed if the test is failing).
pub struct RunningService {
    pub name: String,
    dir: TempDir,
    child: Option<Child>,
    copiers: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningService {
    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Everything it printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("output.log")).unwrap_or_default()
    }

    /// The last lines it printed.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Waits until its output contains `text`.
    pub async fn wait_for_log(&self, text: &str, timeout: Duration) {
        let what = format!("'{text}' in the output of {}", self.name);
        eventually(timeout, &what, || async { self.log().contains(text) }).await;
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGTERM, then waits (bounded) for the exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the service is running");
        let pid = child.id().expect("a running child has a pid");
        let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        let status = match tokio::time::timeout(Duration::from_secs(20), child.wait()).await {
            Ok(Ok(status)) => status,
            _ => {
                let _ = child.kill().await;
                panic!("{} did not exit within 20 s of SIGTERM; output:\n{}", self.name, self.log_tail());
            }
        };
        for copier in self.copiers.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), copier).await;
        }
        status
    }

    /// SIGKILL, then reap.
    pub async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }
}

impl Drop for RunningService {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- output of {} ----\n{}", self.name, self.log_tail());
        }
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}
