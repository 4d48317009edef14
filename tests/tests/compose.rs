//! The pipeline in containers, on the real Docker engine: the images built by
//! scripts/build-images.sh (from the binaries of this build, FROM scratch), compose.yaml up
//! with a local etcd image (two preprocess, two train and two serve replicas, the train replicas one
//! training group; mutual TLS between every sidecar, with SVIDs from the `certs` service),
//! predictions from the host through serve's published port, a plaintext connection to a
//! sidecar's internal port refused, then `docker kill` of serve's sidecar and of a preprocess
//! replica, recovery, and teardown with the volumes. Without a Docker engine this test fails (it never skips under CI=true); outside CI,
//! TANDEM_SKIP_COMPOSE_TEST=1 skips it, saying so.

use std::time::Duration;

use serde_json::{Value, json};
use tandem_sdk::{CallOptions, SidecarClient};
use tandem_tests::compose::{ComposeProject, DockerSupport, docker_support};
use tandem_tests::free_port;

/// How long the pipeline may take from `up` to a serving model (a debug build on 2 busy cores).
const PIPELINE_TIMEOUT: Duration = Duration::from_secs(900);

/// A few 8x8 digits (pixel intensities 0..16) drawn for this test: a 0, a 1 and a 7.
fn samples() -> Vec<Vec<f32>> {
    let zero = "0 0 5 13 9 1 0 0 0 0 13 15 10 15 5 0 0 3 15 2 0 11 8 0 0 4 12 0 0 8 8 0 0 5 8 0 0 9 8 0 0 4 11 0 1 12 7 0 0 2 14 5 10 12 0 0 0 0 6 13 10 0 0 0";
    let one = "0 0 0 12 13 5 0 0 0 0 0 11 16 9 0 0 0 0 3 15 16 6 0 0 0 7 15 16 16 2 0 0 0 0 1 16 16 3 0 0 0 0 1 16 16 6 0 0 0 0 1 16 16 6 0 0 0 0 0 11 16 10 0 0";
    let seven = "0 0 7 8 13 16 15 1 0 0 7 7 4 11 12 0 0 0 0 0 8 13 1 0 0 4 8 8 15 15 6 0 0 2 11 15 15 4 0 0 0 0 0 16 5 0 0 0 0 0 9 15 1 0 0 0 0 0 13 5 0 0 0 0";
    [zero, one, seven].iter().map(|s| s.split_whitespace().map(|v| v.parse::<f32>().unwrap()).collect()).collect()
}

async fn invoke_json(client: &SidecarClient, app: &str, method: &str, body: &Value) -> Result<Value, tonic::Status> {
    let options = CallOptions::default().timeout(Duration::from_secs(10)).content_type("application/json");
    let reply = client.invoke_with(app, method, serde_json::to_vec(body).unwrap(), options).await?;
    serde_json::from_slice(&reply.data)
        .map_err(|e| tonic::Status::internal(format!("{app}.{method} answered non-JSON: {e}")))
}

/// Sends the samples to serve's `predict`; the answer, checked for shape.
async fn predict(client: &SidecarClient) -> Result<(String, Vec<u64>), tonic::Status> {
    let samples = samples();
    let answer = invoke_json(client, "serve", "predict", &json!({ "features": samples })).await?;
    let version = answer["model_version"].as_str().expect("predict answers a model_version").to_string();
    let predictions = answer["predictions"].as_array().expect("predict answers predictions");
    assert_eq!(predictions.len(), samples.len(), "one prediction per sample: {answer}");
    let mut classes = Vec::new();
    for p in predictions {
        let probabilities: Vec<f64> =
            p["probabilities"].as_array().expect("probabilities").iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(probabilities.len(), 10, "ten classes: {p}");
        let sum: f64 = probabilities.iter().sum();
        assert!((sum - 1.0).abs() < 1e-3, "probabilities sum to 1, not {sum}: {p}");
        classes.push(p["class"].as_u64().expect("class"));
    }
    Ok((version, classes))
}

/// Sends an HTTP/2 client preface in plaintext to `address`; what came back before the
/// connection closed (at most 64 bytes, within 10 s).
async fn plaintext_http2_attempt(address: &str) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(address))
        .await
        .unwrap_or_else(|_| panic!("connecting to {address} timed out"))
        .unwrap_or_else(|e| panic!("cannot connect to {address}: {e}"));
    // The preface and an empty SETTINGS frame; a plaintext gRPC server would answer SETTINGS.
    let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await;
    let mut answer = vec![0; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer)).await;
    let read = read.unwrap_or_else(|_| panic!("{address} neither answered nor closed the connection in 10 s"));
    answer.truncate(read.unwrap_or(0));
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_in_compose_serves_the_host_and_recovers_from_killed_containers() {
    let compose = match docker_support() {
        DockerSupport::Ready(compose) => compose,
        DockerSupport::Missing(why) => {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true");
            if !ci && std::env::var("TANDEM_SKIP_COMPOSE_TEST").is_ok_and(|v| v == "1") {
                eprintln!("SKIPPED the compose test: {why} (TANDEM_SKIP_COMPOSE_TEST=1)");
                return;
            }
            panic!(
                "the compose test needs Docker: {why}. Install docker.io and docker-compose (apt-get install docker.io docker-compose) and start the engine{}",
                if ci { "" } else { ", or set TANDEM_SKIP_COMPOSE_TEST=1 to skip it outside CI" }
            );
        }
    };
    let serve_port = free_port();
    let mut project = ComposeProject::new(
        compose,
        "tandem-compose-test",
        vec![
            ("TANDEM_SERVE_BIND".into(), "127.0.0.1".into()),
            ("TANDEM_SERVE_PORT".into(), serve_port.to_string()),
            ("TANDEM_LOG_LEVEL".into(), "info".into()),
        ],
    );
    let build = project.build_images(&["tandemd", "ingest", "preprocess", "train", "serve", "tandem", "etcd"]).await;
    assert!(build.status.success(), "building the images failed:\n{}", String::from_utf8_lossy(&build.stderr));
    println!("{}", String::from_utf8_lossy(&build.stdout));
    // compose.yaml's etcd defaults to the upstream image; this machine cannot pull it.
    let etcd_image = format!("tandem/etcd:{}", project.image_tag);
    project.add_env("ETCD_IMAGE", &etcd_image);

    // `up -d` starts in dependency order and waits for the health conditions in compose.yaml.
    let up = project.compose(&["up", "-d", "--no-build"], Duration::from_secs(600)).await;
    assert!(
        up.status.success(),
        "compose up failed:\n{}\n{}",
        String::from_utf8_lossy(&up.stderr),
        project.logs(40).await
    );

    // One preprocess replica dies while the dataset flows: the other must take its share.
    project.kill("preprocess-1").await;
    assert_eq!(project.inspect("preprocess-1", "{{.State.Status}}").await, "exited");

    let client = SidecarClient::new(&format!("127.0.0.1:{serve_port}")).unwrap();
    let waited = std::time::Instant::now();
    let last_error = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    // Five answers in a row: of the two serve replicas, the one that did not get model.ready
    // loads the model within a second (it polls train), and until then answers UNAVAILABLE
    // and is ejected by the caller's sidecar.
    let in_a_row = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    project
        .wait_for(PIPELINE_TIMEOUT, "serve answering predict from the host with a trained model", || {
            let (client, last_error, in_a_row) = (client.clone(), last_error.clone(), in_a_row.clone());
            async move {
                match predict(&client).await {
                    Ok(_) => in_a_row.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 >= 5,
                    Err(status) => {
                        in_a_row.store(0, std::sync::atomic::Ordering::SeqCst);
                        // Printed when it changes: the way to a model, step by step.
                        let error = format!("{:?}: {}", status.code(), status.message());
                        let mut last = last_error.lock().unwrap();
                        if *last != error {
                            println!("  {:>5.1?} predict: {error}", waited.elapsed());
                            *last = error;
                        }
                        false
                    }
                }
            }
        })
        .await;
    let (version, classes) = predict(&client).await.unwrap();
    println!("serving model {version} after {:?}; classes for a drawn 0, 1, 7: {classes:?}", waited.elapsed());
    assert_eq!(project.inspect("preprocess-1", "{{.State.Status}}").await, "exited", "preprocess-1 stayed dead");

    // Both train replicas ran through it (the mesh answers with either one's status).
    for replica in ["train-1", "train-2"] {
        assert_eq!(project.inspect(replica, "{{.State.Status}}").await, "running", "{replica}");
        assert_eq!(project.health(&format!("{replica}-sidecar")).await, "healthy", "{replica}'s sidecar");
    }
    let train = invoke_json(&client, "train", "status", &json!({})).await.unwrap();
    println!("train status: {train}");
    assert_eq!(train["phase"], "ready", "{train}");
    let accuracy = train["test_accuracy"].as_f64().expect("train reports its test accuracy");
    assert!(accuracy >= 0.97, "test accuracy {accuracy} below 0.97 with the default seed");
    assert_eq!(train["model_version"].as_str(), Some(version.as_str()), "serve serves train's model");

    // Every sidecar ran with its app's SVID (the pipeline above crossed the mesh over mTLS).
    assert_eq!(project.health("certs").await, "healthy", "the certs service's SVIDs are usable");
    for (sidecar, app) in [
        ("ingest-sidecar", "ingest"),
        ("preprocess-2-sidecar", "preprocess"),
        ("train-1-sidecar", "train"),
        ("train-2-sidecar", "train"),
        ("serve-sidecar", "serve"),
        ("serve-2-sidecar", "serve"),
    ] {
        let logs = project.service_logs(sidecar).await;
        let listening = logs.lines().find(|line| line.contains("tandemd listening")).unwrap_or_default();
        assert!(
            listening.contains(&format!("spiffe://public/ns/default/{app}")),
            "{sidecar} did not start with mTLS as {app}: {listening:?}"
        );
    }
    // A plaintext client at a sidecar's internal port (reached from the host on the project's
    // network) gets no HTTP/2 answer, and the sidecar logs why.
    let address = project.inspect("serve-2-sidecar", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}").await;
    let answer = plaintext_http2_attempt(&format!("{address}:50002")).await;
    let http2_settings = answer.len() >= 9 && answer[3] == 4;
    assert!(!http2_settings, "{address}:50002 answered a plaintext client with HTTP/2 SETTINGS: {answer:?}");
    project
        .wait_for(Duration::from_secs(30), "serve-2-sidecar logging the refused plaintext connection", || async {
            project.service_logs("serve-2-sidecar").await.contains("refused a connection: mutual TLS failed")
        })
        .await;

    // Serve's sidecar dies: predictions fail from the host until it is back, then serve the
    // same model again (the serve app kept it; its sidecar's data is on a volume).
    project.kill("serve-sidecar").await;
    assert!(predict(&client).await.is_err(), "predict answered with serve's sidecar killed");
    let start = project.compose(&["start", "serve-sidecar"], Duration::from_secs(120)).await;
    assert!(start.status.success(), "compose start serve-sidecar: {}", String::from_utf8_lossy(&start.stderr));
    project
        .wait_for(Duration::from_secs(120), "predict through the restarted serve sidecar", || {
            let client = client.clone();
            async move { predict(&client).await.is_ok() }
        })
        .await;
    assert_eq!(predict(&client).await.unwrap().0, version, "the same model after the sidecar restart");

    // The killed preprocess replica comes back and rejoins (its sidecar turns healthy again).
    let start = project.compose(&["start", "preprocess-1"], Duration::from_secs(120)).await;
    assert!(start.status.success(), "compose start preprocess-1: {}", String::from_utf8_lossy(&start.stderr));
    project
        .wait_for(Duration::from_secs(120), "preprocess-1 and its sidecar healthy again", || async {
            project.inspect("preprocess-1", "{{.State.Status}}").await == "running"
                && project.health("preprocess-1-sidecar").await == "healthy"
        })
        .await;
    let ingest = invoke_json(&client, "ingest", "status", &json!({})).await.unwrap();
    assert_eq!(ingest["phase"], "done", "{ingest}");
    assert_eq!(ingest["published_batches"], ingest["total_batches"], "{ingest}");

    // Teardown takes the volumes with it.
    let volumes_before = project.volumes().await;
    assert!(volumes_before.len() >= 12, "the project's named volumes: {volumes_before:?}");
    let down = project.tear_down().await;
    assert!(down.status.success(), "compose down: {}", String::from_utf8_lossy(&down.stderr));
    assert_eq!(project.volumes().await, Vec::<String>::new(), "volumes left after down --volumes");
}
