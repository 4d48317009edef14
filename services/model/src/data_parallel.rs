//! Data-parallel training, the part that does not depend on how replicas talk to each other:
//! which samples each replica takes in a step, the parameters and gradients as flat `f32`
//! buffers, Adam on those buffers, and the whole trainer state (weights, optimizer moments,
//! step) as bytes, which is what a replica that joins late receives from a live one.
//!
//! One step of a group of `world` replicas:
//! 1. every replica takes its shard of the step's global batch ([`GlobalBatches::shard`]: the
//!    epoch's seeded permutation cut into batches, each batch split by rank as PyTorch's
//!    `DistributedSampler` does);
//! 2. computes the gradient of its shard's loss weighted by the shard's share of the batch
//!    ([`Trainer::gradients`]), so that the SUM over the replicas is the gradient of the mean
//!    loss over the whole global batch, whatever the world size;
//! 3. the buffers are summed across the group (an all-reduce, done by the sidecars);
//! 4. every replica applies the same sum ([`Trainer::apply`]) and so holds the same state.
//!
//! With `world = 1` this is plain minibatch training: [`crate::train()`] is that case, so one
//! replica and N replicas run the same arithmetic on the same batches.
//!
//! Why flat buffers and our own Adam rather than burn's optimizer: the sum must travel as bytes,
//! and a late joiner needs the optimizer's moments too; flat `f32` buffers make both a copy,
//! and the update is a few element-wise operations per parameter (cheap beside the forward and
//! backward passes, which run on the burn device).

use burn::nn::loss::{CrossEntropyLoss, CrossEntropyLossConfig};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use sha2::{Digest, Sha256};

use crate::dataset::Dataset;
use crate::model::{Classifier, Mlp, MlpConfig, ModelError, count_correct, initial_parameters, labels_tensor, scalar};
use crate::rng::SeededRng;

/// Adam's hyper-parameters besides the learning rate (burn's defaults).
const BETA_1: f32 = 0.9;
const BETA_2: f32 = 0.999;
const EPSILON: f32 = 1e-5;

/// Values a gradient buffer carries after the gradients: the shard's summed loss and its count of
/// correct predictions, so that one all-reduce also gives the step's loss and accuracy.
pub const STATISTICS: usize = 2;

/// The global batches of a training run: epoch `e` is a permutation of the samples drawn from
/// `(seed, e)`, cut into batches of `batch_size` (the last one of an epoch may be smaller);
/// step `s` is batch `s % steps_per_epoch` of epoch `s / steps_per_epoch`. Nothing here depends
/// on the number of replicas, so a group can change size between two steps.
#[derive(Debug, Clone)]
pub struct GlobalBatches {
    samples: usize,
    batch_size: usize,
    seed: u64,
    /// The permutation of the epoch asked last.
    cached: Option<(u64, Vec<usize>)>,
}

/// One replica's part of a global batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// The samples this replica computes on (possibly none, when the batch is smaller than the group).
    pub indices: Vec<usize>,
    /// Samples in the whole global batch.
    pub batch_len: usize,
}

impl GlobalBatches {
    /// Batches over `samples` samples (`> 0`) of `batch_size` (`> 0`) each.
    pub fn new(samples: usize, batch_size: usize, seed: u64) -> Self {
        assert!(samples > 0 && batch_size > 0, "GlobalBatches needs samples and a batch size");
        Self { samples, batch_size, seed, cached: None }
    }

    /// Steps in one epoch (one pass over the samples).
    pub fn steps_per_epoch(&self) -> u64 {
        self.samples.div_ceil(self.batch_size) as u64
    }

    /// The 0-based epoch that step `step` belongs to.
    pub fn epoch_of(&self, step: u64) -> u64 {
        step / self.steps_per_epoch()
    }

    /// The sample indices of step `step`'s global batch.
    pub fn batch(&mut self, step: u64) -> &[usize] {
        let epoch = self.epoch_of(step);
        let first = (step % self.steps_per_epoch()) as usize * self.batch_size;
        let last = (first + self.batch_size).min(self.samples);
        &self.permutation(epoch)[first..last]
    }

    /// Rank `rank`'s part of step `step`'s global batch in a group of `world`: the batch's
    /// positions `rank, rank + world, ...` (as `DistributedSampler` strides an epoch).
    pub fn shard(&mut self, step: u64, rank: usize, world: usize) -> Shard {
        assert!(world > 0 && rank < world, "rank {rank} outside a world of {world}");
        let batch = self.batch(step);
        Shard { indices: batch.iter().skip(rank).step_by(world).copied().collect(), batch_len: batch.len() }
    }

    fn permutation(&mut self, epoch: u64) -> &[usize] {
        if self.cached.as_ref().is_none_or(|(cached, _)| *cached != epoch) {
            let mut order: Vec<usize> = (0..self.samples).collect();
            let mixed = self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch.wrapping_add(0xE90C);
            SeededRng::new(mixed).shuffle(&mut order);
            self.cached = Some((epoch, order));
        }
        &self.cached.as_ref().expect("just cached").1
    }
}

/// Everything a replica holds between steps: the parameters, Adam's moments and the number of
/// steps applied. Replicas of one group hold identical states after every step.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerState {
    /// Steps applied so far (the next step to compute).
    pub step: u64,
    parameters: Vec<f32>,
    moment_1: Vec<f32>,
    moment_2: Vec<f32>,
}

/// The first bytes of [`TrainerState::to_bytes`].
const STATE_MAGIC: &[u8; 16] = b"tandem-trainer-1";

impl TrainerState {
    /// The flat parameters (see [`MlpConfig::parameter_count`] for the layout).
    pub fn parameters(&self) -> &[f32] {
        &self.parameters
    }

    /// Hex SHA-256 of the parameters' bytes: equal on every replica of a group after a step.
    pub fn parameters_hash(&self) -> String {
        let mut hasher = Sha256::new();
        for value in &self.parameters {
            hasher.update(value.to_le_bytes());
        }
        hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// The state as bytes: magic, step, parameter count, then parameters and both moments as
    /// little-endian `f32`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let count = self.parameters.len();
        let mut bytes = Vec::with_capacity(STATE_MAGIC.len() + 16 + 3 * 4 * count);
        bytes.extend_from_slice(STATE_MAGIC);
        bytes.extend_from_slice(&self.step.to_le_bytes());
        bytes.extend_from_slice(&(count as u64).to_le_bytes());
        for buffer in [&self.parameters, &self.moment_1, &self.moment_2] {
            bytes.extend(buffer.iter().flat_map(|value| value.to_le_bytes()));
        }
        bytes
    }

    /// Reads bytes written by [`TrainerState::to_bytes`] for a model of `parameter_count`
    /// parameters; anything else is refused with what was wrong.
    pub fn from_bytes(bytes: &[u8], parameter_count: usize) -> Result<Self, ModelError> {
        let bad = |reason: String| ModelError::NotARecord(format!("trainer state: {reason}"));
        let header = STATE_MAGIC.len() + 16;
        if bytes.len() < header || &bytes[..STATE_MAGIC.len()] != STATE_MAGIC {
            return Err(bad("it does not start with the trainer state's header".into()));
        }
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let step = word(STATE_MAGIC.len());
        let count = word(STATE_MAGIC.len() + 8);
        if count != parameter_count as u64 {
            return Err(bad(format!("it holds {count} parameters, the model has {parameter_count}")));
        }
        if bytes.len() != header + 3 * 4 * parameter_count {
            return Err(bad(format!("{} bytes, expected {}", bytes.len(), header + 3 * 4 * parameter_count)));
        }
        let mut buffers = bytes[header..]
            .chunks_exact(4 * parameter_count.max(1))
            .map(|chunk| chunk.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect());
        let mut next = || buffers.next().unwrap_or_default();
        let (parameters, moment_1, moment_2) = (next(), next(), next());
        Ok(Self { step, parameters, moment_1, moment_2 })
    }
}

/// A shard's contribution to a step: its weighted gradients followed by [`STATISTICS`] values.
#[derive(Debug, Clone, PartialEq)]
pub struct StepGradients {
    buffer: Vec<f32>,
}

impl StepGradients {
    /// The buffer to sum across the group (gradients, then the shard's loss sum and correct count).
    pub fn buffer(&self) -> &[f32] {
        &self.buffer
    }

    /// The buffer, owned.
    pub fn into_buffer(self) -> Vec<f32> {
        self.buffer
    }
}

/// What a step's summed buffer says about the global batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    /// Mean loss over the global batch.
    pub loss: f32,
    /// Fraction of the global batch predicted right before the update.
    pub accuracy: f32,
    /// Samples in the global batch.
    pub samples: usize,
}

/// Computes shard gradients and applies summed ones, for one architecture on one device.
#[derive(Debug, Clone)]
pub struct Trainer {
    config: MlpConfig,
    learning_rate: f32,
    device: Device,
    autodiff: Device,
    loss: CrossEntropyLoss,
}

impl Trainer {
    /// A trainer of `config` with Adam at `learning_rate` (finite, `> 0`), computing on `device`.
    pub fn new(config: MlpConfig, learning_rate: f64, device: &Device) -> Result<Self, ModelError> {
        config.validate()?;
        if !(learning_rate.is_finite() && learning_rate > 0.0) {
            return Err(ModelError::Config(format!("learning rate {learning_rate} must be > 0")));
        }
        let autodiff = device.clone().autodiff();
        let loss = CrossEntropyLossConfig::new().init(&autodiff);
        Ok(Self { config, learning_rate: learning_rate as f32, device: device.clone(), autodiff, loss })
    }

    /// The architecture.
    pub fn config(&self) -> &MlpConfig {
        &self.config
    }

    /// Length of a gradient buffer: the parameters plus [`STATISTICS`].
    pub fn buffer_len(&self) -> usize {
        self.config.parameter_count() + STATISTICS
    }

    /// The state before the first step: parameters drawn from `seed` (the same ones
    /// [`crate::train()`] starts from), zero moments.
    pub fn init(&self, seed: u64) -> TrainerState {
        let mut rng = SeededRng::new(SeededRng::new(seed).next_u64());
        let parameters = initial_parameters(&self.config, &mut rng);
        let zeros = vec![0.0; parameters.len()];
        TrainerState { step: 0, parameters, moment_1: zeros.clone(), moment_2: zeros }
    }

    /// Checks that `state` belongs to this architecture (e.g. one received from another replica).
    pub fn check(&self, state: &TrainerState) -> Result<(), ModelError> {
        let expected = self.config.parameter_count();
        if state.parameters.len() != expected || state.moment_1.len() != expected || state.moment_2.len() != expected {
            return Err(ModelError::ArchitectureMismatch {
                architecture: self.config.architecture(),
                reason: format!("the trainer state holds {} parameters, it has {expected}", state.parameters.len()),
            });
        }
        Ok(())
    }

    /// The gradient of `shard`'s cross-entropy loss on `data`, weighted by
    /// `shard.indices.len() / shard.batch_len`, at `state`'s parameters. An empty shard gives
    /// zeros (its replica still takes part in the sum).
    pub fn gradients(&self, state: &TrainerState, data: &Dataset, shard: &Shard) -> Result<StepGradients, ModelError> {
        let samples = shard.indices.len();
        if samples == 0 {
            return Ok(StepGradients { buffer: vec![0.0; self.buffer_len()] });
        }
        if data.num_features() != self.config.num_features {
            return Err(ModelError::FeatureCount {
                sample: 0,
                expected: self.config.num_features,
                found: data.num_features(),
            });
        }
        let num_classes = self.config.num_classes;
        let mut features = Vec::with_capacity(samples * data.num_features());
        let mut labels = Vec::with_capacity(samples);
        for &index in &shard.indices {
            let label = data.labels()[index];
            if label as usize >= num_classes {
                return Err(ModelError::LabelOutOfRange { sample: index, label, num_classes });
            }
            features.extend_from_slice(data.row(index));
            labels.push(label);
        }
        let model = Mlp::from_flat(&self.config, &state.parameters, &self.autodiff);
        let input = Tensor::<2>::from_data(TensorData::new(features, [samples, data.num_features()]), &self.autodiff);
        let targets = labels_tensor(&labels, &self.autodiff);
        let logits = model.forward(input);
        let loss = self.loss.forward(logits.clone(), targets.clone());
        let correct = count_correct(logits.detach(), targets)?;
        let mean_loss = scalar(loss.clone().detach())?;
        let share = samples as f32 / shard.batch_len as f32;
        let mut grads = GradientsParams::from_grads(loss.mul_scalar(share).backward(), &model);
        let mut buffer = model.flat_gradients(&mut grads)?;
        buffer.extend([mean_loss * samples as f32, correct as f32]);
        Ok(StepGradients { buffer })
    }

    /// Applies one Adam step with `summed`, the sum of every replica's [`StepGradients`] buffer
    /// for `state.step`, and advances the step.
    pub fn apply(&self, state: &mut TrainerState, summed: &[f32], batch_len: usize) -> Result<StepOutcome, ModelError> {
        if summed.len() != self.buffer_len() {
            return Err(ModelError::Config(format!(
                "a summed gradient buffer of {} values, the model needs {}",
                summed.len(),
                self.buffer_len()
            )));
        }
        self.check(state)?;
        let (gradients, statistics) = summed.split_at(self.config.parameter_count());
        let time = (state.step + 1).min(i32::MAX as u64) as i32;
        let correction_2 = (1.0 - BETA_2.powi(time)).sqrt();
        let factor = self.learning_rate * correction_2 / (1.0 - BETA_1.powi(time));
        let epsilon = EPSILON * correction_2;
        for (((parameter, m), v), &g) in
            state.parameters.iter_mut().zip(&mut state.moment_1).zip(&mut state.moment_2).zip(gradients)
        {
            *m = BETA_1 * *m + (1.0 - BETA_1) * g;
            *v = BETA_2 * *v + (1.0 - BETA_2) * g * g;
            *parameter -= factor * *m / (v.sqrt() + epsilon);
        }
        state.step += 1;
        let batch = batch_len.max(1) as f32;
        Ok(StepOutcome { loss: statistics[0] / batch, accuracy: statistics[1] / batch, samples: batch_len })
    }

    /// A classifier holding `state`'s parameters, ready to predict on the plain device.
    pub fn classifier(&self, state: &TrainerState) -> Result<Classifier, ModelError> {
        Classifier::from_parameters(&self.config, &state.parameters, &self.device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Standardizer;

    fn cpu() -> Device {
        crate::parse_device("cpu").unwrap()
    }

    #[test]
    fn shards_cover_each_global_batch_once_whatever_the_world_size() {
        let mut batches = GlobalBatches::new(103, 10, 7);
        assert_eq!(batches.steps_per_epoch(), 11);
        for step in [0, 5, 10, 11, 40] {
            let batch = batches.batch(step).to_vec();
            assert_eq!(batch.len(), if step % 11 == 10 { 3 } else { 10 });
            for world in 1..=4 {
                let mut union: Vec<usize> =
                    (0..world).flat_map(|rank| batches.shard(step, rank, world).indices).collect();
                union.sort();
                let mut sorted = batch.clone();
                sorted.sort();
                assert_eq!(union, sorted, "step {step}, world {world}");
            }
        }
        // An epoch visits every sample once; the next epoch in another order.
        let epoch_0: Vec<usize> = (0..11).flat_map(|step| batches.batch(step).to_vec()).collect();
        let epoch_1: Vec<usize> = (11..22).flat_map(|step| batches.batch(step).to_vec()).collect();
        let mut sorted = epoch_0.clone();
        sorted.sort();
        assert_eq!(sorted, (0..103).collect::<Vec<_>>());
        assert_ne!(epoch_0, epoch_1);
        // A batch smaller than the group leaves some ranks without samples.
        let last = batches.shard(10, 3, 4);
        assert_eq!((last.indices.len(), last.batch_len), (0, 3));
        // The same seed gives the same batches; another seed other batches.
        assert_eq!(GlobalBatches::new(103, 10, 7).batch(12), batches.batch(12));
        assert_ne!(GlobalBatches::new(103, 10, 8).batch(12), batches.batch(12));
    }

    #[test]
    fn trainer_state_round_trips_through_bytes_and_refuses_others() {
        let config = MlpConfig { num_features: 3, hidden: vec![4], num_classes: 2 };
        let trainer = Trainer::new(config.clone(), 1e-3, &cpu()).unwrap();
        let mut state = trainer.init(1);
        state.step = 9;
        state.moment_1[2] = 0.5;
        let bytes = state.to_bytes();
        assert_eq!(TrainerState::from_bytes(&bytes, config.parameter_count()).unwrap(), state);
        let err = TrainerState::from_bytes(&bytes, 5).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("weights bytes are not a burn record: trainer state: it holds {} parameters, the model has 5", 26)
        );
        assert!(TrainerState::from_bytes(&bytes[..bytes.len() - 1], 26).is_err());
        assert!(TrainerState::from_bytes(b"garbage", 26).is_err());
        assert_eq!(state.parameters_hash().len(), 64);
        assert_ne!(state.parameters_hash(), trainer.init(2).parameters_hash());
    }

    /// Relative difference of two parameter buffers: the largest element difference over the
    /// largest magnitude (the norm numpy's `allclose` would need an `atol` for near zero).
    pub(crate) fn relative_difference(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    /// The arithmetic of data parallelism without any network: N replicas' buffers summed in
    /// process give the parameters of one replica after every step (PyTorch's DDP equivalence
    /// test, `_test_DDP_niter`), and the replicas agree bit for bit among themselves.
    #[test]
    fn n_shards_summed_give_the_single_replica_parameters_after_every_step() {
        let device = cpu();
        let split = Dataset::digits().split(0.2, 42).unwrap();
        let data = Standardizer::fit(&split.train, &device).transform(&split.train, &device).unwrap();
        let config = MlpConfig { num_features: 64, hidden: vec![32], num_classes: 10 };
        let trainer = Trainer::new(config, 1e-3, &device).unwrap();
        let batch_size = 50;
        for world in [2usize, 3] {
            let mut batches = GlobalBatches::new(data.len(), batch_size, 42);
            let mut single = trainer.init(42);
            let mut group = vec![trainer.init(42); world];
            for _ in 0..20 {
                let step = single.step;
                let shard = batches.shard(step, 0, 1);
                let whole = trainer.gradients(&single, &data, &shard).unwrap();
                let one = trainer.apply(&mut single, whole.buffer(), shard.batch_len).unwrap();

                let mut summed = vec![0.0f32; trainer.buffer_len()];
                for (rank, state) in group.iter().enumerate() {
                    let part = trainer.gradients(state, &data, &batches.shard(step, rank, world)).unwrap();
                    summed.iter_mut().zip(part.buffer()).for_each(|(s, v)| *s += v);
                }
                let mut outcomes = Vec::new();
                for state in &mut group {
                    outcomes.push(trainer.apply(state, &summed, shard.batch_len).unwrap());
                }
                assert!(group.iter().all(|s| s.parameters_hash() == group[0].parameters_hash()));
                let difference = relative_difference(group[0].parameters(), single.parameters());
                assert!(difference <= 1e-5, "world {world}, step {step}: relative difference {difference}");
                assert!((outcomes[0].loss - one.loss).abs() <= 1e-4 * one.loss, "{outcomes:?} {one:?}");
                assert_eq!(outcomes[0].accuracy, one.accuracy);
                assert_eq!(group[0].step, step + 1);
            }
        }
    }

    #[test]
    fn a_summed_buffer_of_the_wrong_length_is_refused() {
        let config = MlpConfig { num_features: 3, hidden: vec![4], num_classes: 2 };
        let trainer = Trainer::new(config, 1e-3, &cpu()).unwrap();
        let mut state = trainer.init(1);
        let before = state.clone();
        let err = trainer.apply(&mut state, &[0.0; 3], 1).unwrap_err();
        assert_eq!(err.to_string(), "invalid configuration: a summed gradient buffer of 3 values, the model needs 28");
        assert_eq!(state, before, "a refused buffer changes nothing");
    }
}
