//! The state building block: the [`StateStore`] trait every store implements, and the stores.
//!
//! - [`sled`]: `state.sled`, embedded in tandemd, on disk under `--data-dir` (the default).
//! - [`etcd`]: `state.etcd`, in etcd, so every replica of an app sees one state.
//! - [`registry`]: component type -> store, with each store's name and key prefix.
//!
//! Stores never see Dapr's protos or sled/etcd types leak out: the API layer
//! (`crate::api::state`) turns requests into [`Operation`]s on already-prefixed keys, and
//! every store gives them the same meaning:
//! - a write's [`Precondition`] is checked for every operation before anything is written, so
//!   a batch (a transaction, a bulk save) is all-or-nothing;
//! - every write gives the key a new, never reused ETag;
//! - an expired key is absent for reads and preconditions at once, and purged later;
//! - a write is durable (survives `kill -9`) before `apply` returns.

pub mod etcd;
pub mod registry;
pub mod sled;

use std::time::{Duration, SystemTime};

/// A stored value with its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateValue {
    pub value: Vec<u8>,
    pub etag: String,
    /// When the key stops being visible, if it has a TTL.
    pub expires_at: Option<SystemTime>,
}

/// What must hold for a write to happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    /// Last write wins.
    None,
    /// The key exists (unexpired) with this ETag.
    EtagMatches(String),
    /// The key does not exist (first-write-wins without an ETag).
    Absent,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    Set {
        key: String,
        value: Vec<u8>,
        precondition: Precondition,
        /// `None`: the key never expires (a new write without a TTL also clears an old TTL).
        ttl: Option<Duration>,
    },
    Delete {
        key: String,
        /// `Absent` is never used for deletes; deleting a missing key without an ETag succeeds.
        precondition: Precondition,
    },
}

impl Operation {
    pub fn key(&self) -> &str {
        match self {
            Operation::Set { key, .. } | Operation::Delete { key, .. } => key,
        }
    }

    pub fn precondition(&self) -> &Precondition {
        match self {
            Operation::Set { precondition, .. } | Operation::Delete { precondition, .. } => precondition,
        }
    }
}

/// What can go wrong in a store. Messages name the key (as the store saw it) or the path.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A precondition failed: nothing of the batch was written.
    #[error("ETag mismatch for key '{key}': {reason}")]
    EtagMismatch { key: String, reason: String },
    /// The value (or the whole batch) is larger than the store accepts.
    #[error("{0}")]
    TooLarge(String),
    /// The data dir has too little space left to write: nothing was written; reads go on.
    #[error(transparent)]
    DiskFull(#[from] crate::disk::DiskFull),
    /// The backing service cannot be reached now; retrying later may work.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// The store's files are not a store this version can read, or are damaged.
    #[error("{0}")]
    Corrupt(String),
    #[error("state store error: {0}")]
    Internal(String),
}

/// A key-value store with ETags, TTLs and atomic batches.
#[tonic::async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// The component type, e.g. `state.sled`.
    fn kind(&self) -> &'static str;

    /// The value of `key`, `None` when it is absent or expired.
    async fn get(&self, key: &str) -> Result<Option<StateValue>, StateError>;

    /// Applies `operations` in order as one atomic, durable batch: either every
    /// precondition holds and all are written, or none is (`EtagMismatch` naming the key).
    /// Several operations on one key apply in order (a set then a delete leaves it absent).
    async fn apply(&self, operations: Vec<Operation>) -> Result<(), StateError>;

    /// Up to `limit` live keys that start with `prefix`, in key order, with their values.
    async fn scan(&self, prefix: &str, limit: usize) -> Result<Vec<(String, StateValue)>, StateError>;

    /// Whether this sidecar is the only process that opens the store (an embedded store whose
    /// directory is locked while open), so whatever is in it was written by this sidecar or an
    /// earlier run of it.
    fn exclusive(&self) -> bool;
}
