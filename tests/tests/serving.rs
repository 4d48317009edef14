//! Serve replicas at scale through real sidecars: both replicas of `serve` answer, and a
//! replica whose queue is full sheds load at once with RESOURCE_EXHAUSTED (the caller's sidecar
//! first tries the other replica, and sheds by itself while both just refused) while every
//! request it took is answered.

use std::time::{Duration, Instant};

use tandem_pipeline::messages::{JSON, PredictResponse, ServeStatus, app_ids, methods};
use tandem_sdk::{CallOptions, Code};
use tandem_tests::pipeline::Stage;
use tandem_tests::sidecar::sample;
use tandem_tests::training::{TrainGroup, app_status};
use tandem_tests::{Etcd, eventually, free_port, http};

const FEATURES: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_serve_replicas_shed_what_does_not_fit_and_answer_everything_they_took() {
    let etcd = Etcd::start().await;
    let dataset = format!("synthetic:800:{FEATURES}:4");
    let train = TrainGroup::start(&etcd, 1, &["--dataset", &dataset, "--epochs", "1", "--hidden", "32"]).await;
    let version = train.wait_for_model(0, Duration::from_secs(120)).await;

    // Slow replicas (20 ms a pass, one sample each) that let at most 4 samples wait, each
    // with its /metrics on a port of its own.
    let metrics_ports = [free_port(), free_port()];
    let mut serve = Vec::new();
    for port in metrics_ports {
        let args: Vec<String> = ["--max-queue", "4", "--max-batch-size", "1", "--slow-ms", "20", "--metrics-port"]
            .iter()
            .map(|s| s.to_string())
            .chain([port.to_string()])
            .collect();
        serve.push(Stage::start(&etcd, app_ids::SERVE, Some(&args)).await);
    }
    for replica in &serve {
        eventually(Duration::from_secs(60), "a serve replica to load the model", || async {
            let status = app_status::<ServeStatus>(replica.app_port).await;
            status.is_ok_and(|s| s.model_version.as_deref() == Some(version.as_str()))
        })
        .await;
    }

    // 60 requests at once: about 2 x (4 waiting + 1 running) fit, the rest is shed.
    let body = serde_json::json!({ "features": vec![0.5f32; FEATURES] }).to_string();
    let calls: Vec<_> = (0..60)
        .map(|_| {
            let (client, body) = (train.client.clone(), body.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let options = CallOptions::default().content_type(JSON).timeout(Duration::from_secs(30));
                let answer = client.invoke_with(app_ids::SERVE, methods::PREDICT, body.into_bytes(), options).await;
                (answer, started.elapsed())
            })
        })
        .collect();
    let (mut answered, mut shed) = (0u64, 0u64);
    for call in calls {
        match call.await.unwrap() {
            (Ok(reply), _) => {
                let answer: PredictResponse = serde_json::from_slice(&reply.data).expect("predict JSON");
                assert_eq!(answer.model_version, version);
                assert_eq!(answer.predictions.len(), 1);
                answered += 1;
            }
            (Err(status), took) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "only shedding may fail a request: {status:?}");
                assert!(status.message().contains("--max-queue 4"), "the refusal names the limit: {status:?}");
                assert!(took < Duration::from_secs(5), "a refusal took {took:?}");
                shed += 1;
            }
        }
    }
    assert!(shed > 0, "nothing was shed: {answered} answered");
    assert!(answered >= 4, "only {answered} answered");

    // Each replica answered some and counts what it shed; together they answered each request
    // the callers got an answer to, once.
    let (mut predicted, mut refused) = (0, 0);
    for (i, replica) in serve.iter().enumerate() {
        let status: ServeStatus = app_status(replica.app_port).await.unwrap();
        assert!(status.samples > 0, "serve replica {i} predicted nothing: {status:?}");
        assert_eq!(status.queued, 0, "serve replica {i}: nothing left waiting");
        predicted += status.samples;
        refused += status.shed;
    }
    assert_eq!(predicted, answered, "samples predicted by the replicas vs answers received");
    // A refusal the caller saw came from a replica, or from its own sidecar while both
    // replicas had just refused (shed there without crossing the mesh).
    assert!(refused > 0, "the replicas refused nothing, yet {shed} requests were refused");

    // The same counts on the replicas' /metrics, for an autoscaler.
    let (mut metric_answers, mut metric_shed) = (0.0, 0.0);
    for port in metrics_ports {
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let scrape = http::request(address, "GET", "/metrics", &[], b"").await.expect("serve's /metrics");
        assert_eq!(scrape.status, 200);
        let text = scrape.text();
        metric_answers += sample(&text, &format!(r#"tandem_serve_predictions_total{{model_version="{version}"}}"#));
        metric_shed += sample(&text, "tandem_serve_shed_total");
        assert_eq!(sample(&text, "tandem_serve_queue_depth_samples"), 0.0, "{text}");
        assert_eq!(sample(&text, "tandem_serve_requests_in_flight"), 0.0, "{text}");
        assert!(text.contains("tandem_serve_batch_size_count"), "{text}");
    }
    assert_eq!(metric_answers as u64, answered);
    assert_eq!(metric_shed as u64, refused);
}
