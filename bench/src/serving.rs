//! The closed-loop serving benchmark (`serving-closed-loop`, kept as a reference beside the
//! open-loop one in [`crate::serving_slo`]): `predict` throughput and latency of `tandem-serve`
//! with 64 concurrent clients, dynamic batching against batch size 1, in the same run on the
//! same model.
//!
//! It starts the real pipeline (etcd; ingest, one preprocess, train and serve, each beside its
//! tandemd; a client sidecar) with a short training (the model's accuracy does not matter
//! here), then restarts serve with each batching setting in turn, for `rounds` rounds. Each
//! client sends one digits sample per call and waits for the answer before the next. Two
//! routes are measured for each setting: through the mesh (client sidecar -> serve's sidecar
//! -> serve, what an app sees) and straight to serve's callback port (`OnInvoke`), which shows
//! what batching does to the service itself when the sidecars are not the bottleneck.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tandem_pipeline::messages::{ServeStatus, app_ids, methods};
use tandem_proto::common::InvokeRequest;
use tandem_proto::prost_types::Any;
use tandem_proto::runtime::app_callback_client::AppCallbackClient;
use tandem_sdk::CallOptions;
use tandem_tests::pipeline::{Pipeline, PipelineOptions};
use tonic::transport::{Channel, Endpoint};

use crate::machine::RunContext;
use crate::report::{Section, latency, thousands, times};
use crate::stats::{LatencySummary, ratio};

pub const SERVING_SECTION: Section = Section {
    heading: "## Serving, closed loop (reference): dynamic batching against batch size 1",
    start_marker: "<!-- bench:serving:start -->",
    end_marker: "<!-- bench:serving:end -->",
};

/// The closed-loop target of the pipeline issue, replaced by the open-loop one (serving_slo).
pub const MIN_BATCHING_SPEEDUP: f64 = 2.0;

/// How the benchmark runs.
#[derive(Debug, Clone, Copy)]
pub struct ServingSettings {
    pub clients: usize,
    pub duration: Duration,
    pub rounds: usize,
    pub max_batch_size: u32,
    pub max_batch_wait_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Mesh,
    Direct,
}

/// What one setting on one route achieved, summed over the rounds.
#[derive(Debug, Clone, Default)]
struct Figures {
    calls: u64,
    failures: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
    samples: u64,
    batches: u64,
}

impl Figures {
    fn per_second(&self) -> f64 {
        if self.elapsed.is_zero() { 0.0 } else { self.calls as f64 / self.elapsed.as_secs_f64() }
    }

    fn mean_batch(&self) -> f64 {
        if self.batches == 0 { 0.0 } else { self.samples as f64 / self.batches as f64 }
    }
}

/// Runs the benchmark; returns its markdown.
pub async fn run(settings: ServingSettings, context: RunContext) -> Result<String> {
    eprintln!("starting etcd and the pipeline (ingest, preprocess, train, serve, a client sidecar) ...");
    let options = PipelineOptions {
        preprocess_replicas: 1,
        train_args: vec!["--epochs".into(), "5".into()],
        serve_args: serve_args(1, settings.max_batch_wait_ms),
        ..Default::default()
    };
    let mut pipeline = Pipeline::start(options).await;
    let model = pipeline.wait_for_model(None, Duration::from_secs(900)).await;
    eprintln!("model {model} trained");
    let sample = tandem_model::Dataset::digits().row(0).to_vec();
    let body = serde_json::json!({ "features": sample }).to_string().into_bytes();

    let settings_list = [(settings.max_batch_size, "dynamic batching"), (1, "batch size 1")];
    let mut figures: Vec<[Figures; 2]> = vec![Default::default(), Default::default()];
    for round in 0..settings.rounds {
        for (index, (max_batch, name)) in settings_list.iter().enumerate() {
            pipeline.serve[0].stop_service().await;
            pipeline.serve[0].start_service(&serve_args(*max_batch, settings.max_batch_wait_ms)).await;
            pipeline.wait_for_model(None, Duration::from_secs(60)).await;
            let direct = direct_client(pipeline.serve[0].app_port).await?;
            for (slot, route) in [Route::Mesh, Route::Direct].into_iter().enumerate() {
                eprintln!("round {}: {name} ({route:?}) ...", round + 1);
                let before: ServeStatus = pipeline.status(app_ids::SERVE).await.context("serve status")?;
                // Warm-up, then the measured span.
                load(&pipeline, &direct, route, &body, settings.clients, Duration::from_millis(500)).await;
                let measured = load(&pipeline, &direct, route, &body, settings.clients, settings.duration).await;
                let after: ServeStatus = pipeline.status(app_ids::SERVE).await.context("serve status")?;
                let f = &mut figures[index][slot];
                f.calls += measured.calls;
                f.failures += measured.failures;
                f.elapsed += measured.elapsed;
                f.latencies.extend(measured.latencies);
                f.samples += after.samples - before.samples;
                f.batches += after.batches - before.batches;
            }
        }
    }
    drop(pipeline);
    Ok(markdown(&settings, &context, &settings_list, figures))
}

fn serve_args(max_batch: u32, wait_ms: u64) -> Vec<String> {
    vec![
        "--max-batch-size".into(),
        max_batch.to_string(),
        "--max-batch-wait-ms".into(),
        wait_ms.to_string(),
        "--model-poll-secs".into(),
        "1".into(),
    ]
}

async fn direct_client(port: u16) -> Result<AppCallbackClient<Channel>> {
    let channel = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?.tcp_nodelay(true).connect().await?;
    Ok(AppCallbackClient::new(channel))
}

/// `clients` closed-loop clients for `duration`.
async fn load(
    pipeline: &Pipeline,
    direct: &AppCallbackClient<Channel>,
    route: Route,
    body: &[u8],
    clients: usize,
    duration: Duration,
) -> Figures {
    let start = Instant::now();
    let deadline = start + duration;
    let body: Arc<[u8]> = body.into();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (mesh, mut direct, body) = (pipeline.client.clone(), direct.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut f = Figures::default();
            while Instant::now() < deadline {
                let sent = Instant::now();
                let ok = match route {
                    Route::Mesh => {
                        let options = CallOptions::default().content_type("application/json");
                        mesh.invoke_with(app_ids::SERVE, methods::PREDICT, body.to_vec(), options).await.is_ok()
                    }
                    Route::Direct => {
                        let request = InvokeRequest {
                            method: methods::PREDICT.into(),
                            data: Some(Any { type_url: String::new(), value: body.to_vec() }),
                            content_type: "application/json".into(),
                            http_extension: None,
                        };
                        direct.on_invoke(request).await.is_ok()
                    }
                };
                f.latencies.push(sent.elapsed());
                if ok { f.calls += 1 } else { f.failures += 1 }
            }
            f
        }));
    }
    let mut total = Figures::default();
    for task in tasks {
        let f = task.await.unwrap_or_default();
        total.calls += f.calls;
        total.failures += f.failures;
        total.latencies.extend(f.latencies);
    }
    total.elapsed = start.elapsed();
    total
}

fn markdown(
    settings: &ServingSettings,
    context: &RunContext,
    names: &[(u32, &str); 2],
    figures: Vec<[Figures; 2]>,
) -> String {
    let mut out = context.measured_line();
    out.push_str(&format!(
        "{} closed-loop clients, one digits sample per `predict` call, {} rounds of {:?} per setting and route \
         (serve restarted for each setting, same model); max batch wait {} ms.\n\n",
        settings.clients, settings.rounds, settings.duration, settings.max_batch_wait_ms
    ));
    out.push_str("| route | setting | calls/s | p50 | p99 | mean batch | failed |\n|---|---|---|---|---|---|---|\n");
    for (slot, route) in
        ["mesh (client sidecar -> serve's sidecar -> serve)", "direct to serve's app port"].iter().enumerate()
    {
        for (index, (max_batch, name)) in names.iter().enumerate() {
            let f = &figures[index][slot];
            let summary = LatencySummary::from_samples(f.latencies.clone());
            out.push_str(&format!(
                "| {route} | {name} (max {max_batch}) | {} | {} | {} | {:.1} | {} |\n",
                thousands(f.per_second() as u64),
                summary.map(|s| latency(s.p50)).unwrap_or_else(|| "-".into()),
                summary.map(|s| latency(s.p99)).unwrap_or_else(|| "-".into()),
                f.mean_batch(),
                f.failures
            ));
        }
    }
    out.push('\n');
    for (slot, route) in ["mesh", "direct"].iter().enumerate() {
        let speedup = ratio(figures[0][slot].per_second(), figures[1][slot].per_second());
        let verdict = if speedup.is_some_and(|s| s >= MIN_BATCHING_SPEEDUP) { "PASS" } else { "MISS" };
        out.push_str(&format!(
            "- {route}: batching gives {} the throughput of batch size 1 (target >= {MIN_BATCHING_SPEEDUP}x): **{verdict}**\n",
            times(speedup)
        ));
    }
    out
}
