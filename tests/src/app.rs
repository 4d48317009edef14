//! Apps that serve the callback API in the test process, on a free loopback port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use std::time::Duration;

use tandem_sdk::{AppServer, Reply, SidecarClient};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Waits until calls through `client` reach every app in `names` (each a [`TestApp::named`]
/// behind its own sidecar), i.e. the caller's routing table holds all of them.
pub async fn wait_for_instances(client: &SidecarClient, app_id: &str, names: &[&str]) {
    let what = format!("app-id '{app_id}' routed to all of {names:?}");
    let mut seen = std::collections::HashSet::new();
    let start = std::time::Instant::now();
    while !names.iter().all(|n| seen.contains(*n)) {
        if start.elapsed() > Duration::from_secs(30) {
            panic!("timed out waiting for {what}; reached only {seen:?}");
        }
        match client.invoke(app_id, "whoami", Vec::new()).await {
            Ok(reply) => {
                seen.insert(String::from_utf8_lossy(&reply.data).into_owned());
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A running app; stopped when dropped.
pub struct TestApp {
    pub address: SocketAddr,
    calls: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl TestApp {
    /// Serves `server` on a free port.
    pub async fn start(server: AppServer) -> TestApp {
        Self::start_counted(server, Arc::new(AtomicUsize::new(0))).await
    }

    /// Serves `server` on `port` (one a sidecar was already told, from [`crate::free_port`]).
    pub async fn start_on(server: AppServer, port: u16) -> TestApp {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("binding a test app's port");
        Self::serve(server, listener, Arc::new(AtomicUsize::new(0)))
    }

    /// An app whose `whoami` answers `name` and whose `echo` returns the payload, with the
    /// caller's app-id in the `caller` response header. Counts the calls it serves.
    pub async fn named(name: &str) -> TestApp {
        let calls = Arc::new(AtomicUsize::new(0));
        let (who, echo_calls, who_calls) = (name.to_string(), calls.clone(), calls.clone());
        let server = AppServer::new()
            .handler("whoami", move |_| {
                who_calls.fetch_add(1, Ordering::SeqCst);
                let who = who.clone();
                async move { Ok(Reply::text(who)) }
            })
            .handler("echo", move |call| {
                echo_calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    let caller = call.caller_app_id.unwrap_or_default();
                    Ok(Reply { data: call.data, content_type: call.content_type, metadata: vec![] }
                        .header("caller", caller))
                }
            });
        Self::start_counted(server, calls).await
    }

    async fn start_counted(server: AppServer, calls: Arc<AtomicUsize>) -> TestApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding a test app");
        Self::serve(server, listener, calls)
    }

    fn serve(server: AppServer, listener: TcpListener, calls: Arc<AtomicUsize>) -> TestApp {
        let address = listener.local_addr().expect("bound");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await;
        });
        TestApp { address, calls, stop: Some(stop), task }
    }

    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// Calls served by the handlers of [`TestApp::named`].
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Stops serving and waits until the port is closed.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}
