//! The preprocess service: the `dataset.raw` handler, `status` and `probe_ack`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_model::{Device, Standardizer};
use tandem_pipeline::messages::{
    Batch, FeatureMessage, FeaturesEnd, JSON, PUBSUB, PreprocessStatus, Probe, RawBatch, RawEnd, RawMessage,
    ScalerParams, app_ids, methods, topics,
};
use tandem_pipeline::{arrow_batch, json, probe};
use tandem_sdk::{AppServer, EventOutcome, SidecarClient, Status, TopicEvent};
use tokio::sync::watch;

/// How long an event waits in the handler for train's subscription before it is answered
/// RETRY. Only a replica that has not finished its own probe yet waits at all (ingest publishes
/// once a replica has seen train subscribed), and that takes a second or two.
const TRAIN_WAIT: Duration = Duration::from_secs(10);

/// An event of `dataset.raw`: a batch (Arrow IPC) or a JSON message.
enum Raw {
    Batch(RawBatch),
    Json(RawMessage),
}

/// One preprocess replica; clones share one state.
#[derive(Clone)]
pub struct Preprocess {
    inner: Arc<Inner>,
}

struct Inner {
    sidecar: SidecarClient,
    device: Device,
    /// Whether `dataset.features` has a subscriber (train) yet; until then nothing is published.
    train_subscribed: watch::Sender<bool>,
    transformed: AtomicU64,
    /// The dataset version of the last event handled (its scaler came with it).
    last_version: Mutex<Option<String>>,
}

impl Preprocess {
    pub fn new(sidecar: SidecarClient, device: Device) -> Preprocess {
        Preprocess {
            inner: Arc::new(Inner {
                sidecar,
                device,
                train_subscribed: watch::Sender::new(false),
                transformed: AtomicU64::new(0),
                last_version: Mutex::new(None),
            }),
        }
    }

    pub fn app_server(&self) -> AppServer {
        let (status, acks, events) = (self.clone(), self.clone(), self.clone());
        AppServer::new()
            .handler(methods::STATUS, move |_| {
                let status = status.status();
                async move { json::reply(&status) }
            })
            .handler(methods::PROBE_ACK, move |call| {
                let this = acks.clone();
                async move { probe::record_ack(&this.inner.sidecar, &call.data).await }
            })
            .subscribe(PUBSUB, topics::DATASET_RAW, move |event| {
                let this = events.clone();
                async move { this.on_raw_event(event).await }
            })
    }

    /// Waits until train subscribes to `dataset.features` (see `tandem_pipeline::probe`).
    pub async fn wait_for_train(&self) {
        probe::wait_for_subscriber(
            &self.inner.sidecar,
            topics::DATASET_FEATURES,
            app_ids::PREPROCESS,
            Duration::from_secs(1),
            |probe| json::encode(&FeatureMessage::Probe(probe)),
        )
        .await;
        self.inner.train_subscribed.send_replace(true);
    }

    pub fn status(&self) -> PreprocessStatus {
        let version = self.inner.last_version.lock().unwrap_or_else(|p| p.into_inner()).clone();
        PreprocessStatus {
            scaler_fitted: version.is_some(),
            transformed_batches: self.inner.transformed.load(Ordering::SeqCst),
            dataset_version: version,
        }
    }

    async fn on_raw_event(&self, event: TopicEvent) -> EventOutcome {
        let message = if event.data_content_type == arrow_batch::ARROW_STREAM {
            arrow_batch::decode_raw(&event.data).map(Raw::Batch)
        } else {
            json::decode::<RawMessage>(&event.data, "a dataset.raw event").map(Raw::Json)
        };
        let message = match message {
            Ok(message) => message,
            Err(error) => {
                tracing::error!(id = %event.id, %error, "dropping a malformed dataset.raw event");
                return EventOutcome::Drop;
            }
        };
        let result = match message {
            Raw::Json(RawMessage::Probe(probe)) => self.on_probe(probe).await,
            Raw::Json(RawMessage::End(end)) => self.on_end(end).await,
            Raw::Batch(batch) => self.on_batch(batch).await,
        };
        match result {
            Ok(true) => EventOutcome::Success,
            Ok(false) => EventOutcome::Retry,
            Err(error) => {
                tracing::warn!(id = %event.id, error = %error.message(), "handling a dataset.raw event failed; it will be retried");
                EventOutcome::Retry
            }
        }
    }

    /// Acknowledges ingest's probe only once train is subscribed here, so ingest publishes
    /// nothing before the whole chain can take it. An unacknowledged probe is not redelivered:
    /// ingest sends a new one every second.
    async fn on_probe(&self, probe: Probe) -> Result<bool, Status> {
        if *self.inner.train_subscribed.borrow() {
            probe::acknowledge(&self.inner.sidecar, &probe).await?;
        } else {
            tracing::debug!("ingest's probe left unanswered: train is not subscribed yet");
        }
        Ok(true)
    }

    /// Holds the event until train is subscribed (bounded by [`TRAIN_WAIT`]); `false` if not.
    async fn train_ready(&self) -> bool {
        let mut subscribed = self.inner.train_subscribed.subscribe();
        tokio::time::timeout(TRAIN_WAIT, subscribed.wait_for(|s| *s)).await.is_ok_and(|r| r.is_ok())
    }

    /// `Ok(false)`: train is still not subscribed after [`TRAIN_WAIT`]: deliver again later.
    async fn on_batch(&self, raw: RawBatch) -> Result<bool, Status> {
        let RawBatch { batch, scaler } = raw;
        if let Some(problem) = shape_problem(&batch, &scaler) {
            tracing::error!(batch = %batch.key(), problem = %problem, "dropping a malformed batch");
            return Ok(true);
        }
        self.seen(&batch.dataset_version);
        if !self.train_ready().await {
            return Ok(false);
        }
        let features = standardize(&scaler, &batch.features, &self.inner.device)?;
        let out = arrow_batch::encode(&Batch { features, ..batch }, None);
        self.inner.sidecar.publish(PUBSUB, topics::DATASET_FEATURES, out, arrow_batch::ARROW_STREAM).await?;
        self.inner.transformed.fetch_add(1, Ordering::SeqCst);
        Ok(true)
    }

    async fn on_end(&self, end: RawEnd) -> Result<bool, Status> {
        self.seen(&end.dataset_version);
        if !self.train_ready().await {
            return Ok(false);
        }
        let out = FeatureMessage::End(FeaturesEnd {
            dataset_version: end.dataset_version,
            feature_count: end.feature_count,
            class_count: end.class_count,
            counts: end.counts,
            scaler: end.scaler,
        });
        self.inner.sidecar.publish(PUBSUB, topics::DATASET_FEATURES, json::encode(&out), JSON).await?;
        Ok(true)
    }

    fn seen(&self, version: &str) {
        *self.inner.last_version.lock().unwrap_or_else(|p| p.into_inner()) = Some(version.to_string());
    }
}

/// What is wrong with a batch's shape (or its scaler's), if anything.
fn shape_problem(batch: &Batch, scaler: &ScalerParams) -> Option<String> {
    if batch.features.is_empty() || batch.features.len() != batch.labels.len() {
        return Some(format!("{} rows but {} labels", batch.features.len(), batch.labels.len()));
    }
    let width = batch.feature_count as usize;
    if scaler.mean.len() != width || scaler.std.len() != width {
        return Some(format!(
            "its scaler has {} means and {} deviations for {width} features",
            scaler.mean.len(),
            scaler.std.len()
        ));
    }
    batch
        .features
        .iter()
        .position(|row| row.len() != batch.feature_count as usize)
        .map(|row| format!("row {row} has {} features, not {}", batch.features[row].len(), batch.feature_count))
}

/// `(x - mean) / std` per feature, on burn tensors.
fn standardize(scaler: &ScalerParams, rows: &[Vec<f32>], device: &Device) -> Result<Vec<Vec<f32>>, Status> {
    let standardizer = Standardizer { mean: scaler.mean.clone(), std: scaler.std.clone() };
    standardizer.transform_rows(rows, device).map_err(|e| Status::internal(format!("standardizing: {e}")))
}
