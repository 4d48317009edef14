//! tandemd's configuration: environment variables, and start-up refusing bad settings with a
//! message that names what is wrong.

use tandem_tests::sidecar::run_until_exit;
use tandem_tests::{Etcd, Sidecar, free_port};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_port_comes_from_dapr_grpc_port_like_dapr() {
    let etcd = Etcd::start().await;
    let port = free_port();
    let sidecar = Sidecar::new("svc-env").etcd(&etcd).env("DAPR_GRPC_PORT", &port.to_string()).spawn().await;
    assert_eq!(sidecar.grpc_addr().port(), port);
    assert_eq!(sidecar.client().metadata().await.unwrap().id, "svc-env");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_stop_tandemd_at_start_naming_the_problem() {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap();
    let base = ["--grpc-port", "0", "--internal-port", "0", "--admin-port", "0", "--data-dir", data_dir];

    let out = run_until_exit(&[&["--app-id", "a/b"], &base[..]].concat()).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("app-id 'a/b'"), "{stderr}");

    let out = run_until_exit(&[&["--app-id", "ok", "--lease-ttl", "0"], &base[..]].concat()).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--lease-ttl"), "{out:?}");

    let out = run_until_exit(&[&["--app-id", "ok", "--app-health-probe-interval", "5d"], &base[..]].concat()).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown unit 'd'"), "{out:?}");

    // A port someone else holds.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = run_until_exit(&[
        "--app-id",
        "ok",
        "--grpc-port",
        &port,
        "--internal-port",
        "0",
        "--admin-port",
        "0",
        "--data-dir",
        data_dir,
    ])
    .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("gRPC API port") && stderr.contains(&port), "{stderr}");

    // A data dir that cannot be created (a file is in the way).
    let file = data.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let out = run_until_exit(&[
        "--app-id",
        "ok",
        "--grpc-port",
        "0",
        "--internal-port",
        "0",
        "--admin-port",
        "0",
        "--data-dir",
        file.join("sub").to_str().unwrap(),
    ])
    .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("data dir"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let etcd = Etcd::start().await;
    let sidecar = Sidecar::new("svc-json").etcd(&etcd).arg("--log-format").arg("json").spawn().await;
    sidecar.wait_ready().await;
    sidecar.wait_for_log("registered in etcd").await;
    let log = sidecar.log();
    let mut messages = Vec::new();
    for line in log.lines() {
        let json: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(json["level"].is_string() && json["timestamp"].is_string(), "{line}");
        messages.push(json["fields"]["message"].as_str().unwrap_or_default().to_string());
    }
    assert!(messages.iter().any(|m| m == "tandemd listening"), "{messages:?}");
    assert!(messages.iter().any(|m| m == "registered in etcd"), "{messages:?}");

    let out = run_until_exit(&["--app-id", "x", "--log-format", "yaml"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--log-format"), "{out:?}");
}
