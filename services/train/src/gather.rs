//! Gathering a dataset's feature batches. A batch is kept by the replica that received it,
//! in its sidecar's local store ([`BATCH_STORE`], sled on that replica's disk:
//! `batch/VERSION/SPLIT/INDEX`, the Arrow IPC stream as it came). Train's shared store (etcd)
//! holds only small records: where each batch is kept (`stored/VERSION/SPLIT/INDEX`, the
//! keeper's store id), where each keeper runs now (`keeper/STORE_ID`, its instance id), and the
//! dataset's progress (`gather/VERSION`: how many batches are in, the end marker), updated by
//! compare-and-swap because every replica gathers the batches it happens to receive. A batch's
//! marker and the count are written in one transaction, so a redelivered batch is counted
//! once. `gather/current` names the dataset whose record was created last.
//!
//! A replica that trains a dataset reads every batch: its own from its store, the others from
//! their keepers (`read_batch`, an invocation pinned to the keeper's instance), keeping a copy,
//! so a keeper that dies later takes nothing away from it. A store id outlives the replica's
//! process: a replica restarted on the same data dir keeps its batches and announces its new
//! instance under the same id. Etcd so carries kilobytes per dataset however large the data,
//! and a batch is written to one disk as it arrives.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tandem_model::Dataset;
use tandem_pipeline::messages::{Batch, FeaturesEnd, STATE_STORE, Split, batch_key};
use tandem_pipeline::{arrow_batch, json};
use tandem_sdk::{CallOptions, Code, ConditionalWrite, SidecarClient, Status, WriteCondition};

pub const CURRENT: &str = "gather/current";

/// Each replica's own store of the batches it keeps (`components/train/batchstore.yaml`).
pub const BATCH_STORE: &str = "batches";

/// The method a keeper answers with a batch it keeps (data: the batch's `VERSION/SPLIT/INDEX`).
pub const READ_BATCH: &str = "read_batch";

/// Where a replica keeps its store id in its own store.
const STORE_ID_KEY: &str = "store-id";

/// How long a keeper may take to answer with one batch.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Attempts at a compare-and-swap of a record before giving up.
const SWAP_ATTEMPTS: usize = 50;

/// What train knows about one dataset version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GatherRecord {
    pub dataset_version: String,
    /// How many distinct batches are stored.
    #[serde(default)]
    pub batches_stored: u32,
    pub end: Option<FeaturesEnd>,
    /// Set once a model was trained on it.
    pub model_version: Option<String>,
}

impl GatherRecord {
    pub fn expected(&self) -> Option<u32> {
        self.end.as_ref().map(|end| end.counts.total_batches())
    }

    pub fn is_complete(&self) -> bool {
        self.expected().is_some_and(|expected| self.batches_stored >= expected)
    }
}

fn record_key(version: &str) -> String {
    format!("gather/{version}")
}

fn stored_batch_key(key: &str) -> String {
    format!("batch/{key}")
}

fn marker_key(key: &str) -> String {
    format!("stored/{key}")
}

fn keeper_key(store_id: &str) -> String {
    format!("keeper/{store_id}")
}

/// This replica as a keeper of batches: its store id (kept in its own store, so it survives a
/// restart on the same data dir) and the app-id its peers invoke.
#[derive(Debug, Clone)]
pub struct Keeper {
    pub store_id: String,
    pub app_id: String,
    /// Batches arrive many at a time; counted one at a time here, they never race each other
    /// for the dataset's record (which cost up to 50 compare-and-swap rounds each).
    counting: Arc<tokio::sync::Mutex<()>>,
    /// The instance announced last under the store id.
    announced: Arc<tokio::sync::Mutex<String>>,
}

impl Keeper {
    /// Reads (or, on the first start with this data dir, creates) the store id, and announces
    /// under it the instance that runs now.
    pub async fn announce(sidecar: &SidecarClient) -> Result<Keeper, Status> {
        let metadata = sidecar.metadata().await?;
        let instance_id = sidecar.instance_id().await?;
        // The first instance's id is unique, and so serves as the store's id from then on.
        let store_id = match sidecar.get_state(BATCH_STORE, STORE_ID_KEY).await? {
            Some(stored) => String::from_utf8_lossy(&stored.value).into_owned(),
            None => {
                sidecar.save_state(BATCH_STORE, STORE_ID_KEY, instance_id.clone().into_bytes()).await?;
                instance_id.clone()
            }
        };
        sidecar.save_state(STATE_STORE, &keeper_key(&store_id), instance_id.clone().into_bytes()).await?;
        Ok(Keeper {
            store_id,
            app_id: metadata.id,
            counting: Arc::default(),
            announced: Arc::new(tokio::sync::Mutex::new(instance_id)),
        })
    }

    /// Announces the instance again when it changed: the sidecar restarted beside this process
    /// (a new instance id), and peers must find the batches kept here under the new one.
    pub async fn follow_restarts(&self, sidecar: &SidecarClient) -> Result<(), Status> {
        let instance_id = sidecar.instance_id().await?;
        let mut announced = self.announced.lock().await;
        if *announced != instance_id {
            sidecar.save_state(STATE_STORE, &keeper_key(&self.store_id), instance_id.clone().into_bytes()).await?;
            tracing::info!(store_id = %self.store_id, instance = %instance_id, "announced this replica's batch store anew");
            *announced = instance_id;
        }
        Ok(())
    }
}

/// The batch `key` (`VERSION/SPLIT/INDEX`) from this replica's own store, if it keeps it.
pub async fn read_kept(sidecar: &SidecarClient, key: &str) -> Result<Option<Vec<u8>>, Status> {
    Ok(sidecar.get_state(BATCH_STORE, &stored_batch_key(key)).await?.map(|entry| entry.value))
}

/// The record of `version` (an empty one when none is stored) and its ETag.
async fn load_with_etag(sidecar: &SidecarClient, version: &str) -> Result<(GatherRecord, Option<String>), Status> {
    match sidecar.get_state(STATE_STORE, &record_key(version)).await? {
        Some(stored) => Ok((
            json::decode(&stored.value, "the stored gathering record").map_err(Status::internal)?,
            Some(stored.etag),
        )),
        None => Ok((GatherRecord { dataset_version: version.to_string(), ..Default::default() }, None)),
    }
}

pub async fn load(sidecar: &SidecarClient, version: &str) -> Result<GatherRecord, Status> {
    Ok(load_with_etag(sidecar, version).await?.0)
}

/// The dataset gathered last, if any.
pub async fn current(sidecar: &SidecarClient) -> Result<Option<String>, Status> {
    Ok(sidecar.get_state(STATE_STORE, CURRENT).await?.map(|e| String::from_utf8_lossy(&e.value).into_owned()))
}

/// Applies `change` to the record of `version` by compare-and-swap (again on a conflict with
/// another replica), marks it current, and returns the record before and after.
pub async fn update(
    sidecar: &SidecarClient,
    version: &str,
    change: impl Fn(&mut GatherRecord),
) -> Result<(GatherRecord, GatherRecord), Status> {
    for _ in 0..SWAP_ATTEMPTS {
        let (before, etag) = load_with_etag(sidecar, version).await?;
        let mut after = before.clone();
        change(&mut after);
        let data = json::encode(&after);
        let saved = match &etag {
            Some(etag) => {
                match sidecar.save_state_with(STATE_STORE, &record_key(version), data, Some(etag), None).await {
                    Ok(()) => true,
                    Err(status) if status.code() == Code::Aborted => false,
                    Err(status) => return Err(status),
                }
            }
            None => sidecar.save_state_if_absent(STATE_STORE, &record_key(version), data).await?,
        };
        if saved {
            if etag.is_none() {
                mark_current(sidecar, version).await?;
            }
            return Ok((before, after));
        }
    }
    Err(Status::aborted(format!("the gathering record of {version} kept changing; will retry")))
}

async fn mark_current(sidecar: &SidecarClient, version: &str) -> Result<(), Status> {
    sidecar.save_state(STATE_STORE, CURRENT, version.as_bytes().to_vec()).await
}

/// Keeps `batch` as it came (`ipc`: its Arrow IPC stream) in this replica's store, and counts
/// it in the dataset's shared record with a marker naming this keeper: the record before and
/// after, or `None` when the batch had been counted already (a redelivery, whichever replica
/// took it first).
pub async fn store_batch(
    sidecar: &SidecarClient,
    keeper: &Keeper,
    batch: &Batch,
    ipc: Vec<u8>,
) -> Result<Option<(GatherRecord, GatherRecord)>, Status> {
    let version = &batch.dataset_version;
    let key = batch.key();
    // Idempotent: a redelivered batch writes the same bytes again.
    sidecar.save_state(BATCH_STORE, &stored_batch_key(&key), ipc).await?;
    let marker = marker_key(&key);
    let _one_at_a_time = keeper.counting.lock().await;
    for _ in 0..SWAP_ATTEMPTS {
        let (before, etag) = load_with_etag(sidecar, version).await?;
        let after = GatherRecord { batches_stored: before.batches_stored + 1, ..before.clone() };
        let created = etag.is_none();
        let writes = vec![
            ConditionalWrite {
                key: marker.clone(),
                value: keeper.store_id.clone().into_bytes(),
                condition: WriteCondition::Absent,
            },
            ConditionalWrite {
                key: record_key(version),
                value: json::encode(&after),
                condition: etag.map_or(WriteCondition::Absent, WriteCondition::Etag),
            },
        ];
        if sidecar.write_state_atomically(STATE_STORE, writes).await? {
            if created {
                mark_current(sidecar, version).await?;
            }
            return Ok(Some((before, after)));
        }
        // Either the batch was counted already, or another replica changed the record.
        if sidecar.get_state(STATE_STORE, &marker).await?.is_some() {
            return Ok(None);
        }
    }
    Err(Status::aborted(format!("the gathering record of {version} kept changing; will retry")))
}

/// The batch `key`: from this replica's store, else from its keeper (then kept here too).
async fn read_batch(sidecar: &SidecarClient, keeper: &Keeper, key: &str) -> Result<Vec<u8>, Status> {
    if let Some(bytes) = read_kept(sidecar, key).await? {
        return Ok(bytes);
    }
    let store_id = sidecar
        .get_state(STATE_STORE, &marker_key(key))
        .await?
        .map(|entry| String::from_utf8_lossy(&entry.value).into_owned())
        .ok_or_else(|| Status::internal(format!("batch {key} is counted but no replica is recorded as keeping it")))?;
    let instance = sidecar
        .get_state(STATE_STORE, &keeper_key(&store_id))
        .await?
        .map(|entry| String::from_utf8_lossy(&entry.value).into_owned())
        .ok_or_else(|| {
            Status::internal(format!("batch {key} is kept by store {store_id}, which never announced itself"))
        })?;
    let options = CallOptions::default().instance(&instance).timeout(READ_TIMEOUT);
    let bytes = match sidecar.invoke_with(&keeper.app_id, READ_BATCH, key.as_bytes().to_vec(), options).await {
        Ok(response) => response.data,
        Err(status) => {
            return Err(Status::unavailable(format!(
                "batch {key} is kept by the replica with store {store_id} (instance {instance}), which did not \
                 give it ({}: {}); waiting for that replica to come back",
                status.code(),
                status.message()
            )));
        }
    };
    sidecar.save_state(BATCH_STORE, &stored_batch_key(key), bytes.clone()).await?;
    Ok(bytes)
}

/// The `batches` batches of one split (`samples` rows in all), read in order into one flat
/// buffer: this replica's own, and copies of the others' from their keepers.
pub async fn load_split(
    sidecar: &SidecarClient,
    keeper: &Keeper,
    version: &str,
    split: Split,
    batches: u32,
    samples: u32,
) -> Result<Dataset, Status> {
    let mut features: Vec<f32> = Vec::new();
    let mut labels: Vec<u32> = Vec::with_capacity(samples as usize);
    let mut feature_count = 0;
    for index in 0..batches {
        let key = batch_key(version, split, index);
        let bytes = read_batch(sidecar, keeper, &key).await?;
        let batch = arrow_batch::decode(&bytes).map_err(|e| Status::internal(format!("stored batch {key}: {e}")))?;
        if index == 0 {
            feature_count = batch.feature_count as usize;
            features.reserve_exact(samples as usize * feature_count);
        }
        for row in &batch.features {
            features.extend_from_slice(row);
        }
        labels.extend(batch.labels);
    }
    Dataset::from_flat(feature_count, features, labels)
        .map_err(|e| Status::internal(format!("the {split} split of {version} is unusable: {e}")))
}
