//! Dynamic batching: concurrent `predict` calls queue here, and one task runs them as few
//! forward passes as it can, up to a maximum batch size and a maximum wait.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tandem_model::Prediction;
use tandem_sdk::Status;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::model::{LoadedModel, ModelSlot};

/// How requests are grouped into forward passes.
#[derive(Debug, Clone, Copy)]
pub struct BatchingOptions {
    /// Most samples per forward pass; 1 runs every sample alone. A single request with more
    /// samples than this is still run in one pass.
    pub max_batch_size: usize,
    /// After the first request of a batch, how long to wait for more.
    pub max_wait: Duration,
}

/// Predictions of one request and the model version that made them.
#[derive(Debug, Clone)]
pub struct Answer {
    pub model_version: String,
    pub predictions: Vec<Prediction>,
}

struct Job {
    samples: Vec<Vec<f32>>,
    reply: oneshot::Sender<Result<Answer, Status>>,
}

/// Handle of the batching task (cheap to clone).
#[derive(Clone)]
pub struct Batcher {
    queue: mpsc::Sender<Job>,
    /// Forward passes run.
    pub batches: Arc<AtomicU64>,
    /// Samples predicted.
    pub samples: Arc<AtomicU64>,
}

impl Batcher {
    /// Starts the batching task, which predicts with whatever model `slot` holds at each batch.
    pub fn start(options: BatchingOptions, slot: Arc<ModelSlot>) -> Batcher {
        let (queue, jobs) = mpsc::channel(4096);
        let batcher = Batcher { queue, batches: Arc::new(AtomicU64::new(0)), samples: Arc::new(AtomicU64::new(0)) };
        tokio::spawn(run(options, slot, jobs, batcher.clone()));
        batcher
    }

    /// Predicts `samples` (already checked: finite, one width) in the next batch.
    pub async fn predict(&self, samples: Vec<Vec<f32>>) -> Result<Answer, Status> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Job { samples, reply })
            .await
            .map_err(|_| Status::unavailable("the prediction queue is closed (serve is shutting down)"))?;
        answer.await.map_err(|_| Status::internal("the batch holding this request was lost"))?
    }
}

async fn run(options: BatchingOptions, slot: Arc<ModelSlot>, mut queue: mpsc::Receiver<Job>, counters: Batcher) {
    let max = options.max_batch_size.max(1);
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match queue.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        let mut size = first.samples.len();
        let mut jobs = vec![first];
        let deadline = Instant::now() + options.max_wait;
        while size < max {
            // Take what is already queued without waiting; then wait until the deadline.
            let next = match queue.try_recv() {
                Ok(job) => Some(job),
                Err(mpsc::error::TryRecvError::Empty) => {
                    tokio::time::timeout_at(deadline, queue.recv()).await.ok().flatten()
                }
                Err(mpsc::error::TryRecvError::Disconnected) => None,
            };
            let Some(job) = next else { break };
            if size + job.samples.len() > max {
                carried = Some(job);
                break;
            }
            size += job.samples.len();
            jobs.push(job);
        }
        run_batch(slot.current(), jobs, &counters).await;
    }
}

async fn run_batch(model: Option<Arc<LoadedModel>>, jobs: Vec<Job>, counters: &Batcher) {
    let Some(model) = model else {
        for job in jobs {
            let _ = job.reply.send(Err(no_model()));
        }
        return;
    };
    // The model may have changed since a request was checked: check again against this one.
    let (fitting, misfits): (Vec<Job>, Vec<Job>) =
        jobs.into_iter().partition(|job| job.samples.iter().all(|s| s.len() == model.feature_count));
    for job in misfits {
        let found = job.samples[0].len();
        let _ = job.reply.send(Err(wrong_feature_count(found, &model)));
    }
    if fitting.is_empty() {
        return;
    }
    let sizes: Vec<usize> = fitting.iter().map(|job| job.samples.len()).collect();
    let mut replies = Vec::with_capacity(fitting.len());
    let mut all = Vec::with_capacity(sizes.iter().sum());
    for job in fitting {
        all.extend(job.samples);
        replies.push(job.reply);
    }
    let total = all.len() as u64;
    let worker = model.clone();
    let result = tokio::task::spawn_blocking(move || worker.predict(&all)).await;
    counters.batches.fetch_add(1, Ordering::Relaxed);
    counters.samples.fetch_add(total, Ordering::Relaxed);
    match result {
        Ok(Ok(predictions)) => {
            let mut predictions = predictions.into_iter();
            for (reply, size) in replies.into_iter().zip(sizes) {
                let answer = Answer {
                    model_version: model.version.clone(),
                    predictions: predictions.by_ref().take(size).collect(),
                };
                let _ = reply.send(Ok(answer));
            }
        }
        Ok(Err(error)) => {
            for reply in replies {
                let _ = reply.send(Err(Status::internal(format!("prediction failed: {error}"))));
            }
        }
        Err(join) => {
            for reply in replies {
                let _ = reply.send(Err(Status::internal(format!("the prediction task failed: {join}"))));
            }
        }
    }
}

pub fn no_model() -> Status {
    Status::unavailable("no model loaded yet: serve is waiting for train to publish one on model.ready")
}

pub fn wrong_feature_count(found: usize, model: &LoadedModel) -> Status {
    Status::invalid_argument(format!(
        "wrong feature count: samples have {found} features, model {} takes {}",
        model.version, model.feature_count
    ))
}
