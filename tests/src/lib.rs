//! tandem-tests: the test harness and the integration tests.
//!
//! Everything the tests start is real and private to the test: an etcd server ([`Etcd`]),
//! `tandemd` processes ([`Sidecar`]) and apps serving the callback API ([`TestApp`]), each on
//! free loopback ports with its own temp dir, and all of it stopped when dropped.
//!
//! Modules: [`etcd`], [`nats`] (a NATS JetStream server), [`sidecar`], [`server_process`] (what
//! the etcd and NATS servers share), [`app`], [`fixture`] (the usual cast of an invocation test),
//! [`compose`] (a Docker Compose project of compose.yaml, torn down when dropped),
//! [`http`] (a tiny HTTP/1.1 GET for admin endpoints), [`poll`] (bounded waiting for a
//! condition instead of sleeps), [`pubsub`] (an inbox of received events, waiting for a
//! subscription), [`pubsub_cases`] (the pub/sub tests every component passes), [`state`]
//! (component files and a state API client), [`stats`] (latency percentiles for the benchmark
//! and the demo), [`otlp`] (an OTLP trace collector in the test process, and tracers for test
//! apps that export to it), [`service`] (a workspace service binary as a process), [`pipeline`]
//! (the AI pipeline: the four services, each beside its own tandemd), [`python`] (a virtualenv
//! with the official Dapr SDK, and the scripts of tests/python/), [`training`] (train
//! replicas in one training group, their status and step logs), [`pki`] (roots and SVIDs
//! on disk for mutual TLS).

pub mod app;
pub mod compose;
pub mod etcd;
pub mod fixture;
pub mod http;
pub mod nats;
pub mod otlp;
pub mod pipeline;
pub mod pki;
pub mod poll;
pub mod pubsub;
pub mod pubsub_cases;
pub mod python;
pub mod server_process;
pub mod service;
pub mod sidecar;
pub mod state;
pub mod stats;
pub mod training;

pub use app::{TestApp, wait_for_instances};
pub use etcd::Etcd;
pub use fixture::InvokeMesh;
pub use nats::Nats;
pub use poll::eventually;
pub use sidecar::{RunningSidecar, Sidecar};

/// A free loopback port for a server that cannot bind port 0 itself (etcd, an app whose port
/// its sidecar must know first), held back from everyone else for the rest of the test
/// process: a socket stays bound to it (`SO_REUSEADDR`, never listening), so Linux never hands
/// it to a port-0 bind (a tandemd started before the app) or an outgoing connection, while the
/// server it is meant for binds it anyway (std's, tokio's, Go's and Python's servers set
/// `SO_REUSEADDR`). Connecting to it before that is refused, as to a closed port.
pub fn free_port() -> u16 {
    static HELD: std::sync::Mutex<Vec<tokio::net::TcpSocket>> = std::sync::Mutex::new(Vec::new());
    let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket.bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0))).expect("binding an ephemeral loopback port");
    let port = socket.local_addr().expect("the bound address").port();
    HELD.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(socket);
    port
}

/// Where a workspace binary sits next to the running executable: `target/<profile>/NAME`,
/// also for a test executable in `target/<profile>/deps/`.
pub fn workspace_binary_path(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the running executable has a path");
    let mut dir = exe.parent().expect("the executable is in a directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// [`workspace_binary_path`], asserting that the binary was built.
pub fn workspace_binary(name: &str) -> std::path::PathBuf {
    let path = workspace_binary_path(name);
    assert!(
        path.exists(),
        "{} is missing: build it first (cargo build --workspace, or cargo test --workspace which builds it)",
        path.display()
    );
    path
}
