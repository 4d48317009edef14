//! A real NATS server with JetStream (Debian's `nats-server`, run as `nats-server -js`) on a
//! free loopback port, with its own temp store dir; killed when dropped.

use std::net::SocketAddr;
use std::process::Stdio;

use tempfile::TempDir;
use tokio::process::{Child, Command};

use crate::state::ResourcesDir;
use crate::{free_port, http, server_process};

pub struct Nats {
    // Fields drop in order: the process is killed before its store is removed.
    child: Option<Child>,
    dir: TempDir,
    port: u16,
    monitor: u16,
}

impl Nats {
    /// Starts nats-server with JetStream and waits until it reports healthy. Retries with new
    /// ports if the picked ones were taken in between.
    pub async fn start() -> Nats {
        let mut last_error = String::new();
        for _ in 0..5 {
            let dir = tempfile::Builder::new().prefix("tandem-nats-").tempdir().expect("creating a temp dir");
            let mut nats = Nats { child: None, dir, port: free_port(), monitor: free_port() };
            match nats.launch().await {
                Ok(()) => return nats,
                Err(e) => last_error = e,
            }
        }
        panic!("nats-server did not start: {last_error}");
    }

    /// Starts nats-server on `port` (for sidecars already pointed there).
    pub async fn start_on(port: u16) -> Nats {
        let dir = tempfile::Builder::new().prefix("tandem-nats-").tempdir().expect("creating a temp dir");
        let mut nats = Nats { child: None, dir, port, monitor: free_port() };
        if let Err(e) = nats.launch().await {
            panic!("nats-server did not start on port {port}: {e}");
        }
        nats
    }

    /// `nats://127.0.0.1:PORT`, the value for a component's `natsURL`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// A `--resources-path` with one `pubsub.jetstream` component named `name` on this server,
    /// with `metadata` besides `natsURL`.
    pub fn resources(&self, name: &str, metadata: &[(&str, &str)]) -> ResourcesDir {
        let url = self.url();
        let mut all = vec![("natsURL", url.as_str())];
        all.extend_from_slice(metadata);
        ResourcesDir::new(&[(name, "pubsub.jetstream", all.as_slice())])
    }

    /// Kills the server (SIGKILL) and waits for it to exit; its store stays for [`Nats::restart`].
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts the server again on the same port and store.
    pub async fn restart(&mut self) {
        self.kill().await;
        server_process::relaunch("nats-server", async || self.launch().await).await;
    }

    async fn launch(&mut self) -> Result<(), String> {
        let log = self.dir.path().join("nats.log");
        let (stdout, stderr) = server_process::log_to(&log)?;
        let child = Command::new(binary())
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-m", &self.monitor.to_string()])
            .arg("-sd")
            .arg(self.dir.path().join("store"))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run nats-server (install Debian's nats-server): {e}"))?;
        let monitor = SocketAddr::from(([127, 0, 0, 1], self.monitor));
        let healthy = async || matches!(http::get(monitor, "/healthz?js-enabled-only=true").await, Ok((200, _)));
        self.child = Some(server_process::until_healthy(child, "nats-server", &log, healthy).await?);
        Ok(())
    }

    /// The last lines the server logged.
    pub fn log_tail(&self) -> String {
        server_process::log_tail(&self.dir.path().join("nats.log"))
    }
}

/// `nats-server` on PATH, else where Debian puts it (/usr/sbin is not on every user's PATH).
fn binary() -> &'static str {
    const DEBIAN: &str = "/usr/sbin/nats-server";
    let on_path = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join("nats-server").is_file()));
    if !on_path && std::path::Path::new(DEBIAN).is_file() { DEBIAN } else { "nats-server" }
}
