//! Dapr's state API on top of the [`StateStore`](crate::state::StateStore)s: request validation, key prefixes, ETag
//! and concurrency options, TTL metadata, and the answers Dapr gives.
//!
//! Writes of one request (a bulk save, a bulk delete, a transaction) are one atomic batch:
//! either every ETag check holds and all are written, or the request fails with ABORTED
//! naming the key and nothing is written. A transaction on a store with an outbox also writes
//! its events in that batch (see [`super::outbox`]).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use std::sync::Arc;
use tandem_proto::common::state_options::StateConcurrency;
use tandem_proto::common::{StateItem, StateOptions};
use tandem_proto::runtime::{
    BulkStateItem, DeleteBulkStateRequest, DeleteStateRequest, ExecuteStateTransactionRequest, GetBulkStateRequest,
    GetBulkStateResponse, GetStateRequest, GetStateResponse, RegisteredComponents, SaveStateRequest,
};

use super::error::{ApiError, StateWork};
use super::outbox::{self, Outbox};
use crate::metrics::Metrics;
use crate::state::registry::NamedStore;
use crate::state::{Operation, Precondition, StateValue};

/// Dapr's metadata key for a per-write TTL.
pub const TTL_IN_SECONDS: &str = "ttlInSeconds";
/// Dapr's response metadata key for when a key expires (RFC 3339, UTC).
pub const TTL_EXPIRE_TIME: &str = "ttlExpireTime";

pub struct StateApi {
    /// This sidecar's app-id, named in Dapr's error details.
    app_id: String,
    stores: BTreeMap<String, NamedStore>,
    /// The transactional outboxes, by store name.
    outboxes: BTreeMap<String, Arc<Outbox>>,
    max_value_bytes: usize,
    metrics: Arc<Metrics>,
}

impl StateApi {
    pub fn new(
        app_id: String,
        stores: BTreeMap<String, NamedStore>,
        outboxes: BTreeMap<String, Arc<Outbox>>,
        max_value_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        StateApi { app_id, stores, outboxes, max_value_bytes, metrics }
    }

    /// The stores, as GetMetadata lists them.
    pub fn registered_components(&self) -> Vec<RegisteredComponents> {
        self.stores
            .values()
            .map(|store| RegisteredComponents {
                name: store.name.clone(),
                r#type: store.kind.to_string(),
                version: "v1".into(),
                capabilities: vec!["ETAG".into(), "TRANSACTIONAL".into(), "TTL".into()],
            })
            .collect()
    }

    fn store(&self, name: &str) -> Result<&NamedStore, ApiError> {
        if self.stores.is_empty() {
            return Err(ApiError::state_stores_not_configured(&self.app_id, name));
        }
        self.stores.get(name).ok_or_else(|| ApiError::state_store_not_found(&self.app_id, name, &self.store_names()))
    }

    fn store_names(&self) -> String {
        self.stores.keys().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ")
    }

    pub async fn get_state(&self, request: GetStateRequest) -> Result<GetStateResponse, ApiError> {
        let store = self.store(&request.store_name)?;
        let key = store_key(store, &request.key)?;
        let found = store.store.get(&key).await;
        self.metrics.state_operation(&store.name, "get", found.is_ok());
        let found = found.map_err(|e| ApiError::state(&store.name, StateWork::Get { key: &request.key }, e))?;
        Ok(match found {
            Some(value) => {
                GetStateResponse { metadata: response_metadata(&value), data: value.value, etag: value.etag }
            }
            None => GetStateResponse::default(),
        })
    }

    /// Answers per key: a key that cannot be read carries its error, the others their data.
    pub async fn get_bulk_state(&self, request: GetBulkStateRequest) -> Result<GetBulkStateResponse, ApiError> {
        let store = self.store(&request.store_name)?;
        let mut items = Vec::with_capacity(request.keys.len());
        for key in request.keys {
            let read = match store_key(store, &key) {
                Ok(store_key) => {
                    let read = store.store.get(&store_key).await;
                    self.metrics.state_operation(&store.name, "get", read.is_ok());
                    read.map_err(|e| e.to_string())
                }
                Err(error) => Err(error.message),
            };
            items.push(match read {
                Ok(Some(value)) => BulkStateItem {
                    key,
                    metadata: response_metadata(&value),
                    data: value.value,
                    etag: value.etag,
                    error: String::new(),
                },
                Ok(None) => BulkStateItem { key, ..Default::default() },
                Err(error) => BulkStateItem { key, error, ..Default::default() },
            });
        }
        Ok(GetBulkStateResponse { items })
    }

    pub async fn save_state(&self, request: SaveStateRequest) -> Result<(), ApiError> {
        let store = self.store(&request.store_name)?;
        let operations =
            request.states.into_iter().map(|item| self.set_operation(store, item)).collect::<Result<Vec<_>, _>>()?;
        self.apply(store, operations, StateWork::Save).await
    }

    pub async fn delete_state(&self, request: DeleteStateRequest) -> Result<(), ApiError> {
        let store = self.store(&request.store_name)?;
        let key = store_key(store, &request.key)?;
        let precondition = delete_precondition(request.etag.map(|e| e.value));
        self.apply(store, vec![Operation::Delete { key, precondition }], StateWork::Delete { key: &request.key }).await
    }

    pub async fn delete_bulk_state(&self, request: DeleteBulkStateRequest) -> Result<(), ApiError> {
        let store = self.store(&request.store_name)?;
        let operations = request
            .states
            .into_iter()
            .map(|item| {
                let key = store_key(store, &item.key)?;
                Ok(Operation::Delete { key, precondition: delete_precondition(item.etag.map(|e| e.value)) })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        let keys = keys_of(&operations);
        self.apply(store, operations, StateWork::Delete { key: &keys }).await
    }

    pub async fn execute_state_transaction(&self, request: ExecuteStateTransactionRequest) -> Result<(), ApiError> {
        let store = self.store(&request.store_name)?;
        let outbox = self.outboxes.get(&store.name);
        let mut operations = Vec::with_capacity(request.operations.len() + 1);
        // With an outbox: what each upsert publishes, and the projections that replace it.
        let mut upserts = Vec::new();
        let mut projections = HashMap::new();
        for (index, operation) in request.operations.into_iter().enumerate() {
            let item = operation
                .request
                .ok_or_else(|| ApiError::malformed(format!("transaction operation {index} has no request")))?;
            match operation.operation_type.as_str() {
                "upsert" => {
                    let projection =
                        outbox.is_some() && item.metadata.get(outbox::PROJECTION).is_some_and(|v| outbox::is_truthy(v));
                    let published = outbox.is_some().then(|| (item.key.clone(), item.metadata.clone()));
                    let set = self.set_operation(store, item)?;
                    match (published, &set) {
                        (Some((key, metadata)), Operation::Set { value, .. }) if projection => {
                            projections.insert(key, (value.clone(), metadata));
                        }
                        (Some((key, metadata)), Operation::Set { value, .. }) => {
                            upserts.push((key, value.clone(), metadata));
                            operations.push(set);
                        }
                        _ => operations.push(set),
                    }
                }
                "delete" => operations.push(Operation::Delete {
                    key: store_key(store, &item.key)?,
                    precondition: delete_precondition(item.etag.map(|e| e.value)),
                }),
                other => return Err(ApiError::unsupported_state_operation(&format!("'{other}' (operation {index})"))),
            }
        }
        let Some(outbox) = outbox else {
            return self.apply(store, operations, StateWork::Transaction).await;
        };
        let events = outbox.events(upserts, projections)?;
        if events.is_empty() {
            return self.apply(store, operations, StateWork::Transaction).await;
        }
        let count = events.len();
        let (record, committed) = outbox.record(events);
        operations.push(record);
        self.apply(store, operations, StateWork::Transaction).await?;
        self.metrics.outbox_events(&store.name, "recorded", count);
        outbox.committed(committed);
        Ok(())
    }

    fn set_operation(&self, store: &NamedStore, item: StateItem) -> Result<Operation, ApiError> {
        let key = store_key(store, &item.key)?;
        if item.value.len() > self.max_value_bytes {
            return Err(ApiError::too_large(
                "ERR_STATE_SAVE",
                format!(
                    "the value of key '{}' is {} bytes, over the limit of {} bytes (--max-body-size)",
                    item.key,
                    item.value.len(),
                    self.max_value_bytes
                ),
            ));
        }
        let ttl = parse_ttl(&item.key, &item.metadata)?;
        let precondition = set_precondition(item.etag.map(|e| e.value), item.options.as_ref());
        Ok(Operation::Set { key, value: item.value, precondition, ttl })
    }
}

impl StateApi {
    /// Applies one request's writes as one batch, counted as one `apply` of the store.
    async fn apply(&self, store: &NamedStore, operations: Vec<Operation>, work: StateWork<'_>) -> Result<(), ApiError> {
        if operations.is_empty() {
            return Ok(());
        }
        let applied = store.store.apply(operations).await;
        self.metrics.state_operation(&store.name, "apply", applied.is_ok());
        applied.map_err(|e| ApiError::state(&store.name, work, e))
    }
}

/// The keys a batch of deletes names, for an error message.
fn keys_of(operations: &[Operation]) -> String {
    let keys: Vec<&str> = operations
        .iter()
        .map(|operation| match operation {
            Operation::Set { key, .. } | Operation::Delete { key, .. } => key.rsplit("||").next().unwrap_or(key),
        })
        .collect();
    keys.join(", ")
}

/// The key as the store keeps it; empty keys and keys with `||` (the prefix separator) are refused.
fn store_key(store: &NamedStore, key: &str) -> Result<String, ApiError> {
    if key.is_empty() {
        return Err(ApiError::invalid_state_key(
            &store.name,
            key,
            "\"key\" is a required field: the state key is empty",
        ));
    }
    if key.contains("||") {
        return Err(ApiError::invalid_state_key(
            &store.name,
            key,
            format!("input key/keyPrefix '{key}' can't contain '||' (it separates key prefixes)"),
        ));
    }
    Ok(store.key_prefix.apply(key))
}

/// With an ETag, the write must match it (first-write-wins through ETags). Without one,
/// `CONCURRENCY_FIRST_WRITE` means "only if the key does not exist yet"; otherwise the last
/// write wins.
fn set_precondition(etag: Option<String>, options: Option<&StateOptions>) -> Precondition {
    match etag.filter(|e| !e.is_empty()) {
        Some(etag) => Precondition::EtagMatches(etag),
        None if options.is_some_and(|o| o.concurrency == StateConcurrency::ConcurrencyFirstWrite as i32) => {
            Precondition::Absent
        }
        None => Precondition::None,
    }
}

fn delete_precondition(etag: Option<String>) -> Precondition {
    match etag.filter(|e| !e.is_empty()) {
        Some(etag) => Precondition::EtagMatches(etag),
        None => Precondition::None,
    }
}

/// `ttlInSeconds`: a positive number of seconds, or -1 (never expires, as without it).
fn parse_ttl(key: &str, metadata: &HashMap<String, String>) -> Result<Option<Duration>, ApiError> {
    let Some(text) = metadata.get(TTL_IN_SECONDS) else { return Ok(None) };
    match text.trim().parse::<i64>() {
        Ok(-1) => Ok(None),
        Ok(seconds) if seconds > 0 => Ok(Some(Duration::from_secs(seconds as u64))),
        _ => Err(ApiError::malformed(format!(
            "metadata {TTL_IN_SECONDS} '{text}' of key '{key}' is invalid: use a positive number of seconds, or -1 for none"
        ))),
    }
}

fn response_metadata(value: &StateValue) -> HashMap<String, String> {
    value.expires_at.map(|at| HashMap::from([(TTL_EXPIRE_TIME.to_string(), rfc3339(at))])).unwrap_or_default()
}

/// `2026-11-25T20:30:00Z` (UTC, whole seconds).
pub fn rfc3339(at: SystemTime) -> String {
    let seconds = at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rest) = (seconds / 86_400, seconds % 86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_638_645);
        assert_eq!(rfc3339(at), "2026-11-25T20:30:45Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_825_600);
        assert_eq!(rfc3339(leap), "2000-02-29T12:00:00Z");
    }

    #[test]
    fn ttl_metadata_is_validated() {
        let meta = |v: &str| HashMap::from([(TTL_IN_SECONDS.to_string(), v.to_string())]);
        assert_eq!(parse_ttl("k", &HashMap::new()).unwrap(), None);
        assert_eq!(parse_ttl("k", &meta("-1")).unwrap(), None);
        assert_eq!(parse_ttl("k", &meta("5")).unwrap(), Some(Duration::from_secs(5)));
        for bad in ["foo", "0", "-2", "1.5", ""] {
            let err = parse_ttl("k", &meta(bad)).unwrap_err();
            assert_eq!(err.code, tonic::Code::InvalidArgument);
            assert!(err.message.contains(&format!("'{bad}'")), "{err:?}");
        }
    }

    #[test]
    fn etags_and_concurrency_become_preconditions() {
        let first = StateOptions { concurrency: StateConcurrency::ConcurrencyFirstWrite as i32, consistency: 0 };
        let last = StateOptions { concurrency: StateConcurrency::ConcurrencyLastWrite as i32, consistency: 0 };
        assert_eq!(set_precondition(Some("7".into()), Some(&last)), Precondition::EtagMatches("7".into()));
        assert_eq!(set_precondition(Some("7".into()), Some(&first)), Precondition::EtagMatches("7".into()));
        assert_eq!(set_precondition(None, Some(&first)), Precondition::Absent);
        assert_eq!(set_precondition(Some(String::new()), Some(&first)), Precondition::Absent);
        assert_eq!(set_precondition(None, Some(&last)), Precondition::None);
        assert_eq!(set_precondition(None, None), Precondition::None);
        assert_eq!(delete_precondition(Some(String::new())), Precondition::None);
        assert_eq!(delete_precondition(Some("3".into())), Precondition::EtagMatches("3".into()));
    }
}
