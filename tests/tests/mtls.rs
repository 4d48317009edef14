//! Mutual TLS between sidecars, with real etcd and tandemd processes: SVIDs issued as
//! `tandem certs` issues them, a callee whose internal port refuses every peer that cannot
//! prove who it is, callers that refuse a peer that is not the app they meant, the caller's
//! app-id taken from its certificate, certificates and roots rotated on disk under load, bad
//! files that stop tandemd at start, naming the file, and access control by the caller's
//! verified app-id, the operation's path and its verb.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tandem_cli::certs::{Issued, Validity};
use tandem_proto::common::InvokeRequest;
use tandem_proto::internal::InternalInvokeRequest;
use tandem_proto::internal::mesh_client::MeshClient;
use tandem_sdk::{AppServer, Reply, SidecarClient};
use tandem_tests::pki::{Root, TlsFiles, spiffe_id};
use tandem_tests::sidecar::run_until_exit;
use tandem_tests::{Etcd, RunningSidecar, Sidecar, TestApp, eventually, http};
use tandem_transport::GrpcConnection;

/// An app whose `caller` method answers with the caller's app-id as its sidecar gave it.
async fn caller_echo(calls: Arc<AtomicUsize>) -> TestApp {
    TestApp::start(AppServer::new().handler("caller", move |call| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move { Ok(Reply::text(call.caller_app_id.unwrap_or_default())) }
    }))
    .await
}

async fn mtls_sidecar(etcd: &Etcd, app_id: &str, files: &TlsFiles, app: Option<&TestApp>) -> RunningSidecar {
    let mut sidecar = files.apply(Sidecar::new(app_id).etcd(etcd));
    if let Some(app) = app {
        sidecar = sidecar.app_port(app.port());
    }
    let sidecar = sidecar.spawn().await;
    sidecar.wait_ready().await;
    sidecar
}

/// Calls the callee's internal port directly, as a sidecar would, claiming to be `claimed`.
async fn call_internal(connection: GrpcConnection, target: &str, claimed: &str) -> Result<String, tonic::Status> {
    let origin = connection.origin();
    let request = InternalInvokeRequest {
        caller_app_id: claimed.into(),
        target_app_id: target.into(),
        message: Some(InvokeRequest { method: "caller".into(), ..Default::default() }),
        metadata: Default::default(),
    };
    let response = MeshClient::with_origin(connection, origin).invoke(request).await?.into_inner();
    Ok(String::from_utf8_lossy(&response.message.unwrap_or_default().data.unwrap_or_default().value).into_owned())
}

/// Waits until calls from `client` reach svc-b's app (one call at least is made).
async fn wait_routed(client: &SidecarClient) {
    eventually(Duration::from_secs(30), "calls to svc-b to get through", || async {
        client.invoke("svc-b", "caller", Vec::new()).await.is_ok()
    })
    .await;
}

async fn refusals_logged(sidecar: &RunningSidecar, at_least: usize, reason: &str) {
    eventually(
        Duration::from_secs(10),
        &format!("the callee to log {at_least} refusals, one for: {reason}"),
        || async {
            let log = sidecar.log();
            let refusals: Vec<&str> =
                log.lines().filter(|line| line.contains("refused a connection: mutual TLS failed")).collect();
            refusals.len() >= at_least
                && refusals.iter().any(|line| line.to_lowercase().contains(&reason.to_lowercase()))
        },
    )
    .await;
}

/// svc-b (behind `app`) and svc-a, a caller without an app, over mTLS with the SVIDs given,
/// once svc-a's calls get through; svc-a's files, to call as it.
async fn caller_and_callee(
    etcd: &Etcd,
    root: &Root,
    app: &TestApp,
    callee: &Issued,
    caller: &Issued,
) -> (RunningSidecar, RunningSidecar, TlsFiles) {
    let callee_files = TlsFiles::new(callee, &[root]);
    let callee = mtls_sidecar(etcd, "svc-b", &callee_files, Some(app)).await;
    let caller_files = TlsFiles::new(caller, &[root]);
    let caller = mtls_sidecar(etcd, "svc-a", &caller_files, None).await;
    assert!(callee.log().contains("mtls=spiffe://public/ns/default/svc-b"), "{}", callee.log_tail());
    wait_routed(&caller.client()).await;
    (callee, caller, caller_files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mtls_sidecars_call_each_other_and_the_caller_is_who_its_certificate_says() {
    let etcd = Etcd::start().await;
    let root = Root::new("test root");
    let calls = Arc::new(AtomicUsize::new(0));
    let app = caller_echo(calls.clone()).await;
    let (callee, caller, caller_files) =
        caller_and_callee(&etcd, &root, &app, &root.svid("svc-b"), &root.svid("svc-a")).await;
    let answer = caller.client().invoke("svc-b", "caller", Vec::new()).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&answer.data), "svc-a");
    let before = calls.load(Ordering::SeqCst);

    // A peer that claims another app-id in the call is still who its certificate says.
    let as_caller =
        GrpcConnection::with_tls(&callee.internal_addr().to_string(), caller_files.load("svc-a"), spiffe_id("svc-b"))
            .unwrap();
    assert_eq!(call_internal(as_caller, "svc-b", "admin").await.unwrap(), "svc-a");
    assert_eq!(calls.load(Ordering::SeqCst), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svids_of_kubernetes_service_accounts_named_after_the_app_identify_it() {
    // cert-manager's csi-driver-spiffe (and SPIRE's default) name a pod by its service account.
    let etcd = Etcd::start().await;
    let root = Root::new("test root");
    let app = caller_echo(Arc::new(AtomicUsize::new(0))).await;
    let callee = root.svid_for("spiffe://public/ns/default/sa/svc-b");
    let caller = root.svid_for("spiffe://public/ns/default/sa/svc-a");
    // The caller verified svc-b's certificate; svc-b's sidecar took the caller's app-id from its.
    let (_callee, caller, _) = caller_and_callee(&etcd, &root, &app, &callee, &caller).await;
    let answer = caller.client().invoke("svc-b", "caller", Vec::new()).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&answer.data), "svc-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_files_mtls_section_turns_mtls_on_in_its_trust_domain() {
    let etcd = Etcd::start().await;
    let root = Root::new("test root");
    let files = TlsFiles::new(&root.svid_for("spiffe://example.org/ns/default/svc-a"), &[&root]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    let text = "apiVersion: dapr.io/v1alpha1\nkind: Configuration\nmetadata:\n  name: appconfig\nspec:\n  mtls:\n    \
                enabled: true\n    workloadCertTTL: 24h\n    trustDomain: example.org\n";
    std::fs::write(&config, text).unwrap();
    // The file flags without --enable-mtls: the file turns it on.
    let flags: Vec<String> = files.flags().into_iter().skip(1).collect();
    let sidecar = flags
        .into_iter()
        .fold(Sidecar::new("svc-a").etcd(&etcd), Sidecar::arg)
        .arg("--config")
        .arg(config.to_str().unwrap())
        .spawn()
        .await;
    sidecar.wait_ready().await;
    assert!(sidecar.log().contains("mtls=spiffe://example.org/ns/default/svc-a"), "{}", sidecar.log_tail());
    let plaintext = GrpcConnection::new(&sidecar.internal_addr().to_string()).unwrap();
    assert!(call_internal(plaintext, "svc-a", "svc-b").await.is_err(), "the internal port answered plaintext");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_internal_port_refuses_plaintext_an_unknown_ca_and_an_expired_certificate_before_the_app() {
    let etcd = Etcd::start().await;
    let root = Root::new("test root");
    let calls = Arc::new(AtomicUsize::new(0));
    let app = caller_echo(calls.clone()).await;
    let callee = mtls_sidecar(&etcd, "svc-b", &TlsFiles::new(&root.svid("svc-b"), &[&root]), Some(&app)).await;
    let internal = callee.internal_addr().to_string();

    // Plaintext.
    let status = call_internal(GrpcConnection::new(&internal).unwrap(), "svc-b", "svc-a").await.unwrap_err();
    assert_ne!(status.code(), tonic::Code::Ok);
    refusals_logged(&callee, 1, "").await;

    // A certificate for a proper app-id, from a root the callee does not trust. (The client
    // trusts both roots, so only the callee can refuse.)
    let other = Root::new("another root");
    let stranger = TlsFiles::new(&other.svid("svc-a"), &[&other, &root]);
    let connection = GrpcConnection::with_tls(&internal, stranger.load("svc-a"), spiffe_id("svc-b")).unwrap();
    call_internal(connection, "svc-b", "svc-a").await.unwrap_err();
    refusals_logged(&callee, 2, "UnknownIssuer").await;

    // A certificate from the right root that has expired.
    let expires = SystemTime::now() + Duration::from_secs(2);
    let short = TlsFiles::new(
        &root.svid_valid(
            "svc-a",
            Validity { not_before: SystemTime::now() - Duration::from_secs(60), not_after: expires },
        ),
        &[&root],
    );
    let expired = short.load("svc-a");
    eventually(Duration::from_secs(10), "the short certificate to expire", || async {
        SystemTime::now() > expires + Duration::from_secs(1)
    })
    .await;
    let connection = GrpcConnection::with_tls(&internal, expired, spiffe_id("svc-b")).unwrap();
    call_internal(connection, "svc-b", "svc-a").await.unwrap_err();
    refusals_logged(&callee, 3, "expired").await;

    assert_eq!(calls.load(Ordering::SeqCst), 0, "a refused peer reached the app");
    // And a proper peer still gets through.
    let friend = TlsFiles::new(&root.svid("svc-a"), &[&root]);
    let connection = GrpcConnection::with_tls(&internal, friend.load("svc-a"), spiffe_id("svc-b")).unwrap();
    assert_eq!(call_internal(connection, "svc-b", "svc-a").await.unwrap(), "svc-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_refuses_a_peer_whose_certificate_names_another_app() {
    let etcd = Etcd::start().await;
    let root = Root::new("test root");
    let impostor_calls = Arc::new(AtomicUsize::new(0));
    let impostor_app = caller_echo(impostor_calls.clone()).await;
    let impostor =
        mtls_sidecar(&etcd, "svc-x", &TlsFiles::new(&root.svid("svc-x"), &[&root]), Some(&impostor_app)).await;
    let caller = mtls_sidecar(&etcd, "svc-a", &TlsFiles::new(&root.svid("svc-a"), &[&root]), None).await;

    // Whoever can write etcd records svc-x's sidecar as an instance of svc-b.
    let record = serde_json::json!({
        "app_id": "svc-b",
        "instance_id": "forged",
        "internal_address": impostor.internal_addr().to_string(),
        "has_app": true,
        "runtime_version": "forged",
    });
    let mut etcd_client = etcd_client::Client::connect([etcd.endpoint()], None).await.unwrap();
    let keys = |app_id| tandem_sidecar::discovery::keys::app_key("default", app_id);
    etcd_client.put(keys("svc-b"), "", None).await.unwrap();
    let instance = tandem_sidecar::discovery::keys::instance_key("default", "svc-b", "forged");
    etcd_client.put(instance, record.to_string(), None).await.unwrap();

    // Once the caller routes to the forged instance, every call is refused in the handshake.
    let client = caller.client();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let status = client.invoke("svc-b", "caller", Vec::new()).await.unwrap_err();
        if status.message().contains("spiffe://public/ns/default/svc-x") {
            break status;
        }
        assert!(Instant::now() < deadline, "the caller never routed svc-b to the forged instance: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("not spiffe://public/ns/default/svc-b"), "{}", status.message());
    assert_eq!(impostor_calls.load(Ordering::SeqCst), 0, "the impostor's app was called");
}

/// Calls `svc-b` through `client` until `stop`; counts answers and failures (with the last).
fn invoke_continuously(client: SidecarClient, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    tokio::spawn(async move {
        let (mut answered, mut failures) = (0, Vec::new());
        while !stop.load(Ordering::SeqCst) {
            match client.invoke("svc-b", "caller", Vec::new()).await {
                Ok(answer) if answer.data == b"svc-a" => answered += 1,
                Ok(answer) => failures.push(format!("wrong caller: {:?}", String::from_utf8_lossy(&answer.data))),
                Err(status) => failures.push(format!("{:?}: {}", status.code(), status.message())),
            }
        }
        (answered, failures)
    })
}

async fn reloads_logged(sidecar: &RunningSidecar, count: usize) {
    eventually(
        Duration::from_secs(15),
        &format!("{} to read its TLS files anew ({count} times)", "a sidecar"),
        || async { sidecar.log().matches("new TLS certificates read").count() >= count },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_and_a_root_rotated_on_disk_under_load_fail_no_call() {
    let etcd = Etcd::start().await;
    let old_root = Root::new("old root");
    let app = caller_echo(Arc::new(AtomicUsize::new(0))).await;
    let callee_files = TlsFiles::new(&old_root.svid("svc-b"), &[&old_root]);
    let caller_files = TlsFiles::new(&old_root.svid("svc-a"), &[&old_root]);
    let callee = mtls_sidecar(&etcd, "svc-b", &callee_files, Some(&app)).await;
    let caller = mtls_sidecar(&etcd, "svc-a", &caller_files, None).await;
    wait_routed(&caller.client()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = invoke_continuously(caller.client(), stop.clone());

    // New SVIDs from the same root, written certificate first (a moment of mismatch).
    callee_files.write_svid(&old_root.svid("svc-b"));
    caller_files.write_svid(&old_root.svid("svc-a"));
    reloads_logged(&callee, 1).await;
    reloads_logged(&caller, 1).await;

    // A new root: first trusted beside the old one, then issuing, then alone.
    let new_root = Root::new("new root");
    callee_files.write_anchors(&[&old_root, &new_root]);
    caller_files.write_anchors(&[&old_root, &new_root]);
    reloads_logged(&callee, 2).await;
    reloads_logged(&caller, 2).await;
    callee_files.write_svid(&new_root.svid("svc-b"));
    caller_files.write_svid(&new_root.svid("svc-a"));
    reloads_logged(&callee, 3).await;
    reloads_logged(&caller, 3).await;
    callee_files.write_anchors(&[&new_root]);
    caller_files.write_anchors(&[&new_root]);
    reloads_logged(&callee, 4).await;
    reloads_logged(&caller, 4).await;

    // New connections use the new material: a peer of the new root gets in, one of the old
    // root no longer does.
    let internal = callee.internal_addr().to_string();
    let fresh = TlsFiles::new(&new_root.svid("svc-a"), &[&new_root]);
    let connection = GrpcConnection::with_tls(&internal, fresh.load("svc-a"), spiffe_id("svc-b")).unwrap();
    assert_eq!(call_internal(connection, "svc-b", "svc-a").await.unwrap(), "svc-a");
    let stale = TlsFiles::new(&old_root.svid("svc-a"), &[&old_root, &new_root]);
    let connection = GrpcConnection::with_tls(&internal, stale.load("svc-a"), spiffe_id("svc-b")).unwrap();
    call_internal(connection, "svc-b", "svc-a").await.unwrap_err();

    stop.store(true, Ordering::SeqCst);
    let (answered, failures) = load.await.unwrap();
    assert!(failures.is_empty(), "{} of {} calls failed: {:?}", failures.len(), answered + failures.len(), failures);
    assert!(answered > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_files_stop_tandemd_at_start_naming_the_file() {
    let root = Root::new("test root");
    let good = TlsFiles::new(&root.svid("svc-a"), &[&root]);
    let other = TlsFiles::new(&root.svid("svc-a"), &[&root]);
    let account = TlsFiles::new(&root.svid_for("spiffe://public/ns/default/sa/default"), &[&root]);
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();

    // A certificate with no SPIFFE id (a DNS name only).
    let key = rcgen::KeyPair::generate().unwrap();
    let plain = rcgen::CertificateParams::new(vec!["svc-a.example".to_string()]).unwrap().self_signed(&key).unwrap();
    std::fs::write(path("plain.crt"), plain.pem()).unwrap();
    std::fs::write(path("plain.key"), key.serialize_pem()).unwrap();
    std::fs::write(path("empty.pem"), "").unwrap();

    let file = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let cases: Vec<(&str, [String; 3], &str, String)> = vec![
        (
            "a missing certificate",
            [path("missing.crt"), file(&good.key), file(&good.anchors)],
            "cannot be read",
            path("missing.crt"),
        ),
        (
            "a directory for a key",
            [file(&good.cert), dir.path().to_string_lossy().into_owned(), file(&good.anchors)],
            "cannot be read",
            dir.path().to_string_lossy().into_owned(),
        ),
        (
            "another certificate's key",
            [file(&good.cert), file(&other.key), file(&good.anchors)],
            "does not hold the private key",
            file(&other.key),
        ),
        (
            "the SVID of another service account",
            [file(&account.cert), file(&account.key), file(&account.anchors)],
            "is the SVID of spiffe://public/ns/default/sa/default, but this sidecar is spiffe://public/ns/default/svc-a",
            file(&account.cert),
        ),
        (
            "no SPIFFE id",
            [path("plain.crt"), path("plain.key"), file(&good.anchors)],
            "no SPIFFE id",
            path("plain.crt"),
        ),
        (
            "no trust anchors",
            [file(&good.cert), file(&good.key), path("empty.pem")],
            "holds no certificate",
            path("empty.pem"),
        ),
    ];
    for (what, [cert, key, anchors], expected, named) in cases {
        let output = run_until_exit(&[
            "--app-id",
            "svc-a",
            "--grpc-port",
            "0",
            "--http-port",
            "0",
            "--internal-port",
            "0",
            "--admin-port",
            "0",
            "--etcd-endpoints",
            "http://127.0.0.1:1",
            "--data-dir",
            &path("data"),
            "--enable-mtls",
            "--cert-file",
            &cert,
            "--key-file",
            &key,
            "--trust-anchors-file",
            &anchors,
        ])
        .await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{what}: tandemd started");
        assert!(stderr.contains(expected) && stderr.contains(&named), "{what}: {stderr}");
    }

    // --enable-mtls without files names what is missing.
    let output = run_until_exit(&[
        "--app-id",
        "svc-a",
        "--etcd-endpoints",
        "http://127.0.0.1:1",
        "--data-dir",
        &path("data"),
        "--enable-mtls",
    ])
    .await;
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--cert-file"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

const ACCESS_CONTROL: &str = r#"
apiVersion: dapr.io/v1alpha1
kind: Configuration
metadata:
  name: svc-b-config
spec:
  accessControl:
    defaultAction: deny
    trustDomain: public
    policies:
    - appId: svc-a
      defaultAction: deny
      namespace: default
      operations:
      - name: /orders/**
        httpVerb: ['GET', 'POST']
        action: allow
      - name: /orders/admin/**
        httpVerb: ['*']
        action: deny
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_control_allows_and_denies_by_app_path_and_verb_and_no_encoding_walks_around_it() {
    let etcd = Etcd::start().await;
    let root = Root::new("test root");
    let (orders, admin) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (orders_calls, admin_calls) = (orders.clone(), admin.clone());
    let app = TestApp::start(
        AppServer::new()
            .handler("orders/17", move |_| {
                orders_calls.fetch_add(1, Ordering::SeqCst);
                async { Ok(Reply::text("order 17")) }
            })
            .handler("orders/admin/drop", move |_| {
                admin_calls.fetch_add(1, Ordering::SeqCst);
                async { Ok(Reply::text("dropped")) }
            }),
    )
    .await;
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("config.yaml");
    std::fs::write(&config, ACCESS_CONTROL).unwrap();
    let callee_files = TlsFiles::new(&root.svid("svc-b"), &[&root]);
    let callee = callee_files
        .apply(Sidecar::new("svc-b").etcd(&etcd).app_port(app.port()))
        .arg("--config")
        .arg(config.to_string_lossy().into_owned())
        .spawn()
        .await;
    callee.wait_ready().await;
    let a = mtls_sidecar(&etcd, "svc-a", &TlsFiles::new(&root.svid("svc-a"), &[&root]), None).await;
    let c = mtls_sidecar(&etcd, "svc-c", &TlsFiles::new(&root.svid("svc-c"), &[&root]), None).await;
    let (a_client, c_client) = (a.client(), c.client());
    eventually(Duration::from_secs(30), "svc-a's calls to reach svc-b", || async {
        a_client.invoke("svc-b", "orders/17", Vec::new()).await.is_ok()
    })
    .await;

    // Allowed: the operation and, over HTTP, its verbs.
    let http_call = |verb: &'static str, path: String| {
        let address = a.http_addr();
        async move { http::request(address, verb, &format!("/v1.0/invoke/svc-b/method/{path}"), &[], b"").await.unwrap() }
    };
    assert_eq!(http_call("POST", "orders/17".into()).await.status, 200);
    assert_eq!(http_call("GET", "orders/17".into()).await.status, 200);
    // Denied: a verb the operation does not list, a more specific deny, another app.
    let refused = http_call("DELETE", "orders/17".into()).await;
    assert_eq!(refused.status, 403, "{}", refused.text());
    let message = refused.json()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("spiffe://public/ns/default/svc-a") && message.contains("'/orders/17' (DELETE)"),
        "{message}"
    );
    let status = a_client.invoke("svc-b", "orders/admin/drop", Vec::new()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("/orders/admin/drop"), "{}", status.message());
    let status = c_client.invoke("svc-b", "orders/17", Vec::new()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("spiffe://public/ns/default/svc-c"), "{}", status.message());

    // Paths that reach the admin operation in disguise, over gRPC and over HTTP.
    let disguised = [
        "orders//admin/drop",
        "orders/./admin/drop",
        "orders/x/../admin/drop",
        "orders/x/%2e%2e/admin/drop",
        "orders/x/%2E%2E/admin/drop",
        "orders%2Fadmin%2Fdrop",
        "orders/admin%2Fdrop",
        "orders/17/../../orders/admin/drop",
        "orders/%2e%2e/%2e%2e/orders/admin/drop",
    ];
    for path in disguised {
        let status = a_client.invoke("svc-b", path, Vec::new()).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "gRPC {path}: {status:?}");
        // The HTTP API refuses dot segments itself (400), before the mesh; the rest is denied.
        let answer = http_call("GET", path.to_string()).await;
        assert!(matches!(answer.status, 400 | 403), "HTTP {path}: {} {}", answer.status, answer.text());
    }
    assert_eq!(admin.load(Ordering::SeqCst), 0, "a denied call reached the app");
    assert!(orders.load(Ordering::SeqCst) >= 3);
    assert!(callee.log().contains("refused an invocation"), "{}", callee.log_tail());
}
