//! A real etcd server (Debian's `etcd-server`, `etcd` on PATH) on free loopback ports.

use std::net::SocketAddr;
use std::process::Stdio;

use tempfile::TempDir;
use tokio::process::{Child, Command};

use crate::{free_port, http, server_process};

pub struct Etcd {
    // Fields drop in order: the process is killed before its data dir is removed.
    child: Option<Child>,
    dir: TempDir,
    client: SocketAddr,
    peer: SocketAddr,
    /// `--max-request-bytes`, when not etcd's default (1.5 MiB).
    max_request_bytes: Option<u64>,
}

impl Etcd {
    /// Starts etcd and waits until it reports healthy. Retries with new ports if the picked
    /// ones were taken in between.
    pub async fn start() -> Etcd {
        Self::start_with_request_limit(None).await
    }

    /// Like [`Etcd::start`], taking requests of up to 64 MiB, as `tandem up` and the manifests
    /// run it: train's registry holds whole models, far over etcd's default of 1.5 MiB.
    pub async fn start_for_models() -> Etcd {
        Self::start_with_request_limit(Some(64 << 20)).await
    }

    async fn start_with_request_limit(max_request_bytes: Option<u64>) -> Etcd {
        let mut last_error = String::new();
        for _ in 0..5 {
            let dir = tempfile::Builder::new().prefix("tandem-etcd-").tempdir().expect("creating a temp dir");
            let client = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let peer = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let mut etcd = Etcd { child: None, dir, client, peer, max_request_bytes };
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
        let mut etcd = Etcd { child: None, dir, client, peer, max_request_bytes: None };
        if let Err(e) = etcd.launch().await {
            panic!("etcd did not start on port {client_port}: {e}");
        }
        etcd
    }

    /// The etcd process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(tokio::process::Child::id)
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
        server_process::relaunch("etcd", async || self.launch().await).await;
    }

    async fn launch(&mut self) -> Result<(), String> {
        let log = self.dir.path().join("etcd.log");
        let (stdout, stderr) = server_process::log_to(&log)?;
        let client_url = format!("http://{}", self.client);
        let peer_url = format!("http://{}", self.peer);
        let mut command = Command::new("etcd");
        if let Some(limit) = self.max_request_bytes {
            command.args(["--max-request-bytes", &limit.to_string()]);
        }
        let child = command
            .args(["--name", "tandem-test"])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("tandem-test={peer_url}")])
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run etcd (install Debian's etcd-server): {e}"))?;
        let client = self.client;
        let healthy = async || matches!(http::get(client, "/health").await, Ok((200, body)) if body.contains("true"));
        self.child = Some(server_process::until_healthy(child, "etcd", &log, healthy).await?);
        Ok(())
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
        server_process::log_tail(&self.dir.path().join("etcd.log"))
    }
}
