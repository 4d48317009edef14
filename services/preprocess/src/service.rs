//! The preprocess service: the `dataset.raw` handler, `status` and `probe_ack`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_model::{Device, Standardizer};
use tandem_pipeline::messages::{
    Batch, FeatureMessage, FeaturesEnd, JSON, PUBSUB, PreprocessStatus, RawEnd, RawMessage, STATE_STORE, ScalerParams,
    Split, app_ids, methods, topics,
};
use tandem_pipeline::{json, probe};
use tandem_sdk::{AppServer, EventOutcome, SidecarClient, Status, TopicEvent};

use crate::moments::{self, BatchMoments};

/// One preprocess replica; clones share one state.
#[derive(Clone)]
pub struct Preprocess {
    inner: Arc<Inner>,
}

struct Inner {
    sidecar: SidecarClient,
    device: Device,
    /// Scalers known to this replica, by dataset version (they never change once stored).
    scalers: Mutex<HashMap<String, Arc<ScalerParams>>>,
    /// Whether `dataset.features` has a subscriber (train) yet; until then nothing is published.
    train_subscribed: AtomicBool,
    transformed: AtomicU64,
    last_version: Mutex<Option<String>>,
}

fn stats_key(version: &str, index: u32) -> String {
    format!("stats/{version}/{index}")
}

fn scaler_key(version: &str) -> String {
    format!("scaler/{version}")
}

impl Preprocess {
    pub fn new(sidecar: SidecarClient, device: Device) -> Preprocess {
        Preprocess {
            inner: Arc::new(Inner {
                sidecar,
                device,
                scalers: Mutex::new(HashMap::new()),
                train_subscribed: AtomicBool::new(false),
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
        self.inner.train_subscribed.store(true, Ordering::SeqCst);
    }

    pub fn status(&self) -> PreprocessStatus {
        let version = self.inner.last_version.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let scaler_fitted = version
            .as_ref()
            .is_some_and(|v| self.inner.scalers.lock().unwrap_or_else(|p| p.into_inner()).contains_key(v));
        PreprocessStatus {
            scaler_fitted,
            transformed_batches: self.inner.transformed.load(Ordering::SeqCst),
            dataset_version: version,
        }
    }

    async fn on_raw_event(&self, event: TopicEvent) -> EventOutcome {
        let message: RawMessage = match json::decode(&event.data, "a dataset.raw event") {
            Ok(message) => message,
            Err(error) => {
                tracing::error!(id = %event.id, %error, "dropping a malformed dataset.raw event");
                return EventOutcome::Drop;
            }
        };
        let result = match message {
            RawMessage::Probe(probe) => probe::acknowledge(&self.inner.sidecar, &probe).await.map(|()| true),
            RawMessage::Batch(batch) => self.on_batch(batch).await,
            RawMessage::End(end) => self.on_end(end).await,
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

    /// `Ok(false)`: not yet (no scaler, or train not subscribed yet): deliver again later.
    async fn on_batch(&self, batch: Batch) -> Result<bool, Status> {
        if let Some(problem) = shape_problem(&batch) {
            tracing::error!(batch = %batch.key(), problem = %problem, "dropping a malformed batch");
            return Ok(true);
        }
        self.seen(&batch.dataset_version);
        let sidecar = &self.inner.sidecar;
        if batch.split == Split::Train {
            let key = stats_key(&batch.dataset_version, batch.batch_index);
            if sidecar.get_state(STATE_STORE, &key).await?.is_none() {
                sidecar.save_state(STATE_STORE, &key, json::encode(&BatchMoments::of(&batch.features))).await?;
            }
        }
        let train_batches = (batch.split == Split::Train).then_some(batch.batch_count);
        let Some(scaler) = self.scaler(&batch.dataset_version, train_batches).await? else {
            tracing::debug!(batch = %batch.key(), "no scaler yet; retry later");
            return Ok(false);
        };
        if !self.inner.train_subscribed.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let features = standardize(&scaler, &batch.features, &self.inner.device)?;
        let out = FeatureMessage::Batch(Batch { features, ..batch });
        sidecar.publish(PUBSUB, topics::DATASET_FEATURES, json::encode(&out), JSON).await?;
        self.inner.transformed.fetch_add(1, Ordering::SeqCst);
        Ok(true)
    }

    async fn on_end(&self, end: RawEnd) -> Result<bool, Status> {
        self.seen(&end.dataset_version);
        let Some(scaler) = self.scaler(&end.dataset_version, Some(end.counts.train_batches)).await? else {
            return Ok(false);
        };
        if !self.inner.train_subscribed.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let out = FeatureMessage::End(FeaturesEnd {
            dataset_version: end.dataset_version,
            feature_count: end.feature_count,
            class_count: end.class_count,
            counts: end.counts,
            scaler: (*scaler).clone(),
        });
        self.inner.sidecar.publish(PUBSUB, topics::DATASET_FEATURES, json::encode(&out), JSON).await?;
        Ok(true)
    }

    /// The scaler of `version`: known, stored by a replica, or fitted now when every train
    /// batch's statistics are in (`train_batches`, when this caller knows the count).
    async fn scaler(&self, version: &str, train_batches: Option<u32>) -> Result<Option<Arc<ScalerParams>>, Status> {
        if let Some(scaler) = self.inner.scalers.lock().unwrap_or_else(|p| p.into_inner()).get(version) {
            return Ok(Some(scaler.clone()));
        }
        let sidecar = &self.inner.sidecar;
        let key = scaler_key(version);
        let scaler = match sidecar.get_state(STATE_STORE, &key).await? {
            Some(stored) => {
                json::decode::<ScalerParams>(&stored.value, "the stored scaler").map_err(Status::internal)?
            }
            None => {
                let Some(count) = train_batches else { return Ok(None) };
                let mut batches = Vec::with_capacity(count as usize);
                for index in 0..count {
                    match sidecar.get_state(STATE_STORE, &stats_key(version, index)).await? {
                        Some(stored) => batches.push(
                            json::decode::<BatchMoments>(&stored.value, "stored batch statistics")
                                .map_err(Status::internal)?,
                        ),
                        None => return Ok(None),
                    }
                }
                let Some(fitted) = moments::fit(&batches) else {
                    return Err(Status::internal(format!(
                        "the train batches of {version} disagree on the feature count"
                    )));
                };
                // First write wins: if another replica stored one meanwhile, use that one.
                match sidecar.get_state(STATE_STORE, &key).await? {
                    Some(stored) => {
                        json::decode::<ScalerParams>(&stored.value, "the stored scaler").map_err(Status::internal)?
                    }
                    None => {
                        sidecar.save_state(STATE_STORE, &key, json::encode(&fitted)).await?;
                        tracing::info!(
                            dataset_version = version,
                            samples = fitted.samples,
                            "scaler fitted on the train split"
                        );
                        fitted
                    }
                }
            }
        };
        let scaler = Arc::new(scaler);
        self.inner.scalers.lock().unwrap_or_else(|p| p.into_inner()).insert(version.to_string(), scaler.clone());
        Ok(Some(scaler))
    }

    fn seen(&self, version: &str) {
        *self.inner.last_version.lock().unwrap_or_else(|p| p.into_inner()) = Some(version.to_string());
    }
}

/// What is wrong with a batch's shape, if anything.
fn shape_problem(batch: &Batch) -> Option<String> {
    if batch.features.is_empty() || batch.features.len() != batch.labels.len() {
        return Some(format!("{} rows but {} labels", batch.features.len(), batch.labels.len()));
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
