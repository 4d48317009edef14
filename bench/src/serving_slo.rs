//! The open-loop serving benchmark: what rate `serve` holds at a latency SLO, how the mesh's
//! balancing copes with one slow replica, and what shedding does under overload.
//!
//! Requests are sent on a Poisson schedule at a fixed offered rate, each on its own task at its
//! scheduled time whether or not earlier ones were answered (open loop), and each latency is
//! taken from the request's *scheduled* send time, so a client that falls behind does not hide
//! the queueing (no coordinated omission). Latencies go into an `hdrhistogram` (microseconds).
//! Every request crosses the mesh: the bench's client sidecar -> serve's sidecar -> serve.
//! serve runs with one compute thread (`RAYON_NUM_THREADS=1`): on this 2-core machine a pass on
//! both cores would starve the sidecars, and the latency measured would be the mesh's wait for
//! a core.
//!
//! 1. SLO rate: for the digits MLP and for a compute-bound MLP (synthetic data, 256 features,
//!    hidden 2048,2048), with dynamic batching (`--max-batch-size 64`) and with batch size 1:
//!    the highest offered rate whose p99 stays within [`SLO`] with at most 1% of the requests
//!    refused or failed, found by doubling the rate and then bisecting.
//! 2. A slow replica: two serve replicas (digits), one with `--slow-ms`, at half the rate one
//!    healthy replica holds; p2c against round robin (two client sidecars), and two healthy
//!    replicas as the reference.
//! 3. Overload: one replica of the compute-bound model (batching) offered twice the rate it
//!    holds at the SLO, its `--max-queue` sized to 4 ms of that rate: how fast refusals come
//!    back, and whether the accepted requests stay within the SLO; through a client sidecar
//!    with the adaptive concurrency limit (the default) and one without
//!    (`--concurrency-limit off`), in alternating rounds against the same replica. (The digits model is not
//!    used here: at twice its rate the sidecars, not serve, are the bottleneck, and requests
//!    queue before they reach serve's queue.)

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use hdrhistogram::Histogram;
use tandem_pipeline::messages::{JSON, ServeStatus, app_ids, methods};
use tandem_sdk::{CallOptions, Code, SidecarClient};
use tandem_tests::pipeline::Stage;
use tandem_tests::training::{TrainGroup, app_status};
use tandem_tests::{Etcd, RunningSidecar, Sidecar, eventually};
use tokio::time::Instant;

use crate::machine::RunContext;
use crate::report::{Section, thousands, times};

pub const SERVING_SLO_SECTION: Section = Section {
    heading: "## Serving at a latency SLO (open loop)",
    start_marker: "<!-- bench:serving-slo:start -->",
    end_marker: "<!-- bench:serving-slo:end -->",
};

/// The latency objective: p99 of a request, from its scheduled send time to its answer.
pub const SLO: Duration = Duration::from_millis(10);
/// Dynamic batching must hold at least this many times the rate of batch size 1 at the SLO,
/// on the compute-bound model.
pub const MIN_BATCHING_RATE_RATIO: f64 = 2.0;
/// With one replica slowed, p2c's p99 may be at most this many times two healthy replicas'.
pub const MAX_SLOW_REPLICA_P99_RATIO: f64 = 1.5;
/// Under overload a refusal must come back within this long (p99).
pub const MAX_SHED_LATENCY: Duration = Duration::from_millis(5);
/// The compute-bound workload: a wide MLP (4.7 M parameters, 19 MB of weights, more than this
/// machine's caches hold), so that a forward pass of one sample, which reads every weight for
/// one sample, costs far more than a batch's pass per sample. Its registry entry (25 MB) needs
/// the sidecars' --max-body-size raised (see `main`).
const COMPUTE_BOUND_DATASET: &str = "synthetic:4000:256:10";
const COMPUTE_BOUND_FEATURES: usize = 256;
const COMPUTE_BOUND_HIDDEN: &str = "2048,2048";
/// The sidecars' --max-body-size for this benchmark, set through the environment they inherit.
pub const MAX_BODY_SIZE: &str = "64Mi";
/// Share of refused or failed requests above which a rate does not count as held.
const MAX_LOST_SHARE: f64 = 0.01;
/// Rounds of the overload per client sidecar, taking turns.
const OVERLOAD_ROUNDS: usize = 3;
/// The longest a request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy)]
pub struct SloSettings {
    /// How long each offered rate is held (after a short warm-up).
    pub duration: Duration,
    /// Extra time of each forward pass of the slowed replica.
    pub slow_ms: u64,
    /// The first rate tried when searching (requests/s).
    pub start_rate: f64,
}

/// What one offered rate gave.
#[derive(Debug, Clone)]
struct RateFigures {
    offered: f64,
    sent: u64,
    /// Latencies of the answered requests, µs.
    answered: Histogram<u64>,
    /// Latencies of the refusals (RESOURCE_EXHAUSTED), µs.
    shed: Histogram<u64>,
    /// Refusals made by the client's sidecar itself, without sending the call on.
    shed_by_caller: u64,
    failed: u64,
}

impl RateFigures {
    fn new(offered: f64) -> RateFigures {
        RateFigures { offered, sent: 0, answered: histogram(), shed: histogram(), shed_by_caller: 0, failed: 0 }
    }

    /// Adds another run's figures at the same offered rate.
    fn merge(&mut self, other: &RateFigures) {
        self.sent += other.sent;
        self.answered.add(&other.answered).expect("histograms with the same bounds");
        self.shed.add(&other.shed).expect("histograms with the same bounds");
        self.shed_by_caller += other.shed_by_caller;
        self.failed += other.failed;
    }

    fn lost_share(&self) -> f64 {
        if self.sent == 0 { 1.0 } else { (self.shed.len() + self.failed) as f64 / self.sent as f64 }
    }

    fn p(&self, quantile: f64) -> Duration {
        Duration::from_micros(self.answered.value_at_quantile(quantile))
    }

    /// Whether the rate is held: p99 within the SLO, next to nothing refused or failed.
    fn holds(&self) -> bool {
        !self.answered.is_empty() && self.p(0.99) <= SLO && self.lost_share() <= MAX_LOST_SHARE
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// The best rate one setting held, with its figures there.
#[derive(Debug, Clone)]
struct SloRow {
    model: &'static str,
    setting: &'static str,
    held: Option<RateFigures>,
    mean_batch: f64,
}

/// Runs the benchmark; returns its markdown.
pub async fn run(settings: SloSettings, context: RunContext) -> Result<String> {
    ensure!(settings.start_rate > 0.0, "the start rate must be positive");
    let mut rows = Vec::new();

    eprintln!("digits: training the model ...");
    let digits = Models::train(&["--dataset", "digits", "--epochs", "3"]).await?;
    let digits_sample = sample_body(64);
    for (setting, batch) in [("dynamic batching (max 64)", "64"), ("batch size 1", "1")] {
        rows.push(digits.slo_row("digits MLP", setting, &["--max-batch-size", batch], &digits_sample, settings).await?);
    }
    let one_replica_rate = rows[0].held.as_ref().map(|f| f.offered).unwrap_or(settings.start_rate);

    // 2. One slow replica at half of what one healthy replica holds.
    let slow_rate = (one_replica_rate / 2.0).max(10.0);
    eprintln!("slow replica: two replicas at {slow_rate:.0}/s ...");
    let healthy = digits.two_replicas(&[], &digits_sample, slow_rate, settings, Policy::P2c).await?;
    let slow_flag = settings.slow_ms.to_string();
    let slowed: &[&str] = &["--slow-ms", &slow_flag];
    let p2c = digits.two_replicas(slowed, &digits_sample, slow_rate, settings, Policy::P2c).await?;
    let round_robin = digits.two_replicas(slowed, &digits_sample, slow_rate, settings, Policy::RoundRobin).await?;

    drop(digits);

    eprintln!("compute-bound MLP: training the model ...");
    let compute =
        Models::train(&["--dataset", COMPUTE_BOUND_DATASET, "--hidden", COMPUTE_BOUND_HIDDEN, "--epochs", "1"]).await?;
    let compute_sample = sample_body(COMPUTE_BOUND_FEATURES);
    for (setting, batch) in [("dynamic batching (max 64)", "64"), ("batch size 1", "1")] {
        let args = ["--max-batch-size", batch];
        rows.push(compute.slo_row("compute-bound MLP", setting, &args, &compute_sample, settings).await?);
    }

    // 3. Overload of the compute-bound model, where serve (not the sidecars) is the bottleneck:
    // twice the rate it holds with batching, its queue sized to 4 ms of that rate.
    let held_rate = rows[2].held.as_ref().map(|f| f.offered).unwrap_or(settings.start_rate);
    let overload_rate = 2.0 * held_rate;
    let queue = ((held_rate * 0.004).ceil() as u64).max(1);
    eprintln!("overload: {overload_rate:.0}/s against one replica, --max-queue {queue} ...");
    let queue_flag = queue.to_string();
    let (adaptive, unlimited) =
        compute.overload(&["--max-queue", &queue_flag], &compute_sample, overload_rate, settings.duration).await?;
    drop(compute);

    let slow = SlowReplica { rate: slow_rate, slow_ms: settings.slow_ms, healthy, p2c, round_robin };
    let overload = Overload { rate: overload_rate, held_rate, queue, adaptive, unlimited };
    Ok(markdown(&context, settings, &rows, &slow, &overload))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    P2c,
    RoundRobin,
}

/// An etcd, a trained model in train's registry, and client sidecars (p2c, round robin, and
/// p2c without the adaptive concurrency limit).
struct Models {
    train: TrainGroup,
    round_robin: RunningSidecar,
    unlimited: RunningSidecar,
    version: String,
    // Last: dropped after everything that uses it.
    etcd: Etcd,
}

impl Models {
    async fn train(args: &[&str]) -> Result<Models> {
        let etcd = Etcd::start_for_models().await;
        let train = TrainGroup::start(&etcd, 1, args).await;
        let version = train.wait_for_model(0, Duration::from_secs(900)).await;
        let round_robin = Sidecar::new("client-rr").etcd(&etcd).arg("--lb-policy").arg("round-robin").spawn().await;
        let unlimited = Sidecar::new("client-nolimit").etcd(&etcd).arg("--concurrency-limit").arg("off").spawn().await;
        Ok(Models { train, round_robin, unlimited, version, etcd })
    }

    fn client(&self, policy: Policy) -> SidecarClient {
        match policy {
            Policy::P2c => self.train.client.clone(),
            Policy::RoundRobin => self.round_robin.client(),
        }
    }

    /// Starts a serve replica with `args` and waits until it serves the model.
    async fn serve(&self, args: &[&str]) -> Result<Stage> {
        let mut all: Vec<String> = vec!["--model-poll-secs".into(), "1".into()];
        all.extend(args.iter().map(|a| a.to_string()));
        let mut stage = Stage::start(&self.etcd, app_ids::SERVE, None).await;
        // One compute thread (burn's flex pool), so a forward pass leaves the other core to the
        // sidecars and the load: on 2 cores, two would starve the mesh during every pass.
        stage.start_service_with_env(&all, &[("RAYON_NUM_THREADS".into(), "1".into())]).await;
        let version = self.version.clone();
        eventually(Duration::from_secs(60), "a serve replica to load the model", || async {
            app_status::<ServeStatus>(stage.app_port).await.is_ok_and(|s| s.model_version.as_ref() == Some(&version))
        })
        .await;
        Ok(stage)
    }

    /// The highest rate one replica with `args` holds at the SLO.
    async fn slo_row(
        &self,
        model: &'static str,
        setting: &'static str,
        args: &[&str],
        body: &[u8],
        settings: SloSettings,
    ) -> Result<SloRow> {
        let stage = self.serve(args).await?;
        let client = self.client(Policy::P2c);
        let before: ServeStatus = app_status(stage.app_port).await.context("serve status")?;
        let held = highest_held_rate(&client, body, settings).await;
        let after: ServeStatus = app_status(stage.app_port).await.context("serve status")?;
        let batches = after.batches.saturating_sub(before.batches);
        let mean_batch =
            if batches == 0 { 0.0 } else { after.samples.saturating_sub(before.samples) as f64 / batches as f64 };
        eprintln!(
            "  {model}, {setting}: {}",
            held.as_ref().map_or("no rate held".into(), |f| format!("{:.0}/s held", f.offered))
        );
        Ok(SloRow { model, setting, held, mean_batch })
    }

    /// Two replicas, the second with `second_args`, at `rate` through `policy`'s client.
    async fn two_replicas(
        &self,
        second_args: &[&str],
        body: &[u8],
        rate: f64,
        settings: SloSettings,
        policy: Policy,
    ) -> Result<(RateFigures, f64)> {
        let first = self.serve(&[]).await?;
        let second = self.serve(second_args).await?;
        let client = self.client(policy);
        offer(&client, body, rate, Duration::from_millis(500)).await;
        let before: ServeStatus = app_status(second.app_port).await.context("serve status")?;
        let figures = offer(&client, body, rate, settings.duration).await;
        let after: ServeStatus = app_status(second.app_port).await.context("serve status")?;
        let second_share = after.requests.saturating_sub(before.requests) as f64 / figures.sent.max(1) as f64;
        drop((first, second));
        Ok((figures, second_share))
    }

    /// One replica with `args` offered `rate` through the default client sidecar (adaptive
    /// concurrency limit) and one with the limit off, in alternating rounds of `duration`.
    async fn overload(
        &self,
        args: &[&str],
        body: &[u8],
        rate: f64,
        duration: Duration,
    ) -> Result<(RateFigures, RateFigures)> {
        let stage = self.serve(args).await?;
        let (adaptive_client, unlimited_client) = (self.client(Policy::P2c), self.unlimited.client());
        let (mut adaptive, mut unlimited) = (RateFigures::new(rate), RateFigures::new(rate));
        for _ in 0..OVERLOAD_ROUNDS {
            for (client, figures) in [(&adaptive_client, &mut adaptive), (&unlimited_client, &mut unlimited)] {
                offer(client, body, rate, Duration::from_millis(500)).await;
                figures.merge(&offer(client, body, rate, duration).await);
            }
        }
        drop(stage);
        Ok((adaptive, unlimited))
    }
}

/// A `predict` body of one sample with `features` values.
fn sample_body(features: usize) -> Vec<u8> {
    let sample: Vec<f32> = (0..features).map(|i| ((i * 7) % 16) as f32).collect();
    serde_json::json!({ "features": sample }).to_string().into_bytes()
}

/// Doubles the rate from `start_rate` until it is not held, then bisects three times between
/// the last held rate and the first one not held. Returns the best held rate's figures.
async fn highest_held_rate(client: &SidecarClient, body: &[u8], settings: SloSettings) -> Option<RateFigures> {
    let mut best: Option<RateFigures> = None;
    let mut rate = settings.start_rate;
    let mut not_held = None;
    // A fresh replica's first passes are slow (a large model's weights paged in, allocator
    // growth): a longer warm-up first.
    offer(client, body, rate, Duration::from_secs(1)).await;
    for _ in 0..12 {
        let figures = try_rate(client, body, rate, settings.duration).await;
        if figures.holds() {
            best = Some(figures);
            rate *= 2.0;
        } else {
            not_held = Some(rate);
            break;
        }
    }
    let (mut low, mut high) = (best.as_ref()?.offered, not_held?);
    for _ in 0..3 {
        let rate = (low + high) / 2.0;
        let figures = try_rate(client, body, rate, settings.duration).await;
        if figures.holds() {
            low = rate;
            best = Some(figures);
        } else {
            high = rate;
        }
    }
    best
}

/// Offers `rate` for `duration` after a short warm-up; a rate not held gets a second try, so
/// that one noisy moment of a shared machine does not end a search (the second try counts).
async fn try_rate(client: &SidecarClient, body: &[u8], rate: f64, duration: Duration) -> RateFigures {
    let mut figures = RateFigures::new(rate);
    for attempt in 0..2 {
        offer(client, body, rate, Duration::from_millis(300)).await;
        figures = offer(client, body, rate, duration).await;
        eprintln!("    {rate:.0}/s: p99 {:?}, lost {:.2}%", figures.p(0.99), 100.0 * figures.lost_share());
        if figures.holds() || attempt == 1 {
            break;
        }
    }
    figures
}

/// Sends `predict` requests on a Poisson schedule at `rate` for `duration`; each latency is
/// taken from the request's scheduled time.
async fn offer(client: &SidecarClient, body: &[u8], rate: f64, duration: Duration) -> RateFigures {
    let mut figures = RateFigures::new(rate);
    let start = Instant::now();
    let mut random = Exponential::new(0x5eed_u64 ^ rate.to_bits());
    let mut at = Duration::ZERO;
    let mut calls = Vec::new();
    loop {
        at += Duration::from_secs_f64(random.next() / rate);
        if at >= duration {
            break;
        }
        let scheduled = start + at;
        tokio::time::sleep_until(scheduled).await;
        let (client, body) = (client.clone(), body.to_vec());
        calls.push(tokio::spawn(async move {
            let options = CallOptions::default().content_type(JSON).timeout(REQUEST_TIMEOUT);
            let answer = client.invoke_with(app_ids::SERVE, methods::PREDICT, body, options).await;
            let answer = answer
                .map(|_| ())
                .map_err(|status| (status.code(), status.message().contains("shed by the caller's sidecar")));
            (answer, scheduled.elapsed())
        }));
    }
    for call in calls {
        figures.sent += 1;
        let micros = |took: Duration| (took.as_micros() as u64).clamp(1, 60_000_000);
        match call.await {
            Ok((Ok(()), took)) => figures.answered.saturating_record(micros(took)),
            Ok((Err((Code::ResourceExhausted, by_caller)), took)) => {
                figures.shed.saturating_record(micros(took));
                figures.shed_by_caller += u64::from(by_caller);
            }
            _ => figures.failed += 1,
        }
    }
    figures
}

/// Exponentially distributed numbers with mean 1 (Poisson inter-arrival times), from a
/// splitmix64 stream: reproducible for a given seed.
struct Exponential(u64);

impl Exponential {
    fn new(seed: u64) -> Exponential {
        Exponential(seed)
    }

    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // Uniform in (0, 1]: never ln(0).
        let uniform = ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        -uniform.ln()
    }
}

struct SlowReplica {
    rate: f64,
    slow_ms: u64,
    /// Figures and the share of requests the second replica answered.
    healthy: (RateFigures, f64),
    p2c: (RateFigures, f64),
    round_robin: (RateFigures, f64),
}

struct Overload {
    rate: f64,
    held_rate: f64,
    queue: u64,
    /// Through the default client sidecar (adaptive concurrency limit).
    adaptive: RateFigures,
    /// Through a client sidecar with `--concurrency-limit off`.
    unlimited: RateFigures,
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn quantiles(f: &RateFigures) -> String {
    if f.answered.is_empty() {
        return "- | - | -".into();
    }
    format!("{} | {} | {}", ms(f.p(0.5)), ms(f.p(0.99)), ms(f.p(0.999)))
}

fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "MISS" }
}

fn markdown(
    context: &RunContext,
    settings: SloSettings,
    rows: &[SloRow],
    slow: &SlowReplica,
    overload: &Overload,
) -> String {
    let mut out = context.measured_line();
    out.push_str(&format!(
        "Open loop: `predict` requests of one sample sent on a Poisson schedule at a fixed offered rate for {:?} \
         (after a short warm-up), each latency from the request's scheduled send time to its answer, in an \
         hdrhistogram; every request crosses the mesh (client sidecar -> serve's sidecar -> serve); serve has one compute thread (`RAYON_NUM_THREADS=1`). A rate is held \
         when p99 <= {} ms with at most {:.0}% refused or failed (a rate not held is tried a second time, which \
         counts); the highest held rate is found by doubling from {:.0}/s and bisecting three times.\n\n",
        settings.duration,
        SLO.as_millis(),
        MAX_LOST_SHARE * 100.0,
        settings.start_rate
    ));
    out.push_str("| model | serve setting | highest rate held | p50 | p99 | p99.9 | mean batch |\n");
    out.push_str("|---|---|---|---|---|---|---|\n");
    for row in rows {
        let (rate, q) = match &row.held {
            Some(f) => (format!("{}/s", thousands(f.offered as u64)), quantiles(f)),
            None => ("none".into(), "- | - | -".into()),
        };
        out.push_str(&format!("| {} | {} | {rate} | {q} | {:.1} |\n", row.model, row.setting, row.mean_batch));
    }
    out.push('\n');
    for model in ["digits MLP", "compute-bound MLP"] {
        let rate = |setting: &str| {
            rows.iter().find(|r| r.model == model && r.setting.starts_with(setting)).and_then(|r| r.held.as_ref())
        };
        let ratio = match (rate("dynamic"), rate("batch size 1")) {
            (Some(b), Some(one)) => Some(b.offered / one.offered),
            _ => None,
        };
        let target = if model == "compute-bound MLP" {
            format!(
                " (target >= {MIN_BATCHING_RATE_RATIO}x): **{}**",
                verdict(ratio.is_some_and(|r| r >= MIN_BATCHING_RATE_RATIO))
            )
        } else {
            String::new()
        };
        out.push_str(&format!("- {model}: batching holds {} the rate of batch size 1{target}\n", times(ratio)));
    }

    out.push_str(&format!(
        "\nOne slow replica: two serve replicas (digits, batching), the second with `--slow-ms {}`, offered {}/s \
         (half the rate one healthy replica holds), through a p2c and a round-robin client sidecar.\n\n",
        slow.slow_ms,
        thousands(slow.rate as u64)
    ));
    out.push_str(
        "| replicas | client's policy | p50 | p99 | p99.9 | share on the second replica | refused or failed |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|\n");
    for (name, policy, (f, share)) in [
        ("two healthy", "p2c", &slow.healthy),
        ("one slowed", "p2c", &slow.p2c),
        ("one slowed", "round robin", &slow.round_robin),
    ] {
        out.push_str(&format!(
            "| {name} | {policy} | {} | {:.1}% | {:.2}% |\n",
            quantiles(f),
            share * 100.0,
            f.lost_share() * 100.0
        ));
    }
    let p99 = |f: &RateFigures| f.p(0.99).as_secs_f64();
    let slow_ratio = (!slow.healthy.0.answered.is_empty()).then(|| p99(&slow.p2c.0) / p99(&slow.healthy.0));
    let rr_ratio = (!slow.healthy.0.answered.is_empty()).then(|| p99(&slow.round_robin.0) / p99(&slow.healthy.0));
    out.push_str(&format!(
        "\n- p2c with one slowed replica: p99 {} that of two healthy replicas (target <= {MAX_SLOW_REPLICA_P99_RATIO}x): \
         **{}**; round robin: {}\n",
        times(slow_ratio),
        verdict(slow_ratio.is_some_and(|r| r <= MAX_SLOW_REPLICA_P99_RATIO)),
        times(rr_ratio)
    ));

    let shed_p99 =
        |f: &RateFigures| (!f.shed.is_empty()).then(|| Duration::from_micros(f.shed.value_at_quantile(0.99)));
    out.push_str(&format!(
        "\nOverload: one replica (compute-bound MLP, batching) offered {}/s, twice the {}/s it holds, with \
         `--max-queue {}` (4 ms of the held rate), through the default client sidecar (adaptive concurrency \
         limit) and one with `--concurrency-limit off`, taking turns ({OVERLOAD_ROUNDS} rounds of {:?} each).\n\n",
        thousands(overload.rate as u64),
        thousands(overload.held_rate as u64),
        overload.queue,
        settings.duration
    ));
    out.push_str(
        "| client sidecar | sent | answered | accepted p50 | accepted p99 | accepted p99.9 | refused | of which by the client's sidecar | refusal p99 | failed |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    for (name, f) in [("adaptive limit (default)", &overload.adaptive), ("no limit", &overload.unlimited)] {
        out.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} |\n",
            thousands(f.sent),
            thousands(f.answered.len()),
            quantiles(f),
            thousands(f.shed.len()),
            thousands(f.shed_by_caller),
            shed_p99(f).map(ms).unwrap_or_else(|| "-".into()),
            f.failed
        ));
    }
    let f = &overload.adaptive;
    let accepted_ok = !f.answered.is_empty() && f.p(0.99) <= SLO;
    out.push_str(&format!(
        "\n- with the default client sidecar: refusals answered within {} ms (p99): **{}**; accepted requests \
         within the {} ms SLO (p99): **{}**\n",
        MAX_SHED_LATENCY.as_millis(),
        verdict(shed_p99(f).is_some_and(|d| d <= MAX_SHED_LATENCY)),
        SLO.as_millis(),
        verdict(accepted_ok)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_arrivals_have_mean_one_and_are_reproducible() {
        let mut a = Exponential::new(7);
        let n = 100_000;
        let mean = (0..n).map(|_| a.next()).sum::<f64>() / n as f64;
        assert!((mean - 1.0).abs() < 0.02, "mean {mean}");
        let (mut b, mut c) = (Exponential::new(9), Exponential::new(9));
        assert!((0..100).all(|_| b.next() == c.next()));
    }

    #[test]
    fn a_rate_is_held_only_within_the_slo_and_with_little_lost() {
        let mut f = RateFigures::new(100.0);
        f.sent = 200;
        for _ in 0..198 {
            f.answered.record(2_000).unwrap();
        }
        f.shed.record(100).unwrap();
        f.failed = 1;
        assert!(f.holds(), "1% lost, p99 2 ms");
        f.failed = 2;
        assert!(!f.holds(), "1.5% lost");
        f.failed = 0;
        for _ in 0..10 {
            f.answered.record(20_000).unwrap();
        }
        assert!(!f.holds(), "p99 past 10 ms");
    }
}
