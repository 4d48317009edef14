//! A real etcd server (Debian's `etcd-server`, `etcd` on PATH) on free loopback ports.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tempfile::TempDir;
use tokio::process::{Child, Command};

use crate::{free_port, http};

pub struct Etcd {
    // Fields drop in order: the process is killed before its data dir is removed.
    child: Option<Child>,
    dir: TempDir,
    client: SocketAddr,
    peer: SocketAddr,
}

impl Etcd {
    /// Starts etcd and waits until it reports healthy. Retries with new ports if the picked
    /// ones were taken in between.
    pub async fn start() -> Etcd {
        let mut last_error = String::new();
        for _ in 0..5 {
            let dir = tempfile::Builder::new().prefix("tandem-etcd-").tempdir().expect("creating a temp dir");
            let client = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let peer = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let mut etcd = Etcd { child: None, dir, client, peer };
            match etcd.launch().await {
                Ok(()) => return etcd,
                Err(e) => last_error = e,
            }
        }
        panic!("etcd did not start: {last_error}");
    }

    /// Starts etcd serving clients on `client_port` (for a sidecar already pointed there).
    pub async fn start_on(client_port: u16) -> Etcd {
        let dir = tempfile::Builder::new().prefix("tandem-etcd-").tempdir().expect("creating a temp dir");
        let client = SocketAddr::from(([127, 0, 0, 1], client_port));
        let peer = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut etcd = Etcd { child: None, dir, client, peer };
        if let Err(e) = etcd.launch().await {
            panic!("etcd did not start on port {client_port}: {e}");
        }
        etcd
    }

    /// `http://127.0.0.1:PORT`, the value for `--etcd-endpoints`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.client)
    }

    /// Kills etcd (SIGKILL) and waits for it to exit; its data stays for [`Etcd::restart`].
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts etcd again on the same ports and data dir.
    pub async fn restart(&mut self) {
        self.kill().await;
        let mut last_error = String::new();
        // The old process's ports may take a moment to be released.
        for _ in 0..20 {
            match self.launch().await {
                Ok(()) => return,
                Err(e) => last_error = e,
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("etcd did not restart: {last_error}");
    }

    async fn launch(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .map_err(|e| e.to_string())?;
        let client_url = format!("http://{}", self.client);
        let peer_url = format!("http://{}", self.peer);
        let mut child = Command::new("etcd")
            .args(["--name", "tandem-test"])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("tandem-test={peer_url}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run etcd (install Debian's etcd-server): {e}"))?;
        let started = std::time::Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("etcd exited with {status}; log: {}", self.log_tail()));
            }
            if let Ok((200, body)) = http::get(self.client, "/health").await
                && body.contains("true")
            {
                self.child = Some(child);
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(20) {
                let _ = child.kill().await;
                return Err(format!("etcd not healthy after 20 s; log: {}", self.log_tail()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The keys under `prefix`, read from etcd itself.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        let mut client = etcd_client::Client::connect([self.endpoint()], None).await.expect("etcd client");
        let response = client
            .get(prefix, Some(etcd_client::GetOptions::new().with_prefix().with_keys_only()))
            .await
            .expect("listing etcd keys");
        response.kvs().iter().map(|kv| String::from_utf8_lossy(kv.key()).into_owned()).collect()
    }

    /// How many instances of `app_id` are registered in the default namespace.
    pub async fn registered_instances(&self, app_id: &str) -> usize {
        self.keys(&tandem_sidecar::discovery::keys::instances_prefix("default", app_id)).await.len()
    }

    /// The last lines etcd logged.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}
