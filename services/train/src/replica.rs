//! One replica's part in data-parallel training: join the run's training group through the
//! sidecar, take the group's state when the round says so, then step: gradients of this rank's
//! shard, the sum over the group (the sidecars' all-reduce), the same Adam update as every
//! other replica. When a round ends (a replica died, or one waits to join at this step
//! boundary) the replica asks for the next round with the state it holds and carries on from
//! its step: nothing restarts, nothing is reloaded.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_model::data_parallel::STATISTICS;
use tandem_model::{
    Dataset, Device, GlobalBatches, MlpConfig, ModelError, Shard, StepGradients, Trainer, TrainerState, TrainingConfig,
};
use tandem_sdk::{Code, GroupMember, GroupOptions, Round, SidecarClient, Status};

use crate::progress::{Board, StepLog, StepTimes};

/// How often `status` gets the parameters hash when no step log asks for it every step.
const HASH_EVERY: Duration = Duration::from_secs(1);

/// How replicas form a group.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupSettings {
    /// The group's name (one per app: a run's fingerprint says what it trains).
    pub group: String,
    pub min_replicas: u32,
    /// 0: no limit.
    pub max_replicas: u32,
    /// `None`: the sidecar's default.
    pub last_call: Option<Duration>,
}

/// What one run trains: the data and everything the replicas must agree on.
pub struct Run {
    /// Names the run in the registry (a hash of the fingerprint).
    pub id: String,
    pub dataset_version: String,
    pub train_set: Arc<Dataset>,
    pub config: TrainingConfig,
    pub model: MlpConfig,
}

impl Run {
    pub fn new(dataset_version: &str, train_set: Arc<Dataset>, config: &TrainingConfig) -> Run {
        let model = MlpConfig {
            num_features: train_set.num_features(),
            hidden: config.hidden.clone(),
            num_classes: train_set.num_classes(),
        };
        let mut run = Run {
            id: String::new(),
            dataset_version: dataset_version.to_string(),
            train_set,
            config: config.clone(),
            model,
        };
        run.id = run_id(&run.fingerprint());
        run
    }

    /// What every replica of the run must have alike; a replica that differs is refused.
    pub fn fingerprint(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("dataset_version".to_string(), self.dataset_version.clone()),
            ("train_samples".to_string(), self.train_set.len().to_string()),
            ("architecture".to_string(), self.model.architecture()),
            ("epochs".to_string(), self.config.epochs.to_string()),
            ("batch_size".to_string(), self.config.batch_size.to_string()),
            ("learning_rate".to_string(), self.config.learning_rate.to_string()),
            ("seed".to_string(), self.config.seed.to_string()),
        ])
    }
}

/// The first 16 hex digits of the SHA-256 of `fingerprint`'s `key=value` lines.
fn run_id(fingerprint: &BTreeMap<String, String>) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for (key, value) in fingerprint {
        hasher.update(format!("{key}={value}\n"));
    }
    hasher.finalize().iter().take(8).map(|byte| format!("{byte:02x}")).collect()
}

/// Why a replica stopped training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Model(#[from] ModelError),
    #[error("the training group refused this replica: {0}")]
    Refused(String),
    #[error("the training group ({0}): {1}")]
    Group(&'static str, String),
    #[error("a training task failed: {0}")]
    Task(String),
}

impl TrainError {
    fn group(what: &'static str, status: Status) -> TrainError {
        if status.code() == Code::FailedPrecondition && status.message().starts_with("refused") {
            TrainError::Refused(status.message().to_string())
        } else {
            TrainError::Group(what, status.message().to_string())
        }
    }
}

/// A trained state and the trainer that applies it.
pub struct Trained {
    pub trainer: Arc<Trainer>,
    pub state: TrainerState,
}

/// True for the answers that mean "this round is over, ask for the next one".
fn round_over(status: &Status) -> bool {
    matches!(status.code(), Code::Aborted | Code::DeadlineExceeded)
}

/// Trains `run` as a replica of the group in `settings`. Returns `None` when `done_elsewhere`
/// says that other replicas finished the run (checked at each round and epoch).
pub async fn train<F: Future<Output = bool>>(
    sidecar: &SidecarClient,
    run: &Run,
    device: &Device,
    settings: &GroupSettings,
    board: &Board,
    step_log: Option<&StepLog>,
    done_elsewhere: impl Fn() -> F,
) -> Result<Option<Trained>, TrainError> {
    let trainer = Arc::new(Trainer::new(run.model.clone(), run.config.learning_rate, device)?);
    let mut state = trainer.init(run.config.seed);
    let mut batches = GlobalBatches::new(run.train_set.len(), run.config.batch_size, run.config.seed);
    let steps_per_epoch = batches.steps_per_epoch();
    let total_steps = steps_per_epoch * run.config.epochs as u64;
    let options = GroupOptions {
        group: settings.group.clone(),
        min_members: settings.min_replicas,
        max_members: settings.max_replicas,
        fingerprint: run.fingerprint(),
        last_call: settings.last_call,
    };
    board.joining(&settings.group, total_steps, state.parameters_hash());
    tracing::info!(group = %settings.group, run = %run.id, total_steps, "joining the training group");
    let mut member = join(sidecar, &options, &state).await?;
    let mut round = first_round(&mut member, board).await?;
    let mut epoch_loss = (0.0f64, 0usize);
    let mut hashed = Instant::now();
    loop {
        if done_elsewhere().await {
            tracing::info!(run = %run.id, "other replicas finished this run; leaving the group");
            return Ok(None);
        }
        board.entered(&round);
        tracing::info!(
            round = round.round,
            rank = round.rank,
            world = round.world_size,
            step = state.step,
            sync = round.sync_state,
            "in a round"
        );
        if round.sync_state {
            let mine = if round.rank == round.source_rank { state.to_bytes() } else { Vec::new() };
            match member.broadcast_from_source(&round, mine).await {
                Ok(bytes) if round.rank != round.source_rank => {
                    let received = TrainerState::from_bytes(&bytes, run.model.parameter_count())?;
                    trainer.check(&received)?;
                    tracing::info!(from = round.source_rank, step = received.step, "took the group's state");
                    if received.step / steps_per_epoch != state.step / steps_per_epoch {
                        epoch_loss = (0.0, 0);
                    }
                    state = received;
                }
                Ok(_) => {}
                Err(status) if round_over(&status) => {
                    round = next_round(sidecar, &options, &mut member, &state, board, status.message()).await?;
                    continue;
                }
                Err(status) => return Err(TrainError::group("taking the group's state", status)),
            }
        }
        let (rank, world) = (round.rank as usize, round.world_size as usize);
        let ended = loop {
            if state.step >= total_steps {
                break None;
            }
            let shard = batches.shard(state.step, rank, world);
            let started = Instant::now();
            let (computed, gradients) = compute(&trainer, state, &run.train_set, &shard).await?;
            state = computed;
            let computed_at = Instant::now();
            let summed = match member.all_reduce(&round, state.step, gradients.buffer()).await {
                Ok(summed) => summed,
                Err(status) if round_over(&status) => break Some(status.message().to_string()),
                Err(status) => return Err(TrainError::group("the all-reduce", status)),
            };
            let reduced_at = Instant::now();
            let (applied, outcome) = apply(&trainer, state, summed.values, shard.batch_len).await?;
            state = applied;
            let times = StepTimes {
                compute: computed_at - started,
                all_reduce: reduced_at - computed_at,
                apply: reduced_at.elapsed(),
            };
            // Hashing megabytes of parameters costs a few ms: every step only for the step log,
            // else for the status about once a second and at the end.
            let hash = (step_log.is_some() || state.step == total_steps || hashed.elapsed() >= HASH_EVERY)
                .then(|| state.parameters_hash());
            if let Some(hash) = &hash {
                hashed = Instant::now();
                if let Some(log) = step_log {
                    log.record(state.step, &round, outcome.loss, hash, state.parameters());
                }
            }
            board.step_done(state.step, outcome.samples, outcome.loss, times, hash);
            epoch_loss.0 += f64::from(outcome.loss) * outcome.samples as f64;
            epoch_loss.1 += outcome.samples;
            if state.step % steps_per_epoch == 0 {
                let (epoch, loss) = (state.step / steps_per_epoch, (epoch_loss.0 / epoch_loss.1.max(1) as f64) as f32);
                tracing::info!(epoch, epochs = run.config.epochs, loss, world, "epoch done");
                board.epoch_done(epoch as u32, loss);
                epoch_loss = (0.0, 0);
                if done_elsewhere().await {
                    return Ok(None);
                }
            }
            if summed.round_ends {
                break Some("a replica waits to join the group".to_string());
            }
        };
        match ended {
            None => break,
            Some(reason) => round = next_round(sidecar, &options, &mut member, &state, board, &reason).await?,
        }
    }
    drop(member);
    tracing::info!(run = %run.id, steps = state.step, hash = %state.parameters_hash(), "training done; left the group");
    Ok(Some(Trained { trainer, state }))
}

async fn join(
    sidecar: &SidecarClient,
    options: &GroupOptions,
    state: &TrainerState,
) -> Result<GroupMember, TrainError> {
    sidecar.join_group(options, state.step, &state.parameters_hash()).await.map_err(|s| TrainError::group("joining", s))
}

async fn first_round(member: &mut GroupMember, board: &Board) -> Result<Round, TrainError> {
    member
        .round(|waiting| waiting_for(board, &waiting.reason))
        .await
        .map_err(|s| TrainError::group("the first round", s))
}

fn waiting_for(board: &Board, reason: &str) {
    tracing::info!(reason, "waiting for a round of the training group");
    board.waiting(reason);
}

/// Asks for the next round from `state`. When the sidecar closed the membership meanwhile
/// (its lease lapsed while etcd was away), joins again as a new member.
async fn next_round(
    sidecar: &SidecarClient,
    options: &GroupOptions,
    member: &mut GroupMember,
    state: &TrainerState,
    board: &Board,
    reason: &str,
) -> Result<Round, TrainError> {
    tracing::info!(reason, step = state.step, "the round ended; asking for the next one");
    board.waiting(&format!("the round ended ({reason}); asking for the next one"));
    let hash = state.parameters_hash();
    match member.next_round(state.step, &hash, |waiting| waiting_for(board, &waiting.reason)).await {
        Ok(round) => Ok(round),
        Err(status) if status.code() == Code::Unavailable && sidecar.metadata().await.is_ok() => {
            tracing::warn!(error = %status.message(), "the sidecar ended this membership; joining again");
            *member = join(sidecar, options, state).await?;
            first_round(member, board).await
        }
        Err(status) => Err(TrainError::group("the next round", status)),
    }
}

/// This rank's gradients, computed off the async threads; the state goes there and back.
async fn compute(
    trainer: &Arc<Trainer>,
    state: TrainerState,
    data: &Arc<Dataset>,
    shard: &Shard,
) -> Result<(TrainerState, StepGradients), TrainError> {
    let (trainer, data, shard) = (trainer.clone(), data.clone(), shard.clone());
    let (state, gradients) = tokio::task::spawn_blocking(move || {
        let gradients = trainer.gradients(&state, &data, &shard);
        (state, gradients)
    })
    .await
    .map_err(|e| TrainError::Task(e.to_string()))?;
    Ok((state, gradients?))
}

async fn apply(
    trainer: &Arc<Trainer>,
    mut state: TrainerState,
    summed: Vec<f32>,
    batch_len: usize,
) -> Result<(TrainerState, tandem_model::StepOutcome), TrainError> {
    debug_assert!(summed.len() >= STATISTICS);
    let trainer = trainer.clone();
    let (state, outcome) = tokio::task::spawn_blocking(move || {
        let outcome = trainer.apply(&mut state, &summed, batch_len);
        (state, outcome)
    })
    .await
    .map_err(|e| TrainError::Task(e.to_string()))?;
    Ok((state, outcome?))
}
