//! The train service: gathering batches into state, training, `get_model`, `status`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tandem_model::{Dataset, Device, TrainingConfig};
use tandem_pipeline::messages::{
    Batch, FeatureMessage, FeaturesEnd, GetModelRequest, JSON, ModelEntry, ModelMetrics, ModelReady, PUBSUB,
    STATE_STORE, Split, TrainPhase, TrainStatus, TrainingParams, batch_key, methods, topics,
};
use tandem_pipeline::{json, probe, service::now_rfc3339, weights};
use tandem_sdk::{AppServer, Code, EventOutcome, SidecarClient, Status, TopicEvent};

use crate::registry;

/// What train knows about one dataset version, in state under `gather/VERSION`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct GatherRecord {
    dataset_version: String,
    /// `SPLIT/INDEX` of every batch stored.
    received: BTreeSet<String>,
    end: Option<FeaturesEnd>,
    /// Set once a model was trained on it.
    model_version: Option<String>,
}

impl GatherRecord {
    fn expected(&self) -> Option<u32> {
        self.end.as_ref().map(|end| end.counts.total_batches())
    }

    fn is_complete(&self) -> bool {
        self.expected().is_some_and(|expected| self.received.len() as u32 >= expected)
    }
}

const CURRENT: &str = "gather/current";

fn gather_key(version: &str) -> String {
    format!("gather/{version}")
}

fn stored_batch_key(version: &str, split: Split, index: u32) -> String {
    format!("batch/{}", batch_key(version, split, index))
}

/// The train service; clones share one state.
#[derive(Clone)]
pub struct Train {
    inner: Arc<Inner>,
}

struct Inner {
    sidecar: SidecarClient,
    config: TrainingConfig,
    device: Device,
    status: Mutex<TrainStatus>,
    /// Orders the read-modify-writes of gathering records.
    gather_lock: tokio::sync::Mutex<()>,
    /// One training at a time.
    training_lock: tokio::sync::Mutex<()>,
}

impl Train {
    pub fn new(sidecar: SidecarClient, config: TrainingConfig, device: Device) -> Train {
        let status = TrainStatus {
            phase: TrainPhase::Gathering,
            dataset_version: None,
            batches_received: 0,
            batches_expected: None,
            epoch: 0,
            epochs: config.epochs as u32,
            loss: 0.0,
            test_accuracy: None,
            model_version: None,
        };
        Train {
            inner: Arc::new(Inner {
                sidecar,
                config,
                device,
                status: Mutex::new(status),
                gather_lock: tokio::sync::Mutex::new(()),
                training_lock: tokio::sync::Mutex::new(()),
            }),
        }
    }

    pub fn status(&self) -> TrainStatus {
        self.inner.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update(&self, change: impl FnOnce(&mut TrainStatus)) {
        change(&mut self.inner.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub fn app_server(&self) -> AppServer {
        let (status, models, events) = (self.clone(), self.clone(), self.clone());
        AppServer::new()
            .handler(methods::STATUS, move |_| {
                let status = status.status();
                async move { json::reply(&status) }
            })
            .handler(methods::GET_MODEL, move |call| {
                let this = models.clone();
                async move {
                    let request: GetModelRequest = json::request(&call.data, "the get_model request")?;
                    let entry = registry::get(&this.inner.sidecar, request.version.as_deref()).await?;
                    json::reply(&entry)
                }
            })
            .subscribe(PUBSUB, topics::DATASET_FEATURES, move |event| {
                let this = events.clone();
                async move { this.on_event(event).await }
            })
    }

    /// After a restart: picks up the latest model and the dataset being gathered, and trains
    /// if that dataset is complete but has no model yet.
    pub async fn resume(&self) -> Result<(), Status> {
        let sidecar = &self.inner.sidecar;
        match registry::get(sidecar, None).await {
            Ok(entry) => self.update(|s| {
                s.phase = TrainPhase::Ready;
                s.model_version = Some(entry.model_version.clone());
                s.test_accuracy = Some(entry.metrics.test_accuracy);
                s.loss = entry.metrics.final_loss;
                s.epoch = entry.training.epochs;
            }),
            Err(status) if status.code() == Code::NotFound => {}
            Err(status) => return Err(status),
        }
        let Some(current) = sidecar.get_state(STATE_STORE, CURRENT).await? else { return Ok(()) };
        let version = String::from_utf8_lossy(&current.value).into_owned();
        let record = self.load_record(&version).await?;
        self.show_gathering(&record);
        if record.is_complete() && record.model_version.is_none() {
            tracing::info!(dataset_version = %version, "resuming: the dataset is complete but has no model yet");
            self.spawn_training(version);
        }
        Ok(())
    }

    async fn on_event(&self, event: TopicEvent) -> EventOutcome {
        let message: FeatureMessage = match json::decode(&event.data, "a dataset.features event") {
            Ok(message) => message,
            Err(error) => {
                tracing::error!(id = %event.id, %error, "dropping a malformed dataset.features event");
                return EventOutcome::Drop;
            }
        };
        let result = match message {
            FeatureMessage::Probe(probe) => probe::acknowledge(&self.inner.sidecar, &probe).await,
            FeatureMessage::Batch(batch) => self.on_batch(batch).await,
            FeatureMessage::End(end) => self.on_end(end).await,
        };
        match result {
            Ok(()) => EventOutcome::Success,
            Err(status) => {
                tracing::warn!(id = %event.id, error = %status.message(), "handling a dataset.features event failed; it will be retried");
                EventOutcome::Retry
            }
        }
    }

    async fn on_batch(&self, batch: Batch) -> Result<(), Status> {
        let ok_shape = !batch.features.is_empty()
            && batch.features.len() == batch.labels.len()
            && batch.batch_index < batch.batch_count
            && batch.features.iter().all(|row| row.len() == batch.feature_count as usize);
        if !ok_shape {
            tracing::error!(batch = %batch.key(), "dropping a malformed feature batch");
            return Ok(());
        }
        let key = stored_batch_key(&batch.dataset_version, batch.split, batch.batch_index);
        self.inner.sidecar.save_state(STATE_STORE, &key, json::encode(&batch)).await?;
        let name = format!("{}/{}", batch.split, batch.batch_index);
        self.record_progress(&batch.dataset_version, |record| {
            record.received.insert(name);
        })
        .await
    }

    async fn on_end(&self, end: FeaturesEnd) -> Result<(), Status> {
        let version = end.dataset_version.clone();
        self.record_progress(&version, |record| record.end = Some(end)).await
    }

    /// Applies `change` to the dataset's record in state; starts training once it is complete.
    async fn record_progress(&self, version: &str, change: impl FnOnce(&mut GatherRecord)) -> Result<(), Status> {
        let _guard = self.inner.gather_lock.lock().await;
        let mut record = self.load_record(version).await?;
        let was_complete = record.is_complete();
        change(&mut record);
        let sidecar = &self.inner.sidecar;
        sidecar.save_state(STATE_STORE, &gather_key(version), json::encode(&record)).await?;
        sidecar.save_state(STATE_STORE, CURRENT, version.as_bytes().to_vec()).await?;
        self.show_gathering(&record);
        if record.is_complete() && !was_complete && record.model_version.is_none() {
            tracing::info!(dataset_version = version, batches = record.received.len(), "dataset complete; training");
            self.spawn_training(version.to_string());
        }
        Ok(())
    }

    async fn load_record(&self, version: &str) -> Result<GatherRecord, Status> {
        match self.inner.sidecar.get_state(STATE_STORE, &gather_key(version)).await? {
            Some(stored) => json::decode(&stored.value, "the stored gathering record").map_err(Status::internal),
            None => Ok(GatherRecord { dataset_version: version.to_string(), ..Default::default() }),
        }
    }

    fn show_gathering(&self, record: &GatherRecord) {
        self.update(|s| {
            if s.phase != TrainPhase::Training {
                s.dataset_version = Some(record.dataset_version.clone());
                s.batches_received = record.received.len() as u32;
                s.batches_expected = record.expected();
                if record.model_version.is_none() {
                    s.phase = TrainPhase::Gathering;
                }
            }
        });
    }

    fn spawn_training(&self, version: String) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(error) = this.train_version(&version).await {
                tracing::error!(dataset_version = %version, error = %error.message(), "training failed");
            }
        });
    }

    async fn train_version(&self, version: &str) -> Result<(), Status> {
        let _training = self.inner.training_lock.lock().await;
        let record = self.load_record(version).await?;
        let Some(end) = record.end.clone() else { return Ok(()) };
        if record.model_version.is_some() {
            return Ok(());
        }
        self.update(|s| {
            s.phase = TrainPhase::Training;
            s.dataset_version = Some(version.to_string());
            s.epoch = 0;
        });
        let train_set = self.load_split(version, Split::Train, end.counts.train_batches).await?;
        let test_set = self.load_split(version, Split::Test, end.counts.test_batches).await?;
        let config = self.inner.config.clone();
        let device = self.inner.device.clone();
        let this = self.clone();
        let started = Instant::now();
        let version_owned = version.to_string();
        let trained = tokio::task::spawn_blocking(move || {
            let model = tandem_model::train(&train_set, &config, &device, |progress| {
                tracing::info!(
                    dataset_version = %version_owned,
                    epoch = progress.epoch,
                    epochs = progress.epochs,
                    loss = progress.loss,
                    train_accuracy = progress.train_accuracy,
                    "epoch done"
                );
                this.update(|s| {
                    s.epoch = progress.epoch as u32;
                    s.epochs = progress.epochs as u32;
                    s.loss = progress.loss;
                });
            })?;
            let on_test = model.evaluate(&test_set)?;
            let on_train = model.evaluate(&train_set)?;
            Ok::<_, tandem_model::ModelError>((model.to_bytes()?, model.config().clone(), on_test, on_train))
        })
        .await
        .map_err(|e| Status::internal(format!("the training task failed: {e}")))?;
        let (bytes, mlp, on_test, on_train) =
            trained.map_err(|e| Status::internal(format!("training on {version} failed: {e}")))?;
        let training_seconds = started.elapsed().as_secs_f64();

        let sidecar = &self.inner.sidecar;
        let (sequence, model_version) = registry::next_version(sidecar).await?;
        let entry = ModelEntry {
            model_version: model_version.clone(),
            sequence,
            dataset_version: version.to_string(),
            created_at: now_rfc3339(),
            feature_count: mlp.num_features as u32,
            class_count: mlp.num_classes as u32,
            hidden: mlp.hidden.iter().map(|h| *h as u32).collect(),
            weights: weights::encode(&bytes),
            preprocessing: end.scaler.clone(),
            metrics: ModelMetrics {
                test_accuracy: on_test.accuracy,
                train_accuracy: on_train.accuracy,
                final_loss: self.status().loss,
                train_samples: on_train.samples as u32,
                test_samples: on_test.samples as u32,
                training_seconds,
            },
            training: TrainingParams {
                epochs: self.inner.config.epochs as u32,
                seed: self.inner.config.seed,
                learning_rate: self.inner.config.learning_rate,
                batch_size: self.inner.config.batch_size as u32,
            },
        };
        registry::store(sidecar, &entry).await?;
        {
            let _guard = self.inner.gather_lock.lock().await;
            let mut record = self.load_record(version).await?;
            record.model_version = Some(model_version.clone());
            sidecar.save_state(STATE_STORE, &gather_key(version), json::encode(&record)).await?;
        }
        tracing::info!(
            model_version = %model_version,
            dataset_version = version,
            test_accuracy = on_test.accuracy,
            train_accuracy = on_train.accuracy,
            seconds = training_seconds,
            "model trained and registered"
        );
        self.update(|s| {
            s.phase = TrainPhase::Ready;
            s.test_accuracy = Some(on_test.accuracy);
            s.model_version = Some(model_version.clone());
        });
        let ready = ModelReady {
            model_version,
            sequence,
            dataset_version: version.to_string(),
            test_accuracy: on_test.accuracy,
        };
        let data = json::encode(&ready);
        let mut delay = Duration::from_millis(100);
        while let Err(status) = sidecar.publish(PUBSUB, topics::MODEL_READY, data.clone(), JSON).await {
            tracing::warn!(error = %status.message(), "publishing model.ready failed; retrying in {delay:?}");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        Ok(())
    }

    async fn load_split(&self, version: &str, split: Split, batches: u32) -> Result<Dataset, Status> {
        let mut rows = Vec::new();
        let mut labels = Vec::new();
        for index in 0..batches {
            let key = stored_batch_key(version, split, index);
            let stored = self
                .inner
                .sidecar
                .get_state(STATE_STORE, &key)
                .await?
                .ok_or_else(|| Status::internal(format!("batch {key} is missing from state")))?;
            let batch: Batch = json::decode(&stored.value, "a stored batch").map_err(Status::internal)?;
            rows.extend(batch.features);
            labels.extend(batch.labels);
        }
        Dataset::from_rows(&rows, labels)
            .map_err(|e| Status::internal(format!("the {split} split of {version} is unusable: {e}")))
    }
}
