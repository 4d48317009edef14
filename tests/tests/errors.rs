//! Bad input and faults on the invocation path: each gets a clear status, never a crash.

use std::time::Duration;

use tandem_sdk::{AppServer, Code, Status};
use tandem_tests::{Etcd, InvokeMesh, Sidecar, TestApp, eventually, wait_for_instances};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_targets_and_empty_fields_are_named_in_the_error() {
    let mut mesh = InvokeMesh::start(1).await;
    let client = mesh.client.clone();

    let unknown = client.invoke("no-such-app", "echo", Vec::new()).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    assert!(unknown.message().contains("'no-such-app'"), "{unknown:?}");

    let empty_id = client.invoke("", "echo", Vec::new()).await.unwrap_err();
    assert_eq!(empty_id.code(), Code::InvalidArgument, "{empty_id:?}");
    assert!(empty_id.message().contains("app-id"), "{empty_id:?}");

    let empty_method = client.invoke("svc-b", "", Vec::new()).await.unwrap_err();
    assert_eq!(empty_method.code(), Code::InvalidArgument, "{empty_method:?}");
    assert!(empty_method.message().contains("method"), "{empty_method:?}");

    let bad_id = client.invoke("a/b", "echo", Vec::new()).await.unwrap_err();
    assert_eq!(bad_id.code(), Code::InvalidArgument, "{bad_id:?}");
    assert!(bad_id.message().contains("'a/b'"), "{bad_id:?}");

    // The app-id stays known after its last instance leaves: UNAVAILABLE, not NOT_FOUND.
    mesh.callees[0].terminate().await;
    eventually(Duration::from_secs(20), "svc-b without live instances", || {
        let client = client.clone();
        async move {
            matches!(client.invoke("svc-b", "echo", Vec::new()).await,
                Err(s) if s.code() == Code::Unavailable && s.message().contains("no live instance"))
        }
    })
    .await;

    // None of it hurt the sidecar.
    assert!(matches!(mesh.caller.get("/healthz").await, Ok((200, _))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_is_not_listening_answers_unavailable_saying_so() {
    let mut mesh = InvokeMesh::start(1).await;
    let (client, callee) = (&mesh.client, &mesh.callees[0]);
    let app = mesh.apps.remove(0);
    let app_port = app.port();
    app.stop().await;
    let status = client.invoke("svc-b", "echo", Vec::new()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("not listening"), "{status:?}");
    assert!(status.message().contains(&app_port.to_string()), "{status:?}");

    // Its sidecar stops being ready and says why.
    eventually(Duration::from_secs(10), "svc-b's sidecar not ready", || async {
        matches!(callee.get("/readyz").await, Ok((503, body)) if body.contains("not listening"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_from_the_app_reaches_the_caller_unchanged_and_is_never_retried() {
    let etcd = Etcd::start().await;
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let server = |name: &'static str, calls: std::sync::Arc<std::sync::atomic::AtomicUsize>| {
        AppServer::new().handler("whoami", move |_| async move { Ok(tandem_sdk::Reply::text(name)) }).handler(
            "fail",
            move |_| {
                calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async { Err(Status::unavailable("the model is still loading")) }
            },
        )
    };
    let b1 = TestApp::start(server("b-1", calls.clone())).await;
    let b2 = TestApp::start(server("b-2", calls.clone())).await;
    let _s1 = Sidecar::new("svc-b").etcd(&etcd).app_port(b1.port()).spawn().await;
    let _s2 = Sidecar::new("svc-b").etcd(&etcd).app_port(b2.port()).spawn().await;
    let caller = Sidecar::new("svc-a").etcd(&etcd).spawn().await;
    let client = caller.client();
    wait_for_instances(&client, "svc-b", &["b-1", "b-2"]).await;

    for round in 1..=4 {
        let status = client.invoke("svc-b", "fail", Vec::new()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "the model is still loading");
        // The call reached an app, so it was not sent to the other instance as well.
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), round);
    }

    let unknown_method = client.invoke("svc-b", "nope", Vec::new()).await.unwrap_err();
    assert_eq!(unknown_method.code(), Code::Unimplemented);
    assert!(unknown_method.message().contains("'nope'"));
}
