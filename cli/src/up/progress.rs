//! The pipeline's progress: each service's `status` answer (JSON, field names from the
//! pipeline contract, read leniently) turned into one row per service instance, drawn as
//! progress bars on a terminal and as plain lines (one per change) otherwise. A train replica's
//! row shows its training group (round, rank/world, step/total steps, step loss, samples/s, or
//! what it waits for), and every row its restarts; [`Console`] prints other lines without
//! tearing the bars.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::IsTerminal;
use std::rc::Rc;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use crate::up::plan::{INGEST, PREPROCESS, SERVE, TRAIN};

/// How long a live row (a training step counter, changing on every poll) waits between two of
/// its plain lines.
const LIVE_LINE_INTERVAL: Duration = Duration::from_secs(5);

/// What one row shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub position: u64,
    /// `None`: no known end (a spinner).
    pub length: Option<u64>,
    pub message: String,
    pub finished: bool,
    /// Its numbers move on every poll: as plain lines it is printed at most every few seconds
    /// (`LIVE_LINE_INTERVAL`).
    pub live: bool,
}

impl Row {
    fn text(message: impl Into<String>) -> Row {
        Row { position: 0, length: None, message: message.into(), finished: false, live: false }
    }
}

/// One instance in a [`Snapshot`].
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceStatus {
    pub name: String,
    pub app_id: &'static str,
    /// Its latest `status` answer (`None`: none yet from the pair running now).
    pub status: Option<Value>,
    /// How often its pair was restarted.
    pub restarts: u32,
    /// While its pair is down: what it waits for (shown instead of a status).
    pub down: Option<String>,
}

impl InstanceStatus {
    /// An instance of a pair that runs (or starts) and was never restarted.
    pub fn new(name: impl Into<String>, app_id: &'static str, status: Option<Value>) -> InstanceStatus {
        InstanceStatus { name: name.into(), app_id, status, restarts: 0, down: None }
    }
}

/// The latest `status` answer of every instance, in start order.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub instances: Vec<InstanceStatus>,
}

impl Snapshot {
    /// The answers of every instance of `app_id` that has one.
    fn answers(&self, app_id: &'static str) -> impl Iterator<Item = &Value> {
        self.instances.iter().filter(move |i| i.app_id == app_id && i.down.is_none()).filter_map(|i| i.status.as_ref())
    }

    fn first(&self, app_id: &'static str) -> Option<&Value> {
        self.answers(app_id).next()
    }

    /// The model serve answers with, once every serve replica that is up has it.
    pub fn serving_model(&self) -> Option<String> {
        let mut versions = self
            .instances
            .iter()
            .filter(|i| i.app_id == SERVE && i.down.is_none())
            .map(|i| i.status.as_ref().and_then(|status| text(status, "model_version")));
        let first = versions.next()??;
        versions.all(|version| version.as_deref() == Some(first.as_str())).then_some(first)
    }

    /// The test accuracy (0..1) and model version of the first train replica that is done.
    pub fn trained(&self) -> Option<(f64, String)> {
        self.answers(TRAIN)
            .find_map(|train| Some((train.get("test_accuracy")?.as_f64()?, text(train, "model_version")?)))
    }

    /// Every instance's row, in the snapshot's order.
    pub fn rows(&self) -> Vec<(String, Row)> {
        let total_batches = self.first(INGEST).and_then(|s| number(s, "total_batches"));
        // Preprocessing is over once any train replica is past gathering.
        let gathered = self.answers(TRAIN).any(|s| text(s, "phase").is_some_and(|phase| phase != "gathering"));
        self.instances
            .iter()
            .map(|instance| {
                let mut row = match (&instance.down, &instance.status) {
                    (Some(down), _) => Row::text(down.clone()),
                    (None, None) => Row::text("starting"),
                    (None, Some(status)) => match instance.app_id {
                        INGEST => ingest_row(status),
                        PREPROCESS => preprocess_row(status, total_batches, gathered),
                        TRAIN => train_row(status),
                        SERVE => serve_row(status),
                        _ => other_row(status),
                    },
                };
                if instance.restarts > 0 && instance.down.is_none() {
                    row.message.push_str(&format!(" (restarts: {})", instance.restarts));
                }
                (instance.name.clone(), row)
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
    Row { position: published, length: Some(total), message, finished: done, live: false }
}

fn preprocess_row(status: &Value, total_batches: Option<u64>, gathered: bool) -> Row {
    let Some(transformed) = number(status, "transformed_batches") else { return other_row(status) };
    let fitted = status.get("scaler_fitted").and_then(Value::as_bool).unwrap_or(false);
    let message = format!(
        "batches standardized by this replica{}",
        if fitted { ", scaler fitted on the train split" } else { "" }
    );
    Row { position: transformed, length: total_batches, message, finished: gathered, live: false }
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
                live: false,
            }
        }
        "training" if status.get("group").is_some_and(Value::is_object) => group_row(&status["group"]),
        "training" => {
            let epoch = number(status, "epoch").unwrap_or(0);
            // No loss to show before the first epoch is done.
            let loss = status.get("loss").and_then(Value::as_f64).filter(|_| epoch > 0);
            Row {
                position: epoch,
                length: number(status, "epochs"),
                message: format!("training, epochs done{}", loss.map(|l| format!(", loss {l:.4}")).unwrap_or_default()),
                finished: false,
                live: false,
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
                live: false,
            }
        }
        _ => other_row(status),
    }
}

/// A train replica in its training group: what it waits for, or the round it is in (rank of
/// world size) and the group's steps, step loss and throughput.
fn group_row(group: &Value) -> Row {
    if let Some(waiting) = text(group, "waiting") {
        return Row::text(format!("waiting for its training group: {waiting}"));
    }
    let step = number(group, "step").unwrap_or(0);
    let total = number(group, "total_steps").filter(|total| *total > 0);
    let mut message = format!(
        "training: round {}, rank {}/{}",
        number(group, "round").unwrap_or(0),
        number(group, "rank").unwrap_or(0),
        number(group, "world_size").unwrap_or(0)
    );
    // No loss before the first step, and no rate before there is one.
    if step > 0 {
        if let Some(loss) = group.get("step_loss").and_then(Value::as_f64) {
            message.push_str(&format!(", step loss {loss:.4}"));
        }
        if let Some(rate) = group.get("samples_per_second").and_then(Value::as_f64).filter(|rate| *rate > 0.0) {
            message.push_str(&format!(", {rate:.0} samples/s"));
        }
    }
    Row { position: step, length: total, message, finished: false, live: true }
}

fn serve_row(status: &Value) -> Row {
    match text(status, "model_version") {
        Some(version) => Row {
            position: 1,
            length: None,
            message: format!("serving model {}", short(&version)),
            finished: true,
            live: false,
        },
        None if status.get("model_version").is_some() => Row::text("waiting for a model"),
        None => other_row(status),
    }
}

/// Prints whole lines on stderr: above the progress bars while they are drawn (without
/// tearing them), plainly otherwise.
#[derive(Clone, Default)]
pub struct Console(Rc<RefCell<Option<MultiProgress>>>);

impl Console {
    pub fn line(&self, text: &str) {
        match self.0.borrow().as_ref() {
            Some(multi) => multi.suspend(|| eprintln!("{text}")),
            None => eprintln!("{text}"),
        }
    }
}

/// Draws rows: bars on a terminal, else a line whenever a row's text changes (a live row's at
/// most every few seconds).
pub struct ProgressView {
    bars: Option<(MultiProgress, HashMap<String, ProgressBar>)>,
    /// Per row: the last line printed, when, and whether it was live.
    printed: HashMap<String, (String, Instant, bool)>,
    console: Console,
}

impl ProgressView {
    /// Bars when stderr is a terminal.
    pub fn new() -> ProgressView {
        let bars = std::io::stderr()
            .is_terminal()
            .then(|| (MultiProgress::with_draw_target(ProgressDrawTarget::stderr()), HashMap::new()));
        let console = Console(Rc::new(RefCell::new(bars.as_ref().map(|(multi, _)| multi.clone()))));
        ProgressView { bars, printed: HashMap::new(), console }
    }

    /// Where other lines go while this view draws.
    pub fn console(&self) -> Console {
        self.console.clone()
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
                    if plain_line_due(self.printed.get(name), &line, row.live, Instant::now()) {
                        eprintln!("  {line}");
                        self.printed.insert(name.clone(), (line, Instant::now(), row.live));
                    }
                }
            }
        }
    }

    /// Leaves the bars on screen as they are and stops redrawing them; the console prints
    /// plain lines from now on.
    pub fn finish(&mut self) {
        if let Some((_, bars)) = &self.bars {
            for bar in bars.values() {
                if !bar.is_finished() {
                    bar.abandon();
                }
            }
        }
        self.console.0.borrow_mut().take();
    }
}

/// Whether a row's plain `line` is printed, after `previous` (the last line printed for it,
/// when, and whether it was live): when it changed, except that a live row waits
/// [`LIVE_LINE_INTERVAL`] after a live line of its own (its first live line, after a line of
/// another kind, prints at once).
fn plain_line_due(previous: Option<&(String, Instant, bool)>, line: &str, live: bool, now: Instant) -> bool {
    match previous {
        None => true,
        Some((printed, at, was_live)) => {
            printed != line && !(live && *was_live && now.duration_since(*at) < LIVE_LINE_INTERVAL)
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
            instances: vec![
                InstanceStatus::new("ingest", INGEST, Some(ingest)),
                InstanceStatus::new("preprocess-1", PREPROCESS, Some(pre[0].clone())),
                InstanceStatus::new("preprocess-2", PREPROCESS, Some(pre[1].clone())),
                InstanceStatus::new("train", TRAIN, Some(train)),
                InstanceStatus::new("serve", SERVE, Some(serve)),
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
        // With a second serve replica, serving means every replica that is up has the model.
        let mut two = s.clone();
        two.instances.push(InstanceStatus::new("serve-2", SERVE, None));
        assert_eq!(two.serving_model(), None, "serve-2 has not answered yet");
        two.instances.last_mut().unwrap().status = Some(json!({"model_version":"m1","requests":0}));
        assert_eq!(two.serving_model().as_deref(), Some("m1"));
        two.instances.last_mut().unwrap().down = Some("down: restarting".into());
        assert_eq!(two.serving_model().as_deref(), Some("m1"), "a replica that is down does not hold it back");
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
        let serve = ServeStatus { model_version: None, requests: 0, samples: 0, batches: 0, shed: 0, queued: 0 };
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
            instances: vec![
                InstanceStatus::new("train", TRAIN, Some(json!({"hello":"world"}))),
                InstanceStatus::new("serve", SERVE, None),
            ],
        };
        let rows = s.rows();
        assert!(rows[0].1.message.contains("hello"), "{:?}", rows[0]);
        assert_eq!(rows[1].1.message, "starting");
    }

    /// A train replica's row shows its group, from train's own status type.
    #[test]
    fn a_train_replica_shows_its_group_or_what_it_waits_for() {
        use tandem_pipeline::messages::{GroupMemberInfo, GroupProgress, TrainPhase, TrainStatus};
        let group = GroupProgress {
            group: "train/d1".into(),
            waiting: None,
            round: 2,
            rank: 1,
            world_size: 2,
            members: vec![
                GroupMemberInfo { rank: 0, member_id: "a".into() },
                GroupMemberInfo { rank: 1, member_id: "b".into() },
            ],
            step: 120,
            total_steps: 450,
            step_loss: 0.125,
            samples_per_second: 812.4,
            rounds: 2,
            parameters_hash: "ab12".into(),
            ..GroupProgress::default()
        };
        let mut train = TrainStatus {
            phase: TrainPhase::Training,
            dataset_version: Some("d1".into()),
            batches_received: 29,
            batches_expected: Some(29),
            epoch: 1,
            epochs: 5,
            loss: 0.5,
            test_accuracy: None,
            model_version: None,
            group: Some(group.clone()),
        };
        let row = |train: &TrainStatus| train_row(&serde_json::to_value(train).unwrap());
        let training = row(&train);
        assert_eq!((training.position, training.length), (120, Some(450)), "{training:?}");
        for part in ["round 2", "rank 1/2", "step loss 0.1250", "812 samples/s"] {
            assert!(training.message.contains(part), "{part:?} in {training:?}");
        }
        assert!(training.live && !training.finished);

        train.group = Some(GroupProgress { waiting: Some("1 of 2 replicas wait for a round".into()), ..group.clone() });
        let waiting = row(&train);
        assert_eq!(waiting.message, "waiting for its training group: 1 of 2 replicas wait for a round");
        assert_eq!(waiting.length, None, "a spinner while waiting");

        train.group = Some(GroupProgress { step: 0, ..group.clone() });
        let first = row(&train);
        assert!(!first.message.contains("loss") && !first.message.contains("samples/s"), "{first:?}");
        train.group = Some(GroupProgress { step: 1, samples_per_second: 0.0, ..group });
        let no_rate_yet = row(&train);
        assert!(no_rate_yet.message.ends_with("step loss 0.1250"), "{no_rate_yet:?}");
    }

    #[test]
    fn live_rows_print_a_plain_line_at_most_every_few_seconds() {
        let t0 = Instant::now();
        let waiting = ("train-1: waiting".to_string(), t0, false);
        assert!(plain_line_due(None, "x", true, t0));
        assert!(!plain_line_due(Some(&waiting), "train-1: waiting", false, t0), "unchanged");
        assert!(plain_line_due(Some(&waiting), "train-1: training [1/9]", true, t0), "the first live line at once");
        let training = ("train-1: training [1/9]".to_string(), t0, true);
        let soon = t0 + Duration::from_secs(1);
        assert!(!plain_line_due(Some(&training), "train-1: training [2/9]", true, soon));
        assert!(plain_line_due(Some(&training), "train-1: trained", false, soon), "leaving the live state at once");
        assert!(plain_line_due(Some(&training), "train-1: training [7/9]", true, t0 + LIVE_LINE_INTERVAL));
    }

    #[test]
    fn restarts_and_down_pairs_show_in_the_rows() {
        let training = json!({"phase":"training","epoch":0,"epochs":5,"loss":0.0,
            "group":{"group":"g","round":3,"rank":0,"world_size":1,"members":[],"step":10,"total_steps":90,
                     "step_loss":0.5,"samples_per_second":100.0,"rounds":2,"parameters_hash":""}});
        let ready = json!({"phase":"ready","epochs":5,"test_accuracy":0.98,"model_version":"v2"});
        let s = Snapshot {
            instances: vec![
                InstanceStatus { restarts: 1, ..InstanceStatus::new("train-1", TRAIN, Some(training)) },
                InstanceStatus {
                    restarts: 2,
                    down: Some("down; restart 2 of 5 in 3s".into()),
                    ..InstanceStatus::new("train-2", TRAIN, Some(ready))
                },
                InstanceStatus::new("serve", SERVE, Some(json!({"model_version":"v2"}))),
            ],
        };
        let rows: HashMap<String, Row> = s.rows().into_iter().collect();
        assert!(rows["train-1"].message.ends_with("(restarts: 1)"), "{:?}", rows["train-1"]);
        assert_eq!(rows["train-2"].message, "down; restart 2 of 5 in 3s");
        assert_eq!(s.trained(), None, "a down replica's last answer does not count");
        assert_eq!(s.serving_model().as_deref(), Some("v2"));
    }

    #[test]
    fn any_train_replica_that_is_done_gives_the_accuracy() {
        let s = Snapshot {
            instances: vec![
                InstanceStatus::new("train-1", TRAIN, Some(json!({"phase":"training"}))),
                InstanceStatus::new("train-2", TRAIN, None),
                InstanceStatus::new(
                    "train-3",
                    TRAIN,
                    Some(json!({"phase":"ready","test_accuracy":0.9,"model_version":"v1"})),
                ),
            ],
        };
        assert_eq!(s.trained(), Some((0.9, "v1".to_string())));
    }
}
