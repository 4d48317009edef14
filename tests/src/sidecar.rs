//! `tandemd` as a real process: every port 0 (the bound addresses are read from its log), its
//! own temp data dir, its log kept in a file and shown when a test fails.

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tandem_sdk::SidecarClient;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use crate::{Etcd, eventually, http, workspace_binary};

/// Builder of a tandemd process.
#[derive(Debug, Clone)]
pub struct Sidecar {
    app_id: String,
    etcd_endpoints: Option<String>,
    app_port: Option<u16>,
    app_protocol: &'static str,
    lease_ttl: u32,
    args: Vec<String>,
    env: Vec<(String, String)>,
    data_dir: Option<std::path::PathBuf>,
}

impl Sidecar {
    pub fn new(app_id: &str) -> Self {
        Sidecar {
            app_id: app_id.into(),
            etcd_endpoints: None,
            app_port: None,
            app_protocol: "grpc",
            lease_ttl: 2,
            args: Vec::new(),
            env: Vec::new(),
            data_dir: None,
        }
    }

    pub fn etcd(mut self, etcd: &Etcd) -> Self {
        self.etcd_endpoints = Some(etcd.endpoint());
        self
    }

    /// etcd endpoints given as text (e.g. one where nothing listens).
    pub fn etcd_endpoints(mut self, endpoints: &str) -> Self {
        self.etcd_endpoints = Some(endpoints.into());
        self
    }

    pub fn app_port(mut self, port: u16) -> Self {
        self.app_port = Some(port);
        self
    }

    /// The app's protocol: `grpc` (the default here, for the test apps of [`crate::TestApp`])
    /// or `http` (Dapr's default).
    pub fn app_protocol(mut self, protocol: &'static str) -> Self {
        self.app_protocol = protocol;
        self
    }

    /// Lease TTL in seconds (2 by default, so tests see expiry quickly).
    pub fn lease_ttl(mut self, seconds: u32) -> Self {
        self.lease_ttl = seconds;
        self
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Keeps the sidecar's data in `dir` (to restart a sidecar on the same data); by default
    /// each spawn gets a fresh temp dir.
    pub fn data_dir(mut self, dir: &std::path::Path) -> Self {
        self.data_dir = Some(dir.to_path_buf());
        self
    }

    /// `--resources-path`: a directory of component files.
    pub fn resources(self, dir: &std::path::Path) -> Self {
        self.arg("--resources-path").arg(dir.to_string_lossy().into_owned())
    }

    /// Sets an environment variable of the process. `DAPR_GRPC_PORT` replaces the default
    /// `--grpc-port 0` (a flag would win over the variable).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Starts tandemd and waits until it has bound its ports (not until it is ready).
    pub async fn spawn(self) -> RunningSidecar {
        let dir = tempfile::Builder::new().prefix(&format!("tandemd-{}-", self.app_id)).tempdir().expect("temp dir");
        let mut command = Command::new(workspace_binary("tandemd"));
        command
            .args(["--app-id", &self.app_id])
            .args(["--internal-port", "0", "--admin-port", "0"])
            .args(["--lease-ttl", &self.lease_ttl.to_string()])
            .args(["--app-health-probe-interval", "200ms", "--drain-timeout", "5s"])
            .arg("--data-dir")
            .arg(self.data_dir.clone().unwrap_or_else(|| dir.path().join("data")))
            .env("TANDEM_LOG_LEVEL", "info,tandem_sidecar=debug")
            .env_remove("DAPR_GRPC_PORT")
            .env_remove("DAPR_HTTP_PORT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if !self.env.iter().any(|(key, _)| key == "DAPR_GRPC_PORT") {
            command.args(["--grpc-port", "0"]);
        }
        if !self.env.iter().any(|(key, _)| key == "DAPR_HTTP_PORT") {
            command.args(["--http-port", "0"]);
        }
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(endpoints) = &self.etcd_endpoints {
            command.args(["--etcd-endpoints", endpoints]);
        }
        if let Some(port) = self.app_port {
            command.args(["--app-port", &port.to_string(), "--app-protocol", self.app_protocol]);
        }
        command.args(&self.args);
        let mut child = command.spawn().expect("starting tandemd");

        let log_path = dir.path().join("tandemd.log");
        let (bound_tx, bound_rx) = oneshot::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let log_copiers = vec![
            tokio::spawn(copy_log(stdout, log_path.clone(), Some(bound_tx))),
            tokio::spawn(copy_log(stderr, dir.path().join("tandemd.stderr.log"), None)),
        ];

        let addresses = match tokio::time::timeout(Duration::from_secs(20), bound_rx).await {
            Ok(Ok(addresses)) => addresses,
            _ => {
                let status = child.try_wait().ok().flatten();
                panic!(
                    "tandemd '{}' did not report its addresses (exit: {status:?}); log:\n{}",
                    self.app_id,
                    read_log_tail(&dir)
                );
            }
        };
        let api_token = self.env.iter().find(|(key, _)| key == "DAPR_API_TOKEN").map(|(_, token)| token.clone());
        RunningSidecar { app_id: self.app_id, dir, child: Some(child), addresses, log_copiers, api_token }
    }
}

/// Runs tandemd with exactly `args` until it exits (bounded): for start-up errors.
pub async fn run_until_exit(args: &[&str]) -> std::process::Output {
    let run = Command::new(workspace_binary("tandemd"))
        .args(args)
        .env_remove("DAPR_GRPC_PORT")
        .env_remove("DAPR_HTTP_PORT")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("tandemd should exit by itself")
        .expect("running tandemd")
}

/// The addresses a tandemd bound.
#[derive(Debug, Clone, Copy)]
pub struct Addresses {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub internal: SocketAddr,
    pub admin: SocketAddr,
}

/// Parses tandemd's "tandemd listening" line (`grpc=… internal=… admin=…`), in the text or
/// the JSON log format.
pub fn parse_listening_line(line: &str) -> Option<Addresses> {
    if !line.contains("tandemd listening") {
        return None;
    }
    if line.starts_with('{') {
        let json: serde_json::Value = serde_json::from_str(line).ok()?;
        let field = |name: &str| json["fields"][name].as_str()?.parse().ok();
        return Some(Addresses {
            grpc: field("grpc")?,
            http: field("http")?,
            internal: field("internal")?,
            admin: field("admin")?,
        });
    }
    let field = |name: &str| -> Option<SocketAddr> {
        let start = line.find(&format!(" {name}="))? + name.len() + 2;
        line[start..].split_whitespace().next()?.parse().ok()
    };
    Some(Addresses { grpc: field("grpc")?, http: field("http")?, internal: field("internal")?, admin: field("admin")? })
}

async fn copy_log(
    output: impl tokio::io::AsyncRead + Unpin,
    path: std::path::PathBuf,
    mut on_bound: Option<oneshot::Sender<Addresses>>,
) {
    let Ok(mut file) = tokio::fs::File::create(&path).await else { return };
    let mut lines = BufReader::new(output).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(addresses) = parse_listening_line(&line)
            && let Some(tx) = on_bound.take()
        {
            let _ = tx.send(addresses);
        }
        let _ = file.write_all(line.as_bytes()).await;
        let _ = file.write_all(b"\n").await;
        let _ = file.flush().await;
    }
}

fn read_log_tail(dir: &TempDir) -> String {
    let mut out = String::new();
    for name in ["tandemd.log", "tandemd.stderr.log"] {
        let text = std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        out.push_str(&lines[lines.len().saturating_sub(40)..].join("\n"));
        out.push('\n');
    }
    out
}

/// A running tandemd; killed when dropped (its log is printed if the test is failing).
pub struct RunningSidecar {
    pub app_id: String,
    dir: TempDir,
    child: Option<Child>,
    addresses: Addresses,
    /// Copy the process's output into the log files; they end at the process's exit.
    log_copiers: Vec<tokio::task::JoinHandle<()>>,
    /// The API token it was started with (`DAPR_API_TOKEN`), which its clients send.
    api_token: Option<String>,
}

impl RunningSidecar {
    pub fn grpc_addr(&self) -> SocketAddr {
        self.addresses.grpc
    }

    pub fn internal_addr(&self) -> SocketAddr {
        self.addresses.internal
    }

    /// The Dapr HTTP API (`--http-port`).
    pub fn http_addr(&self) -> SocketAddr {
        self.addresses.http
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.addresses.admin
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// A client for this sidecar's app-facing API (with its API token, if it has one).
    pub fn client(&self) -> SidecarClient {
        SidecarClient::with_api_token(&self.grpc_addr().to_string(), self.api_token.as_deref())
            .expect("a bound address is valid")
    }

    /// GET on the admin port.
    pub async fn get(&self, path: &str) -> Result<(u16, String), String> {
        http::get(self.admin_addr(), path).await
    }

    /// The Prometheus text of `/metrics`.
    pub async fn scrape(&self) -> String {
        let (code, body) = self.get("/metrics").await.expect("scraping /metrics");
        assert_eq!(code, 200, "/metrics answered {code}: {body}");
        body
    }

    /// The value of one sample of `/metrics` (see [`sample`]).
    pub async fn metric(&self, series: &str) -> f64 {
        sample(&self.scrape().await, series)
    }

    /// Waits until /readyz answers 200.
    pub async fn wait_ready(&self) {
        let admin = self.admin_addr();
        let what = format!("tandemd '{}' ready", self.app_id);
        let deadline = Duration::from_secs(30);
        let ready = tokio::time::timeout(deadline, async {
            loop {
                if matches!(http::get(admin, "/readyz").await, Ok((200, _))) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        if ready.is_err() {
            panic!(
                "timed out waiting for {what}; /readyz: {:?}; log:\n{}",
                http::get(admin, "/readyz").await,
                self.log_tail()
            );
        }
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        read_log_tail(&self.dir)
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tandemd.log")).unwrap_or_default()
    }

    /// SIGKILL, then reap.
    pub async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// SIGTERM, then wait (bounded) for the exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM").await
    }

    /// Sends `signal` (e.g. "TERM", "INT"), then waits (bounded) for the exit.
    pub async fn signal(&mut self, signal: &str) -> ExitStatus {
        let child = self.child.take().expect("the sidecar is running");
        let pid = child.id().expect("a running child has a pid");
        let sent = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("running kill");
        assert!(sent.success(), "kill -{signal} {pid} failed");
        self.wait_exit(child).await
    }

    /// Waits (bounded) for an exit that something else caused, e.g. the Shutdown RPC.
    pub async fn wait_for_exit(&mut self) -> ExitStatus {
        let child = self.child.take().expect("the sidecar is running");
        self.wait_exit(child).await
    }

    async fn wait_exit(&mut self, mut child: Child) -> ExitStatus {
        let status = match tokio::time::timeout(Duration::from_secs(20), child.wait()).await {
            Ok(Ok(status)) => status,
            _ => {
                let _ = child.kill().await;
                panic!("tandemd '{}' did not exit within 20 s; log:\n{}", self.app_id, self.log_tail());
            }
        };
        // The log is complete once the copiers have read to the end of the output.
        for copier in self.log_copiers.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), copier).await;
        }
        status
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Waits until the log contains `text`.
    pub async fn wait_for_log(&self, text: &str) {
        let path = self.dir.path().join("tandemd.log");
        let what = format!("'{text}' in the log of tandemd '{}'", self.app_id);
        eventually(Duration::from_secs(20), &what, || {
            let path = path.clone();
            async move { std::fs::read_to_string(path).unwrap_or_default().contains(text) }
        })
        .await;
    }
}

impl Drop for RunningSidecar {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- log of tandemd '{}' ----\n{}", self.app_id, self.log_tail());
        }
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

/// The value of the sample `series` (name with labels, exactly as exposed) in Prometheus text,
/// 0 when absent.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map(|value| value.trim().parse().expect("a numeric sample"))
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_line_is_parsed() {
        let line = "2026-01-01T00:00:00Z  INFO tandem_sidecar::runtime: tandemd listening app_id=a instance_id=x grpc=127.0.0.1:1 http=127.0.0.1:7 internal=127.0.0.1:2 admin=127.0.0.1:3";
        let a = parse_listening_line(line).unwrap();
        assert_eq!(a.grpc.port(), 1);
        assert_eq!(a.http.port(), 7);
        assert_eq!(a.internal.port(), 2);
        assert_eq!(a.admin.port(), 3);
        assert!(parse_listening_line("something else grpc=127.0.0.1:1").is_none());
        let json = r#"{"level":"INFO","fields":{"message":"tandemd listening","grpc":"127.0.0.1:4","http":"127.0.0.1:8","internal":"127.0.0.1:5","admin":"127.0.0.1:6"}}"#;
        assert_eq!(parse_listening_line(json).unwrap().admin.port(), 6);
    }
}
