//! The pipeline's progress: each service's `status` answer (JSON, field names from the
//! pipeline contract, read leniently) turned into one row per service instance, drawn as
//! progress bars on a terminal and as plain lines (one per change) otherwise.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use crate::up::plan::{INGEST, PREPROCESS, SERVE, TRAIN};

/// What one row shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub position: u64,
    /// `None`: no known end (a spinner).
    pub length: Option<u64>,
    pub message: String,
    pub finished: bool,
}

impl Row {
    fn text(message: impl Into<String>) -> Row {
        Row { position: 0, length: None, message: message.into(), finished: false }
    }
}

/// The latest `status` answer of every instance (`None`: no answer yet).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Instance name -> (app-id, answer).
    pub statuses: Vec<(String, &'static str, Option<Value>)>,
}

impl Snapshot {
    fn first(&self, app_id: &str) -> Option<&Value> {
        self.statuses.iter().find(|(_, app, _)| *app == app_id).and_then(|(_, _, status)| status.as_ref())
    }

    /// The model serve answers with, once it has one.
    pub fn serving_model(&self) -> Option<String> {
        text(self.first(SERVE)?, "model_version")
    }

    /// train's test accuracy (0..1) and model version, once training is done.
    pub fn trained(&self) -> Option<(f64, String)> {
        let train = self.first(TRAIN)?;
        Some((train.get("test_accuracy")?.as_f64()?, text(train, "model_version")?))
    }

    /// Every instance's row, in the snapshot's order.
    pub fn rows(&self) -> Vec<(String, Row)> {
        let total_batches = self.first(INGEST).and_then(|s| number(s, "total_batches"));
        let train_phase = self.first(TRAIN).and_then(|s| text(s, "phase"));
        let gathered = train_phase.as_deref().is_some_and(|phase| phase != "gathering");
        self.statuses
            .iter()
            .map(|(name, app_id, status)| {
                let row = match status {
                    None => Row::text("starting"),
                    Some(status) => match *app_id {
                        INGEST => ingest_row(status),
                        PREPROCESS => preprocess_row(status, total_batches, gathered),
                        TRAIN => train_row(status),
                        SERVE => serve_row(status),
                        _ => other_row(status),
                    },
                };
                (name.clone(), row)
            })
            .collect()
    }
}

fn text(status: &Value, field: &str) -> Option<String> {
    status.get(field)?.as_str().map(str::to_string)
}

fn number(status: &Value, field: &str) -> Option<u64> {
    status.get(field)?.as_u64()
}

/// The first characters of a version hash.
fn short(version: &str) -> &str {
    &version[..version.len().min(12)]
}

fn other_row(status: &Value) -> Row {
    let mut compact = status.to_string();
    if compact.len() > 60 {
        compact.truncate(57);
        compact.push_str("...");
    }
    Row::text(format!("running, status {compact}"))
}

fn ingest_row(status: &Value) -> Row {
    let (Some(published), Some(total)) = (number(status, "published_batches"), number(status, "total_batches")) else {
        return other_row(status);
    };
    let version = text(status, "dataset_version").map(|v| format!(" of dataset {}", short(&v))).unwrap_or_default();
    let done = text(status, "phase").as_deref() == Some("done");
    let message = if done { format!("published all batches{version}") } else { format!("publishing batches{version}") };
    Row { position: published, length: Some(total), message, finished: done }
}

fn preprocess_row(status: &Value, total_batches: Option<u64>, gathered: bool) -> Row {
    let Some(transformed) = number(status, "transformed_batches") else { return other_row(status) };
    let fitted = status.get("scaler_fitted").and_then(Value::as_bool).unwrap_or(false);
    let message = format!(
        "batches standardized by this replica{}",
        if fitted { ", scaler fitted on the train split" } else { "" }
    );
    Row { position: transformed, length: total_batches, message, finished: gathered }
}

fn train_row(status: &Value) -> Row {
    let phase = text(status, "phase").unwrap_or_default();
    match phase.as_str() {
        "gathering" => {
            let received = number(status, "batches_received").unwrap_or(0);
            let expected = number(status, "batches_expected");
            Row {
                position: received,
                length: expected,
                // Until the end marker says how many there are, the count is all there is.
                message: match expected {
                    Some(_) => "gathering feature batches".into(),
                    None => format!("gathering feature batches: {received} so far"),
                },
                finished: false,
            }
        }
        "training" => {
            let epoch = number(status, "epoch").unwrap_or(0);
            // No loss to show before the first epoch is done.
            let loss = status.get("loss").and_then(Value::as_f64).filter(|_| epoch > 0);
            Row {
                position: epoch,
                length: number(status, "epochs"),
                message: format!("training, epochs done{}", loss.map(|l| format!(", loss {l:.4}")).unwrap_or_default()),
                finished: false,
            }
        }
        "ready" => {
            let epochs = number(status, "epochs").unwrap_or(0);
            let accuracy = status.get("test_accuracy").and_then(Value::as_f64);
            let model = text(status, "model_version").map(|v| format!(", model {}", short(&v))).unwrap_or_default();
            Row {
                position: epochs,
                length: Some(epochs),
                message: match accuracy {
                    Some(accuracy) => format!("trained: test accuracy {:.2}%{model}", accuracy * 100.0),
                    None => format!("trained{model}"),
                },
                finished: true,
            }
        }
        _ => other_row(status),
    }
}

fn serve_row(status: &Value) -> Row {
    match text(status, "model_version") {
        Some(version) => {
            Row { position: 1, length: None, message: format!("serving model {}", short(&version)), finished: true }
        }
        None if status.get("model_version").is_some() => Row::text("waiting for a model"),
        None => other_row(status),
    }
}

/// Draws rows: bars on a terminal, else a line whenever a row's text changes.
pub struct ProgressView {
    bars: Option<(MultiProgress, HashMap<String, ProgressBar>)>,
    printed: HashMap<String, String>,
}

impl ProgressView {
    /// Bars when stderr is a terminal.
    pub fn new() -> ProgressView {
        let bars = std::io::stderr()
            .is_terminal()
            .then(|| (MultiProgress::with_draw_target(ProgressDrawTarget::stderr()), HashMap::new()));
        ProgressView { bars, printed: HashMap::new() }
    }

    pub fn update(&mut self, rows: &[(String, Row)]) {
        match &mut self.bars {
            Some((multi, bars)) => {
                for (name, row) in rows {
                    let bar = bars.entry(name.clone()).or_insert_with(|| {
                        let bar = multi.add(ProgressBar::new_spinner().with_prefix(name.clone()));
                        bar.enable_steady_tick(Duration::from_millis(120));
                        bar
                    });
                    draw(bar, row);
                }
            }
            None => {
                for (name, row) in rows {
                    let line = match row.length {
                        Some(length) => format!("{name}: {} [{}/{length}]", row.message, row.position),
                        None => format!("{name}: {}", row.message),
                    };
                    if self.printed.get(name) != Some(&line) {
                        eprintln!("  {line}");
                        self.printed.insert(name.clone(), line);
                    }
                }
            }
        }
    }

    /// Leaves the bars on screen as they are and stops redrawing them.
    pub fn finish(&mut self) {
        if let Some((_, bars)) = &self.bars {
            for bar in bars.values() {
                if !bar.is_finished() {
                    bar.abandon();
                }
            }
        }
    }
}

impl Default for ProgressView {
    fn default() -> Self {
        Self::new()
    }
}

fn draw(bar: &ProgressBar, row: &Row) {
    let style = match (row.length, row.finished) {
        (Some(_), _) => "{prefix:>14.bold} [{bar:30.cyan/blue}] {pos:>4}/{len:<4} {msg}",
        (None, true) => "{prefix:>14.bold} ✔ {msg}",
        (None, false) => "{prefix:>14.bold} {spinner} {msg}",
    };
    bar.set_style(
        ProgressStyle::with_template(style).expect("a valid template").progress_chars("=> ").tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏ "),
    );
    if let Some(length) = row.length {
        bar.set_length(length.max(row.position));
    }
    bar.set_position(row.position);
    bar.set_message(row.message.clone());
    if row.finished && !bar.is_finished() {
        bar.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn snapshot(ingest: Value, pre: [Value; 2], train: Value, serve: Value) -> Snapshot {
        Snapshot {
            statuses: vec![
                ("ingest".into(), INGEST, Some(ingest)),
                ("preprocess-1".into(), PREPROCESS, Some(pre[0].clone())),
                ("preprocess-2".into(), PREPROCESS, Some(pre[1].clone())),
                ("train".into(), TRAIN, Some(train)),
                ("serve".into(), SERVE, Some(serve)),
            ],
        }
    }

    #[test]
    fn rows_follow_the_contracts_status_fields() {
        let s = snapshot(
            json!({"phase":"publishing","dataset_version":"abcdef0123456789","published_batches":3,"total_batches":30}),
            [
                json!({"scaler_fitted":true,"transformed_batches":5,"dataset_version":null}),
                json!({"scaler_fitted":false,"transformed_batches":4,"dataset_version":null}),
            ],
            json!({"phase":"training","dataset_version":"v","batches_received":30,"batches_expected":30,"epoch":2,
                   "epochs":20,"loss":0.25,"test_accuracy":null,"model_version":null}),
            json!({"model_version":null,"requests":0,"samples":0,"batches":0}),
        );
        let rows: HashMap<String, Row> = s.rows().into_iter().collect();
        assert_eq!(rows["ingest"].position, 3);
        assert_eq!(rows["ingest"].length, Some(30));
        assert!(rows["ingest"].message.contains("abcdef012345"), "{:?}", rows["ingest"]);
        assert!(!rows["ingest"].finished);
        assert_eq!((rows["preprocess-1"].position, rows["preprocess-1"].length), (5, Some(30)));
        assert!(rows["preprocess-1"].finished, "train is past gathering, so preprocessing is done");
        assert_eq!((rows["train"].position, rows["train"].length), (2, Some(20)));
        assert!(rows["train"].message.contains("loss 0.2500"), "{:?}", rows["train"]);
        assert_eq!(rows["serve"].message, "waiting for a model");
        assert_eq!(s.serving_model(), None);
        assert_eq!(s.trained(), None);
    }

    #[test]
    fn a_served_model_and_its_accuracy_are_found() {
        let s = snapshot(
            json!({"phase":"done","dataset_version":"v","published_batches":30,"total_batches":30}),
            [
                json!({"scaler_fitted":true,"transformed_batches":15}),
                json!({"scaler_fitted":true,"transformed_batches":15}),
            ],
            json!({"phase":"ready","batches_received":30,"batches_expected":30,"epoch":20,"epochs":20,"loss":0.01,
                   "test_accuracy":0.975,"model_version":"m1"}),
            json!({"model_version":"m1","requests":0}),
        );
        assert_eq!(s.serving_model().as_deref(), Some("m1"));
        assert_eq!(s.trained(), Some((0.975, "m1".to_string())));
        let rows: HashMap<String, Row> = s.rows().into_iter().collect();
        assert!(rows.values().all(|row| row.finished), "{rows:?}");
        assert!(rows["train"].message.contains("97.50%"), "{:?}", rows["train"]);
    }

    /// The rows read what the services really send: tandem-pipeline's status types.
    #[test]
    fn the_pipelines_own_status_types_are_understood() {
        use tandem_pipeline::messages::{
            IngestPhase, IngestStatus, PreprocessStatus, ServeStatus, TrainPhase, TrainStatus,
        };
        fn value<T: serde::Serialize>(status: &T) -> Value {
            serde_json::to_value(status).expect("status types serialize")
        }
        let ingest = IngestStatus {
            phase: IngestPhase::Done,
            dataset_version: "d1".into(),
            published_batches: 29,
            total_batches: 29,
        };
        let pre = PreprocessStatus { scaler_fitted: true, transformed_batches: 14, dataset_version: Some("d1".into()) };
        let mut train = TrainStatus {
            phase: TrainPhase::Training,
            dataset_version: Some("d1".into()),
            batches_received: 29,
            batches_expected: Some(29),
            epoch: 3,
            epochs: 30,
            loss: 0.5,
            test_accuracy: None,
            model_version: None,
            group: None,
        };
        let serve = ServeStatus { model_version: None, requests: 0, samples: 0, batches: 0 };
        let snapshot = |train: &TrainStatus, serve: &ServeStatus| {
            snapshot(value(&ingest), [value(&pre), value(&pre)], value(train), value(serve))
        };
        let rows: HashMap<String, Row> = snapshot(&train, &serve).rows().into_iter().collect();
        assert!(rows["ingest"].finished && rows["ingest"].position == 29, "{:?}", rows["ingest"]);
        assert_eq!(rows["preprocess-2"].position, 14);
        assert_eq!((rows["train"].position, rows["train"].length), (3, Some(30)));
        assert_eq!(rows["serve"].message, "waiting for a model");

        train.phase = TrainPhase::Ready;
        train.test_accuracy = Some(0.975);
        train.model_version = Some("v1".into());
        let serve = ServeStatus { model_version: Some("v1".into()), ..serve };
        let done = snapshot(&train, &serve);
        assert_eq!(done.serving_model().as_deref(), Some("v1"));
        let (accuracy, model) = done.trained().unwrap();
        assert!((accuracy - 0.975).abs() < 1e-6 && model == "v1", "{accuracy} {model}");
    }

    #[test]
    fn unknown_answers_are_shown_not_misread() {
        let s = Snapshot {
            statuses: vec![("train".into(), TRAIN, Some(json!({"hello":"world"}))), ("serve".into(), SERVE, None)],
        };
        let rows = s.rows();
        assert!(rows[0].1.message.contains("hello"), "{:?}", rows[0]);
        assert_eq!(rows[1].1.message, "starting");
    }
}
