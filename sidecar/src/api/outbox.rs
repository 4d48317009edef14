//! Dapr's transactional outbox: a state store with `outboxPublishPubsub` and
//! `outboxPublishTopic` publishes one event per upsert of each transaction (the value, or the
//! value of an `outbox.projection` operation on the same key), and either the transaction's
//! writes and its events both happen or neither does, also across a `kill -9`.
//!
//! How: the events go into the store itself, as one record written in the same atomic batch as
//! the transaction's writes (keys under [`RECORD_PREFIX`], which no app key can take). A failed
//! transaction leaves neither. Once the batch is committed, the store's [`Relay`] publishes the
//! record's events, in commit order, and deletes the record; a record still there later (the
//! sidecar was killed, the pub/sub refused the event) is found by the relay's scan and
//! published then. Delivery is at least once with the ids the events were given, as in Dapr.
//! Unlike Dapr, no internal topic is involved: the store holds the events until they are
//! published, so `outboxPubsub` and `outboxDiscardWhenMissingState` have nothing to configure.
//!
//! Replicas of an app may share a store (`state.etcd`): a record is written with its writer's
//! instance id and a time before which only that writer publishes it; after that, any replica's
//! scan may claim it (a conditional write on its ETag, so one claimant wins) and publish it.
//! In a store only this sidecar opens (`state.sled`), whatever the scan finds was left by an
//! earlier run and is published at once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use prost::Message;
use serde::{Deserialize, Serialize};
use tandem_proto::runtime::TopicEventRequest;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::error::ApiError;
use super::pubsub::PubSubApi;
use crate::metrics::Metrics;
use crate::pubsub::PubSub;
use crate::state::registry::{NamedStore, OutboxSettings};
use crate::state::{Operation, Precondition, StateError};

/// Where outbox records live in a store. Every app key is either free of `||` or starts with
/// a key prefix that cannot begin with `@` (see `KeyPrefix::from_metadata`).
pub const RECORD_PREFIX: &str = "@outbox||";

/// The operation metadata that makes an upsert a projection: its value is published for the
/// upsert of the same key instead of that upsert's value, and is not stored.
pub const PROJECTION: &str = "outbox.projection";

/// How long a record belongs to the sidecar that wrote or claimed it, in a shared store.
const CLAIM_FOR: Duration = Duration::from_secs(30);

/// How often a shared store is scanned for records left by others.
const SCAN_EVERY: Duration = Duration::from_secs(5);

/// Records one scan takes at most.
const SCAN_LIMIT: usize = 256;

/// Retry delays after a failed publish: doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_LAST: Duration = Duration::from_secs(5);

/// Dapr's truthy strings (`kit/strings.IsTruthy`).
pub fn is_truthy(value: &str) -> bool {
    matches!(value.trim().to_ascii_lowercase().as_str(), "1" | "true" | "t" | "y" | "yes" | "on")
}

/// One store's outbox: builds the record a transaction writes, and hands committed records to
/// the relay.
pub struct Outbox {
    store: NamedStore,
    settings: OutboxSettings,
    pubsub_api: Arc<PubSubApi>,
    /// `{RECORD_PREFIX}{app-id}||`: each app relays only its own records.
    prefix: String,
    instance_id: String,
    committed: mpsc::UnboundedSender<Pending>,
}

/// A committed record the relay has yet to publish (or delete).
struct Pending {
    key: String,
    /// The events not published yet.
    events: Vec<TopicEventRequest>,
}

/// What a record holds, as JSON in the store.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    /// The instance that wrote or last claimed it.
    owner: String,
    /// Unix milliseconds until which only `owner` publishes it.
    owned_until_ms: u64,
    /// The events, each a `TopicEventRequest` in protobuf, in base64.
    events: Vec<String>,
}

impl Outbox {
    /// The outbox of `store` (which has outbox settings) and its relay, to be run with
    /// [`Relay::run`]. Errors name what the settings point at that does not exist.
    pub fn new(
        store: NamedStore,
        app_id: &str,
        instance_id: &str,
        pubsub_api: Arc<PubSubApi>,
        metrics: Arc<Metrics>,
    ) -> Result<(Arc<Outbox>, Relay), String> {
        let settings = store.outbox.clone().ok_or_else(|| format!("state store {} has no outbox", store.name))?;
        let pubsub = pubsub_api.component(&settings.pubsub).ok_or_else(|| {
            format!(
                "state store {}: outboxPublishPubsub '{}' is not a pub/sub component here",
                store.name, settings.pubsub
            )
        })?;
        let (committed, queue) = mpsc::unbounded_channel();
        let outbox = Arc::new(Outbox {
            store,
            settings,
            pubsub_api,
            prefix: format!("{RECORD_PREFIX}{app_id}||"),
            instance_id: instance_id.to_string(),
            committed,
        });
        let relay = Relay { outbox: outbox.clone(), pubsub, metrics, queue, pending: VecDeque::new() };
        Ok((outbox, relay))
    }

    /// The events of a transaction: one per upsert `(key, value, metadata)`, carrying the
    /// value of the projection of its key where there is one. A projection whose key the
    /// transaction does not upsert fails the transaction, as Dapr documents.
    pub fn events(
        &self,
        upserts: Vec<(String, Vec<u8>, HashMap<String, String>)>,
        mut projections: HashMap<String, (Vec<u8>, HashMap<String, String>)>,
    ) -> Result<Vec<TopicEventRequest>, ApiError> {
        let upserted: HashSet<&str> = upserts.iter().map(|(key, _, _)| key.as_str()).collect();
        if let Some(key) = projections.keys().find(|key| !upserted.contains(key.as_str())) {
            return Err(ApiError::malformed(format!(
                "the transaction has an outbox projection (metadata '{PROJECTION}') of key '{key}' but no upsert of \
                 that key: a projection replaces the published value of an upsert of the same key"
            )));
        }
        let (pubsub, topic) = (&self.settings.pubsub, &self.settings.topic);
        upserts
            .into_iter()
            .map(|(key, value, metadata)| match projections.remove(&key) {
                Some((projected, projection_metadata)) => {
                    self.pubsub_api.outbox_event(pubsub, topic, projected, &projection_metadata)
                }
                None => self.pubsub_api.outbox_event(pubsub, topic, value, &metadata),
            })
            .collect()
    }

    /// The write that keeps `events` in the store, to go into the transaction's batch, and what
    /// to hand to [`Outbox::committed`] once the batch is.
    pub fn record(&self, events: Vec<TopicEventRequest>) -> (Operation, CommittedRecord) {
        let key = format!("{}{}", self.prefix, uuid::Uuid::new_v4());
        let value = encode(&self.instance_id, now_ms() + CLAIM_FOR.as_millis() as u64, &events);
        let operation = Operation::Set { key: key.clone(), value, precondition: Precondition::Absent, ttl: None };
        (operation, CommittedRecord(Pending { key, events }))
    }

    /// The transaction holding `record` is committed: the relay publishes it.
    pub fn committed(&self, record: CommittedRecord) {
        // The relay ends only with the sidecar; a record it no longer takes waits in the store.
        let _ = self.committed.send(record.0);
    }
}

/// A record of a transaction being committed; opaque to the API.
pub struct CommittedRecord(Pending);

/// Publishes one store's committed records and deletes them, in commit order.
pub struct Relay {
    outbox: Arc<Outbox>,
    pubsub: Arc<dyn PubSub>,
    metrics: Arc<Metrics>,
    queue: mpsc::UnboundedReceiver<Pending>,
    /// Taken, not yet done: published and deleted front to back.
    pending: VecDeque<Pending>,
}

impl Relay {
    /// Relays until `stop`; scans the store at once for records an earlier run left.
    pub async fn run(mut self, stop: CancellationToken) {
        let store = self.outbox.store.name.clone();
        let mut retry = RETRY_FIRST;
        let mut next_scan = tokio::time::Instant::now();
        loop {
            if tokio::time::Instant::now() >= next_scan {
                self.scan().await;
                next_scan = tokio::time::Instant::now() + SCAN_EVERY;
            }
            while let Ok(pending) = self.queue.try_recv() {
                self.pending.push_back(pending);
            }
            match self.drain().await {
                Ok(()) => retry = RETRY_FIRST,
                Err(why) => {
                    tracing::warn!(store = %store, "outbox: {why}; retrying in {retry:?}");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(RETRY_LAST);
                    continue;
                }
            }
            // Only a shared store gets records from others while running.
            let scan_due = if self.outbox.store.store.exclusive() { None } else { Some(next_scan) };
            tokio::select! {
                _ = stop.cancelled() => return,
                taken = self.queue.recv() => match taken {
                    Some(pending) => self.pending.push_back(pending),
                    None => return,
                },
                _ = sleep_until(scan_due) => {}
            }
        }
    }

    /// Publishes and deletes the pending records in order; stops at the first that fails.
    async fn drain(&mut self) -> Result<(), String> {
        while let Some(front) = self.pending.front_mut() {
            let (pubsub, topic) = (&self.outbox.settings.pubsub, &self.outbox.settings.topic);
            if !front.events.is_empty() {
                let outcomes = self.pubsub.publish_all(front.events.clone()).await;
                let mut failure = None;
                let mut unpublished = Vec::new();
                for (event, outcome) in std::mem::take(&mut front.events).into_iter().zip(outcomes) {
                    match outcome {
                        Ok(()) => self.metrics.outbox_events(&self.outbox.store.name, "published", 1),
                        Err(e) => {
                            failure.get_or_insert_with(|| {
                                format!("publishing to topic {topic} in pubsub {pubsub} failed: {e}")
                            });
                            unpublished.push(event);
                        }
                    }
                }
                front.events = unpublished;
                if let Some(failure) = failure {
                    return Err(failure);
                }
            }
            let delete = Operation::Delete { key: front.key.clone(), precondition: Precondition::None };
            self.outbox
                .store
                .store
                .apply(vec![delete])
                .await
                .map_err(|e| format!("deleting the published record {}: {e}", front.key))?;
            self.pending.pop_front();
        }
        Ok(())
    }

    /// Takes the records in the store that this relay does not hold and may publish: in a store
    /// only this sidecar opens, those an earlier run left; else those whose owner's time passed.
    async fn scan(&mut self) {
        let store = &self.outbox.store;
        let found = match store.store.scan(&self.outbox.prefix, SCAN_LIMIT).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(store = %store.name, "outbox: scanning for records left to publish: {e}");
                return;
            }
        };
        let held: HashSet<String> = self.pending.iter().map(|p| p.key.clone()).collect();
        let exclusive = store.store.exclusive();
        let now = now_ms();
        for (key, value) in found {
            if held.contains(&key) {
                continue;
            }
            let record = match decode(&value.value) {
                Ok(record) => record,
                Err(why) => {
                    // Never dropped: left in the store for a person to look at.
                    tracing::error!(store = %store.name, key = %key, "outbox: a record that cannot be read: {why}");
                    continue;
                }
            };
            // Fresh records are their writer's: this sidecar's own come through the queue (the
            // commit may be just done and not handed over yet), others' in a shared store wait.
            let mine = record.0.owner == self.outbox.instance_id;
            if record.0.owned_until_ms > now && (mine || !exclusive) {
                continue;
            }
            // Claim it (one claimant wins the ETag) so that other replicas leave it alone.
            let claim = Operation::Set {
                key: key.clone(),
                value: encode(&self.outbox.instance_id, now + CLAIM_FOR.as_millis() as u64, &record.1),
                precondition: Precondition::EtagMatches(value.etag),
                ttl: None,
            };
            match store.store.apply(vec![claim]).await {
                Ok(()) => {
                    tracing::info!(store = %store.name, key = %key, events = record.1.len(), "outbox: publishing a record left by {}", record.0.owner);
                    self.pending.push_back(Pending { key, events: record.1 });
                }
                Err(StateError::EtagMismatch { .. }) => {}
                Err(e) => tracing::warn!(store = %store.name, key = %key, "outbox: claiming a record: {e}"),
            }
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn encode(owner: &str, owned_until_ms: u64, events: &[TopicEventRequest]) -> Vec<u8> {
    let base64 = base64::engine::general_purpose::STANDARD;
    let record = Record {
        owner: owner.to_string(),
        owned_until_ms,
        events: events.iter().map(|event| base64.encode(event.encode_to_vec())).collect(),
    };
    serde_json::to_vec(&record).expect("a record always encodes")
}

fn decode(bytes: &[u8]) -> Result<(Record, Vec<TopicEventRequest>), String> {
    let record: Record = serde_json::from_slice(bytes).map_err(|e| format!("not an outbox record: {e}"))?;
    let base64 = base64::engine::general_purpose::STANDARD;
    let events = record
        .events
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let bytes = base64.decode(text).map_err(|e| format!("event {i} is not base64: {e}"))?;
            TopicEventRequest::decode(bytes.as_slice()).map_err(|e| format!("event {i} is not an event: {e}"))
        })
        .collect::<Result<_, String>>()?;
    Ok((record, events))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truthy_follows_dapr() {
        for yes in ["true", "TRUE", "1", "t", "y", "yes", "on", " True "] {
            assert!(is_truthy(yes), "{yes}");
        }
        for no in ["false", "0", "", "no", "off", "maybe"] {
            assert!(!is_truthy(no), "{no}");
        }
    }

    #[test]
    fn records_round_trip_and_bad_ones_are_named() {
        let event = TopicEventRequest { id: "outbox-1".into(), data: b"v".to_vec().into(), ..Default::default() };
        let bytes = encode("me", 42, std::slice::from_ref(&event));
        let (record, events) = decode(&bytes).unwrap();
        assert_eq!((record.owner.as_str(), record.owned_until_ms), ("me", 42));
        assert_eq!(events, vec![event]);
        assert!(decode(b"{}").unwrap_err().contains("not an outbox record"));
        let bad = br#"{"owner":"me","owned_until_ms":1,"events":["%%"]}"#;
        assert!(decode(bad).unwrap_err().contains("event 0 is not base64"));
    }
}
