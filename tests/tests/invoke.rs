//! Service invocation through real sidecars and a real etcd: the round trip, load balancing,
//! deadlines, metadata and the pooled connection between sidecars.

use std::time::{Duration, Instant};

use tandem_proto::common::InvokeRequest;
use tandem_proto::runtime::InvokeServiceRequest;
use tandem_sdk::{AppServer, CallOptions, Code, Reply};
use tandem_tests::{Etcd, InvokeMesh, Sidecar, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_travels_app_to_sidecar_to_sidecar_to_app_and_back() {
    let mesh = InvokeMesh::start(1).await;
    let (client, app_b) = (&mesh.client, &mesh.apps[0]);
    let calls_before = app_b.calls();

    let options = CallOptions::default().content_type("application/json");
    let reply = client.invoke_with("svc-b", "echo", b"{\"n\":1}".to_vec(), options).await.unwrap();
    assert_eq!(reply.data, b"{\"n\":1}");
    assert_eq!(reply.content_type, "application/json");
    // The callee saw the caller's app-id, set by the sidecars, and its answer header came back.
    assert_eq!(reply.metadata.get("caller").unwrap(), "svc-a");
    assert_eq!(app_b.calls(), calls_before + 1);

    // A caller cannot pretend to be another app: the sidecars overwrite the identity header.
    let spoofed = CallOptions::default().header("dapr-caller-app-id", "admin");
    let reply = client.invoke_with("svc-b", "echo", Vec::new(), spoofed).await.unwrap();
    assert_eq!(reply.metadata.get("caller").unwrap(), "svc-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_of_one_app_share_the_load() {
    let mesh = InvokeMesh::start(2).await;
    let (client, b1, b2) = (&mesh.client, &mesh.apps[0], &mesh.apps[1]);
    let (before1, before2) = (b1.calls(), b2.calls());
    // 8 callers at a time: p2c weighs calls in flight, so one instance alone cannot keep up
    // with being the cheaper one and the other takes its share. (One call at a time would all
    // go to whichever answers faster, which is what p2c is for.)
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                for _ in 0..25 {
                    client.invoke("svc-b", "echo", b"x".to_vec()).await.unwrap();
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.unwrap();
    }
    let (got1, got2) = (b1.calls() - before1, b2.calls() - before2);
    eprintln!("split of 200 calls: {got1} and {got2}");
    assert_eq!(got1 + got2, 200);
    assert!(got1.min(got2) >= 20, "uneven split: {got1} vs {got2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_deadline_reaches_the_callee_and_expiry_answers_deadline_exceeded() {
    let etcd = Etcd::start().await;
    let app = TestApp::start(
        AppServer::new()
            .handler("timeout", |call| async move {
                let header = call.metadata.get("grpc-timeout").map(|v| v.to_str().unwrap().to_string());
                Ok(Reply::text(header.unwrap_or_default()))
            })
            .handler("slow", |_| async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                Ok(Reply::text("late"))
            }),
    )
    .await;
    let _callee = Sidecar::new("svc-b").etcd(&etcd).app_port(app.port()).spawn().await;
    let caller = Sidecar::new("svc-a").etcd(&etcd).spawn().await;
    let client = caller.client();
    tandem_tests::eventually(Duration::from_secs(20), "svc-b routable", || {
        let client = client.clone();
        async move { client.invoke("svc-b", "timeout", Vec::new()).await.is_ok() }
    })
    .await;

    // The app sees what is left of the caller's 5 s, not more.
    let reply = client
        .invoke_with("svc-b", "timeout", Vec::new(), CallOptions::default().timeout(Duration::from_secs(5)))
        .await
        .unwrap();
    let seen = tandem_sidecar::deadline::parse_timeout(std::str::from_utf8(&reply.data).unwrap()).unwrap();
    assert!(seen > Duration::from_secs(3) && seen < Duration::from_secs(5), "callee saw a timeout of {seen:?}");
    // Without a deadline none is invented.
    let reply = client.invoke("svc-b", "timeout", Vec::new()).await.unwrap();
    assert!(reply.data.is_empty());

    // A client that only sends grpc-timeout and does not enforce it (tonic's own clients
    // give up at the deadline themselves) hears the sidecar's answer: DEADLINE_EXCEEDED, long
    // before the app would have answered.
    let (code, message) = raw_invoke_with_timeout(caller.grpc_addr(), "svc-b", "timeout", "5S").await;
    assert_eq!(code, 0, "{message}");
    let started = Instant::now();
    let (code, message) = raw_invoke_with_timeout(caller.grpc_addr(), "svc-b", "slow", "300m").await;
    assert_eq!(code, Code::DeadlineExceeded as i32, "{message}");
    assert!(message.contains("svc-b") && message.contains("slow"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());

    // The SDK's client gives up at the deadline itself and says so in the standard code.
    let status = client
        .invoke_with("svc-b", "slow", Vec::new(), CallOptions::default().timeout(Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    // A malformed deadline is named, not ignored.
    let (code, message) = raw_invoke_with_timeout(caller.grpc_addr(), "svc-b", "timeout", "soon").await;
    assert_eq!(code, Code::InvalidArgument as i32, "{message}");
    assert!(message.contains("grpc-timeout 'soon'"), "{message}");
}

/// InvokeService over a bare hyper HTTP/2 connection, so no client-side deadline gets in the
/// way (tonic's `Channel` enforces `grpc-timeout` itself). Returns the status code and message
/// the sidecar answered.
async fn raw_invoke_with_timeout(
    sidecar: std::net::SocketAddr,
    app_id: &str,
    method: &str,
    grpc_timeout: &str,
) -> (i32, String) {
    let stream = tokio::net::TcpStream::connect(sidecar).await.unwrap();
    let io = hyper_util::rt::TokioIo::new(stream);
    let (sender, connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
    tokio::spawn(connection);
    let service = tower::service_fn(move |mut request: http::Request<tonic::body::Body>| {
        let mut sender = sender.clone();
        // hyper's connection-level client wants an absolute URI.
        *request.uri_mut() = format!("http://{sidecar}{}", request.uri().path()).parse().unwrap();
        async move { sender.send_request(request).await }
    });
    let mut client = tandem_proto::runtime::dapr_client::DaprClient::new(service);
    let mut request = tonic::Request::new(InvokeServiceRequest {
        id: app_id.into(),
        message: Some(InvokeRequest { method: method.into(), ..Default::default() }),
    });
    request.metadata_mut().insert("grpc-timeout", grpc_timeout.parse().unwrap());
    match client.invoke_service(request).await {
        Ok(_) => (0, String::new()),
        Err(status) => (status.code() as i32, status.message().to_string()),
    }
}

/// Counts established client connections to `port` from /proc/net/tcp (IPv4 loopback).
fn connections_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let remote = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3 && fields[2].ends_with(&remote) && fields[3] == "01"
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_to_a_peer_sidecar_share_one_http2_connection() {
    let mesh = InvokeMesh::start(1).await;
    let client = &mesh.client;
    let calls = (0..64).map(|_| {
        let client = client.clone();
        tokio::spawn(async move { client.invoke("svc-b", "echo", vec![7u8; 1024]).await })
    });
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(
        connections_to(mesh.callees[0].internal_addr().port()),
        1,
        "one pooled connection from the caller's sidecar"
    );
}
