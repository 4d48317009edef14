//! `state.etcd`: a [`StateStore`] in etcd, so every replica of an app sees one state.
//!
//! Layout: each key lives at `{prefix}{key}` (the key is opaque bytes after the prefix). The
//! etcd value is a small record: a version byte (1) then the absolute expiry (unix millis, big
//! endian `u64`, `0` = never) then the value bytes.
//!
//! - ETag: the key's etcd `mod_revision` in decimal; etcd bumps it on every write and never
//!   reuses it.
//! - TTL: a write with a TTL attaches the key to a fresh lease of its own (seconds, rounded up,
//!   at least 1) so etcd purges it, and stores the expiry in the record so reads and
//!   preconditions treat it as absent the moment it expires, before etcd's reaper runs (etcd
//!   also stretches short leases to its minimum TTL). A write without a TTL uses no lease.
//!   When a write replaces or deletes a key that had a lease, that lease is revoked, so
//!   rewriting a key with a long TTL does not pile up leases.
//! - `apply`: operations are folded per key (etcd rejects a txn that names a key twice),
//!   preconditions are checked in code against a read of every key (so an expired record
//!   counts as absent), then one `Txn` writes everything if every key a precondition looked at
//!   still has the `mod_revision` read. If one changed in between, it reads again and re-checks;
//!   last-write-wins keys are never compared, so concurrent plain writes never retry.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Client, Compare, CompareOp, GetOptions, KvClient, LeaseClient, PutOptions, Txn, TxnOp, TxnOpResponse,
};

use super::{Operation, Precondition, StateError, StateStore, StateValue};

/// The first byte of every record this version writes.
const RECORD_V1: u8 = 1;
/// Version byte plus the expiry.
const HEADER_LEN: usize = 9;

/// etcd refuses leases longer than this (`MaxLeaseTTL`, about 285 years).
const MAX_LEASE_TTL_SECS: u64 = 9_000_000_000;

/// How often `apply` re-reads when keys change between its read and its write.
const MAX_ATTEMPTS: u32 = 10;

/// Responses carry whole values (up to etcd's `--max-request-bytes` each, a batch read up to
/// `--max-txn-ops` of them); tonic's default 4 MiB limit would refuse a read of a few.
const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

/// A state store in etcd under one key prefix.
#[derive(Clone)]
pub struct EtcdStore {
    kv: KvClient,
    leases: LeaseClient,
    prefix: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// A store keeping its keys under `prefix` (e.g. `/tandem/v1/default/state/statestore/`).
    pub fn new(client: Client, prefix: String) -> EtcdStore {
        EtcdStore {
            kv: client.kv_client().max_decoding_message_size(MAX_RESPONSE_BYTES),
            leases: client.lease_client(),
            prefix,
        }
    }

    fn etcd_key(&self, key: &str) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.prefix.len() + key.len());
        full.extend_from_slice(self.prefix.as_bytes());
        full.extend_from_slice(key.as_bytes());
        full
    }

    /// Reads every key of the batch in one txn. Keys whose first precondition is `None` are read
    /// without their value: only their lease matters.
    async fn read(&self, plans: &[KeyPlan<'_>]) -> Result<Vec<Stored>, StateError> {
        let gets: Vec<TxnOp> = plans
            .iter()
            .map(|plan| {
                let options =
                    plan.needs_value().then(GetOptions::new).unwrap_or_else(|| GetOptions::new().with_keys_only());
                TxnOp::get(self.etcd_key(plan.key), Some(options))
            })
            .collect();
        let response = self
            .kv
            .clone()
            .txn(Txn::new().and_then(gets))
            .await
            .map_err(|e| map_error(e, &batch_context("reading", plans)))?;
        let responses = response.op_responses();
        if responses.len() != plans.len() {
            return Err(StateError::Internal(format!(
                "etcd answered {} reads for {} keys",
                responses.len(),
                plans.len()
            )));
        }
        let now = SystemTime::now();
        plans
            .iter()
            .zip(responses)
            .map(|(plan, response)| {
                let TxnOpResponse::Get(get) = response else {
                    return Err(StateError::Internal(format!(
                        "etcd answered a read of key '{}' with a write",
                        plan.key
                    )));
                };
                let Some(kv) = get.kvs().first() else {
                    return Ok(Stored::ABSENT);
                };
                let live = if plan.needs_value() {
                    let (expires_at, _) = decode(kv.value()).ok_or_else(|| corrupt(plan.key))?;
                    !is_expired(expires_at, now)
                } else {
                    true
                };
                Ok(Stored { mod_revision: kv.mod_revision(), lease: kv.lease(), live })
            })
            .collect()
    }

    /// Grants one lease per key written with a TTL (never shared: replacing the key revokes it).
    async fn grant_leases(
        &self,
        plans: &[KeyPlan<'_>],
        outcomes: &[Outcome<'_>],
        granted: &mut HashMap<usize, i64>,
    ) -> Result<(), StateError> {
        let mut grants = tokio::task::JoinSet::new();
        for (index, outcome) in outcomes.iter().enumerate() {
            if let Outcome::Put { ttl: Some(ttl), .. } = outcome
                && !granted.contains_key(&index)
            {
                let seconds = lease_seconds(*ttl, plans[index].key)?;
                let mut leases = self.leases.clone();
                grants.spawn(async move { (index, leases.grant(seconds, None).await) });
            }
        }
        let mut failure = None;
        while let Some(joined) = grants.join_next().await {
            let result = match joined {
                Ok((index, Ok(response))) if response.error().is_empty() => {
                    granted.insert(index, response.id());
                    continue;
                }
                Ok((index, Ok(response))) => StateError::Internal(format!(
                    "etcd refused a lease for key '{}': {}",
                    plans[index].key,
                    response.error()
                )),
                Ok((index, Err(e))) => map_error(e, &format!("granting a lease for key '{}'", plans[index].key)),
                Err(e) => StateError::Internal(format!("granting a lease: {e}")),
            };
            failure.get_or_insert(result);
        }
        failure.map_or(Ok(()), Err)
    }

    /// Revokes leases nothing uses any more, in the background: a lease left behind only
    /// lingers until its TTL ends, so this is cleanup, not part of the write.
    fn revoke_later(&self, ids: Vec<i64>) {
        if ids.is_empty() {
            return;
        }
        let mut leases = self.leases.clone();
        tokio::spawn(async move {
            for id in ids {
                if let Err(e) = leases.revoke(id).await {
                    tracing::debug!(lease_id = id, error = %e, "could not revoke an unused lease; it ends with its TTL");
                }
            }
        });
    }
}

#[tonic::async_trait]
impl StateStore for EtcdStore {
    fn kind(&self) -> &'static str {
        "state.etcd"
    }

    async fn get(&self, key: &str) -> Result<Option<StateValue>, StateError> {
        let mut response = self
            .kv
            .clone()
            .get(self.etcd_key(key), None)
            .await
            .map_err(|e| map_error(e, &format!("reading key '{key}'")))?;
        let Some(kv) = response.take_kvs().into_iter().next() else {
            return Ok(None);
        };
        live_value(key, kv, SystemTime::now())
    }

    async fn scan(&self, prefix: &str, limit: usize) -> Result<Vec<(String, StateValue)>, StateError> {
        let options = GetOptions::new().with_prefix().with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
        let mut response = self
            .kv
            .clone()
            .get(self.etcd_key(prefix), Some(options))
            .await
            .map_err(|e| map_error(e, &format!("scanning keys under '{prefix}'")))?;
        let now = SystemTime::now();
        let mut found = Vec::new();
        for kv in response.take_kvs() {
            let Some(key) = kv.key().strip_prefix(self.prefix.as_bytes()) else { continue };
            let key = String::from_utf8(key.to_vec()).map_err(|_| corrupt(prefix))?;
            if let Some(value) = live_value(&key, kv, now)? {
                found.push((key, value));
            }
        }
        Ok(found)
    }

    fn exclusive(&self) -> bool {
        // Every replica of the app, and other apps, may use the same etcd.
        false
    }

    async fn apply(&self, operations: Vec<Operation>) -> Result<(), StateError> {
        let plans = plan_by_key(&operations);
        if plans.is_empty() {
            return Ok(());
        }
        let mut granted = HashMap::new();
        let result = self.apply_plans(&plans, &mut granted).await;
        match &result {
            // An unreachable etcd may have committed the txn: its leases may hold the new
            // records. Left alone, they end with their TTL.
            Ok(()) | Err(StateError::Unavailable(_)) => {}
            // Nothing of the batch was written: its leases hold no key.
            Err(_) => self.revoke_later(granted.into_values().collect()),
        }
        result
    }
}

impl EtcdStore {
    /// Read, check, write; again while a key a precondition looked at changes in between.
    /// `granted` collects the leases granted so far (by index into `plans`), kept across tries.
    async fn apply_plans(&self, plans: &[KeyPlan<'_>], granted: &mut HashMap<usize, i64>) -> Result<(), StateError> {
        // Taken before any lease is granted, so the record never outlives its lease.
        let started = SystemTime::now();
        for attempt in 0..MAX_ATTEMPTS {
            if attempt > 0 {
                // Whoever won the race is done in a moment; spread the retries a little.
                tokio::time::sleep(Duration::from_millis(u64::from(attempt) * 5)).await;
            }
            let stored = self.read(plans).await?;
            let outcomes =
                plans.iter().zip(&stored).map(|(plan, stored)| plan.evaluate(stored)).collect::<Result<Vec<_>, _>>()?;
            self.grant_leases(plans, &outcomes, granted).await?;
            let txn = self.write_txn(plans, &stored, &outcomes, granted, started)?;
            let response =
                self.kv.clone().txn(txn).await.map_err(|e| map_error(e, &batch_context("writing", plans)))?;
            if response.succeeded() {
                // Every lease is used by one put only, so a lease read on a key this batch has
                // now replaced or deleted holds no key any more, even if another writer got in
                // between (its lease is then left to expire).
                self.revoke_later(stored.iter().map(|s| s.lease).filter(|&id| id != 0).collect());
                return Ok(());
            }
        }
        // Nothing was written.
        self.revoke_later(granted.drain().map(|(_, id)| id).collect());
        Err(StateError::Unavailable(format!(
            "{}: the keys changed under concurrent writes on each of {MAX_ATTEMPTS} attempts; try again",
            batch_context("writing", plans)
        )))
    }

    /// The txn that writes `outcomes` if every key is still as `stored` says.
    fn write_txn(
        &self,
        plans: &[KeyPlan<'_>],
        stored: &[Stored],
        outcomes: &[Outcome<'_>],
        granted: &HashMap<usize, i64>,
        started: SystemTime,
    ) -> Result<Txn, StateError> {
        let mut compares = Vec::with_capacity(plans.len());
        let mut writes = Vec::with_capacity(plans.len());
        for (index, ((plan, stored), outcome)) in plans.iter().zip(stored).zip(outcomes).enumerate() {
            let key = self.etcd_key(plan.key);
            // The precondition was decided on this very version (0: the key was absent). Last
            // write wins needs no compare: see `apply_plans` on why revoking the lease read is
            // safe all the same.
            if plan.needs_value() {
                compares.push(Compare::mod_revision(key.clone(), CompareOp::Equal, stored.mod_revision));
            }
            writes.push(match outcome {
                Outcome::Delete => TxnOp::delete(key, None),
                Outcome::Put { value, ttl } => {
                    let expires_at_ms = ttl.map(|ttl| expiry_millis(started, ttl, plan.key)).transpose()?;
                    let options = granted.get(&index).map(|&lease| PutOptions::new().with_lease(lease));
                    TxnOp::put(key, encode(value, expires_at_ms), options)
                }
            });
        }
        Ok(Txn::new().when(compares).and_then(writes))
    }
}

/// What one key's stored record looked like when the batch read it.
#[derive(Debug, Clone, Copy)]
struct Stored {
    /// 0 when absent.
    mod_revision: i64,
    /// 0 when absent or without a lease.
    lease: i64,
    /// Present and not expired (for keys read without their value: present).
    live: bool,
}

impl Stored {
    const ABSENT: Stored = Stored { mod_revision: 0, lease: 0, live: false };
}

/// The operations of a batch on one key, in order.
#[derive(Debug)]
struct KeyPlan<'a> {
    key: &'a str,
    operations: Vec<&'a Operation>,
}

/// What the batch leaves a key as.
#[derive(Debug)]
enum Outcome<'a> {
    Put { value: &'a [u8], ttl: Option<Duration> },
    Delete,
}

/// A key's state while a batch is replayed over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replayed {
    Stored,
    SetInBatch,
    DeletedInBatch,
}

impl KeyPlan<'_> {
    /// Only the first operation's precondition looks at the stored record; later ones see the
    /// batch's own writes.
    fn needs_value(&self) -> bool {
        self.operations.first().is_some_and(|op| !matches!(precondition(op), Precondition::None))
    }

    /// Checks every precondition in order and folds the operations into one write.
    fn evaluate(&self, stored: &Stored) -> Result<Outcome<'_>, StateError> {
        let mismatch =
            |reason: &str| StateError::EtagMismatch { key: self.key.to_string(), reason: reason.to_string() };
        let mut state = Replayed::Stored;
        let mut outcome = Outcome::Delete;
        for op in &self.operations {
            match (precondition(op), state) {
                (Precondition::None, _) => {}
                (Precondition::Absent, Replayed::Stored) if stored.live => {
                    return Err(mismatch("the key already exists"));
                }
                (Precondition::Absent, Replayed::SetInBatch) => {
                    return Err(mismatch("the key is set earlier in the same batch"));
                }
                (Precondition::Absent, _) => {}
                (Precondition::EtagMatches(_), Replayed::Stored) if !stored.live => {
                    return Err(mismatch("the key does not exist"));
                }
                (Precondition::EtagMatches(etag), Replayed::Stored) => {
                    if *etag != stored.mod_revision.to_string() {
                        return Err(mismatch("the key has a different ETag"));
                    }
                }
                (Precondition::EtagMatches(_), Replayed::SetInBatch) => {
                    return Err(mismatch("the key is set earlier in the same batch, so its ETag is not known yet"));
                }
                (Precondition::EtagMatches(_), Replayed::DeletedInBatch) => {
                    return Err(mismatch("the key is deleted earlier in the same batch"));
                }
            }
            (state, outcome) = match op {
                Operation::Set { value, ttl, .. } => (Replayed::SetInBatch, Outcome::Put { value, ttl: *ttl }),
                Operation::Delete { .. } => (Replayed::DeletedInBatch, Outcome::Delete),
            };
        }
        Ok(outcome)
    }
}

fn precondition(op: &Operation) -> &Precondition {
    match op {
        Operation::Set { precondition, .. } | Operation::Delete { precondition, .. } => precondition,
    }
}

/// Groups a batch by key, keys in order of first appearance, operations in batch order.
fn plan_by_key(operations: &[Operation]) -> Vec<KeyPlan<'_>> {
    let mut plans: Vec<KeyPlan<'_>> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for op in operations {
        let at = *index.entry(op.key()).or_insert_with(|| {
            plans.push(KeyPlan { key: op.key(), operations: Vec::new() });
            plans.len() - 1
        });
        plans[at].operations.push(op);
    }
    plans
}

/// "writing key 'a'" or "writing 3 keys ('a', 'b', ...)", for error messages.
fn batch_context(action: &str, plans: &[KeyPlan<'_>]) -> String {
    const SHOWN: usize = 3;
    match plans {
        [one] => format!("{action} key '{}'", one.key),
        _ => {
            let mut names: Vec<String> = plans.iter().take(SHOWN).map(|p| format!("'{}'", p.key)).collect();
            if plans.len() > SHOWN {
                names.push("...".to_string());
            }
            format!("{action} {} keys ({})", plans.len(), names.join(", "))
        }
    }
}

fn encode(value: &[u8], expires_at_ms: Option<u64>) -> Vec<u8> {
    let mut record = Vec::with_capacity(HEADER_LEN + value.len());
    record.push(RECORD_V1);
    record.extend_from_slice(&expires_at_ms.unwrap_or(0).to_be_bytes());
    record.extend_from_slice(value);
    record
}

/// The expiry and the value of a record; `None` when it is not a record this version wrote.
fn decode(record: &[u8]) -> Option<(Option<SystemTime>, &[u8])> {
    let (&version, rest) = record.split_first()?;
    if version != RECORD_V1 || rest.len() < HEADER_LEN - 1 {
        return None;
    }
    let (millis, value) = rest.split_at(HEADER_LEN - 1);
    let millis = u64::from_be_bytes(millis.try_into().ok()?);
    let expires_at = match millis {
        0 => None,
        ms => Some(UNIX_EPOCH.checked_add(Duration::from_millis(ms))?),
    };
    Some((expires_at, value))
}

/// The value of `key` in its etcd record, `None` when it has expired.
fn live_value(key: &str, kv: etcd_client::KeyValue, now: SystemTime) -> Result<Option<StateValue>, StateError> {
    let etag = kv.mod_revision().to_string();
    let (_, mut record) = kv.into_key_value();
    let (expires_at, _) = decode(&record).ok_or_else(|| corrupt(key))?;
    if is_expired(expires_at, now) {
        return Ok(None);
    }
    record.drain(..HEADER_LEN);
    Ok(Some(StateValue { value: record, etag, expires_at }))
}

fn is_expired(expires_at: Option<SystemTime>, now: SystemTime) -> bool {
    expires_at.is_some_and(|at| at <= now)
}

fn corrupt(key: &str) -> StateError {
    StateError::Corrupt(format!(
        "key '{key}' in etcd does not hold a state.etcd record (written by something else, or damaged)"
    ))
}

/// The lease TTL for `ttl`: whole seconds rounded up, at least 1.
fn lease_seconds(ttl: Duration, key: &str) -> Result<i64, StateError> {
    let seconds = ttl.as_secs().saturating_add(u64::from(ttl.subsec_nanos() > 0)).max(1);
    if seconds > MAX_LEASE_TTL_SECS {
        return Err(ttl_too_long(key));
    }
    i64::try_from(seconds).map_err(|_| ttl_too_long(key))
}

fn ttl_too_long(key: &str) -> StateError {
    StateError::TooLarge(format!("the TTL of key '{key}' is longer than etcd's longest lease ({MAX_LEASE_TTL_SECS} s)"))
}

/// `started + ttl` in unix millis (never 0, which means "no expiry").
fn expiry_millis(started: SystemTime, ttl: Duration, key: &str) -> Result<u64, StateError> {
    let since_epoch = started.duration_since(UNIX_EPOCH).unwrap_or_default();
    let at = since_epoch.checked_add(ttl).ok_or_else(|| ttl_too_long(key))?;
    u64::try_from(at.as_millis()).map(|ms| ms.max(1)).map_err(|_| ttl_too_long(key))
}

/// Maps an etcd client error to a store error; `context` says what was being done.
fn map_error(error: etcd_client::Error, context: &str) -> StateError {
    use etcd_client::Error;
    match error {
        Error::GRpcStatus(status) => map_status(&status, context),
        Error::TransportError(e) => StateError::Unavailable(format!("{context}: cannot reach etcd: {e}")),
        Error::IoError(e) => StateError::Unavailable(format!("{context}: cannot reach etcd: {e}")),
        other => StateError::Internal(format!("{context}: etcd: {other}")),
    }
}

fn map_status(status: &tonic::Status, context: &str) -> StateError {
    use tonic::Code;
    let message = status.message();
    // etcd answers InvalidArgument for these; gRPC itself answers ResourceExhausted for a
    // message past etcd's receive limit (--max-request-bytes plus 512 KiB).
    if message.contains("request is too large")
        || (status.code() == Code::ResourceExhausted && message.contains("larger than max"))
    {
        return StateError::TooLarge(format!(
            "{context}: the request exceeds etcd's request size limit (1.5 MiB unless etcd runs with another --max-request-bytes)"
        ));
    }
    if message.contains("too many operations in txn request") {
        return StateError::TooLarge(format!(
            "{context}: the batch touches more keys than etcd allows in one transaction (128 unless etcd runs with another --max-txn-ops)"
        ));
    }
    match status.code() {
        // Timeouts, lost connections, no leader, an overloaded or full etcd: later may work.
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::ResourceExhausted | Code::Aborted => {
            StateError::Unavailable(format!("{context}: etcd: {message}"))
        }
        code => StateError::Internal(format!("{context}: etcd answered {code:?}: {message}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::process::{Child, Command, Stdio};
    use std::time::Instant;

    /// A real etcd on free loopback ports in a temp dir; killed on drop.
    struct TestEtcd {
        child: Child,
        endpoint: String,
        _dir: tempfile::TempDir,
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("bind a free port").port()
    }

    impl TestEtcd {
        async fn start() -> TestEtcd {
            Self::start_with(&[]).await
        }

        async fn start_with(extra: &[&str]) -> TestEtcd {
            let dir = tempfile::tempdir().expect("temp dir");
            let (client_port, peer_port) = (free_port(), free_port());
            let client_url = format!("http://127.0.0.1:{client_port}");
            let peer_url = format!("http://127.0.0.1:{peer_port}");
            let log = std::fs::File::create(dir.path().join("etcd.log")).expect("etcd log");
            let child = Command::new("etcd")
                .args(["--name", "t", "--data-dir"])
                .arg(dir.path().join("data"))
                .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("t={peer_url}")])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start etcd (is it on PATH?)");
            let etcd = TestEtcd { child, endpoint: client_url, _dir: dir };
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(mut client) = etcd.client().await
                    && client.get("/", None).await.is_ok()
                {
                    return etcd;
                }
                assert!(Instant::now() < deadline, "etcd did not start within 20 s");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }

        async fn client(&self) -> Result<Client, etcd_client::Error> {
            crate::discovery::etcd_client(std::slice::from_ref(&self.endpoint), None).await
        }

        async fn store(&self) -> EtcdStore {
            EtcdStore::new(self.client().await.expect("client"), "/tandem/v1/default/state/statestore/".to_string())
        }
    }

    impl Drop for TestEtcd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    const PREFIX: &str = "/tandem/v1/default/state/statestore/";

    fn set(key: &str, value: &[u8], precondition: Precondition) -> Operation {
        Operation::Set { key: key.into(), value: value.to_vec(), precondition, ttl: None }
    }

    fn delete(key: &str, precondition: Precondition) -> Operation {
        Operation::Delete { key: key.into(), precondition }
    }

    fn etag(e: &str) -> Precondition {
        Precondition::EtagMatches(e.to_string())
    }

    async fn value_of(store: &EtcdStore, key: &str) -> Option<Vec<u8>> {
        store.get(key).await.expect("get").map(|v| v.value)
    }

    fn assert_mismatch(result: Result<(), StateError>, expected_key: &str) {
        match result {
            Err(StateError::EtagMismatch { key, .. }) => assert_eq!(key, expected_key),
            other => panic!("expected an ETag mismatch on '{expected_key}', got {other:?}"),
        }
    }

    #[test]
    fn records_round_trip_and_garbage_is_refused() {
        let record = encode(b"hello", Some(1_700_000_000_123));
        let (expires_at, value) = decode(&record).expect("decodes");
        assert_eq!(value, b"hello");
        assert_eq!(expires_at, Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)));
        assert_eq!(decode(&encode(b"", None)), Some((None, &b""[..])));
        assert_eq!(decode(b""), None);
        assert_eq!(decode(b"\x01short"), None);
        assert_eq!(decode(b"plain text someone else wrote"), None);
    }

    #[test]
    fn lease_seconds_round_up_with_a_floor_of_one() {
        assert_eq!(lease_seconds(Duration::from_millis(1), "k").ok(), Some(1));
        assert_eq!(lease_seconds(Duration::ZERO, "k").ok(), Some(1));
        assert_eq!(lease_seconds(Duration::from_millis(1500), "k").ok(), Some(2));
        assert_eq!(lease_seconds(Duration::from_secs(3), "k").ok(), Some(3));
        assert!(matches!(lease_seconds(Duration::MAX, "k"), Err(StateError::TooLarge(_))));
    }

    #[tokio::test]
    async fn set_get_delete() {
        let etcd = TestEtcd::start().await;
        let store = etcd.store().await;
        assert_eq!(store.kind(), "state.etcd");
        assert_eq!(store.get("app||k").await.expect("get"), None);

        store.apply(vec![set("app||k", b"v1", Precondition::None)]).await.expect("set");
        let got = store.get("app||k").await.expect("get").expect("present");
        assert_eq!(got.value, b"v1");
        assert_eq!(got.expires_at, None);
        got.etag.parse::<i64>().expect("decimal ETag");

        // Stored under the prefix, as a record.
        let mut raw = etcd.client().await.expect("client");
        let stored = raw.get(format!("{PREFIX}app||k"), None).await.expect("raw get");
        assert_eq!(stored.kvs().len(), 1);

        store.apply(vec![delete("app||k", Precondition::None)]).await.expect("delete");
        assert_eq!(store.get("app||k").await.expect("get"), None);
        // Deleting a missing key without an ETag succeeds.
        store.apply(vec![delete("app||k", Precondition::None)]).await.expect("delete missing");
        store.apply(vec![]).await.expect("empty batch");
    }

    #[tokio::test]
    async fn a_scan_finds_live_keys_under_its_prefix_in_order_up_to_its_limit() {
        let etcd = TestEtcd::start().await;
        let store = etcd.store().await;
        assert!(!store.exclusive());
        for key in ["p||b", "p||a", "q||a", "p||c"] {
            store.apply(vec![set(key, key.as_bytes(), Precondition::None)]).await.expect("set");
        }
        let found = store.scan("p||", 10).await.expect("scan");
        let keys: Vec<&str> = found.iter().map(|(key, _)| key.as_str()).collect();
        assert_eq!(keys, ["p||a", "p||b", "p||c"]);
        assert_eq!(found[0].1.value, b"p||a");
        assert_eq!(found[0].1.etag, store.get("p||a").await.unwrap().unwrap().etag);
        assert_eq!(store.scan("p||", 2).await.expect("scan").len(), 2);
        assert!(store.scan("none||", 10).await.expect("scan").is_empty());
    }

    #[tokio::test]
    async fn keys_are_opaque_after_the_prefix() {
        let etcd = TestEtcd::start().await;
        let store = etcd.store().await;
        let keys = ["a||b/c d", "a||b", "a||b/", "é\u{0}\u{7f}||*?[", "||"];
        for (i, key) in keys.iter().enumerate() {
            store.apply(vec![set(key, format!("{i}").as_bytes(), Precondition::None)]).await.expect("set");
        }
        for (i, key) in keys.iter().enumerate() {
            assert_eq!(value_of(&store, key).await, Some(format!("{i}").into_bytes()), "key {key:?}");
        }
        store.apply(vec![delete("a||b", Precondition::None)]).await.expect("delete");
        assert_eq!(value_of(&store, "a||b").await, None);
        assert_eq!(value_of(&store, "a||b/").await, Some(b"2".to_vec()), "a longer key survives");
    }

    #[tokio::test]
    async fn etag_changes_on_every_write() {
        let etcd = TestEtcd::start().await;
        let store = etcd.store().await;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3 {
            // The same value each time: the ETag must change anyway.
            store.apply(vec![set("k", b"same", Precondition::None)]).await.expect("set");
            let etag = store.get("k").await.expect("get").expect("present").etag;
            assert!(seen.insert(etag.clone()), "ETag {etag} reused");
        }
        // Delete and recreate: still never reused.
        store.apply(vec![delete("k", Precondition::None)]).await.expect("delete");
        store.apply(vec![set("k", b"same", Precondition::None)]).await.expect("set");
        let etag = store.get("k").await.expect("get").expect("present").etag;
        assert!(seen.insert(etag), "ETag reused after delete");
    }

    #[tokio::test]
    async fn etag_matches_writes_and_a_mismatch_writes_nothing() {
        let etcd = TestEtcd::start().await;
        let store = etcd.store().await;
        store.apply(vec![set("k", b"v1", Precondition::None)]).await.expect("set");
        let first = store.get("k").await.expect("get").expect("present").etag;

        store.apply(vec![set("k", b"v2", etag(&first))]).await.expect("matching ETag");
        let second = store.get("k").await.expect("get").expect("present");
        assert_eq!(second.value, b"v2");

        // The old ETag, a made-up one, a non-numeric one: nothing is written.
        assert_mismatch(store.apply(vec![set("k", b"v3", etag(&first))]).await, "k");
        assert_mismatch(store.apply(vec![set("k", b"v3", etag("999999"))]).await, "k");
        assert_mismatch(store.apply(vec![set("k", b"v3", etag("not-a-number"))]).await, "k");
        assert_mismatch(store.apply(vec![delete("k", etag(&first))]).await, "k");
        assert_eq!(store.get("k").await.expect("get"), Some(second.clone()));

        // A missing key matches no ETag.
        assert_mismatch(store.apply(vec![set("missing", b"v", etag(&second.etag))]).await, "missing");
        assert_mismatch(store.apply(vec![delete("missing", etag("0"))]).await, "missing");
        assert_eq!(store.get("missing").await.expect("get"), None);

        store.apply(vec![delete("k", etag(&second.etag))]).await.expect("delete with ETag");
        assert_eq!(store.get("k").await.expect("get"), None);
    }

    #[tokio::test]
    async fn absent_is_first_write_wins() {
        let etcd = TestEtcd::start().await;
        let store = etcd.store().await;
        store.apply(vec![set("k", b"first", Precondition::Absent)]).await.expect("first write");
        assert_mismatch(store.apply(vec![set("k", b"second", Precondition::Absent)]).await, "k");
        assert_eq!(value_of(&store, "k").await, Some(b"first".to_vec()));
        store.apply(vec![delete("k", Precondition::None)]).await.expect("delete");
        store.apply(vec![set("k", b"again", Precondition::Absent)]).await.expect("absent again after delete");
        assert_eq!(value_of(&store, "k").await, Some(b"again".to_vec()));
    }

    #[tokio::test]
    async fn a_failing_precondition_writes_nothing_of_the_batch() {
        let etcd = TestEtcd::start().await;
        let store = etcd.store().await;
        store
            .apply(vec![set("a", b"a1", Precondition::None), set("b", b"b1", Precondition::None)])
            .await
            .expect("seed");
        let a = store.get("a").await.expect("get").expect("a");
        let b = store.get("b").await.expect("get").expect("b");

        let batch = vec![set("a", b"a2", etag(&a.etag)), set("c", b"c1", Precondition::None), delete("b", etag("1"))];
        assert_mismatch(store.apply(batch).await, "b");
        assert_eq!(store.get("a").await.expect("get"), Some(a.clone()));
        assert_eq!(store.get("b").await.expect("get"), Some(b.clone()));
        assert_eq!(store.get("c").await.expect("get"), None);

        store
            .apply(vec![
                set("a", b"a2", etag(&a.etag)),
                set("c", b"c1", Precondition::Absent),
                delete("b", etag(&b.etag)),
            ])
            .await
            .expect("all preconditions hold");
        assert_eq!(value_of(&store, "a").await, Some(b"a2".to_vec()));
        assert_eq!(value_of(&store, "b").await, None);
        assert_eq!(value_of(&store, "c").await, Some(b"c1".to_vec()));
    }

    #[tokio::test]
    async fn several_operations_on_one_key_fold_in_order() {
        let etcd = TestEtcd::start().await;
        let store = etcd.store().await;
        store.apply(vec![set("k", b"old", Precondition::None)]).await.expect("seed");
        let old = store.get("k").await.expect("get").expect("k");

        // Set then delete: absent.
        store
            .apply(vec![set("k", b"new", etag(&old.etag)), delete("k", Precondition::None)])
            .await
            .expect("set+delete");
        assert_eq!(store.get("k").await.expect("get"), None);

        // Delete then set: the last value; Absent after the batch's own delete holds.
        store.apply(vec![set("k", b"v1", Precondition::None)]).await.expect("seed");
        store
            .apply(vec![delete("k", Precondition::None), set("k", b"v2", Precondition::Absent)])
            .await
            .expect("delete+set");
        assert_eq!(value_of(&store, "k").await, Some(b"v2".to_vec()));

        // Set then set: the last one wins.
        store
            .apply(vec![set("k", b"v3", Precondition::None), set("k", b"v4", Precondition::None)])
            .await
            .expect("set+set");
        assert_eq!(value_of(&store, "k").await, Some(b"v4".to_vec()));

        // Later preconditions see the batch's own writes: the new ETag is not known, a set key
        // is not absent, a deleted key has no ETag. Nothing is written.
        let current = store.get("k").await.expect("get").expect("k");
        assert_mismatch(
            store.apply(vec![set("k", b"x", Precondition::None), delete("k", etag(&current.etag))]).await,
            "k",
        );
        assert_mismatch(
            store.apply(vec![set("k", b"x", Precondition::None), set("k", b"y", Precondition::Absent)]).await,
            "k",
        );
        assert_mismatch(
            store.apply(vec![delete("k", Precondition::None), delete("k", etag(&current.etag))]).await,
            "k",
        );
        // The first operation's precondition is checked against the store.
        assert_mismatch(store.apply(vec![set("k", b"x", etag("1")), delete("k", Precondition::None)]).await, "k");
        assert_eq!(store.get("k").await.expect("get"), Some(current));
    }

    #[tokio::test]
    async fn ttl_hides_the_key_at_once_and_a_write_without_ttl_keeps_it() {
        let etcd = TestEtcd::start().await;
        let store = etcd.store().await;
        let mut raw = etcd.client().await.expect("client");
        let ttl = |key: &str, value: &[u8]| Operation::Set {
            key: key.into(),
            value: value.to_vec(),
            precondition: Precondition::None,
            ttl: Some(Duration::from_secs(1)),
        };

        let written = Instant::now();
        store.apply(vec![ttl("short", b"v"), ttl("kept", b"v")]).await.expect("set with TTL");
        let got = store.get("short").await.expect("get").expect("visible before expiry");
        let expires_at = got.expires_at.expect("has an expiry");
        let left = expires_at.duration_since(SystemTime::now()).unwrap_or_default();
        assert!(left <= Duration::from_secs(1), "expiry in {left:?}");
        let lease = raw.get(format!("{PREFIX}short"), None).await.expect("raw get").kvs()[0].lease();
        assert_ne!(lease, 0, "a TTL attaches a lease");

        // "kept" is rewritten without a TTL: no lease, no expiry.
        store.apply(vec![set("kept", b"forever", Precondition::None)]).await.expect("set without TTL");
        assert_eq!(raw.get(format!("{PREFIX}kept"), None).await.expect("raw get").kvs()[0].lease(), 0);

        // Hidden once the TTL has passed.
        let deadline = written + Duration::from_secs(5);
        while store.get("short").await.expect("get").is_some() {
            assert!(Instant::now() < deadline, "key still visible 5 s after a 1 s TTL");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(written.elapsed() >= Duration::from_millis(990), "hidden after {:?}", written.elapsed());

        // etcd purges it (its minimum lease TTL is longer than 1 s), and the rewritten key stays.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !raw.get(format!("{PREFIX}short"), None).await.expect("raw get").kvs().is_empty() {
            assert!(Instant::now() < deadline, "etcd never purged the expired key");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let kept = store.get("kept").await.expect("get").expect("kept survives its old lease");
        assert_eq!((kept.value.as_slice(), kept.expires_at), (&b"forever"[..], None));
    }

    #[tokio::test]
    async fn an_expired_record_etcd_has_not_purged_yet_counts_as_absent() {
        let etcd = TestEtcd::start().await;
        let store = etcd.store().await;
        let mut raw = etcd.client().await.expect("client");
        // What a TTL'd key looks like between its expiry and etcd's reaper.
        let past = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as u64 - 1000;
        raw.put(format!("{PREFIX}k"), encode(b"stale", Some(past)), None).await.expect("raw put");
        let stale_etag =
            raw.get(format!("{PREFIX}k"), None).await.expect("raw get").kvs()[0].mod_revision().to_string();

        assert_eq!(store.get("k").await.expect("get"), None);
        assert_mismatch(store.apply(vec![set("k", b"x", etag(&stale_etag))]).await, "k");
        store.apply(vec![set("k", b"fresh", Precondition::Absent)]).await.expect("absent holds for an expired key");
        assert_eq!(value_of(&store, "k").await, Some(b"fresh".to_vec()));
    }

    #[tokio::test]
    async fn replacing_a_key_revokes_its_old_lease() {
        let etcd = TestEtcd::start().await;
        let store = etcd.store().await;
        let mut raw = etcd.client().await.expect("client");
        let long_ttl = Operation::Set {
            key: "k".into(),
            value: b"v".to_vec(),
            precondition: Precondition::None,
            ttl: Some(Duration::from_secs(600)),
        };
        store.apply(vec![long_ttl]).await.expect("set with TTL");
        let lease = raw.get(format!("{PREFIX}k"), None).await.expect("raw get").kvs()[0].lease();
        assert!(raw.leases().await.expect("leases").leases().iter().any(|l| l.id() == lease));

        store.apply(vec![set("k", b"v2", Precondition::None)]).await.expect("set without TTL");
        let deadline = Instant::now() + Duration::from_secs(5);
        while raw.leases().await.expect("leases").leases().iter().any(|l| l.id() == lease) {
            assert!(Instant::now() < deadline, "old lease never revoked");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(value_of(&store, "k").await, Some(b"v2".to_vec()));
    }

    #[tokio::test]
    async fn an_undecodable_record_is_corrupt_naming_the_key() {
        let etcd = TestEtcd::start().await;
        let store = etcd.store().await;
        let mut raw = etcd.client().await.expect("client");
        raw.put(format!("{PREFIX}app||bad"), "written by etcdctl", None).await.expect("raw put");
        match store.get("app||bad").await {
            Err(StateError::Corrupt(message)) => assert!(message.contains("'app||bad'"), "{message}"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert!(matches!(
            store.apply(vec![set("app||bad", b"x", Precondition::Absent)]).await,
            Err(StateError::Corrupt(_))
        ));
        // Last write wins does not need to read the old record, so it repairs the key.
        store.apply(vec![set("app||bad", b"ok", Precondition::None)]).await.expect("overwrite");
        assert_eq!(value_of(&store, "app||bad").await, Some(b"ok".to_vec()));
    }

    #[tokio::test]
    async fn too_large_values_and_batches() {
        let etcd = TestEtcd::start_with(&["--max-request-bytes", "65536"]).await;
        let store = etcd.store().await;
        let too_large = |result: Result<(), StateError>| match result {
            Err(StateError::TooLarge(message)) => assert!(message.contains("--max-request-bytes"), "{message}"),
            other => panic!("expected TooLarge, got {other:?}"),
        };
        // Past etcd's own check, and past gRPC's receive limit (max-request-bytes + 512 KiB).
        too_large(store.apply(vec![set("big", &vec![7u8; 100 * 1024], Precondition::None)]).await);
        too_large(store.apply(vec![set("huge", &vec![7u8; 1024 * 1024], Precondition::None)]).await);
        // Each value fits; the batch does not.
        too_large(
            store
                .apply(vec![
                    set("a", &vec![1u8; 40 * 1024], Precondition::None),
                    set("b", &vec![2u8; 40 * 1024], Precondition::None),
                ])
                .await,
        );
        for key in ["big", "huge", "a", "b"] {
            assert_eq!(store.get(key).await.expect("get"), None, "{key} written");
        }
        store.apply(vec![set("a", &vec![1u8; 40 * 1024], Precondition::None)]).await.expect("fits");

        // More keys than one etcd transaction takes.
        let many: Vec<Operation> = (0..200).map(|i| set(&format!("many{i}"), b"v", Precondition::None)).collect();
        match store.apply(many).await {
            Err(StateError::TooLarge(message)) => assert!(message.contains("--max-txn-ops"), "{message}"),
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn unreachable_etcd_is_unavailable() {
        let closed = free_port();
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(300))
            .with_timeout(Duration::from_millis(500));
        let client =
            Client::connect([format!("http://127.0.0.1:{closed}")], Some(options)).await.expect("lazy connect");
        let store = EtcdStore::new(client, PREFIX.to_string());
        let started = Instant::now();
        assert!(matches!(store.get("k").await, Err(StateError::Unavailable(_))), "get");
        let result = store.apply(vec![set("k", b"v", Precondition::None)]).await;
        assert!(matches!(result, Err(StateError::Unavailable(_))), "apply: {result:?}");
        let ttl = Operation::Set {
            key: "t".into(),
            value: b"v".to_vec(),
            precondition: Precondition::None,
            ttl: Some(Duration::from_secs(5)),
        };
        assert!(matches!(store.apply(vec![ttl]).await, Err(StateError::Unavailable(_))), "apply with TTL");
        assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn an_etcd_that_never_answers_is_unavailable_after_the_timeout() {
        // Connections complete in the kernel's backlog, but nothing ever answers.
        let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = silent.local_addr().expect("address");
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(300))
            .with_timeout(Duration::from_millis(500));
        let client = Client::connect([format!("http://{address}")], Some(options)).await.expect("lazy connect");
        let store = EtcdStore::new(client, PREFIX.to_string());
        let started = Instant::now();
        let result = store.get("k").await;
        assert!(matches!(result, Err(StateError::Unavailable(_))), "get: {result:?}");
        let result = store.apply(vec![set("k", b"v", Precondition::None)]).await;
        assert!(matches!(result, Err(StateError::Unavailable(_))), "apply: {result:?}");
        assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn concurrent_last_write_wins_writers_all_succeed() {
        let etcd = TestEtcd::start().await;
        let store = etcd.store().await;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..16 {
            let store = store.clone();
            tasks.spawn(async move {
                for j in 0..10 {
                    let ttl = (j % 2 == 0).then_some(Duration::from_secs(60));
                    let op = Operation::Set {
                        key: "hot".into(),
                        value: format!("{i}-{j}").into_bytes(),
                        precondition: Precondition::None,
                        ttl,
                    };
                    store.apply(vec![op]).await?;
                }
                Ok::<_, StateError>(())
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined.expect("task").expect("every last-write-wins write succeeds");
        }
        assert!(store.get("hot").await.expect("get").is_some());
    }

    #[tokio::test]
    async fn concurrent_etag_increments_lose_no_update() {
        let etcd = TestEtcd::start().await;
        let store = etcd.store().await;
        store.apply(vec![set("counter", b"0", Precondition::Absent)]).await.expect("seed");
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let store = store.clone();
            tasks.spawn(async move {
                let mut done = 0;
                while done < 5 {
                    let current = store.get("counter").await?.expect("counter");
                    let n: u64 = String::from_utf8_lossy(&current.value).parse().expect("number");
                    let next = (n + 1).to_string();
                    match store.apply(vec![set("counter", next.as_bytes(), etag(&current.etag))]).await {
                        Ok(()) => done += 1,
                        Err(StateError::EtagMismatch { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok::<_, StateError>(())
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined.expect("task").expect("increments");
        }
        assert_eq!(value_of(&store, "counter").await, Some(b"40".to_vec()));
    }
}
