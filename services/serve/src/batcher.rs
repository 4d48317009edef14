//! Dynamic batching: concurrent `predict` calls queue here, and one task runs them as few
//! forward passes as it can, up to a maximum batch size and a maximum wait.
//!
//! With no wait (the default) a pass takes what is queued when it starts, so a lone request
//! runs at once and, under load, the requests that arrive during one pass fill the next. A
//! wait makes a pass that is not full linger for more; with closed-loop clients no more than
//! the batch size, that lockstep (every pass waiting for the last client's next request) costs
//! more than it saves (BENCHMARKS.md, serving).
//!
//! Load shedding: at most `max_queue` samples wait for a pass. A request that would go past
//! it is refused at once with RESOURCE_EXHAUSTED, naming the limit, instead of waiting behind
//! a queue that only grows under overload (a sidecar then tries another replica). A request
//! that finds the queue empty is always taken, however large.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tandem_model::Prediction;
use tandem_sdk::Status;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::metrics::ServeMetrics;
use crate::model::{LoadedModel, ModelSlot};

/// How requests are grouped into forward passes.
#[derive(Debug, Clone, Copy)]
pub struct BatchingOptions {
    /// Most samples per forward pass; 1 runs every sample alone. A single request with more
    /// samples than this is still run in one pass.
    pub max_batch_size: usize,
    /// After the first request of a batch, how long to wait for more.
    pub max_wait: Duration,
    /// Most samples waiting for a pass; more are refused (load shedding).
    pub max_queue: usize,
    /// Extra time each pass takes (`--slow-ms`: a slow replica for tests and benchmarks).
    pub slow: Duration,
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
    max_queue: usize,
    /// Its `queue_depth` gauge is the count of samples waiting for a pass: admission reads it.
    metrics: ServeMetrics,
}

impl Batcher {
    /// Starts the batching task, which predicts with whatever model `slot` holds at each batch.
    pub fn start(options: BatchingOptions, slot: Arc<ModelSlot>, metrics: ServeMetrics) -> Batcher {
        // Every waiting job holds a sample at least, so the channel never fills before the queue.
        let (queue, jobs) = mpsc::channel(options.max_queue.clamp(1, 1 << 16));
        let batcher = Batcher {
            queue,
            batches: Arc::new(AtomicU64::new(0)),
            samples: Arc::new(AtomicU64::new(0)),
            max_queue: options.max_queue,
            metrics,
        };
        tokio::spawn(run(options, slot, jobs, batcher.clone()));
        batcher
    }

    /// Predicts `samples` (already checked: finite, one width) in the next batch, or refuses
    /// them at once with RESOURCE_EXHAUSTED when the queue has no room.
    pub async fn predict(&self, samples: Vec<Vec<f32>>) -> Result<Answer, Status> {
        let count = samples.len();
        let waiting = self.metrics.queue_depth.inc_by(count as i64).max(0) as usize;
        if waiting > 0 && waiting + count > self.max_queue {
            self.metrics.queue_depth.dec_by(count as i64);
            self.metrics.shed.inc();
            return Err(Status::resource_exhausted(format!(
                "serve's queue is full: {waiting} samples wait and this request has {count}, above --max-queue {} \
                 (try again later or another replica)",
                self.max_queue
            )));
        }
        let (reply, answer) = oneshot::channel();
        if self.queue.send(Job { samples, reply }).await.is_err() {
            self.taken(count);
            return Err(Status::unavailable("the prediction queue is closed (serve is shutting down)"));
        }
        answer.await.map_err(|_| Status::internal("the batch holding this request was lost"))?
    }

    /// Samples waiting for a pass now.
    pub fn queued(&self) -> usize {
        self.metrics.queue_depth.get().max(0) as usize
    }

    /// `count` samples left the queue (for a pass, or not sent at all).
    fn taken(&self, count: usize) {
        self.metrics.queue_depth.dec_by(count as i64);
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
                // No wait: the pass runs with what is queued (no timer, not even a yield).
                Err(mpsc::error::TryRecvError::Empty) if options.max_wait.is_zero() => None,
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
        if !options.slow.is_zero() {
            tokio::time::sleep(options.slow).await;
        }
        run_batch(slot.current(), jobs, &counters).await;
    }
}

async fn run_batch(model: Option<Arc<LoadedModel>>, jobs: Vec<Job>, counters: &Batcher) {
    let taken = jobs.iter().map(|job| job.samples.len()).sum();
    counters.taken(taken);
    counters.metrics.batch_size.observe(taken as f64);
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

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_model::{Classifier, Device, MlpConfig, Standardizer};

    const FEATURES: usize = 4;

    /// A slot holding a small model "m1".
    fn loaded_slot() -> Arc<ModelSlot> {
        let device = Device::default();
        let config = MlpConfig { num_features: FEATURES, hidden: vec![8], num_classes: 3 };
        let classifier = Classifier::new(&config, 7, &device).unwrap();
        let standardizer = Standardizer { mean: vec![0.0; FEATURES], std: vec![1.0; FEATURES] };
        let slot = Arc::new(ModelSlot::default());
        slot.swap_if_newer(Arc::new(LoadedModel::new("m1", 1, classifier, standardizer, &device)));
        slot
    }

    fn batcher(max_batch_size: usize, max_wait: Duration) -> Batcher {
        let slot = loaded_slot();
        Batcher::start(
            BatchingOptions { max_batch_size, max_wait, max_queue: 1024, slow: Duration::ZERO },
            slot,
            ServeMetrics::new(),
        )
    }

    /// Sends `requests` predicts of one sample each at once; returns when all are answered.
    async fn predict_together(batcher: &Batcher, requests: usize) {
        let calls: Vec<_> = (0..requests)
            .map(|i| {
                let batcher = batcher.clone();
                tokio::spawn(async move { batcher.predict(vec![vec![i as f32; FEATURES]]).await })
            })
            .collect();
        for call in calls {
            let answer = call.await.unwrap().unwrap();
            assert_eq!(answer.model_version, "m1");
            assert_eq!(answer.predictions.len(), 1);
        }
    }

    // One runtime thread: the requests are all queued before the batching task runs, so what
    // is measured is how the batcher groups a queue, not scheduling luck.
    #[tokio::test(flavor = "current_thread")]
    async fn queued_requests_share_forward_passes_up_to_the_batch_size() {
        let b = batcher(4, Duration::ZERO);
        predict_together(&b, 10).await;
        assert_eq!(b.samples.load(Ordering::Relaxed), 10);
        assert_eq!(b.batches.load(Ordering::Relaxed), 3, "10 queued samples, at most 4 per pass");

        let unbatched = batcher(1, Duration::ZERO);
        predict_together(&unbatched, 5).await;
        assert_eq!(unbatched.batches.load(Ordering::Relaxed), 5, "batch size 1: one pass per sample");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_request_with_more_samples_than_the_batch_size_runs_whole() {
        let b = batcher(2, Duration::ZERO);
        let answer = b.predict(vec![vec![0.5; FEATURES]; 5]).await.unwrap();
        assert_eq!(answer.predictions.len(), 5);
        assert_eq!(b.batches.load(Ordering::Relaxed), 1);
    }

    /// Sends one request, lets the batcher take it, then sends a second; returns the passes run.
    async fn first_then_second(max_wait: Duration) -> u64 {
        let b = batcher(2, max_wait);
        let sent = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let first = tokio::spawn({
            let (b, sent) = (b.clone(), sent.clone());
            async move {
                sent.store(true, Ordering::SeqCst);
                b.predict(vec![vec![1.0; FEATURES]]).await
            }
        });
        // The first request is sent and no longer queued: the batcher holds it.
        let mut polls = 0;
        while !(sent.load(Ordering::SeqCst) && b.queue.capacity() == b.queue.max_capacity()) {
            assert!(polls < 10_000, "the batcher never took the first request");
            polls += 1;
            tokio::task::yield_now().await;
        }
        let second = b.predict(vec![vec![2.0; FEATURES]]).await.unwrap();
        assert_eq!(second.predictions.len(), 1);
        first.await.unwrap().unwrap();
        b.batches.load(Ordering::Relaxed)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_wait_gathers_requests_that_arrive_after_the_first() {
        // The pass starts as soon as it is full (2), long before the 60 s wait ends.
        assert_eq!(first_then_second(Duration::from_secs(60)).await, 1, "both requests in one pass");
        // Without a wait the first request runs alone, at once.
        assert_eq!(first_then_second(Duration::ZERO).await, 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_queue_refuses_at_once_and_loses_nothing_it_took() {
        let slot = loaded_slot();
        let metrics = ServeMetrics::new();
        let options =
            BatchingOptions { max_batch_size: 1, max_wait: Duration::ZERO, max_queue: 3, slow: Duration::ZERO };
        let b = Batcher::start(options, slot, metrics.clone());
        // Six requests queue before the batching task runs (one thread): three fit.
        let calls: Vec<_> = (0..6)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { b.predict(vec![vec![i as f32; FEATURES]]).await })
            })
            .collect();
        let (mut answered, mut refused) = (0, 0);
        for call in calls {
            match call.await.unwrap() {
                Ok(answer) => {
                    assert_eq!(answer.predictions.len(), 1);
                    answered += 1;
                }
                Err(status) => {
                    assert_eq!(status.code(), tandem_sdk::Code::ResourceExhausted);
                    assert!(status.message().contains("--max-queue 3"), "{}", status.message());
                    refused += 1;
                }
            }
        }
        assert_eq!((answered, refused), (3, 3), "at most 3 samples wait");
        assert_eq!(metrics.shed.get(), 3);
        assert_eq!(b.queued(), 0);
        assert_eq!(metrics.queue_depth.get(), 0);
        // The queue drained: a request larger than the limit is taken when nothing waits.
        assert_eq!(b.predict(vec![vec![0.5; FEATURES]; 5]).await.unwrap().predictions.len(), 5);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn without_a_model_requests_are_unavailable() {
        let b = Batcher::start(
            BatchingOptions { max_batch_size: 4, max_wait: Duration::ZERO, max_queue: 1024, slow: Duration::ZERO },
            Arc::new(ModelSlot::default()),
            ServeMetrics::new(),
        );
        let status = b.predict(vec![vec![0.0; FEATURES]]).await.unwrap_err();
        assert_eq!(status.code(), tandem_sdk::Code::Unavailable);
        assert!(status.message().contains("no model loaded yet"), "{}", status.message());
    }
}
