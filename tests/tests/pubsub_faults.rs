//! At-least-once under faults: 10,000 events published while the subscriber app, its sidecar
//! and the publisher's sidecar are each `kill -9`ed and restarted once. Every acknowledged
//! event must reach the app; the duplicates it sees are counted and reported.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_sdk::SidecarClient;
use tandem_tests::state::ResourcesDir;
use tandem_tests::{Etcd, RunningSidecar, Sidecar, eventually, free_port, workspace_binary};
use tokio::process::{Child, Command};
use tokio::sync::RwLock;

const EVENTS: usize = 10_000;
const PUBLISHERS: usize = 16;

/// The `event_sink` binary (tests/src/bin): the subscriber app as a process of its own.
struct Sink {
    port: u16,
    file: std::path::PathBuf,
    child: Option<Child>,
}

impl Sink {
    async fn start(port: u16, file: &std::path::Path) -> Sink {
        let mut sink = Sink { port, file: file.to_path_buf(), child: None };
        sink.launch().await;
        sink
    }

    async fn launch(&mut self) {
        let child = Command::new(workspace_binary("event_sink"))
            .arg(self.port.to_string())
            .args(["pubsub", "work"])
            .arg(&self.file)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("starting event_sink");
        self.child = Some(child);
        let address = SocketAddr::from(([127, 0, 0, 1], self.port));
        eventually(Duration::from_secs(20), "event_sink listening", || async {
            tokio::net::TcpStream::connect(address).await.is_ok()
        })
        .await;
    }

    async fn kill9_and_restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill -9 event_sink");
        }
        self.launch().await;
    }

    /// How often each payload was received.
    fn received(&self) -> HashMap<String, usize> {
        let text = std::fs::read_to_string(&self.file).unwrap_or_default();
        let mut counts = HashMap::new();
        for line in text.lines() {
            *counts.entry(line.to_string()).or_default() += 1;
        }
        counts
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_survive_killing_the_app_its_sidecar_and_the_publishers_sidecar() {
    let etcd = Etcd::start().await;
    let res = ResourcesDir::new(&[(
        "pubsub",
        "pubsub.embedded",
        &[("initialRetryDelay", "50ms"), ("maxRetryDelay", "500ms"), ("maxDeliveryAttempts", "1000")],
    )]);
    let dirs = tempfile::tempdir().unwrap();
    let (sub_data, pub_data) = (dirs.path().join("subscriber"), dirs.path().join("publisher"));
    let sink_port = free_port();
    let mut sink = Sink::start(sink_port, &dirs.path().join("received.txt")).await;
    let subscriber =
        || Sidecar::new("sink").etcd(&etcd).resources(res.path()).app_port(sink_port).data_dir(&sub_data).spawn();
    let publisher = || Sidecar::new("source").etcd(&etcd).resources(res.path()).data_dir(&pub_data).spawn();
    let mut sub_sidecar: RunningSidecar = subscriber().await;
    let mut pub_sidecar: RunningSidecar = publisher().await;

    // Wait until the publisher knows the subscription: a probe event arrives.
    let client = Arc::new(RwLock::new(pub_sidecar.client()));
    eventually(Duration::from_secs(30), "the subscription to reach the publisher", || {
        let client = client.clone();
        let received = sink.received();
        async move {
            if received.contains_key("probe") {
                return true;
            }
            let _ = client.read().await.publish("pubsub", "work", b"probe".to_vec(), "text/plain").await;
            false
        }
    })
    .await;

    // Publishers retry each event until the sidecar acknowledges it: only acknowledged events
    // are promised, and while the publisher's sidecar is down nothing is acknowledged.
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let acknowledged = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..PUBLISHERS)
        .map(|_| {
            let (client, next, acknowledged) = (client.clone(), next.clone(), acknowledged.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if i >= EVENTS {
                        return;
                    }
                    let payload = format!("event-{i}").into_bytes();
                    let started = Instant::now();
                    loop {
                        let sidecar: SidecarClient = client.read().await.clone();
                        if sidecar.publish("pubsub", "work", payload.clone(), "text/plain").await.is_ok() {
                            acknowledged.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            break;
                        }
                        assert!(started.elapsed() < Duration::from_secs(120), "event-{i} never acknowledged");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        })
        .collect();

    let progress = |n: usize| {
        let acknowledged = acknowledged.clone();
        async move {
            eventually(Duration::from_secs(120), &format!("{n} events acknowledged"), || {
                let acknowledged = acknowledged.clone();
                async move { acknowledged.load(std::sync::atomic::Ordering::SeqCst) >= n }
            })
            .await
        }
    };
    progress(EVENTS / 4).await;
    sink.kill9_and_restart().await;
    progress(EVENTS / 2).await;
    sub_sidecar.kill9().await;
    sub_sidecar = subscriber().await;
    progress(EVENTS * 3 / 4).await;
    pub_sidecar.kill9().await;
    pub_sidecar = publisher().await;
    *client.write().await = pub_sidecar.client();
    for worker in workers {
        worker.await.unwrap();
    }

    eventually(Duration::from_secs(180), "every acknowledged event at the app", || {
        let received = sink.received();
        async move { (0..EVENTS).all(|i| received.contains_key(&format!("event-{i}"))) }
    })
    .await;
    let received = sink.received();
    let duplicates: usize = (0..EVENTS).map(|i| received[&format!("event-{i}")] - 1).sum();
    let twice = (0..EVENTS).filter(|i| received[&format!("event-{i}")] > 1).count();
    println!(
        "pub/sub fault test: {EVENTS} events acknowledged, all {EVENTS} delivered; {duplicates} duplicate deliveries ({twice} events seen more than once)"
    );
    drop(sub_sidecar);
}
