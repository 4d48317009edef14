//! The data benchmark: rows per second from a Parquet file to training-ready feature batches
//! in train's store, through the pipeline (ingest -> 2 preprocess replicas -> train, each
//! beside its own tandemd; train keeps the batches in its sled store, etcd their markers),
//! against reading and standardizing the same file in one process with the same crates
//! (ingest's two passes with `parquet::arrow`, burn's standardization as preprocess runs it):
//! the physical limit of this machine. And the peak resident memory of every process of the
//! pipeline.
//!
//! The file is written first by `tandem dataset synth`'s generator (64 features, 10 classes).
//! The pipeline's time runs from ingest's start to train's status counting every batch
//! gathered; train is then stopped before it trains.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tandem_ingest::{DatasetOptions, prepare};
use tandem_model::{Standardizer, SyntheticSpec, parse_device};
use tandem_pipeline::messages::{TrainStatus, app_ids};
use tandem_tests::pipeline::{Pipeline, PipelineOptions};
use tandem_tests::training::replica_status;

use crate::machine::RunContext;
use crate::procfs::{Memory, cpu_time, machine_busy};
use crate::report::{Section, megabytes, thousands, times};
use crate::stats::ratio;

pub const DATA_SECTION: Section = Section {
    heading: "## Data: Parquet through the pipeline",
    start_marker: "<!-- bench:data:start -->",
    end_marker: "<!-- bench:data:end -->",
};

/// The pipeline must reach at least this share of the one-process rate.
pub const MIN_RATIO: f64 = 0.5;
/// The bound on every process's peak resident memory.
pub const MAX_PEAK: u64 = 512_000_000;

const FEATURES: usize = 64;
const CLASSES: usize = 10;

#[derive(Debug, Clone)]
pub struct DataSettings {
    pub rows: usize,
    /// Ingest's --batch-size, each measured on its own.
    pub batch_sizes: Vec<u32>,
}

struct Measured {
    batch_size: u32,
    one_process: Duration,
    pipeline: Duration,
    batches: u32,
    /// Every process of the pipeline.
    processes: Vec<ProcessUse>,
    /// CPU time the whole machine was busy while the pipeline ran.
    machine_busy: Duration,
}

/// What one process of the pipeline used.
struct ProcessUse {
    name: String,
    /// Peak resident bytes.
    peak: u64,
    /// CPU time while the dataset went through (user and system).
    cpu: Duration,
}

/// Runs the benchmark; returns its markdown.
pub async fn run(settings: DataSettings, context: RunContext) -> Result<String> {
    ensure!(settings.rows >= 1000, "--data-rows must be at least 1000");
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("data.parquet");
    let spec = SyntheticSpec { rows: settings.rows, features: FEATURES, classes: CLASSES };
    eprintln!("writing {} rows x {FEATURES} features to {} ...", settings.rows, path.display());
    let written = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || tandem_ingest::synth::write(spec, 1, &path)).await??
    };
    let mut measured = Vec::new();
    for &batch_size in &settings.batch_sizes {
        eprintln!("batch size {batch_size}: one process ...");
        let one_process = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || one_process(&path, batch_size)).await??
        };
        eprintln!("batch size {batch_size}: through the pipeline ...");
        let (pipeline, batches, processes, machine_busy) = through_the_pipeline(&path, batch_size).await?;
        measured.push(Measured { batch_size, one_process, pipeline, batches, processes, machine_busy });
    }
    Ok(markdown(&settings, written.bytes, &measured, &context))
}

/// Both passes of ingest and the standardization of every batch, in this process.
fn one_process(path: &Path, batch_size: u32) -> Result<Duration> {
    let device = parse_device("cpu")?;
    let started = Instant::now();
    let options = DatasetOptions { dataset: path.display().to_string(), batch_size, ..DatasetOptions::default() };
    let prepared = prepare(&options)?;
    let standardizer = Standardizer { mean: prepared.scaler.mean.clone(), std: prepared.scaler.std.clone() };
    let mut rows = 0usize;
    for batch in prepared.batches()? {
        rows += standardizer.transform_rows(&batch?.features, &device)?.len();
    }
    let counts = prepared.manifest.counts;
    ensure!(rows == (counts.train_samples + counts.test_samples) as usize, "standardized {rows} rows");
    Ok(started.elapsed())
}

/// ingest -> 2 preprocess -> train's store: the time, the batches, what every process used
/// (its peak memory and its CPU time while the dataset went through) and the machine's busy
/// time meanwhile.
async fn through_the_pipeline(path: &Path, batch_size: u32) -> Result<(Duration, u32, Vec<ProcessUse>, Duration)> {
    let options = PipelineOptions {
        preprocess_replicas: 2,
        serve_replicas: 0,
        start_ingest: false,
        train_args: vec!["--epochs".into(), "1".into()],
        ..PipelineOptions::default()
    };
    let mut pipeline = Pipeline::start(options).await;
    // (name, pid) of every process but ingest's service, which starts below.
    let mut pids = vec![("etcd".to_string(), pipeline.etcd.pid())];
    let stages = std::iter::once((app_ids::INGEST.to_string(), &pipeline.ingest))
        .chain(pipeline.preprocess.iter().enumerate().map(|(i, s)| (format!("{}-{}", app_ids::PREPROCESS, i + 1), s)))
        .chain(std::iter::once((app_ids::TRAIN.to_string(), &pipeline.train[0])));
    for (name, stage) in stages {
        pids.push((format!("{name}'s tandemd"), stage.sidecar.pid()));
        if name != app_ids::INGEST {
            pids.push((name, stage.service().pid()));
        }
    }
    let pids: Vec<(String, u32)> = pids
        .into_iter()
        .map(|(name, pid)| Ok((name.clone(), pid.with_context(|| format!("{name} is not running"))?)))
        .collect::<Result<_>>()?;
    let cpu_before: Vec<Duration> = pids.iter().map(|(_, pid)| cpu_time(*pid)).collect::<Result<_>>()?;
    let busy_before = machine_busy()?;
    let started = Instant::now();
    let args = ["--dataset".to_string(), path.display().to_string(), "--batch-size".into(), batch_size.to_string()];
    pipeline.ingest.start_service(&args).await;
    let train_port = pipeline.train[0].app_port;
    let deadline = started + Duration::from_secs(1800);
    let batches = loop {
        let status: Option<TrainStatus> = replica_status(train_port).await.ok();
        if let Some(expected) = status.as_ref().and_then(|s| s.batches_expected)
            && status.as_ref().is_some_and(|s| s.batches_received == expected && expected > 0)
        {
            break expected;
        }
        ensure!(Instant::now() < deadline, "train did not gather the dataset within 30 minutes: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let elapsed = started.elapsed();
    let busy = machine_busy()?.saturating_sub(busy_before);
    let mut processes = Vec::new();
    for ((name, pid), before) in pids.iter().zip(cpu_before) {
        let cpu = cpu_time(*pid)?.saturating_sub(before);
        processes.push(ProcessUse { name: name.clone(), peak: Memory::of(*pid)?.peak, cpu });
    }
    let ingest = pipeline.ingest.service().pid().context("ingest is not running")?;
    // After its sidecar, as in the pipeline's order.
    processes
        .insert(2, ProcessUse { name: app_ids::INGEST.into(), peak: Memory::of(ingest)?.peak, cpu: cpu_time(ingest)? });
    Ok((elapsed, batches, processes, busy))
}

fn markdown(settings: &DataSettings, file_bytes: u64, measured: &[Measured], context: &RunContext) -> String {
    let rows = settings.rows as f64;
    let rate = |d: Duration| rows / d.as_secs_f64().max(1e-9);
    let mut out = format!("{}\n\n", context.measured_line());
    out.push_str(&format!(
        "A Parquet file of {} rows x {FEATURES} float features and a label ({}, snappy, row groups of 65,536 rows), \
         from `tandem dataset synth`. One process: ingest's two passes (read with `parquet::arrow`, check, split, hash, \
         fit the scaler; read again and cut batches) and burn's standardization of every batch. Pipeline: from \
         tandem-ingest's start to train's status counting every batch gathered (kept in its own sled store, its marker in etcd), through \
         ingest -> 2 preprocess replicas -> train, each beside its own tandemd; batches as Arrow IPC.\n\n",
        thousands(settings.rows as u64),
        megabytes(file_bytes)
    ));
    out.push_str(
        "| ingest --batch-size | batches | one process | rows/s | pipeline | rows/s | pipeline / one process |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|\n");
    for m in measured {
        out.push_str(&format!(
            "| {} | {} | {:.2} s | {} | {:.2} s | {} | {} |\n",
            m.batch_size,
            thousands(u64::from(m.batches)),
            m.one_process.as_secs_f64(),
            thousands(rate(m.one_process) as u64),
            m.pipeline.as_secs_f64(),
            thousands(rate(m.pipeline) as u64),
            times(ratio(rate(m.pipeline), rate(m.one_process))),
        ));
    }
    if let Some(m) = measured.first() {
        out.push_str(&format!(
            "\nEach process of the pipeline, batch size {}: peak resident memory (VmHWM) and CPU time while the \
             dataset went through ({:.2} s of {} cores: the machine was busy {:.1} of {:.1} core-seconds, all \
             processes counted):\n\n",
            m.batch_size,
            m.pipeline.as_secs_f64(),
            context.cpus,
            m.machine_busy.as_secs_f64(),
            m.pipeline.as_secs_f64() * context.cpus as f64,
        ));
        out.push_str("| process | peak | CPU |\n|---|---|---|\n");
        for process in &m.processes {
            out.push_str(&format!(
                "| {} | {} | {:.2} s |\n",
                process.name,
                megabytes(process.peak),
                process.cpu.as_secs_f64()
            ));
        }
    }
    out.push('\n');
    for m in measured {
        let r = ratio(rate(m.pipeline), rate(m.one_process));
        let pass = r.is_some_and(|r| r >= MIN_RATIO);
        out.push_str(&format!(
            "- batch size {}: the pipeline at {} of one process (target >= {MIN_RATIO}x): **{}**\n",
            m.batch_size,
            times(r),
            if pass { "PASS" } else { "MISS" }
        ));
        let worst = m.processes.iter().max_by_key(|process| process.peak);
        if let Some(ProcessUse { name, peak, .. }) = worst {
            out.push_str(&format!(
                "- batch size {}: the largest peak is {name}'s, {} (bound 512 MB): **{}**\n",
                m.batch_size,
                megabytes(*peak),
                if *peak <= MAX_PEAK { "PASS" } else { "MISS" }
            ));
        }
    }
    out
}
