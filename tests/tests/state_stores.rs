//! The state stores beyond the conformance suite: the default store, durability across
//! `kill -9`, refusing data and component files that are not right, state shared by replicas
//! through etcd, and the official Dapr SDK saving and reading state.

use tandem_sdk::Code;
use tandem_tests::sidecar::run_until_exit;
use tandem_tests::state::{ResourcesDir, StateClient, Write};
use tandem_tests::{Etcd, Sidecar, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_components_a_sled_store_and_an_embedded_pubsub_are_there() {
    let etcd = Etcd::start().await;
    let sidecar = Sidecar::new("svc-a").etcd(&etcd).spawn().await;
    let metadata = sidecar.client().metadata().await.unwrap();
    let stores: Vec<(String, String)> =
        metadata.registered_components.iter().map(|c| (c.name.clone(), c.r#type.clone())).collect();
    assert_eq!(
        stores,
        [("statestore".to_string(), "state.sled".to_string()), ("pubsub".to_string(), "pubsub.embedded".to_string())]
    );
    // Through tandem-sdk's state calls.
    let client = sidecar.client();
    assert_eq!(client.get_state("statestore", "k").await.unwrap(), None);
    client.save_state("statestore", "k", b"v".to_vec()).await.unwrap();
    let entry = client.get_state("statestore", "k").await.unwrap().unwrap();
    assert_eq!(entry.value, b"v");
    let err = client.delete_state("statestore", "k", Some("stale")).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    client.delete_state("statestore", "k", Some(&entry.etag)).await.unwrap();
    assert_eq!(client.get_state("statestore", "k").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let etcd = Etcd::start().await;
    let data = tempfile::tempdir().unwrap();
    let mut sidecar = Sidecar::new("svc-a").etcd(&etcd).data_dir(data.path()).spawn().await;
    let state = StateClient::connect(sidecar.grpc_addr(), "statestore").await;
    let writers = (0..8).map(|w| {
        let state = state.clone();
        tokio::spawn(async move {
            for i in 0..25 {
                state.save(&format!("w{w}-k{i}"), format!("value {w}/{i}").as_bytes()).await.unwrap();
            }
        })
    });
    for writer in writers {
        writer.await.unwrap();
    }
    state.transact(vec![("upsert", Write::default().item("txn", b"t"))]).await.unwrap();
    sidecar.kill9().await;

    let sidecar = Sidecar::new("svc-a").etcd(&etcd).data_dir(data.path()).spawn().await;
    let state = StateClient::connect(sidecar.grpc_addr(), "statestore").await;
    for w in 0..8 {
        for i in 0..25 {
            let key = format!("w{w}-k{i}");
            assert_eq!(state.value(&key).await.unwrap(), format!("value {w}/{i}").as_bytes(), "{key} was lost");
        }
    }
    assert_eq!(state.value("txn").await.unwrap(), b"t");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_or_corrupt_data_dir_stops_tandemd_naming_the_path() {
    let data = tempfile::tempdir().unwrap();
    let store_dir = data.path().join("state").join("statestore");
    std::fs::create_dir_all(&store_dir).unwrap();
    std::fs::write(store_dir.join("thesis.tex"), b"someone else's file").unwrap();
    let args = ["--app-id", "a", "--grpc-port", "0", "--internal-port", "0", "--admin-port", "0", "--data-dir"];
    let out = run_until_exit(&[&args[..], &[data.path().to_str().unwrap()]].concat()).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(store_dir.to_str().unwrap()), "{stderr}");
    assert_eq!(std::fs::read(store_dir.join("thesis.tex")).unwrap(), b"someone else's file", "never wiped");

    // The store's path taken by a plain file.
    let data = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(data.path().join("state")).unwrap();
    std::fs::write(data.path().join("state").join("statestore"), b"x").unwrap();
    let out = run_until_exit(&[&args[..], &[data.path().to_str().unwrap()]].concat()).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("statestore"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_component_file_stops_tandemd_naming_file_and_field() {
    let resources = tempfile::tempdir().unwrap();
    let file = resources.path().join("broken.yaml");
    std::fs::write(
        &file,
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: s\nspec:\n  version: v1\n",
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let base = ["--app-id", "a", "--grpc-port", "0", "--internal-port", "0", "--admin-port", "0"];
    let run = |resources: String| {
        let data = data.path().to_str().unwrap().to_string();
        async move {
            let args: Vec<&str> =
                base.iter().copied().chain(["--data-dir", &data, "--resources-path", &resources]).collect();
            run_until_exit(&args).await
        }
    };
    let out = run(resources.path().to_str().unwrap().to_string()).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("broken.yaml") && stderr.contains("spec.type"), "{stderr}");

    std::fs::write(&file, tandem_tests::state::component_yaml("s", "state.redis", &[])).unwrap();
    let out = run(resources.path().to_str().unwrap().to_string()).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("state.redis") && stderr.contains("state.sled"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_state_through_state_etcd() {
    let etcd = Etcd::start().await;
    let resources = ResourcesDir::new(&[("shared", "state.etcd", &[])]);
    let replica_1 = Sidecar::new("trainer").etcd(&etcd).resources(resources.path()).spawn().await;
    let replica_2 = Sidecar::new("trainer").etcd(&etcd).resources(resources.path()).spawn().await;
    let one = StateClient::connect(replica_1.grpc_addr(), "shared").await;
    let two = StateClient::connect(replica_2.grpc_addr(), "shared").await;

    one.save("checkpoint", b"epoch-1").await.unwrap();
    assert_eq!(two.value("checkpoint").await.unwrap(), b"epoch-1");
    // Both see the same ETag, so optimistic concurrency works across replicas.
    let etag = two.etag("checkpoint").await;
    assert_eq!(one.etag("checkpoint").await, etag);
    two.save_with("checkpoint", b"epoch-2", Write::etag(&etag)).await.unwrap();
    let err = one.save_with("checkpoint", b"epoch-2-too", Write::etag(&etag)).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    assert_eq!(one.value("checkpoint").await.unwrap(), b"epoch-2");

    // Another app-id using the same store sees only its own keys (keyPrefix appid).
    let other = Sidecar::new("server").etcd(&etcd).resources(resources.path()).spawn().await;
    let other = StateClient::connect(other.grpc_addr(), "shared").await;
    assert_eq!(other.value("checkpoint").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_over_etcds_request_limit_is_resource_exhausted() {
    let etcd = Etcd::start().await;
    let resources = ResourcesDir::new(&[("shared", "state.etcd", &[])]);
    let sidecar = Sidecar::new("svc-a").etcd(&etcd).resources(resources.path()).spawn().await;
    let state = StateClient::connect(sidecar.grpc_addr(), "shared").await;
    // Under --max-body-size (16 MiB) but over etcd's default request limit (1.5 MiB).
    let err = state.save("big", &vec![1u8; 2 << 20]).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("etcd"), "{err:?}");
    assert_eq!(state.value("big").await, None);
}

/// A state store in etcd shares the namespace with discovery: a sidecar that starts while the
/// store holds values larger than a gRPC message (a model registry) still finds its peers,
/// because discovery reads only its own keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_works_beside_state_values_larger_than_a_grpc_message() {
    let etcd = Etcd::start_for_models().await;
    let resources = ResourcesDir::new(&[("shared", "state.etcd", &[])]);
    let app = TestApp::named("registry").await;
    let holder = Sidecar::new("train").etcd(&etcd).resources(resources.path()).app_port(app.port()).spawn().await;
    let state = StateClient::connect(holder.grpc_addr(), "shared").await;
    // Two values of 6 MiB: together 12 MiB under the namespace, over the 4 MiB a gRPC answer
    // may hold by default.
    for key in ["model/v1", "model/v2"] {
        state.save(key, &vec![7u8; 6 << 20]).await.unwrap();
    }
    let newcomer = Sidecar::new("serve").etcd(&etcd).spawn().await;
    tandem_tests::wait_for_instances(&newcomer.client(), "train", &["registry"]).await;
    assert!(!newcomer.log().contains("decoded message length too large"), "{}", newcomer.log_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_dapr_sdk_saves_and_reads_state_with_an_etag() {
    let etcd = Etcd::start().await;
    let sidecar = Sidecar::new("svc-a").etcd(&etcd).spawn().await;
    let mut client = dapr::Client::<dapr::client::TonicClientWithAuth>::connect_with_address(format!(
        "http://{}",
        sidecar.grpc_addr()
    ))
    .await
    .unwrap();
    client.save_state("statestore", "model", b"v1".to_vec(), None, None, None).await.unwrap();
    let got = client.get_state("statestore", "model", None).await.unwrap();
    assert_eq!(got.data, b"v1");
    let etag = dapr::client::Etag { value: got.etag.clone() };
    client.save_state("statestore", "model", b"v2".to_vec(), Some(etag.clone()), None, None).await.unwrap();
    // The old ETag is stale now.
    let err = client.save_state("statestore", "model", b"v3".to_vec(), Some(etag), None, None).await.unwrap_err();
    assert!(format!("{err:?}").contains("Aborted"), "{err:?}");
    assert_eq!(client.get_state("statestore", "model", None).await.unwrap().data, b"v2");
}
