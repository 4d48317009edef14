//! Gathering a dataset's feature batches into train's shared state: each batch under
//! `batch/VERSION/SPLIT/INDEX`, a marker under `stored/VERSION/SPLIT/INDEX`, and the dataset's
//! progress under `gather/VERSION` (how many batches are in, the end marker), updated by
//! compare-and-swap because every replica gathers the batches it happens to receive. A batch's
//! marker and the count are written in one transaction, so a redelivered batch is counted
//! once and the record stays the same size however many batches there are. `gather/current`
//! names the dataset whose record was created last. Any replica, including one started later,
//! reads a complete dataset back from here.

use serde::{Deserialize, Serialize};
use tandem_model::Dataset;
use tandem_pipeline::messages::{Batch, FeaturesEnd, STATE_STORE, Split, batch_key};
use tandem_pipeline::{arrow_batch, json};
use tandem_sdk::{Code, ConditionalWrite, SidecarClient, Status, WriteCondition};

pub const CURRENT: &str = "gather/current";

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

fn stored_batch_key(version: &str, split: Split, index: u32) -> String {
    format!("batch/{}", batch_key(version, split, index))
}

fn marker_key(version: &str, split: Split, index: u32) -> String {
    format!("stored/{}", batch_key(version, split, index))
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

/// Stores `batch` as it came (`ipc`: its Arrow IPC stream), under its dataset, split and index,
/// and counts it in the dataset's record: the record before and after, or `None` when the
/// batch had been counted already (a redelivery, whichever replica took it first).
pub async fn store_batch(
    sidecar: &SidecarClient,
    batch: &Batch,
    ipc: Vec<u8>,
) -> Result<Option<(GatherRecord, GatherRecord)>, Status> {
    let version = &batch.dataset_version;
    // Idempotent: a redelivered batch writes the same bytes again.
    let key = stored_batch_key(version, batch.split, batch.batch_index);
    sidecar.save_state(STATE_STORE, &key, ipc).await?;
    let marker = marker_key(version, batch.split, batch.batch_index);
    for _ in 0..SWAP_ATTEMPTS {
        let (before, etag) = load_with_etag(sidecar, version).await?;
        let after = GatherRecord { batches_stored: before.batches_stored + 1, ..before.clone() };
        let created = etag.is_none();
        let writes = vec![
            ConditionalWrite { key: marker.clone(), value: b"1".to_vec(), condition: WriteCondition::Absent },
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

/// The `batches` batches of one split, read back in order.
pub async fn load_split(sidecar: &SidecarClient, version: &str, split: Split, batches: u32) -> Result<Dataset, Status> {
    let mut rows = Vec::new();
    let mut labels = Vec::new();
    for index in 0..batches {
        let key = stored_batch_key(version, split, index);
        let stored = sidecar
            .get_state(STATE_STORE, &key)
            .await?
            .ok_or_else(|| Status::internal(format!("batch {key} is missing from state")))?;
        let batch =
            arrow_batch::decode(&stored.value).map_err(|e| Status::internal(format!("stored batch {key}: {e}")))?;
        rows.extend(batch.features);
        labels.extend(batch.labels);
    }
    Dataset::from_rows(&rows, labels)
        .map_err(|e| Status::internal(format!("the {split} split of {version} is unusable: {e}")))
}
