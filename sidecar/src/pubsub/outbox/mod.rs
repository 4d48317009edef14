//! The publisher's outbox: every published event, on disk until each of its subscribers has
//! taken it (or it was dropped or dead-lettered). A publish is acknowledged only once its
//! record is synced to disk, so an acknowledged event survives `kill -9` of the sidecar and a
//! power loss.
//!
//! The outbox is an append-only log (module `log`) of segment files with an index in memory: a
//! publish appends its record, a settled attempt appends the deliveries still pending (none: the
//! record is done), and concurrent publishes share one `fdatasync` (group commit). Nothing is ever
//! rewritten in place, where a B-tree store spent most of the sidecar's time copying pages
//! (BENCHMARKS.md, pub/sub).
//!
//! Appends go to a buffer in memory; the group-commit task writes it out with one `pwrite`
//! before each sync, off the runtime thread, so a publish or a settled attempt costs no system
//! call of its own (two per event were a tenth of the publishing sidecar's CPU). A settled
//! attempt asks for a write (not a sync), so it reaches the file within one round; a crash may
//! lose the last ones, which means redeliveries, as at-least-once allows.
//!
//! Space comes back a segment at a time, oldest first: once every record of the oldest segment
//! is settled its file is removed, and when only a few are left (a stuck subscriber) they are
//! copied to the newest segment first. Removing only the oldest keeps every settlement that
//! older records depend on. Removals wait for the next sync, so the copies are on disk before
//! the originals go.
//!
//! The index holds each pending record's place in the log and its deliveries; recently
//! published events are also kept in memory (up to [`EVENT_CACHE_BYTES`]), so delivering a
//! fresh event reads nothing back from disk.
//!
//! An outbox written by an earlier Tandem (a sled database) is converted at open, without
//! losing its events (module `migrate`).

mod log;
mod migrate;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use prost::Message;
use tandem_proto::internal::{OutboxRecord, PendingDelivery};
use tandem_proto::runtime::TopicEventRequest;
use tokio::sync::{mpsc, oneshot};

use super::PubSubError;
use log::Kind;

/// A segment takes records until it is this large; the next record starts a new one.
const SEGMENT_BYTES: u64 = 16 << 20;
/// Recently published events kept in memory for their first delivery, at most.
pub const EVENT_CACHE_BYTES: usize = 8 << 20;
/// Appended bytes kept in memory at most before the appending call writes them out itself
/// (the group-commit task normally does it well before).
const WRITE_BUFFER_BYTES: usize = 1 << 20;
/// Group-commit rounds syncing at once: a publish that arrives during a sync starts its own
/// round at once instead of waiting for the sync to end.
const ROUNDS_IN_FLIGHT: usize = 2;

/// Sizes, smaller in tests.
#[derive(Debug, Clone, Copy)]
struct Limits {
    segment_bytes: u64,
    cache_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { segment_bytes: SEGMENT_BYTES, cache_bytes: EVENT_CACHE_BYTES }
    }
}
/// The file that marks a directory as an outbox (and its format).
const MARKER: &str = "OUTBOX";
const MARKER_TEXT: &str = "tandem pubsub.embedded outbox, log format 1\n";
/// Held (locked) while a process has the outbox open.
const LOCK: &str = "LOCK";

pub struct Outbox {
    shared: Arc<Shared>,
}

struct Shared {
    dir: PathBuf,
    shown: String,
    state: Mutex<State>,
    /// Records pending, for the backlog limit.
    len: AtomicUsize,
    max_backlog: usize,
    /// Sync requests (with who waits for the sync) or write requests (`None`: settled
    /// attempts to write out) to the group-commit task, started on first use.
    syncs: OnceLock<mpsc::UnboundedSender<Option<Waiter>>>,
    /// Held shared by a round that only syncs files, exclusively by one that also syncs a
    /// segment that stopped being the active one or removes retired segments, so that a
    /// removal never overtakes the sync of the copies it depends on.
    syncing: std::sync::RwLock<()>,
    /// The directory lock, released when the outbox closes.
    _lock: File,
}

type Waiter = oneshot::Sender<Result<(), String>>;
/// A group-commit round on its blocking thread.
type Round = tokio::task::JoinHandle<Result<(), String>>;

/// A pending record: where it is in the log, and what is left to deliver.
struct Indexed {
    segment: u64,
    offset: u64,
    frame_len: u32,
    deliveries: Vec<PendingDelivery>,
    /// The event itself, while it fits the cache.
    event: Option<TopicEventRequest>,
}

struct Segment {
    file: Arc<File>,
    size: u64,
    /// Pending records whose latest full copy is in this segment, and their bytes.
    live: usize,
    live_bytes: u64,
}

struct State {
    limits: Limits,
    index: BTreeMap<u64, Indexed>,
    segments: BTreeMap<u64, Segment>,
    /// The segment appended to (the newest).
    active: u64,
    next_seq: u64,
    /// Segments written to since the last sync, other than the active one.
    unsynced: Vec<Arc<File>>,
    /// A segment file was created since the last sync.
    dir_dirty: bool,
    /// Segments no longer needed, removed (oldest first) after the next sync.
    retired: Vec<u64>,
    cached_bytes: usize,
    /// Entries appended to the active segment and not written to its file yet: the last
    /// `buffer.len()` bytes of its size.
    buffer: Vec<u8>,
}

impl Outbox {
    /// Opens (or creates) the outbox at `path`; refuses a directory that is not an outbox and
    /// one another process has open.
    pub fn open(path: &Path, max_backlog: usize) -> Result<Outbox, PubSubError> {
        Outbox::open_with(path, max_backlog, Limits::default())
    }

    fn open_with(path: &Path, max_backlog: usize, limits: Limits) -> Result<Outbox, PubSubError> {
        let shown = path.display().to_string();
        let storage =
            |what: &str, e: &dyn std::fmt::Display| PubSubError::Storage(format!("outbox {shown}: {what}: {e}"));
        if path.exists() && !path.is_dir() {
            return Err(PubSubError::Storage(format!("outbox {shown} is not a directory")));
        }
        let has_marker = path.join(MARKER).exists();
        let from_sled = migrate::holds_sled(path);
        let foreign = |entry: std::io::Result<std::fs::DirEntry>| entry.is_ok_and(|e| e.file_name() != LOCK);
        if !has_marker && !from_sled && std::fs::read_dir(path).is_ok_and(|mut d| d.any(foreign)) {
            return Err(PubSubError::Storage(format!(
                "{shown} holds files that are not a Tandem outbox; refusing to use it"
            )));
        }
        std::fs::create_dir_all(path).map_err(|e| storage("creating the directory", &e))?;
        let lock = File::create(path.join(LOCK)).map_err(|e| storage("creating its lock file", &e))?;
        lock.try_lock().map_err(|e| storage("it is in use by another process", &e))?;
        if !has_marker {
            if from_sled {
                let moved = migrate::from_sled(path).map_err(|e| storage("converting the sled outbox", &e))?;
                tracing::info!(outbox = %shown, records = moved, "converted an outbox written by an earlier Tandem");
            }
            std::fs::write(path.join(MARKER), MARKER_TEXT).map_err(|e| storage("writing its marker", &e))?;
            log::sync_dir(path).map_err(|e| storage("syncing the directory", &e))?;
        }
        if from_sled {
            // Converted (now or by a run that stopped before cleaning up): sled's files go.
            migrate::remove_sled_files(path).map_err(|e| storage("removing the converted sled files", &e))?;
        }
        let state = State::replay(path, &shown, limits).map_err(|e| storage("reading the log", &e))?;
        let len = AtomicUsize::new(state.index.len());
        Ok(Outbox {
            shared: Arc::new(Shared {
                dir: path.to_path_buf(),
                shown,
                state: Mutex::new(state),
                len,
                max_backlog,
                syncs: OnceLock::new(),
                syncing: std::sync::RwLock::new(()),
                _lock: lock,
            }),
        })
    }

    /// Stores `record` durably; refused when the backlog is full.
    pub async fn push(&self, record: &OutboxRecord) -> Result<u64, PubSubError> {
        self.push_all([record]).await.pop().expect("one outcome per record")
    }

    /// Stores each of `records` (refused one by one once the backlog is full) and makes them
    /// durable with a single sync: one outcome per record, in order.
    pub async fn push_all<'a>(
        &self,
        records: impl IntoIterator<Item = &'a OutboxRecord>,
    ) -> Vec<Result<u64, PubSubError>> {
        let shared = &self.shared;
        let mut outcomes = Vec::new();
        {
            let mut state = shared.state();
            for record in records {
                let waiting = state.index.len();
                outcomes.push(if waiting >= shared.max_backlog {
                    Err(PubSubError::BacklogFull { waiting, max: shared.max_backlog })
                } else {
                    state.insert(&shared.dir, record).map_err(|e| shared.storage("storing an event", e))
                });
            }
            shared.len.store(state.index.len(), Ordering::Relaxed);
        }
        if outcomes.iter().any(Result::is_ok)
            && let Err(e) = self.sync().await
        {
            // Stored but maybe not durable: not acknowledged. Should it survive anyway, it is
            // delivered, which at-least-once allows.
            for outcome in outcomes.iter_mut().filter(|o| o.is_ok()) {
                *outcome = Err(shared.storage("syncing", &e));
            }
        }
        outcomes
    }

    /// Returns once everything appended before the call is on disk.
    async fn sync(&self) -> Result<(), String> {
        let (waiter, done) = oneshot::channel();
        self.shared.syncer().send(Some(waiter)).map_err(|_| "the sync task has stopped".to_string())?;
        done.await.map_err(|_| "the sync task has stopped".to_string())?
    }

    /// Up to `limit` records after `after` (all records when `None`), oldest first, so a scan
    /// holds a bounded number in memory. A record that cannot be read back is reported and
    /// skipped (left in the log, never delivered half-read).
    pub fn records_after(&self, after: Option<u64>, limit: usize) -> Vec<(u64, OutboxRecord)> {
        let state = self.shared.state();
        let start = after.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        let mut out = Vec::new();
        for (&seq, entry) in state.index.range((start, std::ops::Bound::Unbounded)) {
            if out.len() >= limit {
                break;
            }
            match state.event(entry) {
                Ok(event) => out.push((seq, OutboxRecord { event: Some(event), deliveries: entry.deliveries.clone() })),
                Err(e) => {
                    tracing::error!(outbox = %self.shared.shown, seq, error = %e, "unreadable outbox record; skipped")
                }
            }
        }
        out
    }

    /// The event of record `seq` and `app_id`'s pending delivery of it; `None` when that
    /// delivery is settled (or the record gone).
    pub fn pending(&self, seq: u64, app_id: &str) -> Result<Option<(TopicEventRequest, PendingDelivery)>, PubSubError> {
        let state = self.shared.state();
        let Some(entry) = state.index.get(&seq) else { return Ok(None) };
        let Some(pending) = entry.deliveries.iter().find(|d| d.app_id == app_id) else { return Ok(None) };
        let event = state.event(entry).map_err(|e| self.shared.storage("reading an event", e))?;
        Ok(Some((event, pending.clone())))
    }

    /// Changes the pending deliveries of record `seq` with `change` (which returns what the
    /// caller needs to know) and records the change; the record is done once none is left.
    /// `None` if the record is gone. Not synced: losing the change in a crash means a
    /// redelivery, which at-least-once allows.
    pub fn modify<T>(
        &self,
        seq: u64,
        change: impl FnOnce(&mut Vec<PendingDelivery>) -> T,
    ) -> Result<Option<T>, PubSubError> {
        let shared = &self.shared;
        let mut state = shared.state();
        let Some(entry) = state.index.get(&seq) else { return Ok(None) };
        let appended_before = state.buffer.len();
        let mut deliveries = entry.deliveries.clone();
        let answer = change(&mut deliveries);
        if deliveries != entry.deliveries {
            state.update(&shared.dir, seq, deliveries).map_err(|e| shared.storage("recording a delivery", e))?;
            shared.len.store(state.index.len(), Ordering::Relaxed);
        }
        // The change is written out by the next round of the group-commit task; the first
        // change since the last round asks for one, and so does a retired segment (removed soon,
        // not only at the next publish).
        let ask = !state.retired.is_empty() || appended_before == 0 && !state.buffer.is_empty();
        drop(state);
        if ask {
            shared.ask_for_write();
        }
        Ok(Some(answer))
    }

    pub fn len(&self) -> usize {
        self.shared.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn storage(&self, what: &str, e: impl std::fmt::Display) -> PubSubError {
        PubSubError::Storage(format!("outbox {}: {what}: {e}", self.shown))
    }

    /// The group-commit task's queue; the task starts on first use.
    fn syncer(self: &Arc<Self>) -> &mpsc::UnboundedSender<Option<Waiter>> {
        self.syncs.get_or_init(|| spawn_syncer(Arc::downgrade(self)))
    }

    /// Has the buffer written out soon: by the group-commit task, or at once outside a runtime.
    fn ask_for_write(self: &Arc<Self>) {
        if tokio::runtime::Handle::try_current().is_ok() {
            let _ = self.syncer().send(None);
        } else if let Err(e) = self.state().write_buffer() {
            tracing::warn!(outbox = %self.shown, error = %e, "cannot write the outbox buffer yet");
        }
    }

    /// One round of the group-commit task: writes the buffer out and, when `sync` (someone
    /// waits for durability) or segments were created or retired, syncs what was written and
    /// then removes retired segments, oldest first.
    fn write_and_sync(&self, sync: bool) -> Result<(), String> {
        let work = {
            let mut state = self.state();
            // Under the lock, so that a reader finds each entry in the buffer or in the file.
            state.write_buffer().map_err(|e| e.to_string())?;
            if !sync && !state.dir_dirty && state.retired.is_empty() {
                return Ok(());
            }
            let mut files = std::mem::take(&mut state.unsynced);
            if let Some(active) = state.segments.get(&state.active) {
                files.push(active.file.clone());
            }
            SyncWork {
                files,
                dir_dirty: std::mem::take(&mut state.dir_dirty),
                retired: std::mem::take(&mut state.retired),
            }
        };
        let (_alone, _together);
        if work.files.len() > 1 || work.dir_dirty || !work.retired.is_empty() {
            _alone = self.syncing.write().unwrap_or_else(|p| p.into_inner());
        } else {
            _together = self.syncing.read().unwrap_or_else(|p| p.into_inner());
        }
        work.run(&self.dir).map_err(|(error, work)| {
            // Tried again at the next sync.
            let mut state = self.state();
            state.unsynced.extend(work.files);
            state.dir_dirty |= work.dir_dirty;
            state.retired.extend(work.retired);
            error
        })
    }
}

impl Drop for Shared {
    /// What is still buffered goes to the file (not synced: a clean stop, not a crash).
    fn drop(&mut self) {
        if let Err(e) = self.state().write_buffer() {
            tracing::warn!(outbox = %self.shown, error = %e, "the last settled deliveries could not be written");
        }
    }
}

struct SyncWork {
    files: Vec<Arc<File>>,
    dir_dirty: bool,
    retired: Vec<u64>,
}

impl SyncWork {
    fn run(mut self, dir: &Path) -> Result<(), (String, SyncWork)> {
        let result = (|| -> std::io::Result<()> {
            for file in &self.files {
                file.sync_data()?;
            }
            if self.dir_dirty {
                log::sync_dir(dir)?;
            }
            // What the retired segments held is now elsewhere on disk (or settled).
            self.retired.sort_unstable();
            for &id in &self.retired {
                match std::fs::remove_file(log::segment_path(dir, id)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            if !self.retired.is_empty() {
                log::sync_dir(dir)?;
            }
            Ok(())
        })();
        result.map_err(|e| (e.to_string(), self))
    }
}

/// The group-commit task: each round takes every request queued, then on a blocking thread
/// writes the buffer and syncs once (when a request waits for it); rounds are answered in the
/// order they started. Up to [`ROUNDS_IN_FLIGHT`] rounds sync at once, so a publish that
/// arrives during a sync does not wait for it to end (in the pub/sub benchmark this cut the
/// publish call from 1.5 to 1.2 ms). It stops when the outbox is dropped. Two other variants
/// measured slower there: a dedicated sync thread that starts a round as soon as the last one
/// ends (rounds half as large, twice the syncs), and answering the waiters from the blocking
/// thread (a wake-up of the runtime thread from outside for each of them).
fn spawn_syncer(shared: Weak<Shared>) -> mpsc::UnboundedSender<Option<Waiter>> {
    let (requests, mut queue) = mpsc::unbounded_channel::<Option<Waiter>>();
    tokio::spawn(async move {
        // Rounds started and not answered yet, oldest first; answered in that order.
        let mut rounds: std::collections::VecDeque<(Round, Vec<Waiter>)> = std::collections::VecDeque::new();
        // The error of the last failed round, and how many rounds in flight with it are left.
        let mut failed: Option<(String, usize)> = None;
        loop {
            tokio::select! {
                biased;
                result = async { (&mut rounds.front_mut().expect("a round in flight").0).await }, if !rounds.is_empty() => {
                    let (_, waiters) = rounds.pop_front().expect("a round in flight");
                    let mut result = result.unwrap_or_else(|e| Err(format!("the sync task failed: {e}")));
                    // A round that started while an earlier one was syncing may rely on that
                    // sync (for a segment the earlier round took): it fails with it.
                    match (&result, &mut failed) {
                        (Err(e), _) => failed = Some((e.clone(), rounds.len())),
                        (Ok(()), Some((e, left))) if *left > 0 => {
                            *left -= 1;
                            result = Err(e.clone());
                        }
                        _ => {}
                    }
                    if let Err(e) = &result && waiters.is_empty() {
                        tracing::warn!(error = %e, "outbox sync failed; it is tried again with the next publish");
                    }
                    for waiter in waiters {
                        let _ = waiter.send(result.clone());
                    }
                }
                first = queue.recv(), if rounds.len() < ROUNDS_IN_FLIGHT => {
                    let Some(first) = first else { break };
                    let mut waiters: Vec<Waiter> = first.into_iter().collect();
                    while let Ok(next) = queue.try_recv() {
                        waiters.extend(next);
                    }
                    let Some(shared) = shared.upgrade() else { break };
                    let sync = !waiters.is_empty();
                    rounds.push_back((tokio::task::spawn_blocking(move || shared.write_and_sync(sync)), waiters));
                }
            }
        }
        // The outbox is gone or dropped its queue: the rounds in flight still answer.
        for (round, waiters) in rounds {
            let result = round.await.unwrap_or_else(|e| Err(format!("the sync task failed: {e}")));
            for waiter in waiters {
                let _ = waiter.send(result.clone());
            }
        }
    });
    requests
}

impl State {
    /// Reads every segment of `dir` into the index; an empty outbox gets its first segment.
    fn replay(dir: &Path, shown: &str, limits: Limits) -> std::io::Result<State> {
        let mut state = State {
            limits,
            index: BTreeMap::new(),
            segments: BTreeMap::new(),
            active: 0,
            next_seq: 0,
            unsynced: Vec::new(),
            dir_dirty: false,
            retired: Vec::new(),
            cached_bytes: 0,
            buffer: Vec::new(),
        };
        let ids = log::segment_ids(dir)?;
        for (position, &id) in ids.iter().enumerate() {
            let bytes = log::read_segment(dir, id)?;
            let (entries, intact) = log::entries(&bytes);
            let file = Arc::new(log::open_segment(dir, id, false)?);
            if intact < bytes.len() as u64 {
                if position + 1 == ids.len() {
                    tracing::warn!(
                        outbox = shown,
                        segment = id,
                        offset = intact,
                        "the log ends in a torn write (a crash); cut back to the last whole entry"
                    );
                    file.set_len(intact)?;
                } else {
                    tracing::error!(
                        outbox = shown,
                        segment = id,
                        offset = intact,
                        "damaged outbox entry; the rest of this segment is skipped"
                    );
                }
            }
            state.segments.insert(id, Segment { file, size: intact, live: 0, live_bytes: 0 });
            state.active = id;
            for entry in entries {
                state.apply(&entry, shown);
            }
        }
        if state.segments.is_empty() {
            state.start_segment(dir, 1)?;
        }
        Ok(state)
    }

    /// Replays one entry.
    fn apply(&mut self, entry: &log::Entry<'_>, shown: &str) {
        let seq = entry.seq;
        if entry.kind == Kind::SegmentStart {
            self.next_seq = self.next_seq.max(seq);
            return;
        }
        self.next_seq = self.next_seq.max(seq.saturating_add(1));
        let record = match OutboxRecord::decode(entry.payload) {
            Ok(record) => record,
            Err(e) => {
                tracing::error!(outbox = shown, seq, error = %e, "undecodable outbox entry; skipped");
                return;
            }
        };
        match entry.kind {
            Kind::Record => {
                let indexed = Indexed {
                    segment: self.active,
                    offset: entry.offset,
                    frame_len: entry.frame_len,
                    deliveries: record.deliveries,
                    event: None,
                };
                self.count(&indexed, true);
                if let Some(replaced) = self.index.insert(seq, indexed) {
                    self.count(&replaced, false);
                }
            }
            Kind::Deliveries if record.deliveries.is_empty() => {
                if let Some(done) = self.index.remove(&seq) {
                    self.count(&done, false);
                }
            }
            Kind::Deliveries => {
                if let Some(indexed) = self.index.get_mut(&seq) {
                    indexed.deliveries = record.deliveries;
                }
            }
            Kind::SegmentStart => {}
        }
    }

    /// Adds (or takes away) a record's share of its segment's live records and bytes.
    fn count(&mut self, indexed: &Indexed, add: bool) {
        if let Some(segment) = self.segments.get_mut(&indexed.segment) {
            if add {
                segment.live += 1;
                segment.live_bytes += u64::from(indexed.frame_len);
            } else {
                segment.live = segment.live.saturating_sub(1);
                segment.live_bytes = segment.live_bytes.saturating_sub(u64::from(indexed.frame_len));
            }
        }
        if !add && let Some(event) = &indexed.event {
            self.cached_bytes = self.cached_bytes.saturating_sub(event.encoded_len());
        }
    }

    /// Stores a new record under the next sequence number.
    fn insert(&mut self, dir: &Path, record: &OutboxRecord) -> std::io::Result<u64> {
        if self.segments.get(&self.active).is_none_or(|s| s.size >= self.limits.segment_bytes) {
            self.start_segment(dir, self.active + 1)?;
        }
        let seq = self.next_seq;
        let (segment, offset, frame_len) = self.append(Kind::Record, seq, record)?;
        self.next_seq += 1;
        let event =
            record.event.as_ref().filter(|e| self.cached_bytes + e.encoded_len() <= self.limits.cache_bytes).cloned();
        self.cached_bytes += event.as_ref().map_or(0, Message::encoded_len);
        let indexed = Indexed { segment, offset, frame_len, deliveries: record.deliveries.clone(), event };
        self.count(&indexed, true);
        self.index.insert(seq, indexed);
        Ok(seq)
    }

    /// Records the deliveries still pending for `seq`; none: the record is done.
    fn update(&mut self, dir: &Path, seq: u64, deliveries: Vec<PendingDelivery>) -> std::io::Result<()> {
        let change = OutboxRecord { event: None, deliveries };
        self.append(Kind::Deliveries, seq, &change)?;
        if !change.deliveries.is_empty() {
            if let Some(indexed) = self.index.get_mut(&seq) {
                indexed.deliveries = change.deliveries;
            }
            return Ok(());
        }
        if let Some(done) = self.index.remove(&seq) {
            self.count(&done, false);
            if done.segment != self.active && self.segments.get(&done.segment).is_some_and(|s| s.live == 0) {
                self.collect(dir);
            }
        }
        Ok(())
    }

    /// Appends one entry to the active segment (to the buffer, written out later): (segment,
    /// offset, frame length).
    fn append(&mut self, kind: Kind, seq: u64, payload: &impl Message) -> std::io::Result<(u64, u64, u32)> {
        if self.buffer.len() >= WRITE_BUFFER_BYTES {
            self.write_buffer()?;
        }
        let segment = self
            .segments
            .get_mut(&self.active)
            .ok_or_else(|| std::io::Error::other("the outbox has no segment to write to"))?;
        let start = self.buffer.len();
        log::frame(kind, seq, payload, &mut self.buffer);
        let frame_len = self.buffer.len() - start;
        let offset = segment.size;
        segment.size += frame_len as u64;
        Ok((self.active, offset, frame_len as u32))
    }

    /// Writes the buffer to the end of the active segment's file; on failure it stays buffered.
    fn write_buffer(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let segment = self
            .segments
            .get(&self.active)
            .ok_or_else(|| std::io::Error::other("the outbox has no segment to write to"))?;
        segment.file.write_all_at(&self.buffer, segment.size - self.buffer.len() as u64)?;
        self.buffer.clear();
        Ok(())
    }

    /// Makes segment `id` the active one, then reclaims what older segments allow.
    fn start_segment(&mut self, dir: &Path, id: u64) -> std::io::Result<()> {
        // The buffer belongs to the segment that stops being the active one.
        self.write_buffer()?;
        let file = Arc::new(log::open_segment(dir, id, true)?);
        if let Some(previous) = self.segments.get(&self.active) {
            self.unsynced.push(previous.file.clone());
        }
        self.segments.insert(id, Segment { file, size: 0, live: 0, live_bytes: 0 });
        self.active = id;
        self.dir_dirty = true;
        self.append(Kind::SegmentStart, self.next_seq, &())?;
        self.collect(dir);
        Ok(())
    }

    /// Retires the oldest segments while they hold nothing pending, or little enough that
    /// copying it forward pays.
    fn collect(&mut self, dir: &Path) {
        while let Some((&oldest, segment)) = self.segments.first_key_value() {
            if oldest == self.active {
                break;
            }
            if segment.live > 0 {
                if segment.live_bytes * 2 >= segment.size {
                    break;
                }
                if let Err(e) = self.copy_forward(oldest) {
                    tracing::warn!(outbox = %dir.display(), segment = oldest, error = %e, "cannot compact the outbox yet");
                    break;
                }
            }
            self.segments.remove(&oldest);
            self.retired.push(oldest);
        }
    }

    /// Writes the pending records of segment `id` again, at the end of the log.
    fn copy_forward(&mut self, id: u64) -> std::io::Result<()> {
        let seqs: Vec<u64> = self.index.iter().filter(|(_, e)| e.segment == id).map(|(seq, _)| *seq).collect();
        for seq in seqs {
            let Some(indexed) = self.index.get(&seq) else { continue };
            let record = OutboxRecord { event: Some(self.event(indexed)?), deliveries: indexed.deliveries.clone() };
            let (segment, offset, frame_len) = self.append(Kind::Record, seq, &record)?;
            let Some(mut indexed) = self.index.remove(&seq) else { continue };
            self.count(&indexed, false);
            (indexed.segment, indexed.offset, indexed.frame_len) = (segment, offset, frame_len);
            indexed.event = None;
            self.count(&indexed, true);
            self.index.insert(seq, indexed);
        }
        Ok(())
    }

    /// A pending record's event: from the cache, the buffer, or read back from its segment.
    fn event(&self, indexed: &Indexed) -> std::io::Result<TopicEventRequest> {
        if let Some(event) = &indexed.event {
            return Ok(event.clone());
        }
        let segment = self
            .segments
            .get(&indexed.segment)
            .ok_or_else(|| std::io::Error::other(format!("segment {} is gone", indexed.segment)))?;
        let buffered_from = segment.size - self.buffer.len() as u64;
        let payload = if indexed.segment == self.active && indexed.offset >= buffered_from {
            let start = (indexed.offset - buffered_from) as usize;
            log::payload(&self.buffer[start..], indexed.offset, indexed.frame_len)?.to_vec()
        } else {
            log::read_payload(&segment.file, indexed.offset, indexed.frame_len)?
        };
        OutboxRecord::decode(payload.as_slice())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?
            .event
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "the record holds no event"))
    }
}

#[cfg(test)]
mod tests;
