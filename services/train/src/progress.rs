//! What a train replica tells about its training: the status board behind `status`, the
//! group's throughput, and the optional step log (one JSON line per step, for comparing
//! replicas and runs).

use std::collections::VecDeque;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use tandem_pipeline::messages::{GroupMemberInfo, GroupProgress, TrainPhase, TrainStatus};
use tandem_sdk::Round;

/// The replica's [`TrainStatus`], updated as training goes.
pub struct Board {
    status: Mutex<TrainStatus>,
    /// When recent steps ended, how many samples each trained on (the group's throughput) and
    /// where its time went.
    recent: Mutex<VecDeque<(Instant, usize, StepTimes)>>,
}

/// Where one step's time went, as this replica saw it.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepTimes {
    pub compute: Duration,
    pub all_reduce: Duration,
    pub apply: Duration,
}

/// Steps the throughput is measured over.
const THROUGHPUT_WINDOW: usize = 20;

impl Board {
    pub fn new(epochs: u32) -> Board {
        let status = TrainStatus {
            phase: TrainPhase::Gathering,
            dataset_version: None,
            batches_received: 0,
            batches_expected: None,
            epoch: 0,
            epochs,
            loss: 0.0,
            test_accuracy: None,
            model_version: None,
            group: None,
        };
        Board { status: Mutex::new(status), recent: Mutex::new(VecDeque::new()) }
    }

    pub fn get(&self) -> TrainStatus {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn update(&self, change: impl FnOnce(&mut TrainStatus)) {
        change(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn update_group(&self, change: impl FnOnce(&mut GroupProgress)) {
        self.update(|status| change(status.group.get_or_insert_with(GroupProgress::default)));
    }

    /// Training of a run starts: this replica is about to join `group`.
    pub fn joining(&self, group: &str, total_steps: u64, parameters_hash: String) {
        self.recent.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.update(|status| {
            status.phase = TrainPhase::Training;
            status.epoch = 0;
            status.group = Some(GroupProgress {
                group: group.to_string(),
                waiting: Some("joining the group".into()),
                total_steps,
                parameters_hash,
                ..GroupProgress::default()
            });
        });
    }

    pub fn waiting(&self, reason: &str) {
        self.update_group(|group| group.waiting = Some(reason.to_string()));
    }

    pub fn entered(&self, round: &Round) {
        self.recent.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.update_group(|group| {
            group.waiting = None;
            group.round = round.round;
            group.rank = round.rank;
            group.world_size = round.world_size;
            group.members = round
                .members
                .iter()
                .map(|member| GroupMemberInfo { rank: member.rank, member_id: member.member_id.clone() })
                .collect();
            group.rounds += 1;
        });
    }

    /// A step ended: `steps` completed in all, the global batch of `samples` had mean loss
    /// `loss`; the parameters hash when it was computed for this step.
    pub fn step_done(&self, steps: u64, samples: usize, loss: f32, times: StepTimes, parameters_hash: Option<String>) {
        let (samples_per_second, mean) = {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            recent.push_back((Instant::now(), samples, times));
            if recent.len() > THROUGHPUT_WINDOW + 1 {
                recent.pop_front();
            }
            let rate = match (recent.front(), recent.back()) {
                (Some(first), Some(last)) if recent.len() > 1 => {
                    let trained: usize = recent.iter().skip(1).map(|(_, samples, _)| samples).sum();
                    let seconds = (last.0 - first.0).as_secs_f64();
                    if seconds > 0.0 { trained as f64 / seconds } else { 0.0 }
                }
                _ => 0.0,
            };
            let count = recent.len() as f64;
            let mean = |part: fn(&StepTimes) -> Duration| {
                recent.iter().map(|(_, _, times)| part(times).as_secs_f64()).sum::<f64>() * 1e3 / count
            };
            (rate, [mean(|t| t.compute), mean(|t| t.all_reduce), mean(|t| t.apply)])
        };
        self.update_group(|group| {
            group.step = steps;
            group.step_loss = loss;
            group.samples_per_second = samples_per_second;
            [group.compute_ms, group.all_reduce_ms, group.apply_ms] = mean;
            if let Some(hash) = parameters_hash {
                group.parameters_hash = hash;
            }
        });
    }

    pub fn epoch_done(&self, epoch: u32, loss: f32) {
        self.update(|status| {
            status.epoch = epoch;
            status.loss = loss;
        });
    }
}

/// One line of the step log.
#[derive(Debug, Serialize)]
struct StepLine<'a> {
    /// Steps completed (1 after the first).
    step: u64,
    round: u64,
    rank: u32,
    world_size: u32,
    loss: f32,
    parameters_hash: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<&'a [f32]>,
}

/// `--step-log`: a JSON line per step, with the parameters themselves for the first
/// `--step-log-parameters` steps.
pub struct StepLog {
    file: Mutex<std::io::BufWriter<std::fs::File>>,
    parameters_for: u64,
}

impl StepLog {
    pub fn create(path: &Path, parameters_for: u64) -> std::io::Result<StepLog> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(StepLog { file: Mutex::new(std::io::BufWriter::new(file)), parameters_for })
    }

    pub fn record(&self, step: u64, round: &Round, loss: f32, parameters_hash: &str, parameters: &[f32]) {
        let line = StepLine {
            step,
            round: round.round,
            rank: round.rank,
            world_size: round.world_size,
            loss,
            parameters_hash,
            parameters: (step <= self.parameters_for).then_some(parameters),
        };
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let written = serde_json::to_writer(&mut *file, &line)
            .map_err(std::io::Error::other)
            .and_then(|()| file.write_all(b"\n"))
            .and_then(|()| file.flush());
        if let Err(error) = written {
            tracing::warn!(%error, "could not write the step log");
        }
    }
}
