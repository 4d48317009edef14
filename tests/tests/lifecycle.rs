//! The sidecar's life: health endpoints, graceful shutdown (signals and the Shutdown RPC),
//! draining in-flight calls, and riding out etcd being away at start or while running.

use std::time::Duration;

use tandem_sdk::{AppServer, Reply};
use tandem_tests::{Etcd, InvokeMesh, Sidecar, TestApp, eventually, free_port, wait_for_instances};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_answer_for_liveness_readiness_and_dapr_sdks() {
    let etcd = Etcd::start().await;
    let app = TestApp::named("b-1").await;
    let sidecar = Sidecar::new("svc-b").etcd(&etcd).app_port(app.port()).spawn().await;
    sidecar.wait_ready().await;

    assert_eq!(sidecar.get("/healthz").await.unwrap().0, 200);
    assert_eq!(sidecar.get("/readyz").await.unwrap(), (200, "ready\n".to_string()));
    assert_eq!(sidecar.get("/v1.0/healthz").await.unwrap().0, 204);
    assert_eq!(sidecar.get("/v1.0/healthz/outbound").await.unwrap().0, 204);
    assert_eq!(sidecar.get("/no-such-path").await.unwrap().0, 404);

    let metadata = sidecar.client().metadata().await.unwrap();
    assert_eq!(metadata.id, "svc-b");
    assert_eq!(metadata.app_connection_properties.unwrap().port, i32::from(app.port()));
    assert_eq!(metadata.extended_metadata["tandem.namespace"], "default");

    // The app going away makes the sidecar unready, but still alive.
    app.stop().await;
    eventually(Duration::from_secs(10), "/readyz 503 once the app is down", || async {
        matches!(sidecar.get("/readyz").await, Ok((503, body)) if body.contains("app unhealthy"))
    })
    .await;
    assert_eq!(sidecar.get("/healthz").await.unwrap().0, 200);
    assert_eq!(sidecar.get("/v1.0/healthz").await.unwrap().0, 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sigint_and_the_shutdown_rpc_leave_discovery_at_once_and_exit_cleanly() {
    let etcd = Etcd::start().await;
    for how in ["SIGTERM", "SIGINT", "Shutdown RPC"] {
        // A lease far longer than the test: only a revoke can remove the instance this fast.
        let mut sidecar = Sidecar::new("svc-b").etcd(&etcd).lease_ttl(600).spawn().await;
        sidecar.wait_ready().await;
        assert_eq!(etcd.registered_instances("svc-b").await, 1, "{how}");
        let status = match how {
            "SIGTERM" => sidecar.signal("TERM").await,
            "SIGINT" => sidecar.signal("INT").await,
            _ => {
                sidecar.client().shutdown().await.unwrap();
                sidecar.wait_for_exit().await
            }
        };
        assert!(status.success(), "{how}: tandemd exited with {status}");
        assert_eq!(etcd.registered_instances("svc-b").await, 0, "{how}: the lease was not revoked");
        assert!(sidecar.log().contains("lease revoked"), "{how}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_flight_when_the_callee_sidecar_is_stopped_completes() {
    let etcd = Etcd::start().await;
    let (entered_tx, entered_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let app = TestApp::start(AppServer::new().handler("whoami", |_| async { Ok(Reply::text("b-1")) }).handler(
        "slow",
        move |_| {
            let _ = entered_tx.send(());
            async {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                Ok(Reply::text("done"))
            }
        },
    ))
    .await;
    let mut callee = Sidecar::new("svc-b").etcd(&etcd).app_port(app.port()).spawn().await;
    let caller = Sidecar::new("svc-a").etcd(&etcd).spawn().await;
    let client = caller.client();
    wait_for_instances(&client, "svc-b", &["b-1"]).await;

    let mut entered_rx = entered_rx;
    let call = tokio::spawn(async move { client.invoke("svc-b", "slow", Vec::new()).await });
    tokio::time::timeout(Duration::from_secs(10), entered_rx.recv()).await.expect("the call reached the app");
    let status = callee.signal("TERM").await;
    assert!(status.success());
    let reply = call.await.unwrap().expect("the in-flight call was drained, not cut");
    assert_eq!(reply.data, b"done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_started_before_etcd_waits_unready_then_registers() {
    let etcd_port = free_port();
    let sidecar = Sidecar::new("svc-b").etcd_endpoints(&format!("http://127.0.0.1:{etcd_port}")).spawn().await;
    // It keeps retrying (the log says so) and reports why it is not ready.
    sidecar.wait_for_log("retrying").await;
    let (code, body) = sidecar.get("/readyz").await.unwrap();
    assert_eq!(code, 503);
    assert!(body.contains("not registered in etcd"), "{body}");
    assert_eq!(sidecar.get("/healthz").await.unwrap().0, 200);

    let etcd = Etcd::start_on(etcd_port).await;
    sidecar.wait_ready().await;
    assert_eq!(etcd.registered_instances("svc-b").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_flow_while_etcd_is_down_and_registration_returns_with_it() {
    let InvokeMesh { mut etcd, apps: _apps, callees, caller, client } = InvokeMesh::start(1).await;
    let callee = &callees[0];
    callee.wait_ready().await;

    etcd.kill().await;
    // The registration is lost (the keep-alive fails) ...
    eventually(Duration::from_secs(20), "the callee to notice etcd is gone", || async {
        matches!(callee.get("/readyz").await, Ok((503, body)) if body.contains("not registered"))
    })
    .await;
    // ... but routing keeps the last known table.
    for i in 0..10 {
        let reply = client.invoke("svc-b", "echo", vec![i]).await;
        assert!(reply.is_ok(), "call {i} with etcd down failed: {reply:?}");
    }

    etcd.restart().await;
    callee.wait_ready().await;
    caller.wait_ready().await;
    assert_eq!(etcd.registered_instances("svc-b").await, 1);
    // A sidecar that starts now learns of svc-b from etcd alone.
    let newcomer = Sidecar::new("svc-c").etcd(&etcd).spawn().await;
    wait_for_instances(&newcomer.client(), "svc-b", &["b-1"]).await;
}

/// `tandemd probe` is the health check of the container images (no curl in a scratch image):
/// exit 0 while the sidecar is ready, 1 with the reason while it is not, 1 when nothing listens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tandemd_probe_turns_readyz_into_an_exit_code() {
    let probe = |port: u16, path: &'static str| async move {
        let output = tokio::process::Command::new(tandem_tests::workspace_binary("tandemd"))
            .args(["probe", "--path", path, "--timeout", "2s"])
            .env("TANDEM_ADMIN_PORT", port.to_string())
            .output()
            .await
            .expect("running tandemd probe");
        (output.status.code(), String::from_utf8_lossy(&output.stdout).into_owned())
    };
    let etcd = Etcd::start().await;
    let app = TestApp::named("probe-1").await;
    let sidecar = Sidecar::new("svc-probe").etcd(&etcd).app_port(app.port()).spawn().await;
    sidecar.wait_ready().await;
    let admin_port = sidecar.admin_addr().port();

    let (code, out) = probe(admin_port, "/readyz").await;
    assert_eq!(code, Some(0), "ready sidecar: {out}");
    assert!(out.contains("200 ready"), "{out}");

    app.stop().await;
    eventually(Duration::from_secs(10), "tandemd probe exits 1 once the app is down", || async {
        let (code, out) = probe(admin_port, "/readyz").await;
        code == Some(1) && out.contains("503") && out.contains("app unhealthy")
    })
    .await;
    // Liveness still passes: the process serves.
    assert_eq!(probe(admin_port, "/healthz").await.0, Some(0));

    drop(sidecar);
    eventually(Duration::from_secs(10), "tandemd probe exits 1 when nothing listens", || async {
        let (code, out) = probe(admin_port, "/healthz").await;
        code == Some(1) && out.contains("probe failed")
    })
    .await;
}
