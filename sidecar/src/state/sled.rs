//! `state.sled`: the embedded state store, one sled database in a directory of its own.
//!
//! Layout (format version [`FORMAT_VERSION`]), three trees in one sled `Db`:
//! - `tandem_meta`: `__tandem_state_format` = the format version, written when the store is
//!   created. [`SledStore::open`] refuses a database without it (unless a `.tandem-state-creating`
//!   file says an earlier start was interrupted while creating it), so tandemd never writes into
//!   a database or directory it did not create.
//! - `tandem_state`: key -> record. A record is `[version u8][etag u64 BE][expires_at u64 BE][value]`:
//!   the ETag comes from sled's `generate_id`, which never hands out a number twice, even across
//!   restarts, and is shown as a decimal string; `expires_at` is unix milliseconds, 0 for none.
//! - `tandem_expiry`: `[expires_at u64 BE][key]` -> empty, one entry per write with a TTL, so the
//!   purger finds due keys with a range scan instead of reading every record. Entries are never
//!   updated when a key is rewritten; the purger re-checks the record itself, so a stale entry
//!   only costs one look-up when its time comes.
//!
//! Every [`StateStore::apply`] is atomic over the state and expiry trees, and durable (fsynced)
//! before it returns. All of a store's writes go to one writer thread of its own, which takes
//! every write waiting, applies them in one sled transaction in the order they came (a write
//! whose precondition fails is taken back within it, alone), makes them durable with one flush
//! (group commit) and answers them all. sled 0.34 writes and syncs its log once per
//! transaction, on threads it wakes and starts for the purpose, so one transaction per write
//! cost several times the work itself (BENCHMARKS.md). The sidecar may run a single runtime
//! thread, which must not wait on any of it. Reads are in-memory look-ups done inline:
//! measured, a hand-off cost more than the read.
//! Expired records are invisible at once and deleted later by [`SledStore::spawn_purger`], on
//! the writer thread too.

use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sled::transaction::{TransactionError, Transactional, TransactionalTree, UnabortableTransactionError};
use tokio::sync::oneshot;

use super::{Operation, Precondition, StateError, StateStore, StateValue};
use crate::disk::DiskSpace;
use crate::durability;

/// The on-disk format this code reads and writes: the marker in the meta tree and the first
/// byte of every record.
pub const FORMAT_VERSION: u8 = 1;

const META_TREE: &[u8] = b"tandem_meta";
const FORMAT_KEY: &[u8] = b"__tandem_state_format";
const STATE_TREE: &[u8] = b"tandem_state";
const EXPIRY_TREE: &[u8] = b"tandem_expiry";

/// Present in a store directory from before sled creates its files until the format marker is
/// durable, so a start interrupted in between can be told from a foreign or damaged store.
const CREATING: &str = ".tandem-state-creating";

/// Version byte, ETag, expiry.
const RECORD_HEADER: usize = 1 + 8 + 8;

/// How many due expiry entries one purge transaction handles, so that no single transaction
/// (which holds sled's global transaction lock) grows with the backlog.
const PURGE_CHUNK: usize = 256;

/// Writes the writer thread takes at most into one transaction and flush, so that a steady
/// stream of writes still gets flushed (and answered) regularly.
const WRITES_PER_FLUSH: usize = 256;

/// The `state.sled` store. Cheap to share behind an `Arc<dyn StateStore>`.
pub struct SledStore {
    inner: Arc<Inner>,
    /// The store's writer thread takes its writes from here, and ends once this is dropped.
    writer: Arc<mpsc::Sender<Job>>,
    /// The data dir's free space, checked before every write (none in unit tests).
    disk: Option<Arc<DiskSpace>>,
}

/// A write for the writer thread, and where its outcome goes.
enum Job {
    Apply { operations: Vec<Operation>, now: u64, done: oneshot::Sender<Result<(), StateError>> },
    Purge { now: u64, done: oneshot::Sender<Result<usize, StateError>> },
}

struct Inner {
    /// Kept so the database is flushed as a whole; the trees below live in it.
    db: sled::Db,
    state: sled::Tree,
    expiry: sled::Tree,
    path: PathBuf,
}

impl SledStore {
    /// Opens the store in directory `path`, creating it (and its parents) when missing or empty.
    ///
    /// Refuses, with `StateError::Corrupt` naming `path` (and never letting sled write into a
    /// directory that does not already hold a sled database):
    /// a path that is not a directory; a non-empty directory that does not hold a sled database;
    /// a sled database without tandem's format marker (unless a `.tandem-state-creating` file
    /// says this code was creating it, and it holds nothing); another format version; a
    /// database sled cannot open.
    /// Note that sled 0.34 itself starts over a log file it cannot read (rewriting it) before
    /// these checks run; such a store is still refused, now and on every later start, because
    /// its marker is gone with the log.
    /// A database locked by another process is `StateError::Unavailable`.
    ///
    /// Blocking (it reads and, on creation, fsyncs): meant for start-up.
    pub fn open(path: &Path) -> Result<SledStore, StateError> {
        let shown = path.display();
        let sentinel = path.join(CREATING);
        let creating = match std::fs::metadata(path) {
            Ok(meta) if !meta.is_dir() => {
                return Err(StateError::Corrupt(format!(
                    "state store path {shown} exists and is not a directory; refusing to use it"
                )));
            }
            Ok(_) => {
                let entries = dir_entries(path)?;
                if entries.is_empty() {
                    begin_creation(&sentinel)?;
                    true
                } else if entries.iter().any(|name| name == CREATING) {
                    // An earlier start stopped while creating the store: finish the job.
                    true
                } else if path.join("conf").is_file() && path.join("db").is_file() {
                    false
                } else {
                    // Never let sled create its files beside somebody else's.
                    return Err(StateError::Corrupt(format!(
                        "state store directory {shown} is not empty and holds no tandem state store \
                         (found {}); refusing to use it",
                        sample(&entries)
                    )));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(path)
                    .map_err(|e| StateError::Internal(format!("cannot create state store directory {shown}: {e}")))?;
                begin_creation(&sentinel)?;
                true
            }
            Err(e) => return Err(StateError::Internal(format!("cannot inspect state store path {shown}: {e}"))),
        };

        // sled may panic on damaged files instead of returning an error; a damaged store must
        // still be an error naming the path.
        let opened = std::panic::catch_unwind(|| crate::durability::sled_config(path).open());
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(sled::Error::Io(e))) if e.to_string().contains("could not acquire lock") => {
                return Err(StateError::Unavailable(format!(
                    "state store {shown} is already open (in this or another process): {e}"
                )));
            }
            Ok(Err(sled::Error::Io(e))) => {
                return Err(StateError::Internal(format!("cannot open state store {shown}: {e}")));
            }
            Ok(Err(e)) => {
                return Err(StateError::Corrupt(format!("state store {shown} cannot be opened: {e}")));
            }
            Err(_) => {
                return Err(StateError::Corrupt(format!(
                    "state store {shown} cannot be opened: sled failed reading its files"
                )));
            }
        };

        let open_error = |e: sled::Error| open_failure(path, e);
        let meta = db.open_tree(META_TREE).map_err(open_error)?;
        match meta.get(FORMAT_KEY).map_err(open_error)? {
            Some(version) if version.as_ref() == [FORMAT_VERSION] => {}
            Some(version) => {
                return Err(StateError::Corrupt(format!(
                    "state store {shown} has format {}, this tandemd reads format {FORMAT_VERSION}",
                    match version.as_ref() {
                        [v] => v.to_string(),
                        other => format!("{other:?}"),
                    }
                )));
            }
            // Only a store this code began creating may be unmarked, and then it holds nothing
            // yet. Anything else is refused, including a store whose log sled could not read:
            // sled starts such a log over, so the marker is gone and the store looks empty.
            None if creating && holds_nothing(&db).map_err(open_error)? => {
                meta.insert(FORMAT_KEY, &[FORMAT_VERSION]).map_err(open_error)?;
                db.flush().map_err(open_error)?;
            }
            None => {
                return Err(StateError::Corrupt(format!(
                    "state store directory {shown} holds a sled database without tandem's {} \
                     marker (not created by tandemd, or its files are damaged); refusing to use it",
                    String::from_utf8_lossy(FORMAT_KEY)
                )));
            }
        }
        if creating {
            // The marker is durable: the store is complete.
            std::fs::remove_file(&sentinel).map_err(|e| {
                StateError::Internal(format!("cannot remove {} after creating the store: {e}", sentinel.display()))
            })?;
        }

        let state = db.open_tree(STATE_TREE).map_err(open_error)?;
        let expiry = db.open_tree(EXPIRY_TREE).map_err(open_error)?;
        let inner = Arc::new(Inner { db, state, expiry, path: path.to_path_buf() });
        let writer = spawn_writer(inner.clone())
            .map_err(|e| StateError::Internal(format!("cannot start the writer thread of state store {shown}: {e}")))?;
        Ok(SledStore { inner, writer: Arc::new(writer), disk: None })
    }

    /// Refuses writes (and skips purges) while `disk` has too little space left: sled keeps
    /// the first I/O error it meets and fails every later call with it, reads included.
    pub fn with_disk(mut self, disk: Arc<DiskSpace>) -> SledStore {
        self.disk = Some(disk);
        self
    }

    /// `Err` when the data dir has too little space for about `bytes` more.
    fn check_disk(&self, bytes: u64) -> Result<(), StateError> {
        self.disk.as_ref().map_or(Ok(()), |disk| disk.check(bytes).map_err(StateError::from))
    }

    /// Deletes every record whose expiry has passed, returning how many it deleted.
    ///
    /// Walks the expiry index up to now in chunks; each chunk is one transaction that re-reads
    /// each record and deletes it only if it is still expired (a key rewritten since with a
    /// later or no TTL stays). Not flushed: a purge lost in a crash is redone by the next one,
    /// and the records are invisible either way. Blocking; [`SledStore::spawn_purger`] has the
    /// writer thread run it.
    pub fn purge_expired(&self) -> Result<usize, StateError> {
        self.inner.purge_expired(now_ms())
    }

    /// Starts a task that calls [`SledStore::purge_expired`] every `every` (first at once, to
    /// clear what expired while tandemd was down). The task holds only a weak reference: it
    /// ends by itself once the store is dropped, so the directory can be reopened. Failures
    /// are logged and retried at the next tick.
    ///
    /// Must be called from within a tokio runtime (it uses `tokio::spawn`).
    pub fn spawn_purger(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let writer = Arc::downgrade(&self.writer);
        let path = self.inner.path.clone();
        let disk = self.disk.clone();
        // `interval` rejects a zero period.
        let every = every.max(Duration::from_millis(1));
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                // A purge writes too (deletions go to sled's log): not on a full disk.
                if disk.as_ref().is_some_and(|disk| disk.check(64 * 1024).is_err()) {
                    continue;
                }
                let Some(writer) = writer.upgrade() else { break };
                let (done, purged) = oneshot::channel();
                let sent = writer.send(Job::Purge { now: now_ms(), done });
                drop(writer);
                if sent.is_err() {
                    break;
                }
                match purged.await {
                    Ok(Ok(0)) => {}
                    Ok(Ok(purged)) => tracing::debug!(path = %path.display(), purged, "purged expired state keys"),
                    Ok(Err(e)) => {
                        tracing::warn!(path = %path.display(), error = %e, "purging expired state keys failed")
                    }
                    Err(_) => break,
                }
            }
        })
    }

    fn writer_stopped(&self) -> StateError {
        StateError::Internal(format!("the writer thread of state store {} has stopped", self.inner.path.display()))
    }
}

/// Starts the writer thread of the store `inner`; it ends once every sender is dropped.
fn spawn_writer(inner: Arc<Inner>) -> std::io::Result<mpsc::Sender<Job>> {
    let (jobs, queue) = mpsc::channel();
    std::thread::Builder::new().name("tandem-state-writer".into()).spawn(move || inner.write_loop(&queue))?;
    Ok(jobs)
}

#[tonic::async_trait]
impl StateStore for SledStore {
    fn kind(&self) -> &'static str {
        "state.sled"
    }

    async fn get(&self, key: &str) -> Result<Option<StateValue>, StateError> {
        // Inline: a read is an in-memory lookup. It can wait behind a transaction being applied
        // (sled's process-wide lock), which is short, but never on a flush: transactions and
        // flushes run on the store's writer thread.
        self.inner.get_blocking(key, now_ms())
    }

    async fn apply(&self, operations: Vec<Operation>) -> Result<(), StateError> {
        if operations.is_empty() {
            return Ok(());
        }
        // What sled's log takes for the batch, with room for its own bookkeeping.
        let bytes: usize = operations
            .iter()
            .map(|op| match op {
                Operation::Set { key, value, .. } => 2 * (key.len() + value.len()),
                Operation::Delete { key, .. } => 2 * key.len(),
            })
            .sum();
        self.check_disk(bytes as u64 + 64 * 1024)?;
        // The transaction may wait for a flush, read pages from disk and, once per million
        // ETags, fsync the ETag counter: the writer thread does it, off the runtime thread.
        let (done, outcome) = oneshot::channel();
        self.writer.send(Job::Apply { operations, now: now_ms(), done }).map_err(|_| self.writer_stopped())?;
        outcome.await.map_err(|_| self.writer_stopped())?
    }

    async fn scan(&self, prefix: &str, limit: usize) -> Result<Vec<(String, StateValue)>, StateError> {
        // Inline, as reads are: the callers scan small, rarely used key ranges.
        self.inner.scan_blocking(prefix, limit, now_ms())
    }

    fn exclusive(&self) -> bool {
        // sled locks its directory: no other process has the store open.
        true
    }
}

impl Inner {
    /// The writer thread: takes every job waiting (up to [`WRITES_PER_FLUSH`]), applies the
    /// writes among them in one transaction in arrival order ([`Inner::apply_all`]), makes them
    /// durable with one flush and then answers them. A write that fails (an ETag mismatch) is
    /// answered at once, and leaves nothing behind.
    fn write_loop(&self, queue: &mpsc::Receiver<Job>) {
        while let Ok(first) = queue.recv() {
            let mut writes = Vec::new();
            for job in std::iter::once(first).chain(queue.try_iter().take(WRITES_PER_FLUSH - 1)) {
                match job {
                    Job::Apply { operations, now, done } => writes.push((operations, now, done)),
                    // Not flushed: a purge lost in a crash is redone by the next one.
                    Job::Purge { now, done } => {
                        let _ = done.send(self.purge_expired(now));
                    }
                }
            }
            let batch: Vec<(&[Operation], u64)> = writes.iter().map(|(ops, now, _)| (ops.as_slice(), *now)).collect();
            let outcomes = self.apply_all(&batch);
            let mut applied = Vec::new();
            for ((_, _, done), outcome) in writes.into_iter().zip(outcomes) {
                match outcome {
                    Ok(()) => applied.push(done),
                    Err(e) => {
                        let _ = done.send(Err(e));
                    }
                }
            }
            if applied.is_empty() {
                continue;
            }
            let flushed = durability::flush(&self.db);
            for done in applied {
                let _ =
                    done.send(flushed.clone().map_err(|e| {
                        StateError::Internal(format!("flushing state store {}: {e}", self.path.display()))
                    }));
            }
        }
    }

    fn get_blocking(&self, key: &str, now: u64) -> Result<Option<StateValue>, StateError> {
        let raw = self.state.get(key.as_bytes()).map_err(|e| self.storage_error("reading", key, e))?;
        let Some(raw) = raw else { return Ok(None) };
        self.live_value(key, &raw, now)
    }

    fn scan_blocking(&self, prefix: &str, limit: usize, now: u64) -> Result<Vec<(String, StateValue)>, StateError> {
        let mut found = Vec::new();
        for entry in self.state.scan_prefix(prefix.as_bytes()) {
            if found.len() >= limit {
                break;
            }
            let (key, raw) = entry.map_err(|e| self.storage_error("scanning", prefix, e))?;
            let key = String::from_utf8(key.to_vec())
                .map_err(|_| self.corrupt_record(prefix, "a key under this prefix is not UTF-8"))?;
            if let Some(value) = self.live_value(&key, &raw, now)? {
                found.push((key, value));
            }
        }
        Ok(found)
    }

    /// The value in record `raw` of `key`, `None` when it has expired.
    fn live_value(&self, key: &str, raw: &[u8], now: u64) -> Result<Option<StateValue>, StateError> {
        let record = Record::decode(raw).map_err(|why| self.corrupt_record(key, &why))?;
        if record.is_expired(now) {
            return Ok(None);
        }
        Ok(Some(StateValue {
            value: record.value.to_vec(),
            etag: record.etag.to_string(),
            expires_at: (record.expires_at != 0).then(|| UNIX_EPOCH + Duration::from_millis(record.expires_at)),
        }))
    }

    /// Applies each write of `batch` (its operations, and the time it was asked for) in one
    /// sled transaction, in order, as if one after the other: each sees the ones before it, and
    /// one whose precondition fails is undone within the transaction and does not hold back the
    /// others. One outcome per write. Once sled writes a transaction to its log it syncs that
    /// write, so one transaction per batch, rather than per write, is what makes a busy store
    /// cheap (BENCHMARKS.md). A storage error fails them all.
    fn apply_all(&self, batch: &[(&[Operation], u64)]) -> Vec<Result<(), StateError>> {
        if batch.is_empty() {
            return Vec::new();
        }
        type Outcomes = Vec<Result<(), StateError>>;
        let outcome: Result<Outcomes, TransactionError<std::convert::Infallible>> = (&self.state, &self.expiry)
            .transaction(|(state, expiry)| {
                let mut outcomes = Vec::with_capacity(batch.len());
                for (operations, now) in batch {
                    let mut undo = Vec::new();
                    let outcome = self.apply_one(state, expiry, operations, *now, &mut undo)?;
                    if outcome.is_err() {
                        for step in undo.into_iter().rev() {
                            match step {
                                Undo::Restore(key, Some(previous)) => drop(state.insert(key, previous)?),
                                Undo::Restore(key, None) => drop(state.remove(key)?),
                                Undo::Unindex(entry) => drop(expiry.remove(entry)?),
                            }
                        }
                    }
                    outcomes.push(outcome);
                }
                Ok(outcomes)
            });
        match outcome {
            Ok(outcomes) => outcomes,
            Err(TransactionError::Abort(never)) => match never {},
            Err(TransactionError::Storage(e)) => {
                let key = batch.first().and_then(|(ops, _)| ops.first()).map_or("", Operation::key);
                batch.iter().map(|_| Err(self.storage_error("writing a batch starting with", key, e.clone()))).collect()
            }
        }
    }

    /// One write's operations within [`Inner::apply_all`]'s transaction, noting in `undo` how to
    /// take back each change. The inner result is the write's own outcome; the outer one a
    /// storage error, which ends the transaction.
    fn apply_one(
        &self,
        state: &TransactionalTree,
        expiry: &TransactionalTree,
        operations: &[Operation],
        now: u64,
        undo: &mut Vec<Undo>,
    ) -> Result<Result<(), StateError>, UnabortableTransactionError> {
        for operation in operations {
            let key = operation.key();
            if let Err(e) = self.check(state, key, operation.precondition(), now)? {
                return Ok(Err(e));
            }
            undo.push(Undo::Restore(key.as_bytes().to_vec(), state.get(key.as_bytes())?));
            match operation {
                Operation::Set { value, ttl, .. } => {
                    let etag = state.generate_id()?;
                    let expires_at = ttl.map_or(0, |ttl| expiry_ms(now, ttl));
                    state.insert(key.as_bytes(), Record::encode(etag, expires_at, value))?;
                    let entry = expiry_key(expires_at, key);
                    if expires_at != 0 && expiry.insert(entry.clone(), &[])?.is_none() {
                        undo.push(Undo::Unindex(entry));
                    }
                }
                Operation::Delete { .. } => drop(state.remove(key.as_bytes())?),
            }
        }
        Ok(Ok(()))
    }

    /// Checks `precondition` against `key` as the transaction sees it (earlier operations and
    /// writes of the batch included). A record is decoded only when the precondition needs it,
    /// so a blind write can still replace a damaged record.
    fn check(
        &self,
        state: &TransactionalTree,
        key: &str,
        precondition: &Precondition,
        now: u64,
    ) -> Result<Result<(), StateError>, UnabortableTransactionError> {
        if *precondition == Precondition::None {
            return Ok(Ok(()));
        }
        let current = match state.get(key.as_bytes())? {
            None => None,
            Some(raw) => match Record::decode(&raw) {
                Ok(record) => (!record.is_expired(now)).then_some(record.etag),
                Err(why) => return Ok(Err(self.corrupt_record(key, &why))),
            },
        };
        let reason = match (precondition, current) {
            (Precondition::None, _) | (Precondition::Absent, None) => return Ok(Ok(())),
            (Precondition::EtagMatches(want), Some(etag)) if *want == etag.to_string() => return Ok(Ok(())),
            (Precondition::Absent, Some(etag)) => format!("the key already exists (ETag {etag})"),
            (Precondition::EtagMatches(want), None) => format!("expected ETag {want}, but the key does not exist"),
            (Precondition::EtagMatches(want), Some(etag)) => format!("expected ETag {want}, found {etag}"),
        };
        Ok(Err(StateError::EtagMismatch { key: key.to_string(), reason }))
    }

    fn purge_expired(&self, now: u64) -> Result<usize, StateError> {
        // Entries sort by expiry first, so everything due is below `now + 1`.
        let due_before = now.saturating_add(1).to_be_bytes();
        let mut purged = 0;
        loop {
            let due = self
                .expiry
                .range(..&due_before[..])
                .keys()
                .take(PURGE_CHUNK)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.storage_error("scanning expiries", "", e))?;
            if due.is_empty() {
                break;
            }
            let outcome: Result<usize, TransactionError<()>> =
                (&self.state, &self.expiry).transaction(|(state, expiry)| {
                    let mut deleted = 0;
                    for entry in &due {
                        expiry.remove(entry.clone())?;
                        let Some(key) = entry.get(8..) else { continue };
                        let Some(raw) = state.get(key)? else { continue };
                        // A damaged record is left for a read to report.
                        if Record::decode(&raw).is_ok_and(|record| record.is_expired(now)) {
                            state.remove(key)?;
                            deleted += 1;
                        }
                    }
                    Ok(deleted)
                });
            purged += match outcome {
                Ok(deleted) => deleted,
                Err(TransactionError::Abort(())) => 0,
                Err(TransactionError::Storage(e)) => return Err(self.storage_error("purging expired keys", "", e)),
            };
            if due.len() < PURGE_CHUNK {
                break;
            }
        }
        Ok(purged)
    }

    fn corrupt_record(&self, key: &str, why: &str) -> StateError {
        StateError::Corrupt(format!("state record for key '{key}' in {} is unreadable: {why}", self.path.display()))
    }

    fn storage_error(&self, doing: &str, key: &str, e: sled::Error) -> StateError {
        let what = if key.is_empty() {
            format!("{doing} state store {}", self.path.display())
        } else {
            format!("{doing} key '{key}' in state store {}", self.path.display())
        };
        match e {
            sled::Error::Corruption { .. } => StateError::Corrupt(format!("{what}: {e}")),
            e => StateError::Internal(format!("{what}: {e}")),
        }
    }
}

/// How to take back one change of a write that failed within a batch's transaction.
enum Undo {
    /// Put the key's record back as it was (`None`: absent).
    Restore(Vec<u8>, Option<sled::IVec>),
    /// Remove an expiry entry the write added.
    Unindex(Vec<u8>),
}

/// One decoded record, borrowing its value from the stored bytes.
#[derive(Debug)]
struct Record<'a> {
    etag: u64,
    /// Unix milliseconds; 0: never.
    expires_at: u64,
    value: &'a [u8],
}

impl<'a> Record<'a> {
    fn encode(etag: u64, expires_at: u64, value: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(RECORD_HEADER + value.len());
        bytes.push(FORMAT_VERSION);
        bytes.extend_from_slice(&etag.to_be_bytes());
        bytes.extend_from_slice(&expires_at.to_be_bytes());
        bytes.extend_from_slice(value);
        bytes
    }

    /// The record in `bytes`, or why it is not one.
    fn decode(bytes: &'a [u8]) -> Result<Record<'a>, String> {
        let Some((&version, rest)) = bytes.split_first() else {
            return Err("the record is empty".into());
        };
        if version != FORMAT_VERSION {
            return Err(format!("record format {version}, this tandemd reads format {FORMAT_VERSION}"));
        }
        let (Some(etag), Some(expires_at), Some(value)) = (rest.get(0..8), rest.get(8..16), rest.get(16..)) else {
            return Err(format!("the record is {} bytes, shorter than its {RECORD_HEADER}-byte header", bytes.len()));
        };
        Ok(Record { etag: be_u64(etag), expires_at: be_u64(expires_at), value })
    }

    fn is_expired(&self, now: u64) -> bool {
        self.expires_at != 0 && self.expires_at <= now
    }
}

fn be_u64(bytes: &[u8]) -> u64 {
    let mut array = [0u8; 8];
    array.copy_from_slice(bytes);
    u64::from_be_bytes(array)
}

fn expiry_key(expires_at: u64, key: &str) -> Vec<u8> {
    let mut entry = Vec::with_capacity(8 + key.len());
    entry.extend_from_slice(&expires_at.to_be_bytes());
    entry.extend_from_slice(key.as_bytes());
    entry
}

/// When a write at `now` with `ttl` expires, rounding up so a key lives at least its TTL;
/// never 0, which means "no expiry".
fn expiry_ms(now: u64, ttl: Duration) -> u64 {
    let ttl_ms = u64::try_from(ttl.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
    now.saturating_add(ttl_ms).max(1)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

/// The names in directory `path`.
fn dir_entries(path: &Path) -> Result<Vec<String>, StateError> {
    let read = std::fs::read_dir(path)
        .map_err(|e| StateError::Internal(format!("cannot list state store directory {}: {e}", path.display())))?;
    let mut names = Vec::new();
    for entry in read {
        let entry = entry
            .map_err(|e| StateError::Internal(format!("cannot list state store directory {}: {e}", path.display())))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// A few of `names`, for an error message.
fn sample(names: &[String]) -> String {
    let shown: Vec<String> = names.iter().take(3).map(|n| format!("'{n}'")).collect();
    match names.len() {
        0..=3 => shown.join(", "),
        n => format!("{} and {} more", shown.join(", "), n - 3),
    }
}

/// Marks the (empty) store directory as being created, durably, before sled writes into it.
fn begin_creation(sentinel: &Path) -> Result<(), StateError> {
    let failed = |e: std::io::Error| StateError::Internal(format!("cannot create {}: {e}", sentinel.display()));
    std::fs::File::create(sentinel).and_then(|file| file.sync_all()).map_err(failed)?;
    if let Some(dir) = sentinel.parent() {
        std::fs::File::open(dir).and_then(|dir| dir.sync_all()).map_err(failed)?;
    }
    Ok(())
}

/// Whether every tree of `db` is empty.
fn holds_nothing(db: &sled::Db) -> Result<bool, sled::Error> {
    for name in db.tree_names() {
        if !db.open_tree(name)?.is_empty() {
            return Ok(false);
        }
    }
    Ok(true)
}

fn open_failure(path: &Path, e: sled::Error) -> StateError {
    match e {
        sled::Error::Io(e) => StateError::Internal(format!("cannot open state store {}: {e}", path.display())),
        e => StateError::Corrupt(format!("state store {} cannot be opened: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(key: &str, value: &str, precondition: Precondition) -> Operation {
        Operation::Set { key: key.into(), value: value.as_bytes().to_vec(), precondition, ttl: None }
    }

    fn set_ttl(key: &str, value: &str, ttl: Duration) -> Operation {
        Operation::Set {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            precondition: Precondition::None,
            ttl: Some(ttl),
        }
    }

    fn delete(key: &str, precondition: Precondition) -> Operation {
        Operation::Delete { key: key.into(), precondition }
    }

    async fn value(store: &SledStore, key: &str) -> Option<String> {
        store.get(key).await.unwrap().map(|v| String::from_utf8(v.value).unwrap())
    }

    async fn etag(store: &SledStore, key: &str) -> String {
        store.get(key).await.unwrap().expect("key present").etag
    }

    /// Retries while the directory is still locked: sled's IO threads can hold the last file
    /// handle of a just-dropped database for a moment, which only matters when one process
    /// reopens a store, as these tests do.
    fn when_unlocked<T, E: std::fmt::Display>(mut open: impl FnMut() -> Result<T, E>) -> Result<T, E> {
        let started = std::time::Instant::now();
        loop {
            match open() {
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && started.elapsed() < Duration::from_secs(5) =>
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                outcome => return outcome,
            }
        }
    }

    fn open_when_unlocked(path: &Path) -> Result<SledStore, StateError> {
        when_unlocked(|| SledStore::open(path))
    }

    fn sled_open_when_unlocked(path: &Path) -> sled::Result<sled::Db> {
        when_unlocked(|| sled::open(path))
    }

    fn fresh() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = open_when_unlocked(&dir.path().join("store")).unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn a_scan_finds_live_keys_under_its_prefix_in_order_up_to_its_limit() {
        let (_dir, store) = fresh();
        assert!(store.exclusive());
        for key in ["p||b", "p||a", "q||a", "p||c"] {
            store.apply(vec![set(key, key, Precondition::None)]).await.unwrap();
        }
        store.apply(vec![set_ttl("p||gone", "x", Duration::from_millis(1))]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let keys = |found: Vec<(String, StateValue)>| found.into_iter().map(|(k, v)| (k, v.value)).collect::<Vec<_>>();
        assert_eq!(
            keys(store.scan("p||", 10).await.unwrap()),
            [
                ("p||a".to_string(), b"p||a".to_vec()),
                ("p||b".into(), b"p||b".to_vec()),
                ("p||c".into(), b"p||c".to_vec())
            ]
        );
        assert_eq!(store.scan("p||", 2).await.unwrap().len(), 2);
        assert!(store.scan("none||", 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn set_get_delete() {
        let (_dir, store) = fresh();
        assert_eq!(store.kind(), "state.sled");
        assert_eq!(value(&store, "k").await, None);
        store.apply(vec![set("k", "v1", Precondition::None)]).await.unwrap();
        let got = store.get("k").await.unwrap().unwrap();
        assert_eq!(got.value, b"v1");
        assert_eq!(got.expires_at, None);
        assert!(got.etag.parse::<u64>().is_ok(), "decimal ETag, got {}", got.etag);
        store.apply(vec![delete("k", Precondition::None)]).await.unwrap();
        assert_eq!(value(&store, "k").await, None);
        // Deleting what is not there is fine without an ETag.
        store.apply(vec![delete("k", Precondition::None)]).await.unwrap();
        store.apply(vec![]).await.unwrap();
    }

    #[tokio::test]
    async fn etags_change_on_every_write_and_never_repeat_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..2 {
            let store = open_when_unlocked(dir.path()).unwrap();
            for n in 0..5 {
                store.apply(vec![set("k", &n.to_string(), Precondition::None)]).await.unwrap();
                let tag = etag(&store, "k").await;
                assert!(seen.insert(tag.clone()), "ETag {tag} repeated");
                // Another key's writes draw from the same counter.
                store.apply(vec![set("other", "x", Precondition::None)]).await.unwrap();
                assert!(seen.insert(etag(&store, "other").await));
            }
        }
        assert_eq!(seen.len(), 20);
    }

    #[tokio::test]
    async fn etag_matches_writes_only_on_the_current_etag() {
        let (_dir, store) = fresh();
        store.apply(vec![set("k", "v1", Precondition::None)]).await.unwrap();
        let first = etag(&store, "k").await;
        store.apply(vec![set("k", "v2", Precondition::EtagMatches(first.clone()))]).await.unwrap();
        let second = etag(&store, "k").await;
        assert_ne!(first, second);

        let err = store.apply(vec![set("k", "v3", Precondition::EtagMatches(first.clone()))]).await.unwrap_err();
        match &err {
            StateError::EtagMismatch { key, reason } => {
                assert_eq!(key, "k");
                assert_eq!(reason, &format!("expected ETag {first}, found {second}"));
            }
            other => panic!("expected EtagMismatch, got {other:?}"),
        }
        assert_eq!(value(&store, "k").await.as_deref(), Some("v2"));
        assert_eq!(etag(&store, "k").await, second);

        let err = store.apply(vec![delete("k", Precondition::EtagMatches(first))]).await.unwrap_err();
        assert!(matches!(err, StateError::EtagMismatch { .. }), "{err:?}");
        assert_eq!(value(&store, "k").await.as_deref(), Some("v2"));
        store.apply(vec![delete("k", Precondition::EtagMatches(second.clone()))]).await.unwrap();
        assert_eq!(value(&store, "k").await, None);

        let err = store.apply(vec![set("k", "v", Precondition::EtagMatches(second))]).await.unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        assert_eq!(value(&store, "k").await, None);
    }

    #[tokio::test]
    async fn absent_is_first_write_wins() {
        let (_dir, store) = fresh();
        store.apply(vec![set("k", "first", Precondition::Absent)]).await.unwrap();
        let err = store.apply(vec![set("k", "second", Precondition::Absent)]).await.unwrap_err();
        match &err {
            StateError::EtagMismatch { key, reason } => {
                assert_eq!(key, "k");
                assert!(reason.contains("already exists"), "{reason}");
            }
            other => panic!("expected EtagMismatch, got {other:?}"),
        }
        assert_eq!(value(&store, "k").await.as_deref(), Some("first"));
    }

    #[tokio::test]
    async fn a_failed_operation_leaves_the_whole_batch_unwritten() {
        let (_dir, store) = fresh();
        store.apply(vec![set("b", "old", Precondition::None)]).await.unwrap();
        let err = store
            .apply(vec![
                set("a", "new", Precondition::None),
                set("b", "new", Precondition::EtagMatches("no-such-etag".into())),
                set("c", "new", Precondition::None),
            ])
            .await
            .unwrap_err();
        assert!(matches!(&err, StateError::EtagMismatch { key, .. } if key == "b"), "{err:?}");
        assert_eq!(value(&store, "a").await, None);
        assert_eq!(value(&store, "b").await.as_deref(), Some("old"));
        assert_eq!(value(&store, "c").await, None);
    }

    #[tokio::test]
    async fn writes_sharing_a_transaction_succeed_or_fail_each_on_their_own() {
        let (_dir, store) = fresh();
        store.apply(vec![set("kept", "old", Precondition::None)]).await.unwrap();
        let now = now_ms();
        let first = [set("a", "1", Precondition::None)];
        // Fails at its last operation: its first, and its TTL entry, are taken back.
        let failing = [
            set_ttl("b", "2", Duration::from_secs(60)),
            delete("kept", Precondition::None),
            set("a", "x", Precondition::EtagMatches("no-such-etag".into())),
        ];
        // Sees the first write, which is in the same transaction.
        let last = [set("a", "3", Precondition::Absent)];
        let then = [set("c", "4", Precondition::None)];
        let outcomes = store.inner.apply_all(&[(&first, now), (&failing, now), (&last, now), (&then, now)]);
        assert!(outcomes[0].is_ok() && outcomes[3].is_ok(), "{outcomes:?}");
        assert!(matches!(&outcomes[1], Err(StateError::EtagMismatch { key, .. }) if key == "a"), "{outcomes:?}");
        assert!(matches!(&outcomes[2], Err(StateError::EtagMismatch { key, .. }) if key == "a"), "{outcomes:?}");
        assert_eq!(value(&store, "a").await.as_deref(), Some("1"));
        assert_eq!(value(&store, "b").await, None);
        assert_eq!(value(&store, "kept").await.as_deref(), Some("old"));
        assert_eq!(value(&store, "c").await.as_deref(), Some("4"));
        assert_eq!(store.inner.expiry.len(), 0, "the failed write's expiry entry is gone too");
    }

    #[tokio::test]
    async fn operations_on_one_key_apply_in_order() {
        let (_dir, store) = fresh();
        store.apply(vec![set("k", "v", Precondition::None), delete("k", Precondition::None)]).await.unwrap();
        assert_eq!(value(&store, "k").await, None);

        // Each precondition sees the earlier operations of its batch.
        store
            .apply(vec![
                set("k", "1", Precondition::Absent),
                delete("k", Precondition::None),
                set("k", "2", Precondition::Absent),
            ])
            .await
            .unwrap();
        assert_eq!(value(&store, "k").await.as_deref(), Some("2"));
        let err = store
            .apply(vec![set("j", "1", Precondition::Absent), set("j", "2", Precondition::Absent)])
            .await
            .unwrap_err();
        assert!(matches!(&err, StateError::EtagMismatch { key, .. } if key == "j"), "{err:?}");
        assert_eq!(value(&store, "j").await, None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_compare_and_set_loses_no_update() {
        let (_dir, store) = fresh();
        let store = Arc::new(store);
        store.apply(vec![set("counter", "0", Precondition::Absent)]).await.unwrap();
        let writers = (0..8).map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                for _ in 0..10 {
                    loop {
                        let current = store.get("counter").await.unwrap().unwrap();
                        let n: u32 = String::from_utf8(current.value).unwrap().parse().unwrap();
                        let next = set("counter", &(n + 1).to_string(), Precondition::EtagMatches(current.etag));
                        match store.apply(vec![next]).await {
                            Ok(()) => break,
                            Err(StateError::EtagMismatch { .. }) => continue,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            })
        });
        for writer in writers.collect::<Vec<_>>() {
            writer.await.unwrap();
        }
        assert_eq!(value(&store, "counter").await.as_deref(), Some("80"));
    }

    #[tokio::test]
    async fn expired_keys_are_invisible_at_once_and_purged_later() {
        let (_dir, store) = fresh();
        // A zero TTL expires at the moment of the write.
        store
            .apply(vec![set_ttl("gone", "v", Duration::ZERO), set_ttl("stays", "v", Duration::from_secs(3600))])
            .await
            .unwrap();
        assert_eq!(value(&store, "gone").await, None);
        let stays = store.get("stays").await.unwrap().unwrap();
        let expires_at = stays.expires_at.expect("a TTL gives an expiry");
        assert!(expires_at > SystemTime::now() + Duration::from_secs(3500));

        // Expired counts as absent for preconditions too.
        store.apply(vec![set_ttl("gone2", "v", Duration::ZERO)]).await.unwrap();
        let err = store.apply(vec![delete("gone2", Precondition::EtagMatches("0".into()))]).await.unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        store.apply(vec![set("gone2", "again", Precondition::Absent)]).await.unwrap();
        assert_eq!(value(&store, "gone2").await.as_deref(), Some("again"));

        // A short TTL: visible, then not.
        store.apply(vec![set_ttl("short", "v", Duration::from_millis(30))]).await.unwrap();
        let started = std::time::Instant::now();
        while value(&store, "short").await.is_some() {
            assert!(started.elapsed() < Duration::from_secs(5), "key with a 30 ms TTL still visible");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        // The records are still on disk until the purger runs.
        assert!(store.inner.state.contains_key("gone").unwrap());
        let purger = store.spawn_purger(Duration::from_millis(10));
        let started = std::time::Instant::now();
        while store.inner.state.contains_key("gone").unwrap() || store.inner.state.contains_key("short").unwrap() {
            assert!(started.elapsed() < Duration::from_secs(5), "expired keys not purged");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(store.inner.expiry.iter().count(), 1, "only the live TTL's index entry is left");
        assert_eq!(value(&store, "stays").await.as_deref(), Some("v"));
        assert_eq!(value(&store, "gone2").await.as_deref(), Some("again"));

        // The purger ends with the store.
        drop(store);
        tokio::time::timeout(Duration::from_secs(5), purger).await.expect("purger stops").unwrap();
    }

    #[tokio::test]
    async fn purge_rechecks_a_key_rewritten_without_ttl() {
        let (_dir, store) = fresh();
        store.apply(vec![set_ttl("k", "short-lived", Duration::ZERO)]).await.unwrap();
        store.apply(vec![set("k", "forever", Precondition::None)]).await.unwrap();
        assert_eq!(store.purge_expired().unwrap(), 0);
        assert_eq!(value(&store, "k").await.as_deref(), Some("forever"));
        assert_eq!(store.inner.expiry.iter().count(), 0, "the stale index entry is gone");
    }

    #[tokio::test]
    async fn data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let tag = {
            let store = open_when_unlocked(dir.path()).unwrap();
            store
                .apply(vec![set("k", "kept", Precondition::None), set_ttl("t", "ttl", Duration::from_secs(3600))])
                .await
                .unwrap();
            etag(&store, "k").await
        };
        let store = open_when_unlocked(dir.path()).unwrap();
        let got = store.get("k").await.unwrap().unwrap();
        assert_eq!((got.value.as_slice(), got.etag.as_str()), (&b"kept"[..], tag.as_str()));
        assert!(store.get("t").await.unwrap().unwrap().expires_at.is_some());
    }

    #[test]
    fn refuses_a_foreign_directory_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let foreign = dir.path().join("notes.txt");
        std::fs::write(&foreign, b"mine").unwrap();
        let err = open_when_unlocked(dir.path()).err().expect("refused");
        assert!(matches!(err, StateError::Corrupt(_)), "{err:?}");
        assert!(err.to_string().contains(&dir.path().display().to_string()), "{err}");
        assert!(err.to_string().contains("notes.txt"), "{err}");
        assert_eq!(std::fs::read(&foreign).unwrap(), b"mine");
        assert_eq!(dir_entries(dir.path()).unwrap(), vec!["notes.txt".to_string()]);
    }

    #[test]
    fn refuses_a_path_that_is_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("state");
        std::fs::write(&file, b"not a directory").unwrap();
        let err = open_when_unlocked(&file).err().expect("refused");
        assert!(matches!(err, StateError::Corrupt(_)), "{err:?}");
        assert!(err.to_string().contains(&file.display().to_string()), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"not a directory");
    }

    #[test]
    fn refuses_a_sled_database_it_did_not_create() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled_open_when_unlocked(dir.path()).unwrap();
            db.insert("someone", "else's").unwrap();
            db.flush().unwrap();
        }
        let err = open_when_unlocked(dir.path()).err().expect("refused");
        assert!(matches!(err, StateError::Corrupt(_)), "{err:?}");
        assert!(err.to_string().contains(&dir.path().display().to_string()), "{err}");
        let db = sled_open_when_unlocked(dir.path()).unwrap();
        assert_eq!(db.get("someone").unwrap().as_deref(), Some(&b"else's"[..]));
    }

    #[test]
    fn finishes_a_creation_that_was_interrupted() {
        // Interrupted before sled wrote anything, and after sled created its files.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CREATING), b"").unwrap();
        drop(open_when_unlocked(dir.path()).unwrap());
        assert!(!dir.path().join(CREATING).exists());

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CREATING), b"").unwrap();
        drop(sled_open_when_unlocked(dir.path()).unwrap());
        drop(open_when_unlocked(dir.path()).unwrap());
        assert!(!dir.path().join(CREATING).exists());
        open_when_unlocked(dir.path()).unwrap();
    }

    #[test]
    fn refuses_an_empty_sled_database_it_did_not_create() {
        let dir = tempfile::tempdir().unwrap();
        drop(sled_open_when_unlocked(dir.path()).unwrap());
        let err = open_when_unlocked(dir.path()).err().expect("refused");
        assert!(matches!(err, StateError::Corrupt(_)), "{err:?}");
    }

    #[test]
    fn refuses_a_store_whose_log_was_destroyed() {
        let dir = tempfile::tempdir().unwrap();
        drop(open_when_unlocked(dir.path()).unwrap());
        std::fs::write(dir.path().join("db"), vec![0; 4096]).unwrap();
        for attempt in 0..2 {
            let err = open_when_unlocked(dir.path()).err().unwrap_or_else(|| panic!("attempt {attempt} not refused"));
            assert!(matches!(err, StateError::Corrupt(_)), "{err:?}");
            assert!(err.to_string().contains(&dir.path().display().to_string()), "{err}");
        }
    }

    #[test]
    fn refuses_another_format_version() {
        let dir = tempfile::tempdir().unwrap();
        drop(open_when_unlocked(dir.path()).unwrap());
        {
            let db = sled_open_when_unlocked(dir.path()).unwrap();
            db.open_tree(META_TREE).unwrap().insert(FORMAT_KEY, &[FORMAT_VERSION + 1]).unwrap();
            db.flush().unwrap();
        }
        let err = open_when_unlocked(dir.path()).err().expect("refused");
        assert!(err.to_string().contains("format 2"), "{err}");
    }

    #[test]
    fn refuses_damaged_sled_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("conf"), vec![0xAB; 64]).unwrap();
        std::fs::write(dir.path().join("db"), vec![0xCD; 4096]).unwrap();
        let err = open_when_unlocked(dir.path()).err().expect("refused");
        assert!(err.to_string().contains(&dir.path().display().to_string()), "{err}");
    }

    #[test]
    fn a_store_open_elsewhere_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let _first = open_when_unlocked(dir.path()).unwrap();
        let err = SledStore::open(dir.path()).err().expect("refused");
        assert!(matches!(err, StateError::Unavailable(_)), "{err:?}");
        assert!(err.to_string().contains(&dir.path().display().to_string()), "{err}");
    }

    #[tokio::test]
    async fn a_damaged_record_is_an_error_not_a_panic() {
        let (_dir, store) = fresh();
        store.inner.state.insert("short", &[FORMAT_VERSION, 1, 2]).unwrap();
        store.inner.state.insert("future", vec![FORMAT_VERSION + 1; 40]).unwrap();
        store.inner.state.insert("empty", &[]).unwrap();
        for key in ["short", "future", "empty"] {
            let err = store.get(key).await.unwrap_err();
            assert!(matches!(err, StateError::Corrupt(_)), "{err:?}");
            assert!(err.to_string().contains(&format!("'{key}'")), "{err}");
            let err = store.apply(vec![set(key, "v", Precondition::EtagMatches("1".into()))]).await.unwrap_err();
            assert!(matches!(err, StateError::Corrupt(_)), "{err:?}");
        }
        // A blind write needs nothing from the old record, so it replaces it.
        store.apply(vec![set("short", "fixed", Precondition::None)]).await.unwrap();
        assert_eq!(value(&store, "short").await.as_deref(), Some("fixed"));
    }

    #[test]
    fn records_round_trip() {
        let bytes = Record::encode(42, 7, b"value");
        let record = Record::decode(&bytes).unwrap();
        assert_eq!((record.etag, record.expires_at, record.value), (42, 7, &b"value"[..]));
        assert!(Record::decode(&bytes[..RECORD_HEADER - 1]).is_err());
        assert!(Record::decode(&Record::encode(1, 0, b"")).unwrap().value.is_empty());
    }
}
