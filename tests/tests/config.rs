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

    let out = run_until_exit(&[&["--app-id", "ok", "--app-health-probe-interval", "5h"], &base[..]].concat()).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown unit 'h'"), "{out:?}");

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
