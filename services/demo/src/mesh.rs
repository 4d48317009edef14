//! The demo's mesh: a real etcd, and for each of the apps "ping" and "pong" an app served in
//! this process plus a `tandemd` process beside it, all on free loopback ports.
//!
//! The processes are started through the test harness (`tandem-tests`), which kills them when
//! their handles are dropped; [`Mesh::stop`] also waits for them to exit.

use std::io::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::bail;
use tandem_sdk::{AppServer, Invocation, Reply, SidecarClient};
use tandem_tests::{Etcd, RunningSidecar, Sidecar, TestApp};

use crate::stats::millis;

/// The method both apps serve: it answers `"<app> returns <payload> to <caller>"`, where the
/// caller's app-id is the one the sidecars attached (`dapr-caller-app-id`).
pub const METHOD: &str = "hit";

/// What an app answers to `payload` from `caller`.
pub fn expected_reply(app: &str, payload: &str, caller: &str) -> String {
    format!("{app} returns {payload} to {caller}")
}

/// Fails early, with what to do, when etcd or tandemd cannot be found.
pub fn check_prerequisites() -> anyhow::Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if !std::env::split_paths(&path).any(|dir| is_executable(&dir.join("etcd"))) {
        bail!(
            "etcd is not on PATH: install it (Debian: apt-get install etcd-server), or run scripts/demo.sh, which does"
        );
    }
    let tandemd = tandem_tests::workspace_binary_path("tandemd");
    if !is_executable(&tandemd) {
        bail!(
            "{} is missing: build it first with `cargo build -p tandem-sidecar` in the same profile \
             as tandem-demo (scripts/demo.sh builds both)",
            tandemd.display()
        );
    }
    Ok(())
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// etcd and the two apps with their sidecars.
pub struct Mesh {
    pub etcd: Etcd,
    pub ping: Peer,
    pub pong: Peer,
}

impl Mesh {
    /// Starts etcd, then ping and pong (each app, then its sidecar), and waits until both
    /// sidecars are ready (registered in etcd, their app healthy).
    /// Prints a line as each piece is up.
    pub async fn start() -> anyhow::Result<Mesh> {
        let started = Instant::now();
        let etcd = Etcd::start().await;
        say!("  etcd ready                 {:>8}", millis(started.elapsed()))?;
        let ping = Peer::start("ping", &etcd).await?;
        say!("  ping + its tandemd ready   {:>8}", millis(started.elapsed()))?;
        let pong = Peer::start("pong", &etcd).await?;
        say!("  pong + its tandemd ready   {:>8}", millis(started.elapsed()))?;
        Ok(Mesh { etcd, ping, pong })
    }

    /// Prints where etcd, each app and each sidecar listen.
    pub fn print_addresses(&self) -> anyhow::Result<()> {
        say!("  etcd          {}", self.etcd.endpoint())?;
        for peer in [&self.ping, &self.pong] {
            let sidecar = &peer.sidecar;
            say!(
                "  app {:<9} {}  tandemd (pid {}): grpc {}  internal {}  admin http://{}",
                peer.name,
                peer.app.address,
                sidecar.pid().map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
                sidecar.grpc_addr(),
                sidecar.internal_addr(),
                sidecar.admin_addr(),
            )?;
        }
        Ok(())
    }

    /// The last lines each sidecar logged, on stderr (shown when the demo fails).
    pub fn print_sidecar_logs(&self) {
        for peer in [&self.ping, &self.pong] {
            let tail = peer.sidecar.log_tail();
            let _ = writeln!(std::io::stderr(), "---- last lines of tandemd '{}' ----\n{}", peer.name, tail.trim_end());
        }
    }

    /// Kills the sidecars and waits for them to exit, stops the apps, then stops etcd.
    pub async fn stop(self) {
        let Mesh { mut etcd, ping, pong } = self;
        tokio::join!(ping.stop(), pong.stop());
        etcd.kill().await;
    }
}

/// One app, served in this process, and its sidecar.
pub struct Peer {
    pub name: &'static str,
    app: TestApp,
    sidecar: RunningSidecar,
    client: SidecarClient,
}

impl Peer {
    async fn start(name: &'static str, etcd: &Etcd) -> anyhow::Result<Peer> {
        let app = TestApp::start(AppServer::new().handler(METHOD, move |call: Invocation| async move {
            let caller = call.caller_app_id.as_deref().unwrap_or("an unknown caller");
            let payload = String::from_utf8_lossy(&call.data);
            Ok(Reply::text(expected_reply(name, &payload, caller)))
        }))
        .await;
        let sidecar = Sidecar::new(name).etcd(etcd).app_port(app.port()).spawn().await;
        sidecar.wait_ready().await;
        let client = sidecar.client();
        Ok(Peer { name, app, sidecar, client })
    }

    /// The app's client of its own sidecar: every call it makes goes through it.
    pub fn client(&self) -> &SidecarClient {
        &self.client
    }

    async fn stop(self) {
        let Peer { mut sidecar, app, .. } = self;
        sidecar.kill9().await;
        app.stop().await;
    }
}
