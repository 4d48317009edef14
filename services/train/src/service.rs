//! The train service: gathering batches (kept here, counted in shared state), training each complete dataset as
//! a replica of the training group, registering the run's one model, `get_model`, `status`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tandem_model::{Dataset, Device, Standardizer, TrainingConfig};
use tandem_pipeline::messages::{
    Batch, FeatureMessage, FeaturesEnd, GetModelRequest, JSON, ModelEntry, ModelMetrics, ModelReady, PUBSUB,
    ScalerParams, Split, TrainPhase, TrainStatus, TrainingParams, methods, topics,
};
use tandem_pipeline::{arrow_batch, json, probe, service::now_rfc3339, weights};
use tandem_sdk::{AppServer, Code, EventOutcome, Reply, SidecarClient, Status, TopicEvent};

use crate::gather::{self, GatherRecord, Keeper};
use crate::progress::{Board, StepLog};
use crate::registry;
use crate::replica::{self, GroupSettings, Run, TrainError, Trained};

/// How often a replica looks for a complete dataset that has no model yet (one whose last
/// batches another replica received, or one a dead replica was training).
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// How long a replica waits before training a dataset again after its training failed.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// The train service; clones share one state.
#[derive(Clone)]
pub struct Train {
    inner: Arc<Inner>,
}

struct Inner {
    sidecar: SidecarClient,
    /// This replica as a keeper of batches, once announced (the sidecar must be up).
    keeper: tokio::sync::OnceCell<Keeper>,
    config: TrainingConfig,
    device: Device,
    group: GroupSettings,
    step_log: Option<StepLog>,
    board: Board,
    /// One training at a time.
    training_lock: tokio::sync::Mutex<()>,
    /// The dataset version being trained, and the last one whose training failed (and when).
    training: Mutex<Option<String>>,
    failed: Mutex<Option<(String, Instant)>>,
}

/// A dataset ready to train on: both splits standardized, with the scaler that did it.
pub struct Prepared {
    pub dataset_version: String,
    pub train_set: Dataset,
    pub test_set: Dataset,
    pub scaler: ScalerParams,
}

impl Prepared {
    /// Splits `data` by `seed` and standardizes both sides with a scaler fitted on the train
    /// side, as ingest and preprocess do in the pipeline (train on its own, `--dataset`).
    pub fn from_dataset(data: &Dataset, test_fraction: f64, seed: u64, device: &Device) -> Result<Prepared, String> {
        let split = data.split(test_fraction, seed).map_err(|e| e.to_string())?;
        let standardizer = Standardizer::fit(&split.train, device);
        let train_set = standardizer.transform(&split.train, device).map_err(|e| e.to_string())?;
        let test_set = standardizer.transform(&split.test, device).map_err(|e| e.to_string())?;
        let mut hasher = Sha256::new();
        hasher.update(b"tandem-train-dataset-v1");
        hasher.update(split.train.version());
        hasher.update(split.test.version());
        let dataset_version = hasher.finalize().iter().take(16).map(|byte| format!("{byte:02x}")).collect();
        let scaler = ScalerParams { mean: standardizer.mean, std: standardizer.std, samples: split.train.len() as u64 };
        Ok(Prepared { dataset_version, train_set, test_set, scaler })
    }
}

impl Train {
    pub fn new(
        sidecar: SidecarClient,
        config: TrainingConfig,
        device: Device,
        group: GroupSettings,
        step_log: Option<StepLog>,
    ) -> Train {
        let board = Board::new(config.epochs as u32);
        Train {
            inner: Arc::new(Inner {
                sidecar,
                keeper: tokio::sync::OnceCell::new(),
                config,
                device,
                group,
                step_log,
                board,
                training_lock: tokio::sync::Mutex::new(()),
                training: Mutex::new(None),
                failed: Mutex::new(None),
            }),
        }
    }

    pub fn status(&self) -> TrainStatus {
        self.inner.board.get()
    }

    pub fn app_server(&self) -> AppServer {
        let (status, models, batches, events) = (self.clone(), self.clone(), self.clone(), self.clone());
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
            .handler(gather::READ_BATCH, move |call| {
                let this = batches.clone();
                async move {
                    let key = String::from_utf8_lossy(&call.data).into_owned();
                    match gather::read_kept(&this.inner.sidecar, &key).await? {
                        Some(bytes) => Ok(Reply::bytes(bytes)),
                        None => Err(Status::not_found(format!("batch {key} is not kept by this replica"))),
                    }
                }
            })
            .subscribe(PUBSUB, topics::DATASET_FEATURES, move |event| {
                let this = events.clone();
                async move { this.on_event(event).await }
            })
    }

    /// Shows the latest model, then keeps looking for a complete dataset without a model (one
    /// this replica gathered, one another replica completed, or one a dead replica was
    /// training) and trains it. Runs until the process ends.
    pub async fn watch_datasets(&self) {
        // Announced first, so that peers find the batches kept here from an earlier run of
        // this replica (a restart on the same data dir) even before a new batch arrives.
        while let Err(status) = self.keeper().await {
            tracing::warn!(error = %status.message(), "cannot announce this replica's batch store yet; trying again");
            tokio::time::sleep(WATCH_EVERY).await;
        }
        match registry::get(&self.inner.sidecar, None).await {
            Ok(entry) => self.show_model(&entry),
            Err(status) if status.code() == Code::NotFound => {}
            Err(status) => tracing::warn!(error = %status.message(), "cannot read the model registry yet"),
        }
        loop {
            if let Err(status) = self.look_for_work().await {
                tracing::debug!(error = %status.message(), "looking for a dataset to train failed; trying again");
            }
            tokio::time::sleep(WATCH_EVERY).await;
        }
    }

    /// This replica as a keeper of batches (announced on first use).
    async fn keeper(&self) -> Result<&Keeper, Status> {
        self.inner.keeper.get_or_try_init(|| Keeper::announce(&self.inner.sidecar)).await
    }

    async fn look_for_work(&self) -> Result<(), Status> {
        self.keeper().await?.follow_restarts(&self.inner.sidecar).await?;
        let Some(version) = gather::current(&self.inner.sidecar).await? else { return Ok(()) };
        let record = gather::load(&self.inner.sidecar, &version).await?;
        self.show_gathering(&record);
        if record.is_complete() && record.model_version.is_none() {
            self.spawn_training(version);
        }
        Ok(())
    }

    async fn on_event(&self, event: TopicEvent) -> EventOutcome {
        let malformed = |id: &str, error: String| {
            tracing::error!(id = %id, %error, "dropping a malformed dataset.features event");
            EventOutcome::Drop
        };
        let result = if event.data_content_type == arrow_batch::ARROW_STREAM {
            match arrow_batch::decode(&event.data) {
                Ok(batch) => self.on_batch(batch, event.data).await,
                Err(error) => return malformed(&event.id, error),
            }
        } else {
            match json::decode::<FeatureMessage>(&event.data, "a dataset.features event") {
                Ok(FeatureMessage::Probe(probe)) => probe::acknowledge(&self.inner.sidecar, &probe).await,
                Ok(FeatureMessage::End(end)) => self.on_end(end).await,
                Err(error) => return malformed(&event.id, error),
            }
        };
        match result {
            Ok(()) => EventOutcome::Success,
            Err(status) => {
                tracing::warn!(id = %event.id, error = %status.message(), "handling a dataset.features event failed; it will be retried");
                EventOutcome::Retry
            }
        }
    }

    /// `ipc`: the batch as it came, stored as is.
    async fn on_batch(&self, batch: Batch, ipc: Vec<u8>) -> Result<(), Status> {
        let ok_shape = !batch.features.is_empty()
            && batch.features.len() == batch.labels.len()
            && batch.batch_index < batch.batch_count
            && batch.features.iter().all(|row| row.len() == batch.feature_count as usize);
        if !ok_shape {
            tracing::error!(batch = %batch.key(), "dropping a malformed feature batch");
            return Ok(());
        }
        if let Some((before, after)) =
            gather::store_batch(&self.inner.sidecar, self.keeper().await?, &batch, ipc).await?
        {
            self.progressed(&batch.dataset_version, &before, &after);
        }
        Ok(())
    }

    async fn on_end(&self, end: FeaturesEnd) -> Result<(), Status> {
        let version = end.dataset_version.clone();
        self.record_progress(&version, |record| record.end = Some(end.clone())).await
    }

    /// Applies `change` to the dataset's shared record; starts training once it is complete.
    async fn record_progress(&self, version: &str, change: impl Fn(&mut GatherRecord)) -> Result<(), Status> {
        let (before, after) = gather::update(&self.inner.sidecar, version, change).await?;
        self.progressed(version, &before, &after);
        Ok(())
    }

    /// Shows the record's progress; starts training when this change completed the dataset.
    fn progressed(&self, version: &str, before: &GatherRecord, after: &GatherRecord) {
        self.show_gathering(after);
        if after.is_complete() && !before.is_complete() && after.model_version.is_none() {
            tracing::info!(dataset_version = version, batches = after.batches_stored, "dataset complete; training");
            self.spawn_training(version.to_string());
        }
    }

    fn show_gathering(&self, record: &GatherRecord) {
        self.inner.board.update(|s| {
            if s.phase == TrainPhase::Training {
                return;
            }
            // This replica has the model of this dataset already, while the shared record may
            // not say so yet (the replica that records it is a moment behind).
            let trained_here =
                s.phase == TrainPhase::Ready && s.dataset_version.as_deref() == Some(record.dataset_version.as_str());
            s.dataset_version = Some(record.dataset_version.clone());
            s.batches_received = record.batches_stored;
            s.batches_expected = record.expected();
            match &record.model_version {
                None if trained_here => {}
                None => s.phase = TrainPhase::Gathering,
                Some(version) if s.model_version.as_ref() != Some(version) => {
                    s.phase = TrainPhase::Ready;
                    s.model_version = Some(version.clone());
                }
                Some(_) => {}
            }
        });
    }

    fn show_model(&self, entry: &ModelEntry) {
        self.inner.board.update(|s| {
            s.phase = TrainPhase::Ready;
            s.model_version = Some(entry.model_version.clone());
            s.test_accuracy = Some(entry.metrics.test_accuracy);
            s.loss = entry.metrics.final_loss;
            s.epoch = entry.training.epochs;
            s.dataset_version = Some(entry.dataset_version.clone());
        });
    }

    /// Trains `version` on a task of its own, unless it is being trained, or failed here a
    /// moment ago.
    fn spawn_training(&self, version: String) {
        {
            let mut training = self.inner.training.lock().unwrap_or_else(|p| p.into_inner());
            if training.is_some() {
                return;
            }
            let failed = self.inner.failed.lock().unwrap_or_else(|p| p.into_inner());
            if failed.as_ref().is_some_and(|(v, at)| *v == version && at.elapsed() < RETRY_AFTER) {
                return;
            }
            *training = Some(version.clone());
        }
        let this = self.clone();
        tokio::spawn(async move {
            let outcome = this.train_version(&version).await;
            *this.inner.training.lock().unwrap_or_else(|p| p.into_inner()) = None;
            if let Err(error) = outcome {
                tracing::error!(dataset_version = %version, %error, "training failed");
                this.inner.board.waiting(&format!("training failed: {error}"));
                *this.inner.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some((version, Instant::now()));
            }
        });
    }

    async fn train_version(&self, version: &str) -> Result<(), TrainError> {
        let _training = self.inner.training_lock.lock().await;
        let sidecar = &self.inner.sidecar;
        let failed = |what: &'static str| move |status: Status| TrainError::Group(what, status.message().to_string());
        let record = gather::load(sidecar, version).await.map_err(failed("reading the dataset"))?;
        let Some(end) = record.end.clone() else { return Ok(()) };
        if record.model_version.is_some() {
            return Ok(());
        }
        self.inner.board.update(|s| s.dataset_version = Some(version.to_string()));
        let keeper = self.keeper().await.map_err(failed("announcing this replica's batch store"))?;
        let counts = &end.counts;
        let train_set =
            gather::load_split(sidecar, keeper, version, Split::Train, counts.train_batches, counts.train_samples)
                .await
                .map_err(failed("reading the train split"))?;
        let test_set =
            gather::load_split(sidecar, keeper, version, Split::Test, counts.test_batches, counts.test_samples)
                .await
                .map_err(failed("reading the test split"))?;
        let prepared = Prepared { dataset_version: version.to_string(), train_set, test_set, scaler: end.scaler };
        let Some(entry) = self.train_run(prepared).await? else { return Ok(()) };
        gather::update(sidecar, version, |record| record.model_version = Some(entry.model_version.clone()))
            .await
            .map_err(failed("recording the model"))?;
        Ok(())
    }

    /// Trains a dataset given on the command line (`--dataset`), without the pipeline.
    pub async fn train_standalone(&self, prepared: Prepared) -> Result<Option<ModelEntry>, TrainError> {
        let _training = self.inner.training_lock.lock().await;
        self.inner.board.update(|s| {
            s.dataset_version = Some(prepared.dataset_version.clone());
            s.batches_expected = None;
        });
        let outcome = self.train_run(prepared).await;
        if let Err(error) = &outcome {
            self.inner.board.waiting(&format!("training failed: {error}"));
        }
        outcome
    }

    /// Trains `prepared` as a replica of the group, then registers the run's model (whichever
    /// replica gets there first) and announces it. `None` when other replicas finished the run.
    async fn train_run(&self, prepared: Prepared) -> Result<Option<ModelEntry>, TrainError> {
        let inner = &self.inner;
        let started = Instant::now();
        let run = Run::new(&prepared.dataset_version, Arc::new(prepared.train_set), &inner.config);
        let sidecar = inner.sidecar.clone();
        let run_id = run.id.clone();
        let done_elsewhere = || {
            let (sidecar, run_id) = (sidecar.clone(), run_id.clone());
            async move { matches!(registry::claimed(&sidecar, &run_id).await, Ok(Some(_))) }
        };
        if done_elsewhere().await {
            return Ok(None);
        }
        let trained = replica::train(
            &inner.sidecar,
            &run,
            &inner.device,
            &inner.group,
            &inner.board,
            inner.step_log.as_ref(),
            done_elsewhere,
        )
        .await?;
        let Some(Trained { trainer, state }) = trained else {
            self.show_registered(&run.id).await;
            return Ok(None);
        };
        let (train_set, test_set) = (run.train_set.clone(), Arc::new(prepared.test_set));
        let (bytes, on_test, on_train) = tokio::task::spawn_blocking(move || {
            let model = trainer.classifier(&state)?;
            Ok::<_, tandem_model::ModelError>((
                model.to_bytes()?,
                model.evaluate(&test_set)?,
                model.evaluate(&train_set)?,
            ))
        })
        .await
        .map_err(|e| TrainError::Task(e.to_string()))??;
        let mlp = &run.model;
        let entry = ModelEntry {
            model_version: String::new(),
            sequence: 0,
            dataset_version: run.dataset_version.clone(),
            created_at: now_rfc3339(),
            feature_count: mlp.num_features as u32,
            class_count: mlp.num_classes as u32,
            hidden: mlp.hidden.iter().map(|h| *h as u32).collect(),
            weights: weights::encode(&bytes),
            preprocessing: prepared.scaler,
            metrics: ModelMetrics {
                test_accuracy: on_test.accuracy,
                train_accuracy: on_train.accuracy,
                final_loss: self.status().loss,
                train_samples: on_train.samples as u32,
                test_samples: on_test.samples as u32,
                training_seconds: started.elapsed().as_secs_f64(),
            },
            training: TrainingParams {
                epochs: inner.config.epochs as u32,
                seed: inner.config.seed,
                learning_rate: inner.config.learning_rate,
                batch_size: inner.config.batch_size as u32,
            },
        };
        let (entry, claimed) = registry::register_once(&inner.sidecar, &run.id, entry)
            .await
            .map_err(|status| TrainError::Group("registering the model", status.message().to_string()))?;
        tracing::info!(
            model_version = %entry.model_version,
            dataset_version = %entry.dataset_version,
            test_accuracy = entry.metrics.test_accuracy,
            registered_here = claimed,
            seconds = started.elapsed().as_secs_f64(),
            "model trained; the run's model is in the registry"
        );
        self.show_model(&entry);
        self.announce(&entry).await;
        Ok(Some(entry))
    }

    /// After other replicas finished the run: show the model they registered.
    async fn show_registered(&self, run: &str) {
        if let Ok(Some(version)) = registry::claimed(&self.inner.sidecar, run).await
            && let Ok(entry) = registry::get(&self.inner.sidecar, Some(&version)).await
        {
            self.show_model(&entry);
        }
    }

    /// Publishes `model.ready`. Every replica that finishes announces the run's one version
    /// (serve takes a version once), so the announcement survives the death of any of them.
    async fn announce(&self, entry: &ModelEntry) {
        let ready = ModelReady {
            model_version: entry.model_version.clone(),
            sequence: entry.sequence,
            dataset_version: entry.dataset_version.clone(),
            test_accuracy: entry.metrics.test_accuracy,
        };
        let data = json::encode(&ready);
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=20 {
            match self.inner.sidecar.publish(PUBSUB, topics::MODEL_READY, data.clone(), JSON).await {
                Ok(()) => return,
                Err(status) if attempt == 20 => {
                    tracing::error!(error = %status.message(), "could not publish model.ready; the model stays in the registry");
                }
                Err(status) => {
                    tracing::warn!(error = %status.message(), "publishing model.ready failed; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
