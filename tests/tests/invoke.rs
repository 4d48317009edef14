//! Service invocation through real sidecars and a real etcd.

use std::time::Duration;

use tandem_sdk::{CallOptions, Code};
use tandem_tests::{Etcd, Sidecar, TestApp, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_travels_app_to_sidecar_to_sidecar_to_app_and_back() {
    let etcd = Etcd::start().await;
    let app_b = TestApp::named("b-1").await;
    let sidecar_b = Sidecar::new("svc-b").etcd(&etcd).app_port(app_b.port()).spawn().await;
    let sidecar_a = Sidecar::new("svc-a").etcd(&etcd).spawn().await;
    sidecar_a.wait_ready().await;
    sidecar_b.wait_ready().await;

    let client = sidecar_a.client();
    let options = CallOptions::default().header("x-trace-me", "yes").content_type("application/json");
    let reply = client.invoke_with("svc-b", "echo", b"{\"n\":1}".to_vec(), options).await.unwrap();
    assert_eq!(reply.data, b"{\"n\":1}");
    assert_eq!(reply.content_type, "application/json");
    // The callee saw the caller's app-id, set by the sidecars.
    assert_eq!(reply.metadata.get("caller").unwrap(), "svc-a");
    assert_eq!(app_b.calls(), 1);
}
