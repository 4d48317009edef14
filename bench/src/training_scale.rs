//! The training-scale benchmark: data-parallel training through the mesh, one replica against
//! two, in the same run, on the synthetic dataset with a compute-bound MLP; each replica is
//! limited to one compute thread (`RAYON_NUM_THREADS=1`, burn's flex pool), so two replicas
//! have two threads where one has one. Then the recovery after a kill -9: two replicas train,
//! one is killed with its sidecar, and the time from the kill to the survivor's next completed
//! step is measured (the sidecars' lease TTL lowered to 2 s for the run).
//!
//! Every run starts its own etcd and `tandem-train --dataset synthetic:...` replicas, each
//! beside its own tandemd (the release binaries next to this executable). Throughput is read
//! from replica 0's status: global-batch samples over a window of steps after a warm-up;
//! all-reduce time and bytes per step from its sidecar's `/metrics` over the same window.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tandem_tests::Etcd;
use tandem_tests::training::TrainGroup;

use crate::machine::RunContext;
use crate::prometheus::sum_of;
use crate::report::{Section, thousands, times};
use crate::stats::ratio;

pub const TRAINING_SCALE_SECTION: Section = Section {
    heading: "## Training scale: one replica against two, through the mesh",
    start_marker: "<!-- bench:training-scale:start -->",
    end_marker: "<!-- bench:training-scale:end -->",
};

/// Two replicas must train at least this share of twice one replica's rate.
pub const MIN_SCALING_EFFICIENCY: f64 = 0.90;
/// From a replica's kill -9 to the survivor's next completed step, at most.
pub const MAX_RECOVERY: Duration = Duration::from_secs(10);

/// How the benchmark runs.
#[derive(Debug, Clone)]
pub struct ScaleSettings {
    pub rows: usize,
    pub features: usize,
    pub classes: usize,
    pub hidden: Vec<usize>,
    pub batch_size: usize,
    pub warmup_steps: u64,
    pub measured_steps: u64,
    pub rounds: usize,
}

impl ScaleSettings {
    fn dataset(&self) -> String {
        format!("synthetic:{}:{}:{}", self.rows, self.features, self.classes)
    }

    fn architecture(&self) -> String {
        let mut widths = vec![self.features.to_string()];
        widths.extend(self.hidden.iter().map(usize::to_string));
        widths.push(self.classes.to_string());
        widths.join("-")
    }

    fn parameters(&self) -> usize {
        let mut widths = vec![self.features];
        widths.extend(&self.hidden);
        widths.push(self.classes);
        widths.windows(2).map(|w| w[0] * w[1] + w[1]).sum()
    }
}

/// One measured run of `replicas` replicas.
#[derive(Debug, Clone)]
struct Figures {
    samples_per_second: f64,
    step_seconds: f64,
    all_reduce_seconds: f64,
    all_reduce_bytes: f64,
    /// Replica 0's own split of a step (means over its last steps), in ms.
    compute_ms: f64,
    app_all_reduce_ms: f64,
    apply_ms: f64,
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Runs the benchmark at each global batch of `batch_sizes`; returns its markdown.
pub async fn run(settings: ScaleSettings, batch_sizes: &[usize], context: RunContext) -> Result<String> {
    let mut measured = Vec::new();
    for &batch_size in batch_sizes {
        let settings = ScaleSettings { batch_size, ..settings.clone() };
        let (mut one, mut two) = (Vec::new(), Vec::new());
        for round in 1..=settings.rounds {
            for replicas in [1usize, 2] {
                eprintln!("global batch {batch_size}, round {round}/{}: {replicas} replica(s) ...", settings.rounds);
                let figures = measure(&settings, replicas).await.with_context(|| format!("{replicas} replica(s)"))?;
                eprintln!(
                    "  {:.0} samples/s, step {:.1} ms (compute {:.1}, all-reduce {:.1} of which {:.1} across the sidecars, apply {:.1})",
                    figures.samples_per_second,
                    figures.step_seconds * 1e3,
                    figures.compute_ms,
                    figures.app_all_reduce_ms,
                    figures.all_reduce_seconds * 1e3,
                    figures.apply_ms
                );
                if replicas == 1 { one.push(figures) } else { two.push(figures) }
            }
        }
        measured.push((batch_size, one, two));
    }
    eprintln!("recovery: two replicas, one killed with its sidecar ...");
    let recovery_settings = ScaleSettings { batch_size: batch_sizes[0], ..settings.clone() };
    let recovery = recovery(&recovery_settings).await.context("the recovery run")?;
    eprintln!("  {recovery:?}");
    Ok(markdown(&settings, &context, &measured, recovery))
}

fn args(settings: &ScaleSettings, min: usize, max: usize) -> Vec<String> {
    let hidden: Vec<String> = settings.hidden.iter().map(usize::to_string).collect();
    vec![
        "--dataset".into(),
        settings.dataset(),
        "--hidden".into(),
        hidden.join(","),
        "--train-batch-size".into(),
        settings.batch_size.to_string(),
        // Long enough never to finish inside the measurement.
        "--epochs".into(),
        "1000".into(),
        "--min-replicas".into(),
        min.to_string(),
        "--max-replicas".into(),
        max.to_string(),
        "--last-call-ms".into(),
        "500".into(),
    ]
}

async fn start(settings: &ScaleSettings, etcd: &Etcd, replicas: usize, min: usize, max: usize) -> TrainGroup {
    let args = args(settings, min, max);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    TrainGroup::start_with_env(etcd, replicas, &args, &[("RAYON_NUM_THREADS", "1")]).await
}

/// The step replica 0 has completed, with the time it was read.
async fn step_of(group: &TrainGroup) -> Option<(u64, u32, Instant)> {
    let status = group.status(0).await.ok()?;
    let progress = status.group?;
    Some((progress.step, progress.world_size, Instant::now()))
}

/// Polls replica 0 until it has completed `step` steps in a round of `world`; returns when.
async fn reach(group: &TrainGroup, step: u64, world: u32, timeout: Duration) -> Result<(u64, Instant)> {
    let start = Instant::now();
    loop {
        if let Some((done, size, at)) = step_of(group).await
            && done >= step
            && size == world
        {
            return Ok((done, at));
        }
        if start.elapsed() > timeout {
            bail!("replica 0 did not reach step {step} in a round of {world} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn measure(settings: &ScaleSettings, replicas: usize) -> Result<Figures> {
    let etcd = Etcd::start().await;
    let group = start(settings, &etcd, replicas, replicas, replicas).await;
    let timeout = Duration::from_secs(600);
    let (from_step, from) = reach(&group, settings.warmup_steps, replicas as u32, timeout).await?;
    let before = group.replicas[0].sidecar.scrape().await;
    let (to_step, to) = reach(&group, from_step + settings.measured_steps, replicas as u32, timeout).await?;
    let after = group.replicas[0].sidecar.scrape().await;
    let split = group.status(0).await.ok().and_then(|s| s.group).context("replica 0's group progress")?;
    let steps = (to_step - from_step) as f64;
    let seconds = (to - from).as_secs_f64();
    let delta = |name: &str| sum_of(&after, name) - sum_of(&before, name);
    let reduces = delta("tandem_group_all_reduce_seconds_count").max(1.0);
    Ok(Figures {
        samples_per_second: steps * settings.batch_size as f64 / seconds,
        step_seconds: seconds / steps,
        all_reduce_seconds: delta("tandem_group_all_reduce_seconds_sum") / reduces,
        all_reduce_bytes: delta("tandem_group_all_reduce_bytes_total") / reduces,
        compute_ms: split.compute_ms,
        app_all_reduce_ms: split.all_reduce_ms,
        apply_ms: split.apply_ms,
    })
}

/// Two replicas (min 1) train; replica 1 and its sidecar are killed; the time until replica 0
/// completes a step alone.
async fn recovery(settings: &ScaleSettings) -> Result<Duration> {
    let etcd = Etcd::start().await;
    let mut group = start(settings, &etcd, 2, 1, 0).await;
    reach(&group, settings.warmup_steps, 2, Duration::from_secs(600)).await?;
    let (at_kill, _, _) = step_of(&group).await.context("replica 0's status")?;
    let killed = Instant::now();
    group.kill(1).await;
    let (_, recovered) = reach(&group, at_kill + 1, 1, Duration::from_secs(120)).await?;
    Ok(recovered - killed)
}

fn median_of(runs: &[Figures], field: fn(&Figures) -> f64) -> f64 {
    median(&mut runs.iter().map(field).collect::<Vec<_>>())
}

fn efficiency(one: &[Figures], two: &[Figures]) -> (Option<f64>, Option<f64>) {
    let speedup = ratio(median_of(two, |f| f.samples_per_second), median_of(one, |f| f.samples_per_second));
    (speedup, speedup.map(|s| s / 2.0))
}

type Measured = (usize, Vec<Figures>, Vec<Figures>);

/// A table row: its name, the figure it shows and its unit.
type Row = (&'static str, fn(&Figures) -> f64, &'static str);

fn markdown(settings: &ScaleSettings, context: &RunContext, measured: &[Measured], recovery: Duration) -> String {
    let range = |runs: &[Figures]| {
        let values: Vec<f64> = runs.iter().map(|f| f.samples_per_second).collect();
        let (low, high) = values.iter().fold((f64::MAX, 0.0f64), |(l, h), v| (l.min(*v), h.max(*v)));
        format!("{}-{}", thousands(low as u64), thousands(high as u64))
    };
    let mut out = context.measured_line();
    out.push_str(&format!(
        "- Model: MLP {} ({} parameters, {:.1} MB of f32 gradients per step), Adam; data `{}` (seeded, \
         standardized, 80% train). The global batch is split across the replicas; each table is one global batch.\n",
        settings.architecture(),
        thousands(settings.parameters() as u64),
        settings.parameters() as f64 * 4.0 / 1e6,
        settings.dataset()
    ));
    out.push_str(&format!(
        "- Each replica: `tandem-train` beside its own tandemd, one compute thread (`RAYON_NUM_THREADS=1`). \
         {} rounds per global batch, each one replica then two; throughput over {} steps after {} warm-up steps, \
         medians count. The all-reduce runs sidecar to sidecar (ring over `tandem.internal.v1.GroupPeer`); one \
         replica skips it (nothing to sum).\n",
        settings.rounds, settings.measured_steps, settings.warmup_steps
    ));
    for (batch_size, one, two) in measured {
        let rows: [Row; 6] = [
            ("step time", |f| f.step_seconds * 1e3, "ms"),
            ("of which: gradients of the replica's shard", |f| f.compute_ms, "ms"),
            ("of which: all-reduce as the app sees it (to its sidecar, across, back)", |f| f.app_all_reduce_ms, "ms"),
            ("of which: all-reduce across the sidecars (tandemd's histogram)", |f| f.all_reduce_seconds * 1e3, "ms"),
            ("of which: the Adam update", |f| f.apply_ms, "ms"),
            ("bytes a sidecar sends to the others per step", |f| f.all_reduce_bytes, "bytes"),
        ];
        out.push_str(&format!("\n**Global batch {batch_size}**\n\n| | 1 replica | 2 replicas |\n|---|---:|---:|\n"));
        out.push_str(&format!(
            "| training throughput (median) | {} samples/s | {} samples/s |\n",
            thousands(median_of(one, |f| f.samples_per_second) as u64),
            thousands(median_of(two, |f| f.samples_per_second) as u64)
        ));
        out.push_str(&format!("| throughput range over the rounds | {} | {} |\n", range(one), range(two)));
        for (name, field, unit) in rows {
            let show = |runs: &[Figures]| match unit {
                "bytes" => thousands(median_of(runs, field) as u64),
                _ => format!("{:.1} ms", median_of(runs, field)),
            };
            out.push_str(&format!("| {name} | {} | {} |\n", show(one), show(two)));
        }
    }
    let verdict = |pass: bool| if pass { "PASS" } else { "MISS" };
    out.push_str("\n| target | measured | result |\n|---|---|---|\n");
    for (batch_size, one, two) in measured {
        let (speedup, efficiency) = efficiency(one, two);
        out.push_str(&format!(
            "| scaling efficiency of 2 replicas >= {MIN_SCALING_EFFICIENCY:.2}, global batch {batch_size} | {} ({} one replica's rate) | {} |\n",
            efficiency.map(|e| format!("{e:.3}")).unwrap_or_else(|| "-".into()),
            times(speedup),
            verdict(efficiency.is_some_and(|e| e >= MIN_SCALING_EFFICIENCY))
        ));
    }
    out.push_str(&format!(
        "| recovery after kill -9 of a replica and its sidecar <= {} s (lease TTL 2 s) | {:.2} s | {} |\n",
        MAX_RECOVERY.as_secs(),
        recovery.as_secs_f64(),
        verdict(recovery <= MAX_RECOVERY)
    ));
    out
}
