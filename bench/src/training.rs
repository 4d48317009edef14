//! The training benchmark: training throughput (samples/s) of tandem-model's MLP in burn
//! (flex CPU backend) against the same MLP in PyTorch on the CPU, in the same run.
//!
//! Both train on the same standardized digits training split with the same architecture, batch
//! size, epochs, optimizer (Adam, same learning rate and epsilon) and per-batch bookkeeping (loss
//! and accuracy read back after every batch). Only the training loop is timed. The runs alternate
//! burn, PyTorch, burn, ... so that load from elsewhere falls on both alike; the medians count.
//!
//! PyTorch comes from PyPI, installed by this benchmark into its own virtualenv
//! (`target/bench-venv`, once); when torch cannot be installed there, scikit-learn's
//! MLPClassifier is the comparison instead, and the report says so.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;
use tandem_model::{Dataset, Standardizer, TrainingConfig, parse_device, train};

use crate::machine::RunContext;
use crate::report::{Section, thousands, times};
use crate::stats::ratio;

pub const TRAINING_SECTION: Section = Section {
    heading: "## Training throughput: burn against PyTorch",
    start_marker: "<!-- bench:training:start -->",
    end_marker: "<!-- bench:training:end -->",
};

/// burn's throughput must be at least this multiple of the Python framework's.
pub const MIN_SPEEDUP: f64 = 1.0;

/// Fraction of digits held out for the test accuracy (the pipeline's default).
const TEST_FRACTION: f64 = 0.2;

/// One timed training run.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RunFigures {
    pub seconds: f64,
    pub samples_per_second: f64,
    pub test_accuracy: f64,
}

/// What the Python script reports (one JSON object on stdout).
#[derive(Debug, Clone, Deserialize)]
struct PythonRun {
    framework: String,
    version: String,
    threads: Option<usize>,
    #[serde(flatten)]
    figures: RunFigures,
}

/// The Python side's runs in one threading configuration.
#[derive(Debug, Clone)]
pub struct PythonRuns {
    /// `--threads` given to the script: 0 keeps the framework's default.
    pub requested_threads: usize,
    /// Threads the framework reported using (torch's intra-op threads), if it says.
    pub threads: Option<usize>,
    pub runs: Vec<RunFigures>,
}

/// Everything one run of the benchmark measured.
#[derive(Debug, Clone)]
pub struct TrainingReport {
    pub context: RunContext,
    pub config: TrainingConfig,
    pub train_samples: usize,
    pub test_samples: usize,
    pub architecture: String,
    pub burn: Vec<RunFigures>,
    pub burn_threads: usize,
    /// `PyTorch 2.x` or `scikit-learn MLPClassifier 1.x`.
    pub python_framework: String,
    /// PyTorch with its default threads, then with 1 thread (one entry for scikit-learn).
    pub python: Vec<PythonRuns>,
}

/// Runs `runs` rounds of burn then Python (PyTorch twice: default threads and one thread).
pub fn run(runs: usize, context: RunContext) -> Result<TrainingReport> {
    ensure!(runs > 0, "--training-runs must be at least 1");
    let root = workspace_root();
    let python = ensure_python_env(&root)?;
    let config = TrainingConfig::default();
    let device = parse_device("cpu")?;
    let split = Dataset::digits().split(TEST_FRACTION, config.seed)?;
    let scaler = Standardizer::fit(&split.train, &device);
    let train_set = scaler.transform(&split.train, &device)?;
    let test_set = scaler.transform(&split.test, &device)?;
    let data_dir = tempfile::tempdir()?;
    write_data(data_dir.path(), &train_set, &test_set)?;

    // Warm-up, untimed: one epoch pays burn's first-call costs, as train_mlp.py does for torch.
    train(&train_set, &TrainingConfig { epochs: 1, ..config.clone() }, &device, |_| {})?;
    let mut burn = Vec::new();
    let mut python_runs: Vec<PythonRuns> = [0, 1]
        .into_iter()
        .map(|requested_threads| PythonRuns { requested_threads, threads: None, runs: Vec::new() })
        .collect();
    let mut python_framework = String::new();
    let mut architecture = String::new();
    for round in 1..=runs {
        eprintln!("round {round}/{runs}: burn ...");
        let started = Instant::now();
        let classifier = train(&train_set, &config, &device, |_| {})?;
        let seconds = started.elapsed().as_secs_f64();
        architecture = classifier.config().architecture();
        burn.push(RunFigures {
            seconds,
            samples_per_second: (train_set.len() * config.epochs) as f64 / seconds,
            test_accuracy: f64::from(classifier.evaluate(&test_set)?.accuracy),
        });
        for side in python_runs.iter_mut() {
            eprintln!("round {round}/{runs}: python, --threads {} ...", side.requested_threads);
            let run = run_python(&python, &root, data_dir.path(), &config, side.requested_threads)?;
            python_framework = format!("{} {}", run.framework, run.version);
            side.threads = run.threads;
            side.runs.push(run.figures);
            if run.framework != "PyTorch" {
                break; // scikit-learn has no thread setting to compare.
            }
        }
    }
    python_runs.retain(|side| !side.runs.is_empty());
    Ok(TrainingReport {
        context,
        config,
        train_samples: train_set.len(),
        test_samples: test_set.len(),
        architecture,
        burn,
        burn_threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        python_framework,
        python: python_runs,
    })
}

/// The repository root (this crate sits in `bench/`).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("bench/ has a parent").to_path_buf()
}

/// Creates `target/bench-venv` and installs torch into it (scikit-learn when torch cannot be
/// installed); returns the virtualenv's python.
fn ensure_python_env(root: &Path) -> Result<PathBuf> {
    let venv = root.join("target").join("bench-venv");
    let python = venv.join("bin").join("python");
    if !python.exists() {
        eprintln!("creating the virtualenv {} ...", venv.display());
        run_checked(Command::new("python3").args(["-m", "venv"]).arg(&venv), "python3 -m venv")?;
    }
    if imports(&python, "torch") || imports(&python, "sklearn") {
        return Ok(python);
    }
    let requirements = root.join("bench").join("python");
    eprintln!("installing torch from PyPI into {} (a large download, once) ...", venv.display());
    let torch = Command::new(&python)
        .args(["-m", "pip", "install", "--progress-bar", "off", "-r"])
        .arg(requirements.join("requirements-torch.txt"))
        .status();
    if torch.is_ok_and(|status| status.success()) && imports(&python, "torch") {
        return Ok(python);
    }
    eprintln!("warning: torch could not be installed; comparing against scikit-learn's MLPClassifier instead");
    run_checked(
        Command::new(&python)
            .args(["-m", "pip", "install", "--progress-bar", "off", "-r"])
            .arg(requirements.join("requirements-sklearn.txt")),
        "pip install scikit-learn",
    )?;
    ensure!(imports(&python, "sklearn"), "neither torch nor scikit-learn could be installed into {}", venv.display());
    Ok(python)
}

fn imports(python: &Path, module: &str) -> bool {
    Command::new(python).args(["-c", &format!("import {module}")]).output().is_ok_and(|out| out.status.success())
}

fn run_checked(command: &mut Command, what: &str) -> Result<()> {
    let status = command.status().with_context(|| format!("starting {what}"))?;
    ensure!(status.success(), "{what} failed ({status})");
    Ok(())
}

/// Writes the standardized splits in the raw format `train_mlp.py` reads.
fn write_data(dir: &Path, train_set: &Dataset, test_set: &Dataset) -> Result<()> {
    for (name, data) in [("train", train_set), ("test", test_set)] {
        let x: Vec<u8> = data.features().iter().flat_map(|v| v.to_le_bytes()).collect();
        let y: Vec<u8> = data.labels().iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(dir.join(format!("{name}_x.f32")), x)?;
        std::fs::write(dir.join(format!("{name}_y.u32")), y)?;
    }
    let meta =
        format!(r#"{{"num_features": {}, "num_classes": {}}}"#, train_set.num_features(), train_set.num_classes());
    std::fs::write(dir.join("meta.json"), meta)?;
    Ok(())
}

fn run_python(python: &Path, root: &Path, data: &Path, config: &TrainingConfig, threads: usize) -> Result<PythonRun> {
    let mut command = Command::new(python);
    command
        .arg(root.join("bench").join("python").join("train_mlp.py"))
        .arg("--data")
        .arg(data)
        .args(["--epochs", &config.epochs.to_string()])
        .args(["--batch-size", &config.batch_size.to_string()])
        .args(["--learning-rate", &config.learning_rate.to_string()])
        .args(["--seed", &config.seed.to_string()])
        .args(["--threads", &threads.to_string()])
        .arg("--hidden")
        .args(config.hidden.iter().map(usize::to_string));
    let out = command.output().context("starting train_mlp.py")?;
    if !out.status.success() {
        bail!("train_mlp.py failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("reading train_mlp.py's result {line:?}"))
}

/// The median of a non-empty list.
fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.into_iter().collect();
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 { values[mid] } else { (values[mid - 1] + values[mid]) / 2.0 }
}

impl PythonRuns {
    pub fn median(&self) -> f64 {
        median(self.runs.iter().map(|r| r.samples_per_second))
    }

    fn label(&self, framework: &str) -> String {
        match (framework, self.requested_threads, self.threads) {
            ("PyTorch", 0, Some(threads)) => format!("PyTorch, default ({threads} threads)"),
            ("PyTorch", _, Some(1)) => "PyTorch, 1 thread".to_string(),
            ("PyTorch", _, Some(threads)) => format!("PyTorch, {threads} threads"),
            (name, _, _) => name.to_string(),
        }
    }
}

impl TrainingReport {
    pub fn burn_median(&self) -> f64 {
        median(self.burn.iter().map(|r| r.samples_per_second))
    }

    /// The faster Python configuration: the one the target is checked against.
    pub fn best_python(&self) -> Option<&PythonRuns> {
        self.python.iter().max_by(|a, b| a.median().total_cmp(&b.median()))
    }

    pub fn speedup(&self) -> Option<f64> {
        ratio(self.burn_median(), self.best_python()?.median())
    }

    fn framework_short(&self) -> &str {
        if self.python_framework.starts_with("PyTorch") { "PyTorch" } else { "scikit-learn" }
    }

    pub fn to_markdown(&self) -> String {
        let c = &self.config;
        let short = self.framework_short();
        let mut out = self.context.measured_line();
        out.push_str(&format!(
            "- Model: MLP {} (ReLU), cross-entropy loss, Adam (lr {}, betas 0.9/0.999, epsilon 1e-5), \
             batch size {}, {} epochs, minibatches reshuffled every epoch; loss and accuracy read back after \
             every batch in both.\n",
            self.architecture, c.learning_rate, c.batch_size, c.epochs
        ));
        out.push_str(&format!(
            "- Data: the digits training split ({} samples, standardized), test accuracy on the other {} samples. \
             Only the training loop is timed, after an untimed one-epoch warm-up; samples/s = samples x epochs / \
             seconds.\n",
            self.train_samples, self.test_samples
        ));
        out.push_str(&format!(
            "- **burn**: tandem-model's `train` on the flex CPU backend ({} CPUs visible to its thread pool; \
             at these sizes its kernels stay below flex's parallel thresholds and run on one thread). \
             **{}**: `bench/python/train_mlp.py` in the virtualenv target/bench-venv (installed from PyPI by the \
             benchmark){}.\n",
            self.burn_threads,
            self.python_framework,
            if short == "PyTorch" {
                ", once with torch's default intra-op threads and once with one thread"
            } else {
                ""
            }
        ));
        out.push_str(&format!(
            "- {} rounds, each training once per column in turn; medians count. The target is checked against \
             the faster {short} configuration.\n\n",
            self.burn.len()
        ));
        let labels: Vec<String> = self.python.iter().map(|p| p.label(short)).collect();
        out.push_str("| | burn (flex)");
        for label in &labels {
            out.push_str(&format!(" | {label}"));
        }
        out.push_str(" |\n|---|---:");
        out.push_str(&"|---:".repeat(labels.len()));
        out.push_str("|\n");
        let columns: Vec<&[RunFigures]> =
            std::iter::once(self.burn.as_slice()).chain(self.python.iter().map(|p| p.runs.as_slice())).collect();
        let row = |name: &str, cell: &dyn Fn(&[RunFigures]) -> String| {
            let cells: Vec<String> = columns.iter().map(|runs| cell(runs)).collect();
            format!("| {name} | {} |\n", cells.join(" | "))
        };
        out.push_str(&row("training throughput (median)", &|runs| {
            format!("{} samples/s", thousands(median(runs.iter().map(|r| r.samples_per_second)).round() as u64))
        }));
        out.push_str(&row("throughput range over the rounds", &|runs| {
            let min = runs.iter().map(|r| r.samples_per_second).fold(f64::INFINITY, f64::min);
            let max = runs.iter().map(|r| r.samples_per_second).fold(0.0, f64::max);
            format!("{}-{}", thousands(min.round() as u64), thousands(max.round() as u64))
        }));
        out.push_str(&row("training time (median)", &|runs| {
            format!("{:.2} s", median(runs.iter().map(|r| r.seconds)))
        }));
        out.push_str(&row("test accuracy (median)", &|runs| {
            format!("{:.2}%", median(runs.iter().map(|r| r.test_accuracy)) * 100.0)
        }));
        out.push_str(&row("burn / this", &|runs| {
            times(ratio(self.burn_median(), median(runs.iter().map(|r| r.samples_per_second))))
        }));
        out.push('\n');
        let pass = self.speedup().is_some_and(|s| s >= MIN_SPEEDUP);
        let against = self.best_python().map(|p| p.label(short)).unwrap_or_default();
        out.push_str("| target | measured | result |\n|---|---|---|\n");
        out.push_str(&format!(
            "| burn training throughput >= {MIN_SPEEDUP:.1}x {short} | {} (against {against}) | {} |\n",
            self.speedup().map(|s| format!("{s:.3}x")).unwrap_or_else(|| "n/a".into()),
            if pass { "PASS" } else { "**MISS**" }
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(samples_per_second: f64) -> RunFigures {
        RunFigures { seconds: 43_140.0 / samples_per_second, samples_per_second, test_accuracy: 0.98 }
    }

    fn report(burn: [f64; 3], python: [f64; 3]) -> TrainingReport {
        TrainingReport {
            context: RunContext::example("1"),
            config: TrainingConfig::default(),
            train_samples: 1438,
            test_samples: 359,
            architecture: "64-128-10".into(),
            burn: burn.map(figures).to_vec(),
            burn_threads: 2,
            python_framework: "PyTorch 2.15.0".into(),
            python: vec![
                PythonRuns { requested_threads: 0, threads: Some(2), runs: python.map(figures).to_vec() },
                PythonRuns { requested_threads: 1, threads: Some(1), runs: python.map(|v| figures(v / 2.0)).to_vec() },
            ],
        }
    }

    #[test]
    fn medians_and_the_verdict() {
        assert_eq!(median([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0]), 2.5);
        let good = report([30_000.0, 20_000.0, 25_000.0], [20_000.0, 10_000.0, 50_000.0]);
        assert_eq!(good.speedup(), Some(1.25));
        let text = good.to_markdown();
        for expected in [
            "| | burn (flex) | PyTorch, default (2 threads) | PyTorch, 1 thread |",
            "| training throughput (median) | 25,000 samples/s | 20,000 samples/s | 10,000 samples/s |",
            "| throughput range over the rounds | 20,000-30,000 | 10,000-50,000 | 5,000-25,000 |",
            "| burn / this | 1.00x | 1.25x | 2.50x |",
            "| burn training throughput >= 1.0x PyTorch | 1.250x (against PyTorch, default (2 threads)) | PASS |",
            "MLP 64-128-10 (ReLU)",
            "**PyTorch 2.15.0**",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        let bad = report([9_000.0; 3], [10_000.0; 3]);
        let text = bad.to_markdown();
        assert!(text.contains("| burn training throughput >= 1.0x PyTorch | 0.900x (against PyTorch, default (2 threads)) | **MISS** |"), "{text}");
    }
}
