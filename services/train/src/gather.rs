//! Gathering a dataset's feature batches. A batch is kept by the replica that received it,
//! in its sidecar's local store ([`BATCH_STORE`], sled on that replica's disk:
//! `batch/VERSION/SPLIT/INDEX`, the Arrow IPC stream as it came). Train's shared store (etcd)
//! holds only small records: where each batch is kept (`stored/VERSION/SPLIT/INDEX`, the
//! keeper's store id), where each keeper runs now (`keeper/STORE_ID`, its instance id), and the
//! dataset's progress (`gather/VERSION`: how many batches are in, the end marker), updated by
//! compare-and-swap because every replica gathers the batches it happens to receive. A batch's
//! marker and the count are written in one transaction, so a redelivered batch is counted
//! once; the batches that arrive while one transaction is in flight are counted together in
//! the next (group commit, [`Counter`]). `gather/current` names the dataset whose record was
//! created last.
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
use tokio::sync::oneshot;

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
    /// Counts the batches this replica keeps in the datasets' shared records.
    counter: Arc<Counter>,
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
            counter: Arc::default(),
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
            // Created and marked current in one transaction: a record is never left unnamed.
            None => {
                let writes = vec![
                    ConditionalWrite { key: record_key(version), value: data, condition: WriteCondition::Absent },
                    current_write(version),
                ];
                sidecar.write_state_atomically(STATE_STORE, writes).await?
            }
        };
        if saved {
            return Ok((before, after));
        }
    }
    Err(Status::aborted(format!("the gathering record of {version} kept changing; will retry")))
}

/// Names `version` in `gather/current`: written in the transaction that creates its record, so
/// a failure between the two cannot leave a record that no replica looks at.
fn current_write(version: &str) -> ConditionalWrite {
    ConditionalWrite { key: CURRENT.into(), value: version.as_bytes().to_vec(), condition: WriteCondition::Any }
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
    let key = batch.key();
    // Idempotent: a redelivered batch writes the same bytes again.
    sidecar.save_state(BATCH_STORE, &stored_batch_key(&key), ipc).await?;
    keeper.counter.count(sidecar, &keeper.store_id, batch.dataset_version.clone(), key).await
}

/// The most batches counted in one transaction: a marker each, the record and, with a new
/// record, `gather/current`, well under etcd's default limit of 128 operations per transaction.
const MAX_GROUP: usize = 64;

type Counted = Result<Option<(GatherRecord, GatherRecord)>, Status>;

/// A batch stored and waiting to be counted.
struct Uncounted {
    version: String,
    key: String,
    done: oneshot::Sender<Counted>,
}

/// Counts a replica's batches by group commit: batches that arrive while a transaction is in
/// flight are counted together in the next one, so a replica pays one read of the record and
/// one etcd transaction (one fsync) per group instead of per batch. One group at a time, so
/// a replica's batches never race each other for the record (as they did when each ran its
/// own compare-and-swap, up to 50 rounds per batch).
#[derive(Default)]
pub struct Counter {
    queue: std::sync::Mutex<Vec<Uncounted>>,
    committing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counter").finish_non_exhaustive()
    }
}

impl Counter {
    async fn count(&self, sidecar: &SidecarClient, store_id: &str, version: String, key: String) -> Counted {
        let (done, counted) = oneshot::channel();
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).push(Uncounted { version, key, done });
        {
            // Whoever holds the lock counts everything queued: this batch, unless the holder
            // before took it into its group.
            let _committing = self.committing.lock().await;
            while let Some(group) = self.next_group() {
                count_group(sidecar, store_id, group).await;
            }
        }
        counted.await.unwrap_or_else(|_| Err(Status::unavailable("counting the batch was interrupted; will retry")))
    }

    /// Up to [`MAX_GROUP`] queued batches of the dataset queued first, in arrival order.
    fn next_group(&self) -> Option<Vec<Uncounted>> {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let version = queue.first()?.version.clone();
        let mut group = Vec::new();
        let mut rest = Vec::new();
        for uncounted in queue.drain(..) {
            if uncounted.version == version && group.len() < MAX_GROUP {
                group.push(uncounted);
            } else {
                rest.push(uncounted);
            }
        }
        *queue = rest;
        Some(group)
    }
}

/// Counts `group` (batches of one dataset) in one transaction: every marker must be absent and
/// the record unchanged. A batch whose marker exists was counted already (`None`); on a
/// conflict with another replica the group is counted again on the fresh record.
async fn count_group(sidecar: &SidecarClient, store_id: &str, group: Vec<Uncounted>) {
    let version = group[0].version.clone();
    // A batch delivered twice at once is counted once; its other deliveries learn `None`.
    let mut batches: Vec<(String, Vec<oneshot::Sender<Counted>>)> = Vec::new();
    for Uncounted { key, done, .. } in group {
        match batches.iter_mut().find(|(queued, _)| *queued == key) {
            Some((_, waiting)) => waiting.push(done),
            None => batches.push((key, vec![done])),
        }
    }
    let fail = |batches: Vec<(String, Vec<oneshot::Sender<Counted>>)>, status: Status| {
        for done in batches.into_iter().flat_map(|(_, waiting)| waiting) {
            let _ = done.send(Err(status.clone()));
        }
    };
    let mut loaded = load_with_etag(sidecar, &version).await;
    for _ in 0..SWAP_ATTEMPTS {
        let (before, etag) = match loaded {
            Ok(loaded) => loaded,
            Err(status) => return fail(batches, status),
        };
        let mut writes: Vec<ConditionalWrite> = batches
            .iter()
            .map(|(key, _)| ConditionalWrite {
                key: marker_key(key),
                value: store_id.as_bytes().to_vec(),
                condition: WriteCondition::Absent,
            })
            .collect();
        let counted = GatherRecord { batches_stored: before.batches_stored + batches.len() as u32, ..before.clone() };
        writes.push(ConditionalWrite {
            key: record_key(&version),
            value: json::encode(&counted),
            condition: etag.clone().map_or(WriteCondition::Absent, WriteCondition::Etag),
        });
        if etag.is_none() {
            writes.push(current_write(&version));
        }
        match sidecar.write_state_atomically(STATE_STORE, writes).await {
            Ok(true) => {
                // Each batch sees the count move by one, as if counted on its own.
                for (counted_before, (_, waiting)) in batches.into_iter().enumerate() {
                    let stored = before.batches_stored + counted_before as u32;
                    let at = |batches_stored| GatherRecord { batches_stored, ..before.clone() };
                    let mut waiting = waiting.into_iter();
                    if let Some(first) = waiting.next() {
                        let _ = first.send(Ok(Some((at(stored), at(stored + 1)))));
                    }
                    for duplicate in waiting {
                        let _ = duplicate.send(Ok(None));
                    }
                }
                return;
            }
            Ok(false) => {}
            Err(status) => return fail(batches, status),
        }
        // Either another replica changed the record, or some batch was counted already.
        loaded = load_with_etag(sidecar, &version).await;
        if matches!(&loaded, Ok((_, now)) if *now == etag) {
            let mut uncounted = Vec::with_capacity(batches.len());
            let mut checking = batches.into_iter();
            while let Some((key, waiting)) = checking.next() {
                match sidecar.get_state(STATE_STORE, &marker_key(&key)).await {
                    Ok(Some(_)) => waiting.into_iter().for_each(|done| {
                        let _ = done.send(Ok(None));
                    }),
                    Ok(None) => uncounted.push((key, waiting)),
                    Err(status) => {
                        uncounted.push((key, waiting));
                        uncounted.extend(checking);
                        return fail(uncounted, status);
                    }
                }
            }
            batches = uncounted;
            if batches.is_empty() {
                return;
            }
        }
    }
    fail(batches, Status::aborted(format!("the gathering record of {version} kept changing; will retry")));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(counter: &Counter, version: &str, key: &str) -> oneshot::Receiver<Counted> {
        let (done, counted) = oneshot::channel();
        counter.queue.lock().unwrap().push(Uncounted { version: version.into(), key: key.into(), done });
        counted
    }

    fn keys(group: &[Uncounted]) -> Vec<&str> {
        group.iter().map(|uncounted| uncounted.key.as_str()).collect()
    }

    #[test]
    fn a_group_takes_the_first_datasets_batches_in_order_and_at_most_max_group() {
        let counter = Counter::default();
        let mut receivers = Vec::new();
        for index in 0..MAX_GROUP + 2 {
            receivers.push(queue(&counter, "v1", &format!("v1/train/{index}")));
            if index == 1 {
                receivers.push(queue(&counter, "v2", "v2/train/0"));
            }
        }
        let first = counter.next_group().unwrap();
        assert_eq!(first.len(), MAX_GROUP);
        assert!(first.iter().all(|uncounted| uncounted.version == "v1"));
        assert_eq!(keys(&first)[..3], ["v1/train/0", "v1/train/1", "v1/train/2"]);
        // The other dataset's batch keeps its place ahead of the first dataset's overflow.
        let second = counter.next_group().unwrap();
        assert_eq!(keys(&second), ["v2/train/0"]);
        let third = counter.next_group().unwrap();
        assert_eq!(keys(&third), [format!("v1/train/{MAX_GROUP}"), format!("v1/train/{}", MAX_GROUP + 1)]);
        assert!(counter.next_group().is_none());
    }
}
