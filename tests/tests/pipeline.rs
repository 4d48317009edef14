//! The AI pipeline end to end: real etcd, four tandemd sidecars (plus second preprocess and
//! train replicas and a client sidecar), the four service binaries. Digits are ingested,
//! standardized by two competing preprocess replicas, trained on by two train replicas in one
//! training group, and served; predictions go through the mesh. Then a new dataset version makes train publish a second model, which serve swaps in
//! while clients keep predicting. And every bad input gets its named error.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tandem_ingest::DatasetOptions;
use tandem_model::Dataset;
use tandem_pipeline::messages::{
    GetModelRequest, IngestPhase, IngestStatus, ModelEntry, PreprocessStatus, ServeStatus, Split, TrainPhase,
    TrainStatus, app_ids, methods,
};
use tandem_sdk::Code;
use tandem_tests::pipeline::{Pipeline, PipelineOptions, Stage, components_dir};
use tandem_tests::service::Service;
use tandem_tests::training::{app_status, replica_status};
use tandem_tests::{Etcd, Sidecar, eventually, free_port};

/// Generous: debug builds on a busy 2-core CI machine.
const TRAINING_TIMEOUT: Duration = Duration::from_secs(600);

fn accuracy(predicted: &[u32], labels: &[u32]) -> f64 {
    let correct = predicted.iter().zip(labels).filter(|(p, l)| p == l).count();
    correct as f64 / labels.len() as f64
}

/// The digits split exactly as ingest cuts it with its defaults (seed 42, 20% test): (train, test).
fn digits_split() -> (Dataset, Dataset) {
    let prepared = tandem_ingest::prepare(&DatasetOptions::default()).expect("the digits dataset");
    let (mut rows, mut labels) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    for batch in prepared.batches().expect("a second pass") {
        let batch = batch.expect("a batch");
        let side = usize::from(batch.split == Split::Test);
        rows[side].extend(batch.features);
        labels[side].extend(batch.labels);
    }
    let [train_labels, test_labels] = labels;
    let [train_rows, test_rows] = rows;
    (Dataset::from_rows(&train_rows, train_labels).unwrap(), Dataset::from_rows(&test_rows, test_labels).unwrap())
}

fn rows_json(dataset: &Dataset) -> String {
    serde_json::json!({ "features": dataset.to_rows() }).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn digits_flow_through_the_mesh_to_a_served_model_that_is_swapped_under_load() {
    let pipeline =
        Pipeline::start(PipelineOptions { train_replicas: 2, serve_replicas: 2, ..PipelineOptions::default() }).await;

    // 1. The first model: trained on digits by two replicas in one group, announced, loaded by serve.
    let v1 = pipeline.wait_for_model(None, TRAINING_TIMEOUT).await;
    assert_eq!(v1, "v1", "one run, one model version");
    let mut replicas = Vec::new();
    for stage in &pipeline.train {
        let status = std::sync::Mutex::new(None);
        eventually(Duration::from_secs(60), "every train replica to have the model", || async {
            let found = replica_status(stage.app_port).await.ok();
            let ready = found.as_ref().is_some_and(|s: &TrainStatus| s.phase == TrainPhase::Ready);
            *status.lock().unwrap() = found;
            ready
        })
        .await;
        replicas.push(status.into_inner().unwrap().unwrap());
    }
    let train = replicas[0].clone();
    assert_eq!(train.model_version.as_deref(), Some(v1.as_str()));
    assert_eq!(replicas[1].model_version, train.model_version);
    let group = train.group.clone().expect("trained in a group");
    assert_eq!((group.world_size, group.members.len()), (2, 2), "{group:?}");
    assert_eq!(group.parameters_hash, replicas[1].group.as_ref().unwrap().parameters_hash, "both hold the same model");
    let test_accuracy = train.test_accuracy.expect("a test accuracy once ready");
    assert!(test_accuracy >= 0.97, "test accuracy {test_accuracy} < 0.97");
    assert_eq!(train.batches_expected, Some(train.batches_received));

    let ingest: IngestStatus = pipeline.status(app_ids::INGEST).await.expect("ingest status");
    assert_eq!(ingest.phase, IngestPhase::Done);
    assert_eq!(ingest.published_batches, ingest.total_batches);
    assert_eq!(train.dataset_version.as_deref(), Some(ingest.dataset_version.as_str()));

    // The registry entry: weights, dataset version, preprocessing, metrics, time.
    let entry: ModelEntry = pipeline
        .call(app_ids::TRAIN, methods::GET_MODEL, &serde_json::to_string(&GetModelRequest::default()).unwrap())
        .await
        .expect("get_model");
    assert_eq!(entry.model_version, v1);
    assert_eq!(entry.dataset_version, ingest.dataset_version);
    assert!(!entry.weights.is_empty());
    assert_eq!(entry.metrics.test_accuracy, test_accuracy);
    assert_eq!(entry.metrics.train_samples + entry.metrics.test_samples, 1797);
    assert!(entry.created_at.ends_with('Z'));

    // Two competing replicas gave the scaler one process fits on the whole train split.
    let (train_split, test) = digits_split();
    let whole = tandem_model::Standardizer::fit(&train_split, &tandem_model::parse_device("cpu").unwrap());
    assert_eq!(entry.preprocessing.samples, train_split.len() as u64);
    for (i, (got, want)) in entry.preprocessing.mean.iter().zip(&whole.mean).enumerate() {
        assert!((got - want).abs() < 1e-4, "mean of feature {i}: {got} vs {want}");
    }
    for (i, (got, want)) in entry.preprocessing.std.iter().zip(&whole.std).enumerate() {
        assert!((got - want).abs() < 1e-4, "std of feature {i}: {got} vs {want}");
    }
    let preprocess: PreprocessStatus = pipeline.status(app_ids::PREPROCESS).await.expect("preprocess status");
    assert!(preprocess.scaler_fitted);
    assert_eq!(preprocess.dataset_version.as_deref(), Some(ingest.dataset_version.as_str()));

    // 2. Predictions through the mesh: the whole test split in one request, raw features.
    let answer = pipeline.predict(&rows_json(&test)).await.expect("predict the test split");
    assert_eq!(answer.model_version, v1);
    assert_eq!(answer.predictions.len(), test.len());
    let classes: Vec<u32> = answer.predictions.iter().map(|p| p.class).collect();
    let served_accuracy = accuracy(&classes, test.labels());
    assert!(served_accuracy >= 0.97, "served accuracy {served_accuracy} < 0.97");
    assert!((served_accuracy - f64::from(test_accuracy)).abs() < 0.01, "{served_accuracy} vs {test_accuracy}");
    for p in &answer.predictions {
        assert_eq!(p.probabilities.len(), 10);
        let sum: f32 = p.probabilities.iter().sum();
        assert!((sum - 1.0).abs() < 1e-3, "probabilities sum to {sum}");
        let best = p.probabilities.iter().cloned().fold(f32::MIN, f32::max);
        assert_eq!(p.probabilities[p.class as usize], best);
    }
    // One sample, the flat form.
    let one = serde_json::json!({ "features": test.row(0) }).to_string();
    let single = pipeline.predict(&one).await.expect("predict one sample");
    assert_eq!(single.predictions.len(), 1);
    assert_eq!(single.predictions[0].class, classes[0]);

    // 3. Bad input against the live model: wrong feature count, non-finite values.
    let err = pipeline.predict(r#"{"features":[1,2,3]}"#).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("wrong feature count") && err.message().contains("takes 64"), "{}", err.message());
    let mut row: Vec<serde_json::Value> = test.row(0).iter().map(|x| serde_json::json!(x)).collect();
    row[5] = serde_json::json!("NaN");
    let err = pipeline.predict(&serde_json::json!({ "features": [row.clone()] }).to_string()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("sample 0, feature 5: NaN is not a finite number"), "{}", err.message());
    row[5] = serde_json::json!(1e300);
    let err = pipeline.predict(&serde_json::json!({ "features": row }).to_string()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("feature 5") && err.message().contains("not a finite number"), "{}", err.message());

    // 4. A new dataset version (another split seed) makes a second model; serve swaps it in
    // while 8 clients keep predicting: no request may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let newer = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for client in 0..8 {
        let (stop, failures, newer, caller) = (stop.clone(), failures.clone(), newer.clone(), pipeline.client.clone());
        let sample = serde_json::json!({ "features": test.row(client) }).to_string();
        let v1 = v1.clone();
        clients.push(tokio::spawn(async move {
            let mut versions = std::collections::BTreeMap::<String, usize>::new();
            while !stop.load(Ordering::SeqCst) {
                let options = tandem_sdk::CallOptions::default().content_type("application/json");
                match caller.invoke_with(app_ids::SERVE, methods::PREDICT, sample.clone().into_bytes(), options).await {
                    Ok(reply) => {
                        let answer: tandem_pipeline::messages::PredictResponse =
                            serde_json::from_slice(&reply.data).expect("predict JSON");
                        if answer.model_version != v1 {
                            newer.fetch_add(1, Ordering::SeqCst);
                        }
                        *versions.entry(answer.model_version).or_default() += 1;
                    }
                    Err(status) => {
                        eprintln!("predict failed during the swap: {status:?}");
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
                // Steady load that leaves the 2-core CI machine room to train the next model.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            versions
        }));
    }
    let mut pipeline = pipeline;
    pipeline.ingest.stop_service().await;
    pipeline.ingest.start_service(&["--seed".to_string(), "7".to_string()]).await;
    let v2 = pipeline.wait_for_model(Some(&v1), TRAINING_TIMEOUT).await;
    // The clients keep going until each of them could have seen the new model.
    eventually(Duration::from_secs(30), "the load clients to get answers from the new model", || {
        let newer = newer.clone();
        async move { newer.load(Ordering::SeqCst) >= 8 }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for client in clients {
        for (version, count) in client.await.expect("a load client") {
            *seen.entry(version).or_default() += count;
        }
    }
    assert_eq!(failures.load(Ordering::SeqCst), 0, "requests failed during the swap; versions seen: {seen:?}");
    assert!(seen.contains_key(&v1) && seen.contains_key(&v2), "both versions answered under load: {seen:?}");
    let after_swap = pipeline.predict(&rows_json(&test)).await.expect("predict after the swap");
    assert_eq!(after_swap.model_version, v2);
    // Both serve replicas took part of the load and both swapped (wait_for_model saw v2 on each).
    for (i, replica) in pipeline.serve.iter().enumerate() {
        let status: ServeStatus = app_status(replica.app_port).await.expect("a serve replica's status");
        assert_eq!(status.model_version.as_deref(), Some(v2.as_str()), "serve replica {i}");
        assert!(status.requests > 0, "serve replica {i} answered no predict: {status:?}");
    }
    let entry2: ModelEntry = pipeline
        .call(app_ids::TRAIN, methods::GET_MODEL, &format!(r#"{{"version":"{v2}"}}"#))
        .await
        .expect("get_model v2");
    assert!(entry2.sequence > entry.sequence);
    assert_ne!(entry2.dataset_version, entry.dataset_version);
    // The old version stays in the registry.
    let old: ModelEntry =
        pipeline.call(app_ids::TRAIN, methods::GET_MODEL, &format!(r#"{{"version":"{v1}"}}"#)).await.expect("v1");
    assert_eq!(old.weights, entry.weights);
    let missing =
        pipeline.call::<ModelEntry>(app_ids::TRAIN, methods::GET_MODEL, r#"{"version":"v999"}"#).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert!(missing.message().contains("v999"), "{}", missing.message());
}

#[tokio::test]
async fn serve_without_a_model_says_unavailable_and_names_bad_input() {
    let etcd = Etcd::start().await;
    let serve = Stage::start(&etcd, app_ids::SERVE, Some(&[])).await;
    let client_sidecar = Sidecar::new("client").etcd(&etcd).spawn().await;
    let client = client_sidecar.client();
    let call = |body: &'static str| {
        let client = client.clone();
        async move {
            let options = tandem_sdk::CallOptions::default().content_type("application/json");
            client.invoke_with(app_ids::SERVE, methods::PREDICT, body.as_bytes().to_vec(), options).await
        }
    };
    // Until serve's sidecar is routable the client sees UNAVAILABLE from the mesh itself;
    // serve's own answer names the missing model.
    let last = std::sync::Mutex::new(None);
    eventually(Duration::from_secs(30), "serve's own answer to predict", || {
        let last = &last;
        async move {
            let status = call(r#"{"features":[1,2]}"#).await.unwrap_err();
            let done = status.message().contains("no model");
            *last.lock().unwrap() = Some(status);
            done
        }
    })
    .await;
    let status = last.into_inner().unwrap().expect("an answer");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("no model loaded yet"), "{}", status.message());

    for (body, expected) in [
        (r#"{"features":[1,"Infinity"]}"#, "sample 0, feature 1: Infinity is not a finite number"),
        (r#"{"features":[[1,2],[3,"NaN"]]}"#, "sample 1, feature 1: NaN is not a finite number"),
        (r#"{"features":[[1,2],[3]]}"#, "sample 1 has 1 features but sample 0 has 2"),
        (r#"{"features":[1,"x"]}"#, "\"x\" is not a number"),
        (r#"{"samples":[1]}"#, "no 'features' field"),
        (r#"{"features":[]}"#, "no features"),
        ("{", "not valid JSON"),
    ] {
        let status = call(body).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{body}: {status:?}");
        assert!(status.message().contains(expected), "{body}: {}", status.message());
    }
    drop(serve);
}

/// A Parquet file, as `tandem dataset synth` writes it, flows through the pipeline: ingest reads
/// it a chunk at a time, and the model is trained on its version, the very version of the same
/// rows drawn in memory (`synthetic:ROWS:FEATURES:CLASSES` with the seed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parquet_file_flows_through_the_pipeline_to_a_served_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("synthetic.parquet");
    let spec = tandem_model::SyntheticSpec { rows: 3000, features: 8, classes: 3 };
    tandem_ingest::synth::write(spec, 5, &path).unwrap();
    let in_memory = DatasetOptions { dataset: spec.to_string(), seed: 5, ..DatasetOptions::default() };
    let expected = tandem_ingest::prepare(&in_memory).unwrap().manifest;
    let ingest_args = ["--dataset", path.to_str().unwrap(), "--seed", "5"].map(String::from).to_vec();
    let options = PipelineOptions {
        ingest_args,
        train_args: ["--epochs", "10"].map(String::from).to_vec(),
        ..PipelineOptions::default()
    };
    let pipeline = Pipeline::start(options).await;
    let version = pipeline.wait_for_model(None, TRAINING_TIMEOUT).await;
    let entry: ModelEntry = pipeline
        .call(app_ids::TRAIN, methods::GET_MODEL, &serde_json::to_string(&GetModelRequest::default()).unwrap())
        .await
        .expect("get_model");
    assert_eq!(entry.dataset_version, expected.dataset_version);
    assert_eq!((entry.feature_count, entry.class_count), (8, 3));
    assert_eq!(entry.metrics.train_samples, expected.counts.train_samples);
    assert_eq!(entry.metrics.test_samples, expected.counts.test_samples);
    eprintln!("the Parquet dataset's model: test accuracy {}", entry.metrics.test_accuracy);
    assert!(entry.metrics.test_accuracy > 0.6, "test accuracy {} (chance is 0.33)", entry.metrics.test_accuracy);
    // Batches travel and rest as Arrow IPC: train keeps each one as it came, in the replica's
    // own store; the shared store (etcd) only says which replica keeps it.
    let key = format!("{}/train/0", expected.dataset_version);
    let train = pipeline.train[0].sidecar.client();
    let stored =
        train.get_state("batches", &format!("batch/{key}")).await.unwrap().expect("batch 0 in train's own store");
    let keeper = train.get_state("statestore", &format!("stored/{key}")).await.unwrap().expect("batch 0's marker");
    let store_id = train.get_state("batches", "store-id").await.unwrap().expect("the replica's store id");
    assert_eq!(keeper.value, store_id.value, "the marker names the keeping replica");
    assert!(train.get_state("statestore", &format!("batch/{key}")).await.unwrap().is_none(), "batch bytes in etcd");
    let batch = tandem_pipeline::arrow_batch::decode(&stored.value).expect("an Arrow IPC batch");
    assert_eq!((batch.feature_count, batch.labels.len()), (8, 64));
    let answer = pipeline.predict(r#"{"features": [0, 0, 0, 0, 0, 0, 0, 0]}"#).await.expect("predict");
    assert_eq!(answer.model_version, version);
    assert!(answer.predictions[0].class < 3);
}

/// Ingest reads a file in bounded memory: ten times the rows raise the peak resident memory of
/// its first pass (which reads, checks and hashes every row) by far less than those rows take.
#[tokio::test]
async fn ingest_memory_stays_flat_as_rows_grow() {
    let dir = tempfile::tempdir().unwrap();
    let mut peaks = Vec::new();
    for rows in [40_000usize, 400_000] {
        let path = dir.path().join(format!("{rows}.parquet"));
        let spec = tandem_model::SyntheticSpec { rows, features: 16, classes: 4 };
        let written = path.clone();
        tokio::task::spawn_blocking(move || tandem_ingest::synth::write(spec, 1, &written)).await.unwrap().unwrap();
        // No sidecar: the first pass runs before ingest looks for one.
        let mut ingest = Service::new("tandem-ingest")
            .args(["--app-port", &free_port().to_string(), "--sidecar", "http://127.0.0.1:1", "--dataset"])
            .arg(path.display().to_string())
            .spawn()
            .await;
        ingest.wait_for_log("dataset read, split and versioned", Duration::from_secs(300)).await;
        let status = std::fs::read_to_string(format!("/proc/{}/status", ingest.pid().unwrap())).unwrap();
        let peak_kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status");
        ingest.kill9().await;
        peaks.push(peak_kib * 1024);
    }
    let grown = peaks[1].saturating_sub(peaks[0]);
    eprintln!("ingest's peak after its first pass: {} bytes for 40,000 rows, {} for 400,000", peaks[0], peaks[1]);
    // The 360,000 extra rows' 17 values as f32 alone.
    let extra_rows = 360_000 * 17 * 4;
    assert!(
        grown < extra_rows / 2,
        "peak {} -> {} bytes: grew {grown}, the extra rows take {extra_rows}",
        peaks[0],
        peaks[1]
    );
}

#[tokio::test]
async fn a_bad_file_stops_ingest_naming_the_line_or_row_and_the_column() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("ragged.csv", "a,b,label\n1,2,0\n3,4\n", vec!["line 3", "expected 3 got 2"]),
        ("not-a-number.csv", "a,b,label\n1,2,0\n3,oops,1\n", vec!["line 3", "column 'b'", "'oops'"]),
        ("no-label.csv", "a,b,c\n1,2,0\n", vec!["line 1", "label column 'label'"]),
        ("bad-label.csv", "a,b,label\n1,2,0\n3,4,cat\n", vec!["line 3", "column 'label'", "'cat'"]),
        ("empty.csv", "", vec!["empty"]),
    ];
    for (name, text, expected) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        // No sidecar is needed: ingest reads the dataset before anything else.
        let output = Service::new("tandem-ingest")
            .args(["--app-port", "1", "--sidecar", "http://127.0.0.1:1", "--dataset"])
            .arg(path.display().to_string())
            .run_to_exit(Duration::from_secs(30))
            .await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{name}: {stderr}");
        for part in expected {
            assert!(stderr.contains(part), "{name}: expected '{part}' in: {stderr}");
        }
        assert!(stderr.contains(name), "{name}: the message names the file: {stderr}");
    }
    // A Parquet file cut short: named, before anything is published.
    let parquet = dir.path().join("cut.parquet");
    let spec = tandem_model::SyntheticSpec { rows: 1000, features: 4, classes: 2 };
    tandem_ingest::synth::write(spec, 1, &parquet).unwrap();
    let bytes = std::fs::read(&parquet).unwrap();
    std::fs::write(&parquet, &bytes[..bytes.len() - 100]).unwrap();
    let cut = Service::new("tandem-ingest")
        .args(["--app-port", "1", "--sidecar", "http://127.0.0.1:1", "--dataset"])
        .arg(parquet.display().to_string())
        .run_to_exit(Duration::from_secs(30))
        .await;
    let stderr = String::from_utf8_lossy(&cut.stderr);
    assert_eq!(cut.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cut.parquet: not a readable Parquet file"), "{stderr}");
    let missing = Service::new("tandem-ingest")
        .args(["--app-port", "1", "--dataset", "/nonexistent/data.csv"])
        .run_to_exit(Duration::from_secs(30))
        .await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/data.csv"));
}

/// A train replica (with `components/train/`) whose sidecar keeps its data in `data`.
async fn train_replica(etcd: &Etcd, data: &std::path::Path, app_port: u16, args: &[String]) -> Stage {
    let sidecar = Sidecar::new(app_ids::TRAIN)
        .etcd(etcd)
        .app_port(app_port)
        .resources(&components_dir(app_ids::TRAIN))
        .data_dir(data)
        .spawn()
        .await;
    let mut stage = Stage { app_id: app_ids::TRAIN.into(), app_port, service: None, sidecar };
    stage.start_service(args).await;
    stage
}

/// Each train replica keeps the batches it received on its own disk, and etcd only says which
/// replica keeps which. A keeper killed -9 and restarted on its data dir serves its batches
/// again under its new instance, and a replica that joins afterwards copies every batch it
/// lacks from the keepers to train with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn train_replicas_keep_batches_on_their_own_disks_and_a_restarted_keeper_serves_them_again() {
    let options = PipelineOptions { train_replicas: 0, serve_replicas: 0, ..PipelineOptions::default() };
    let mut pipeline = Pipeline::start(options).await;
    // Three replicas form the group: no training until the third comes.
    let args: Vec<String> = ["--min-replicas", "3", "--epochs", "2"].map(String::from).to_vec();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    for i in 0..2 {
        pipeline.train.push(train_replica(&pipeline.etcd, dirs[i].path(), ports[i], &args).await);
    }
    let complete = std::sync::Mutex::new(None);
    eventually(TRAINING_TIMEOUT, "the dataset's every batch to be gathered", || {
        let found = &complete;
        let port = ports[0];
        async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            match replica_status(port).await {
                Ok(TrainStatus { dataset_version: Some(v), batches_received, batches_expected: Some(e), .. })
                    if batches_received == e =>
                {
                    *found.lock().unwrap() = Some((v, e));
                    true
                }
                _ => false,
            }
        }
    })
    .await;
    let (version, expected) = complete.into_inner().unwrap().expect("set when the wait ended");
    let shared = pipeline.train[0].sidecar.client();
    let record = shared.get_state("statestore", &format!("gather/{version}")).await.unwrap().expect("the record");
    let record: serde_json::Value = serde_json::from_slice(&record.value).unwrap();
    let count = |split: &str| record["end"]["counts"][format!("{split}_batches")].as_u64().expect("a count") as u32;
    let (train_batches, test_batches) = (count("train"), count("test"));
    assert_eq!(train_batches + test_batches, expected);
    let keys: Vec<String> = (0..train_batches)
        .map(|i| format!("{version}/train/{i}"))
        .chain((0..test_batches).map(|i| format!("{version}/test/{i}")))
        .collect();

    // Who keeps what: every batch by exactly the replica whose store holds it, none in etcd.
    let store_ids: Vec<Vec<u8>> = {
        let mut ids = Vec::new();
        for stage in &pipeline.train {
            ids.push(stage.sidecar.client().get_state("batches", "store-id").await.unwrap().expect("a store id").value);
        }
        ids
    };
    let mut kept = [0usize; 2];
    for key in &keys {
        let keeper = shared.get_state("statestore", &format!("stored/{key}")).await.unwrap().expect(key).value;
        let i = store_ids.iter().position(|id| *id == keeper).expect("the marker names one of the replicas");
        let own = pipeline.train[i].sidecar.client().get_state("batches", &format!("batch/{key}")).await.unwrap();
        assert!(own.is_some(), "{key} is marked as kept by replica {i}, whose store lacks it");
        assert!(shared.get_state("statestore", &format!("batch/{key}")).await.unwrap().is_none(), "{key} in etcd");
        kept[i] += 1;
    }

    // The replica that keeps more dies hard and comes back on its data dir, a new instance.
    let keeper = if kept[0] >= kept[1] { 0 } else { 1 };
    let before = pipeline.train[keeper].sidecar.client().instance_id().await.unwrap();
    let mut dead = pipeline.train.remove(keeper);
    dead.service = None;
    dead.sidecar.kill9().await;
    drop(dead);
    pipeline.train.push(train_replica(&pipeline.etcd, dirs[keeper].path(), ports[keeper], &args).await);
    let restarted = pipeline.train.last().unwrap().sidecar.client();
    let after = restarted.instance_id().await.unwrap();
    assert_ne!(before, after);
    assert_eq!(restarted.get_state("batches", "store-id").await.unwrap().unwrap().value, store_ids[keeper]);

    // A third replica completes the group: it has none of the batches and trains on all of them.
    pipeline.train.push(train_replica(&pipeline.etcd, dirs[2].path(), ports[2], &args).await);
    for port in ports {
        eventually(TRAINING_TIMEOUT, "every replica to hold the run's model", || async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            matches!(
                replica_status(port).await,
                Ok(TrainStatus { phase: TrainPhase::Ready, model_version: Some(_), .. })
            )
        })
        .await;
    }
    let newcomer = pipeline.train.last().unwrap().sidecar.client();
    for key in &keys {
        let copy = newcomer.get_state("batches", &format!("batch/{key}")).await.unwrap();
        assert!(copy.is_some(), "the replica that joined last has no copy of {key}");
    }
    let entry: ModelEntry = pipeline.call(app_ids::TRAIN, methods::GET_MODEL, "{}").await.expect("get_model");
    assert_eq!(entry.dataset_version, version);
}
