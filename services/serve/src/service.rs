//! The serve service: `predict`, `status`, `model.ready`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tandem_model::Device;
use tandem_pipeline::json;
use tandem_pipeline::messages::{
    GetModelRequest, JSON, ModelEntry, ModelReady, PUBSUB, PredictResponse, Prediction, ServeStatus, TrainStatus,
    app_ids, methods, topics,
};
use tandem_sdk::{AppServer, CallOptions, EventOutcome, SidecarClient, Status, TopicEvent};

use crate::batcher::{self, Batcher, BatchingOptions};
use crate::metrics::{ServeMetrics, VersionLabels};
use crate::model::{LoadedModel, ModelSlot};
use crate::request;

/// The serve service; clones share one state.
#[derive(Clone)]
pub struct Serve {
    inner: Arc<Inner>,
}

struct Inner {
    sidecar: SidecarClient,
    device: Device,
    slot: Arc<ModelSlot>,
    batcher: Batcher,
    requests: AtomicU64,
    metrics: ServeMetrics,
    /// One model load at a time (the event and the poll may both ask).
    loading: tokio::sync::Mutex<()>,
}

impl Serve {
    /// Must be called inside a tokio runtime (starts the batching task).
    pub fn new(sidecar: SidecarClient, batching: BatchingOptions, device: Device, metrics: ServeMetrics) -> Serve {
        let slot = Arc::new(ModelSlot::default());
        let batcher = Batcher::start(batching, slot.clone(), metrics.clone());
        Serve {
            inner: Arc::new(Inner {
                sidecar,
                device,
                slot,
                batcher,
                requests: AtomicU64::new(0),
                metrics,
                loading: tokio::sync::Mutex::new(()),
            }),
        }
    }

    pub fn status(&self) -> ServeStatus {
        ServeStatus {
            model_version: self.inner.slot.current().map(|m| m.version.clone()),
            requests: self.inner.requests.load(Ordering::Relaxed),
            samples: self.inner.batcher.samples.load(Ordering::Relaxed),
            batches: self.inner.batcher.batches.load(Ordering::Relaxed),
            shed: self.inner.metrics.shed.get(),
            queued: self.inner.batcher.queued() as u64,
        }
    }

    pub fn app_server(&self) -> AppServer {
        let (status, predict, events) = (self.clone(), self.clone(), self.clone());
        AppServer::new()
            .handler(methods::STATUS, move |_| {
                let status = status.status();
                async move { json::reply(&status) }
            })
            .handler(methods::PREDICT, move |call| {
                let this = predict.clone();
                async move {
                    this.inner.requests.fetch_add(1, Ordering::Relaxed);
                    let metrics = &this.inner.metrics;
                    metrics.in_flight.inc();
                    let response = this.predict(&call.data).await;
                    metrics.in_flight.dec();
                    let response = response?;
                    let version = VersionLabels { model_version: response.model_version.clone() };
                    metrics.predictions.get_or_create(&version).inc();
                    json::reply(&response)
                }
            })
            .subscribe(PUBSUB, topics::MODEL_READY, move |event| {
                let this = events.clone();
                async move { this.on_model_ready(event).await }
            })
    }

    /// Parses, checks and predicts one request.
    pub async fn predict(&self, body: &[u8]) -> Result<PredictResponse, Status> {
        let samples = request::parse(body)?;
        let model = self.inner.slot.current().ok_or_else(batcher::no_model)?;
        if samples[0].len() != model.feature_count {
            return Err(batcher::wrong_feature_count(samples[0].len(), &model));
        }
        let answer = self.inner.batcher.predict(samples).await?;
        Ok(PredictResponse {
            model_version: answer.model_version,
            predictions: answer
                .predictions
                .into_iter()
                .map(|p| Prediction { class: p.class, probabilities: p.probabilities })
                .collect(),
        })
    }

    async fn on_model_ready(&self, event: TopicEvent) -> EventOutcome {
        let ready: ModelReady = match json::decode(&event.data, "a model.ready event") {
            Ok(ready) => ready,
            Err(error) => {
                tracing::error!(id = %event.id, %error, "dropping a malformed model.ready event");
                return EventOutcome::Drop;
            }
        };
        if ready.sequence <= self.inner.slot.sequence() {
            return EventOutcome::Success;
        }
        match self.load(Some(&ready.model_version)).await {
            Ok(()) => EventOutcome::Success,
            Err(status) => {
                tracing::warn!(model_version = %ready.model_version, error = %status.message(), "cannot load the announced model yet; retrying");
                EventOutcome::Retry
            }
        }
    }

    /// Fetches `version` (the latest when `None`) from train and swaps it in if it is newer.
    pub async fn load(&self, version: Option<&str>) -> Result<(), Status> {
        let _loading = self.inner.loading.lock().await;
        let request = json::encode(&GetModelRequest { version: version.map(String::from) });
        let options = CallOptions::default().content_type(JSON).timeout(Duration::from_secs(30));
        let response = self.inner.sidecar.invoke_with(app_ids::TRAIN, methods::GET_MODEL, request, options).await?;
        let entry: ModelEntry = json::decode(&response.data, "train's get_model answer").map_err(Status::internal)?;
        if entry.sequence <= self.inner.slot.sequence() {
            return Ok(());
        }
        let device = self.inner.device.clone();
        let loaded = tokio::task::spawn_blocking(move || LoadedModel::from_entry(&entry, &device))
            .await
            .map_err(|e| Status::internal(format!("the model loading task failed: {e}")))?
            .map_err(Status::internal)?;
        let (version, sequence) = (loaded.version.clone(), loaded.sequence);
        if self.inner.slot.swap_if_newer(Arc::new(loaded)) {
            tracing::info!(model_version = %version, sequence, "model swapped in");
        }
        Ok(())
    }

    /// Catches up with train's registry at start and every `poll`: a `model.ready` published
    /// before serve subscribed (or while it was down) is not kept by the pub/sub, and of several
    /// serve replicas only one gets each event (they share the app-id's subscription).
    pub async fn follow_registry(self, poll: Duration) {
        loop {
            let status = self
                .inner
                .sidecar
                .invoke_with(app_ids::TRAIN, methods::STATUS, b"{}".to_vec(), CallOptions::default().content_type(JSON))
                .await
                .ok()
                .and_then(|r| json::decode::<TrainStatus>(&r.data, "train's status").ok());
            let latest = status.and_then(|s| s.model_version);
            let current = self.inner.slot.current().map(|m| m.version.clone());
            if let Some(latest) = latest
                && Some(&latest) != current.as_ref()
                && let Err(status) = self.load(Some(&latest)).await
            {
                tracing::warn!(model_version = %latest, error = %status.message(), "cannot load train's latest model yet");
            }
            // A replica without a model answers nothing: it asks every second until it has one.
            let without_model = self.inner.slot.current().is_none();
            tokio::time::sleep(if without_model { poll.min(Duration::from_secs(1)) } else { poll }).await;
        }
    }
}
