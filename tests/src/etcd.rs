//! A real etcd server (Debian's `etcd-server`, `etcd` on PATH) on free loopback ports.

use std::net::SocketAddr;
use std::path::PathBuf;
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
    /// With TLS: its files, and the plain HTTP port of /health.
    tls: Option<(EtcdTlsFiles, SocketAddr)>,
}

/// The files of an etcd that serves clients over TLS and requires client certificates: a CA,
/// etcd's server certificate (for 127.0.0.1) and a client certificate, all PEM.
#[derive(Debug, Clone)]
pub struct EtcdTlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl EtcdTlsFiles {
    /// The flags that give a tandemd (or the CLI) TLS to etcd with the client certificate.
    pub fn client_flags(&self) -> Vec<String> {
        let path = |p: &PathBuf| p.to_string_lossy().into_owned();
        vec![
            "--etcd-ca-file".into(),
            path(&self.ca),
            "--etcd-cert-file".into(),
            path(&self.client_cert),
            "--etcd-key-file".into(),
            path(&self.client_key),
        ]
    }
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
            let mut etcd = Etcd { child: None, dir, client, peer, max_request_bytes, tls: None };
            match etcd.launch().await {
                Ok(()) => return etcd,
                Err(e) => last_error = e,
            }
        }
        panic!("etcd did not start: {last_error}");
    }

    /// Starts etcd serving clients over TLS only, with client-certificate authentication
    /// (`--client-cert-auth`); its certificates are made for it, in its temp dir.
    pub async fn start_with_tls() -> Etcd {
        let dir = tempfile::Builder::new().prefix("tandem-etcd-").tempdir().expect("creating a temp dir");
        let files = crate::pki::etcd_tls_files(dir.path());
        let client = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let peer = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let health = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut etcd = Etcd { child: None, dir, client, peer, max_request_bytes: None, tls: Some((files, health)) };
        if let Err(e) = etcd.launch().await {
            panic!("etcd with TLS did not start: {e}");
        }
        etcd
    }

    /// With [`Etcd::start_with_tls`]: its certificates.
    pub fn tls_files(&self) -> Option<&EtcdTlsFiles> {
        self.tls.as_ref().map(|(files, _)| files)
    }

    /// Starts etcd serving clients on `client_port` (for a sidecar already pointed there).
    pub async fn start_on(client_port: u16) -> Etcd {
        let dir = tempfile::Builder::new().prefix("tandem-etcd-").tempdir().expect("creating a temp dir");
        let client = SocketAddr::from(([127, 0, 0, 1], client_port));
        let peer = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut etcd = Etcd { child: None, dir, client, peer, max_request_bytes: None, tls: None };
        if let Err(e) = etcd.launch().await {
            panic!("etcd did not start on port {client_port}: {e}");
        }
        etcd
    }

    /// The etcd process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(tokio::process::Child::id)
    }

    /// `http://127.0.0.1:PORT` (`https` with TLS), the value for `--etcd-endpoints`.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.client)
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
        let client_url = self.endpoint();
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
            .args(self.tls_args())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run etcd (install Debian's etcd-server): {e}"))?;
        // With TLS, /health is read from the plain metrics listener.
        let health = self.tls.as_ref().map_or(self.client, |(_, health)| *health);
        let healthy = async || matches!(http::get(health, "/health").await, Ok((200, body)) if body.contains("true"));
        self.child = Some(server_process::until_healthy(child, "etcd", &log, healthy).await?);
        Ok(())
    }

    fn tls_args(&self) -> Vec<String> {
        let Some((files, health)) = &self.tls else { return Vec::new() };
        let path = |p: &PathBuf| p.to_string_lossy().into_owned();
        vec![
            "--cert-file".into(),
            path(&files.server_cert),
            "--key-file".into(),
            path(&files.server_key),
            "--client-cert-auth".into(),
            "--trusted-ca-file".into(),
            path(&files.ca),
            "--listen-metrics-urls".into(),
            format!("http://{health}"),
        ]
    }

    /// A client of this etcd (with its client certificate when it requires one).
    pub async fn client(&self) -> etcd_client::Client {
        let tls = self.tls_files().map(|files| {
            tandem_sidecar::discovery::EtcdTls::read(Some(&files.ca), Some(&files.client_cert), Some(&files.client_key))
                .expect("the etcd TLS files")
                .expect("files were given")
        });
        tandem_sidecar::discovery::etcd_client(&[self.endpoint()], tls.as_ref()).await.expect("etcd client")
    }

    /// The keys under `prefix`, read from etcd itself.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        let mut client = self.client().await;
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
