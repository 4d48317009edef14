//! Security of the app-facing side and of etcd, with real sidecars: API tokens as Dapr has
//! them (with `DAPR_API_TOKEN`, both APIs refuse calls without the token, health paths stay
//! open; with `APP_API_TOKEN`, the sidecar sends its token on every call into the app, gRPC
//! or HTTP, and an SDK app given the token refuses callers without it), and etcd over TLS with
//! client certificates. (Mutual TLS between sidecars and access control: `mtls.rs`.)

use std::time::Duration;
use tandem_sdk::{AppServer, Code, Reply, SidecarClient};
use tandem_tests::app::TestApp;
use tandem_tests::http;

use tandem_tests::{Etcd, Sidecar, eventually, free_port};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "tandem-test-token-7f3a";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_api_token_both_apis_refuse_calls_without_it_and_health_stays_open() {
    let etcd = Etcd::start().await;
    let sidecar = Sidecar::new("guarded").etcd(&etcd).env("DAPR_API_TOKEN", TOKEN).spawn().await;
    sidecar.wait_ready().await;
    let address = sidecar.grpc_addr().to_string();

    // gRPC: no token, a wrong one (never echoed back), then the right one.
    let without = SidecarClient::with_api_token(&address, None).unwrap();
    let status = without.save_state("statestore", "k", b"from-anyone".to_vec()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("missing"), "{}", status.message());
    let wrong = SidecarClient::with_api_token(&address, Some("tandem-test-token-7f3b")).unwrap();
    let status = wrong.metadata().await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("does not match") && !status.message().contains("7f3"), "{}", status.message());
    let right = SidecarClient::with_api_token(&address, Some(TOKEN)).unwrap();
    assert!(right.get_state("statestore", "k").await.unwrap().is_none(), "a refused call wrote state");
    right.save_state("statestore", "k", b"v".to_vec()).await.unwrap();
    assert_eq!(right.get_state("statestore", "k").await.unwrap().unwrap().value, b"v");

    // HTTP: the same, on a building block and on the invocation fallback; health is open.
    let api = sidecar.http_addr();
    let refused = http::request(api, "GET", "/v1.0/state/statestore/k", &[], b"").await.unwrap();
    assert_eq!(refused.status, 401, "{}", refused.text());
    assert!(refused.json()["message"].as_str().unwrap().contains("missing"), "{}", refused.text());
    let wrong = [("dapr-api-token", "nope")];
    let refused = http::request(api, "POST", "/anything", &[("dapr-app-id", "guarded"), wrong[0]], b"").await.unwrap();
    assert_eq!(refused.status, 401, "{}", refused.text());
    assert!(refused.json()["message"].as_str().unwrap().contains("does not match"), "{}", refused.text());
    let allowed =
        http::request(api, "GET", "/v1.0/state/statestore/k", &[("dapr-api-token", TOKEN)], b"").await.unwrap();
    assert_eq!((allowed.status, allowed.text().as_str()), (200, "v"));
    for path in ["/v1.0/healthz", "/v1.0/healthz/outbound"] {
        let health = http::request(api, "GET", path, &[], b"").await.unwrap();
        assert_eq!(health.status, 204, "{path}: {}", health.text());
    }
    // The admin port's probes carry no token either.
    assert_eq!(sidecar.get("/healthz").await.unwrap().0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_app_api_token_the_sidecar_sends_it_on_every_call_into_the_app() {
    let etcd = Etcd::start().await;
    // A gRPC app that answers with the token it was sent.
    let grpc_app = TestApp::start(AppServer::new().handler("token", |call| async move {
        let token = call.metadata.get("dapr-api-token").and_then(|v| v.to_str().ok()).unwrap_or("<none>");
        Ok(Reply::text(token.to_string()))
    }))
    .await;
    let _grpc_callee = Sidecar::new("grpc-app")
        .etcd(&etcd)
        .app_port(grpc_app.port())
        .app_protocol("grpc")
        .env("APP_API_TOKEN", TOKEN)
        .spawn()
        .await;
    // An HTTP app that does the same.
    let http_port = free_port();
    let _http_app = tokio::spawn(echo_token_over_http(http_port));
    let _http_callee = Sidecar::new("http-app")
        .etcd(&etcd)
        .app_port(http_port)
        .app_protocol("http")
        .env("APP_API_TOKEN", TOKEN)
        .spawn()
        .await;
    let caller = Sidecar::new("caller").etcd(&etcd).spawn().await;
    let client = caller.client();
    for app in ["grpc-app", "http-app"] {
        let answer = std::sync::Mutex::new(None);
        eventually(Duration::from_secs(30), &format!("{app} to answer through the mesh"), || {
            let (answer, client) = (&answer, &client);
            async move {
                match client.invoke(app, "token", Vec::new()).await {
                    Ok(reply) => {
                        *answer.lock().unwrap() = Some(reply.data);
                        true
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        false
                    }
                }
            }
        })
        .await;
        let answer = answer.into_inner().unwrap().expect("set when the wait ended");
        assert_eq!(String::from_utf8_lossy(&answer), TOKEN, "{app}");
    }
}

/// Serves HTTP/1.1 on `port`, answering every request with its `dapr-api-token` header.
async fn echo_token_over_http(port: u16) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("binding the HTTP app");
    loop {
        let Ok((stream, _)) = listener.accept().await else { return };
        tokio::spawn(async move {
            let (reader, mut writer) = stream.into_split();
            let mut reader = tokio::io::BufReader::new(reader);
            loop {
                // One request: its head, then as many body bytes as it says.
                let (mut token, mut length) = ("<none>".to_string(), 0usize);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let line = line.trim_end();
                    if line.is_empty() {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':') {
                        match name.trim().to_ascii_lowercase().as_str() {
                            "dapr-api-token" => token = value.trim().to_string(),
                            "content-length" => length = value.trim().parse().unwrap_or(0),
                            _ => {}
                        }
                    }
                }
                let mut body = vec![0u8; length];
                if reader.read_exact(&mut body).await.is_err() {
                    return;
                }
                let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{token}", token.len());
                if writer.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// etcd serving only TLS, with client certificates required: a sidecar and the CLI reach it
/// with the certificate; a sidecar without one is refused by etcd and keeps retrying; TLS files with
/// a plaintext endpoint, or a certificate without its key, stop tandemd at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_and_the_cli_reach_an_etcd_that_requires_client_certificates() {
    let etcd = Etcd::start_with_tls().await;
    let files = etcd.tls_files().unwrap().clone();
    let sidecar =
        files.client_flags().into_iter().fold(Sidecar::new("guarded").etcd(&etcd), Sidecar::arg).spawn().await;
    sidecar.wait_ready().await;
    eventually(Duration::from_secs(10), "the sidecar to register in etcd over TLS", || async {
        etcd.registered_instances("guarded").await == 1
    })
    .await;

    // The CLI, with the same files.
    let mut ls = vec!["ls".to_string(), "--etcd".into(), etcd.endpoint()];
    ls.extend(files.client_flags());
    let output = tokio::process::Command::new(tandem_tests::workspace_binary("tandem"))
        .args(&ls)
        .env_remove("TANDEM_ETCD_ENDPOINTS")
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("guarded"), "{}", String::from_utf8_lossy(&output.stdout));

    // Only the CA, no client certificate: etcd refuses the connection, the sidecar keeps trying.
    let ca = files.ca.to_string_lossy().into_owned();
    let refused = Sidecar::new("stranger").etcd(&etcd).arg("--etcd-ca-file").arg(ca.clone()).spawn().await;
    eventually(
        Duration::from_secs(20),
        "the sidecar without a client certificate to report etcd refusing it",
        || async { refused.log().contains("could not register in etcd; retrying") },
    )
    .await;
    assert_eq!(etcd.registered_instances("stranger").await, 0);

    // Bad combinations stop tandemd at start.
    let data = tempfile::tempdir().unwrap();
    let data = data.path().to_string_lossy().into_owned();
    let plain = tandem_tests::sidecar::run_until_exit(&[
        "--app-id",
        "x",
        "--data-dir",
        &data,
        "--etcd-endpoints",
        "http://127.0.0.1:1",
        "--etcd-ca-file",
        &ca,
    ])
    .await;
    let stderr = String::from_utf8_lossy(&plain.stderr);
    assert!(!plain.status.success() && stderr.contains("https://"), "{stderr}");
    let cert = files.client_cert.to_string_lossy().into_owned();
    let keyless = tandem_tests::sidecar::run_until_exit(&[
        "--app-id",
        "x",
        "--data-dir",
        &data,
        "--etcd-endpoints",
        &etcd.endpoint(),
        "--etcd-cert-file",
        &cert,
    ])
    .await;
    let stderr = String::from_utf8_lossy(&keyless.stderr);
    assert!(!keyless.status.success() && stderr.contains("--etcd-key-file"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdk_app_with_an_app_api_token_answers_only_callers_that_carry_it() {
    use tandem_proto::common::InvokeRequest;
    use tandem_proto::runtime::app_callback_client::AppCallbackClient;
    let etcd = Etcd::start().await;
    let app = TestApp::start(
        AppServer::new().app_api_token(Some(TOKEN)).handler("work", |_| async { Ok(Reply::text("done")) }),
    )
    .await;

    // Straight at the app's port, past its sidecar: refused before the handler, naming why.
    let connection = tandem_transport::GrpcConnection::new(&format!("127.0.0.1:{}", app.port())).unwrap();
    let origin = connection.origin();
    let mut direct = AppCallbackClient::with_origin(connection, origin);
    let call = || tonic::Request::new(InvokeRequest { method: "work".into(), ..Default::default() });
    let refused = direct.on_invoke(call()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("this app requires one"), "{}", refused.message());
    let mut wrong = call();
    wrong.metadata_mut().insert("dapr-api-token", "not-the-token".parse().unwrap());
    let refused = direct.on_invoke(wrong).await.unwrap_err();
    assert!(refused.message().contains("does not match this app's"), "{}", refused.message());

    // Its sidecar, started with the same APP_API_TOKEN, gets through (health checks included).
    let _sidecar = Sidecar::new("guarded-app")
        .etcd(&etcd)
        .app_port(app.port())
        .app_protocol("grpc")
        .env("APP_API_TOKEN", TOKEN)
        .spawn()
        .await;
    let caller = Sidecar::new("caller").etcd(&etcd).spawn().await;
    let client = caller.client();
    eventually(Duration::from_secs(30), "the guarded app to answer through its sidecar", || async {
        client.invoke("guarded-app", "work", Vec::new()).await.is_ok_and(|reply| reply.data == b"done")
    })
    .await;
}
