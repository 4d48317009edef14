//! The ingest service: publishes the prepared dataset and answers `status` and `probe_ack`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_pipeline::messages::{
    DatasetManifest, IngestPhase, IngestStatus, JSON, PUBSUB, RawMessage, STATE_STORE, app_ids, methods, topics,
};
use tandem_pipeline::{arrow_batch, json, probe};
use tandem_sdk::{AppServer, Code, SidecarClient, Status};

use crate::Prepared;

/// Batches read ahead of the one being published.
const READ_AHEAD: usize = 8;

/// The ingest service; clones share one state.
#[derive(Clone)]
pub struct Ingest {
    inner: Arc<Inner>,
}

struct Inner {
    prepared: Prepared,
    sidecar: SidecarClient,
    status: Mutex<IngestStatus>,
}

impl Ingest {
    pub fn new(prepared: Prepared, sidecar: SidecarClient) -> Ingest {
        let status = IngestStatus {
            phase: IngestPhase::Publishing,
            dataset_version: prepared.manifest.dataset_version.clone(),
            published_batches: 0,
            total_batches: prepared.manifest.counts.total_batches(),
        };
        Ingest { inner: Arc::new(Inner { prepared, sidecar, status: Mutex::new(status) }) }
    }

    pub fn status(&self) -> IngestStatus {
        self.inner.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The callback API: `status` and `probe_ack`.
    pub fn app_server(&self) -> AppServer {
        let (status, acks) = (self.clone(), self.clone());
        AppServer::new()
            .handler(methods::STATUS, move |_| {
                let status = status.status();
                async move { json::reply(&status) }
            })
            .handler(methods::PROBE_ACK, move |call| {
                let ingest = acks.clone();
                async move { probe::record_ack(&ingest.inner.sidecar, &call.data).await }
            })
    }

    /// Publishes every batch and the end marker (unless a previous run already did), recording
    /// the manifest in state before and after.
    pub async fn publish(&self) -> Result<(), Status> {
        let sidecar = &self.inner.sidecar;
        let prepared = &self.inner.prepared;
        let version = prepared.manifest.dataset_version.clone();
        let key = format!("manifest/{version}");
        let stored = retrying("reading the manifest", || sidecar.get_state(STATE_STORE, &key)).await?;
        if let Some(stored) = stored
            && json::decode::<DatasetManifest>(&stored.value, "the stored manifest").is_ok_and(|m| m.complete)
        {
            tracing::info!(dataset_version = %version, "this dataset was published completely before; not again");
            self.update(|s| {
                s.published_batches = s.total_batches;
                s.phase = IngestPhase::Done;
            });
            return Ok(());
        }
        probe::wait_for_subscriber(sidecar, topics::DATASET_RAW, app_ids::INGEST, Duration::from_secs(1), |probe| {
            json::encode(&RawMessage::Probe(probe))
        })
        .await;
        self.save_manifest(&prepared.manifest).await?;
        // The second pass reads on a blocking thread, a few batches ahead of the publishing.
        let (batches, mut read) = tokio::sync::mpsc::channel(READ_AHEAD);
        let reading = prepared.clone();
        let reader = tokio::task::spawn_blocking(move || {
            let all = match reading.batches() {
                Ok(all) => all,
                Err(error) => return drop(batches.blocking_send(Err(error))),
            };
            for batch in all {
                // Closed: publishing failed and stopped reading.
                if batches.blocking_send(batch).is_err() {
                    break;
                }
            }
        });
        while let Some(batch) = read.recv().await {
            let batch = batch.map_err(|error| Status::failed_precondition(error.to_string()))?;
            let data = arrow_batch::encode(&batch, Some(&prepared.scaler));
            retrying("publishing a batch", || {
                sidecar.publish(PUBSUB, topics::DATASET_RAW, data.clone(), arrow_batch::ARROW_STREAM)
            })
            .await?;
            self.update(|s| s.published_batches += 1);
        }
        reader.await.map_err(|e| Status::internal(format!("reading the dataset: {e}")))?;
        let end = json::encode(&RawMessage::End(prepared.end_marker()));
        retrying("publishing the end marker", || sidecar.publish(PUBSUB, topics::DATASET_RAW, end.clone(), JSON))
            .await?;
        let manifest = DatasetManifest { complete: true, ..prepared.manifest.clone() };
        self.save_manifest(&manifest).await?;
        self.update(|s| s.phase = IngestPhase::Done);
        tracing::info!(dataset_version = %version, batches = prepared.manifest.counts.total_batches(), "dataset published");
        Ok(())
    }

    async fn save_manifest(&self, manifest: &DatasetManifest) -> Result<(), Status> {
        let sidecar = &self.inner.sidecar;
        let data = json::encode(manifest);
        let key = format!("manifest/{}", manifest.dataset_version);
        retrying("saving the manifest", || sidecar.save_state(STATE_STORE, &key, data.clone())).await?;
        retrying("saving the manifest", || sidecar.save_state(STATE_STORE, "manifest/latest", data.clone())).await
    }

    fn update(&self, change: impl FnOnce(&mut IngestStatus)) {
        change(&mut self.inner.status.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// Runs `call` until it succeeds or fails for a reason retrying cannot fix; transient failures
/// (the sidecar not ready, a full backlog) are retried with backoff and logged.
async fn retrying<T, F, Fut>(what: &str, mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(status) if matches!(status.code(), Code::Unavailable | Code::ResourceExhausted | Code::Unknown) => {
                tracing::warn!(error = %status.message(), "{what} failed; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(status) => return Err(status),
        }
    }
}
