//! The publisher's outbox: every published event, on disk until each of its subscribers has
//! taken it (or it was dropped or dead-lettered). A publish is acknowledged only once its
//! record is flushed, so an acknowledged event survives `kill -9` of the sidecar.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use prost::Message;
use tandem_proto::internal::{OutboxRecord, PendingDelivery};
use tandem_proto::runtime::TopicEventRequest;

use super::PubSubError;
use crate::durability::GroupFlusher;

pub struct Outbox {
    db: sled::Db,
    flusher: GroupFlusher,
    records: sled::Tree,
    /// Records on disk, for the backlog limit.
    len: AtomicUsize,
    max_backlog: usize,
    path: String,
    /// Serializes read-modify-write of records: several deliveries of one event end at once.
    updating: Mutex<()>,
}

impl Outbox {
    /// Opens (or creates) the outbox at `path`; refuses a directory that is not an outbox.
    pub fn open(path: &Path, max_backlog: usize) -> Result<Outbox, PubSubError> {
        let shown = path.display().to_string();
        if path.exists() && !path.is_dir() {
            return Err(PubSubError::Storage(format!("outbox {shown} is not a directory")));
        }
        if path.is_dir()
            && std::fs::read_dir(path).map(|mut d| d.next().is_some()).unwrap_or(false)
            && !path.join("conf").exists()
        {
            return Err(PubSubError::Storage(format!(
                "{shown} holds files that are not a Tandem outbox; refusing to use it"
            )));
        }
        let db = crate::durability::sled_config(path)
            .open()
            .map_err(|e| PubSubError::Storage(format!("opening outbox {shown}: {e}")))?;
        let records =
            db.open_tree("tandem_outbox").map_err(|e| PubSubError::Storage(format!("outbox {shown}: {e}")))?;
        let len = AtomicUsize::new(records.len());
        let flusher = GroupFlusher::new();
        Ok(Outbox { db, flusher, records, len, max_backlog, path: shown, updating: Mutex::new(()) })
    }

    fn storage(&self, what: &str, e: impl std::fmt::Display) -> PubSubError {
        PubSubError::Storage(format!("outbox {}: {what}: {e}", self.path))
    }

    /// Stores `record` durably; refused when the backlog is full.
    pub async fn push(&self, record: &OutboxRecord) -> Result<u64, PubSubError> {
        self.push_all([record]).await.pop().expect("one outcome per record")
    }

    /// Stores each of `records` (refused one by one once the backlog is full) and makes them
    /// durable with a single flush: one outcome per record, in order.
    pub async fn push_all<'a>(
        &self,
        records: impl IntoIterator<Item = &'a OutboxRecord>,
    ) -> Vec<Result<u64, PubSubError>> {
        let mut outcomes: Vec<_> = records.into_iter().map(|record| self.insert(record)).collect();
        if outcomes.iter().any(Result::is_ok)
            && let Err(e) = self.flusher.flush(&self.db).await
        {
            // Stored but maybe not durable: not acknowledged. Should it survive anyway, it is
            // delivered, which at-least-once allows.
            let e = e.to_string();
            for outcome in outcomes.iter_mut().filter(|o| o.is_ok()) {
                *outcome = Err(self.storage("flushing", &e));
            }
        }
        outcomes
    }

    /// Writes `record` under a new sequence number, not flushed.
    fn insert(&self, record: &OutboxRecord) -> Result<u64, PubSubError> {
        let waiting = self.len.load(Ordering::Relaxed);
        if waiting >= self.max_backlog {
            return Err(PubSubError::BacklogFull { waiting, max: self.max_backlog });
        }
        let seq = self.db.generate_id().map_err(|e| self.storage("numbering an event", e))?;
        self.records
            .insert(seq.to_be_bytes(), record.encode_to_vec())
            .map_err(|e| self.storage("storing an event", e))?;
        self.len.fetch_add(1, Ordering::Relaxed);
        Ok(seq)
    }

    /// Up to `limit` records after `after` (all records when `None`), oldest first, so a scan
    /// holds a bounded number in memory. A record that does not decode is reported and skipped
    /// (left on disk for inspection, never delivered half-read).
    pub fn records_after(&self, after: Option<u64>, limit: usize) -> Vec<(u64, OutboxRecord)> {
        let mut out = Vec::new();
        let start = match after {
            Some(seq) => std::ops::Bound::Excluded(seq.to_be_bytes()),
            None => std::ops::Bound::Unbounded,
        };
        for entry in self.records.range((start, std::ops::Bound::Unbounded)) {
            if out.len() >= limit {
                break;
            }
            let Ok((key, value)) = entry else { continue };
            let Ok(seq) = <[u8; 8]>::try_from(key.as_ref()).map(u64::from_be_bytes) else { continue };
            match OutboxRecord::decode(value.as_ref()) {
                Ok(record) => out.push((seq, record)),
                Err(e) => tracing::error!(outbox = %self.path, seq, error = %e, "unreadable outbox record; skipped"),
            }
        }
        out
    }

    /// The event of record `seq` and `app_id`'s pending delivery of it; `None` when that
    /// delivery is settled (or the record gone).
    pub fn pending(&self, seq: u64, app_id: &str) -> Result<Option<(TopicEventRequest, PendingDelivery)>, PubSubError> {
        let Some(bytes) = self.records.get(seq.to_be_bytes()).map_err(|e| self.storage("reading an event", e))? else {
            return Ok(None);
        };
        let record = OutboxRecord::decode(bytes.as_ref()).map_err(|e| self.storage("decoding an event", e))?;
        let (Some(event), Some(pending)) = (record.event, record.deliveries.into_iter().find(|d| d.app_id == app_id))
        else {
            return Ok(None);
        };
        Ok(Some((event, pending)))
    }

    /// Changes record `seq` with `change` (which returns what the caller needs to know) and
    /// writes it back, or removes it once no delivery is pending. `None` if the record is gone.
    pub fn modify<T>(&self, seq: u64, change: impl FnOnce(&mut OutboxRecord) -> T) -> Result<Option<T>, PubSubError> {
        let _guard = self.updating.lock().unwrap_or_else(|p| p.into_inner());
        let Some(bytes) = self.records.get(seq.to_be_bytes()).map_err(|e| self.storage("reading an event", e))? else {
            return Ok(None);
        };
        let mut record = OutboxRecord::decode(bytes.as_ref()).map_err(|e| self.storage("decoding an event", e))?;
        let answer = change(&mut record);
        self.update(seq, &record)?;
        Ok(Some(answer))
    }

    /// Replaces a record (after a delivery attempt), or removes it when nobody waits for it.
    /// Not flushed: losing this update in a crash means a redelivery, which at-least-once allows.
    fn update(&self, seq: u64, record: &OutboxRecord) -> Result<(), PubSubError> {
        if record.deliveries.is_empty() {
            if self.records.remove(seq.to_be_bytes()).map_err(|e| self.storage("removing an event", e))?.is_some() {
                self.len.fetch_sub(1, Ordering::Relaxed);
            }
        } else {
            self.records
                .insert(seq.to_be_bytes(), record.encode_to_vec())
                .map_err(|e| self.storage("updating an event", e))?;
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, apps: &[&str]) -> OutboxRecord {
        OutboxRecord {
            event: Some(TopicEventRequest { id: id.into(), topic: "t".into(), ..Default::default() }),
            deliveries: apps.iter().map(|a| PendingDelivery { app_id: a.to_string(), ..Default::default() }).collect(),
        }
    }

    #[tokio::test]
    async fn records_survive_reopening_and_leave_when_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox");
        let (first, second) = {
            let outbox = Outbox::open(&path, 10).unwrap();
            let first = outbox.push(&record("e1", &["a", "b"])).await.unwrap();
            let second = outbox.push(&record("e2", &["a"])).await.unwrap();
            assert!(first < second);
            (first, second)
        };
        let outbox = reopen(&path);
        let records = outbox.records_after(None, 100);
        assert_eq!(records.len(), 2);
        assert_eq!(outbox.records_after(Some(first), 100).len(), 1);
        assert_eq!(outbox.records_after(None, 1).len(), 1);
        assert_eq!(records[0].0, first);
        assert_eq!(records[0].1.event.as_ref().unwrap().id, "e1");

        outbox.modify(first, |r| r.deliveries.retain(|d| d.app_id != "a")).unwrap().unwrap();
        outbox.modify(second, |r| r.deliveries.clear()).unwrap().unwrap();
        assert!(outbox.modify(second, |_| ()).unwrap().is_none(), "a finished event is gone");
        let records = outbox.records_after(None, 100);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].1.deliveries.len(), 1);
        assert_eq!(outbox.len(), 1);
    }

    #[tokio::test]
    async fn pending_finds_one_subscribers_delivery_until_it_is_settled() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&dir.path().join("o"), 10).unwrap();
        let seq = outbox.push(&record("e1", &["a", "b"])).await.unwrap();
        let (event, pending) = outbox.pending(seq, "b").unwrap().unwrap();
        assert_eq!((event.id.as_str(), pending.app_id.as_str()), ("e1", "b"));
        assert!(outbox.pending(seq, "c").unwrap().is_none(), "c never subscribed");
        outbox.modify(seq, |r| r.deliveries.retain(|d| d.app_id != "b")).unwrap();
        assert!(outbox.pending(seq, "b").unwrap().is_none(), "b's delivery is settled");
        assert!(outbox.pending(seq + 100, "a").unwrap().is_none(), "no such record");
    }

    #[tokio::test]
    async fn a_full_backlog_refuses_new_events() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&dir.path().join("o"), 2).unwrap();
        outbox.push(&record("1", &["a"])).await.unwrap();
        outbox.push(&record("2", &["a"])).await.unwrap();
        let err = outbox.push(&record("3", &["a"])).await.unwrap_err();
        assert!(matches!(err, PubSubError::BacklogFull { waiting: 2, max: 2 }), "{err}");
    }

    #[tokio::test]
    async fn push_all_stores_until_the_backlog_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&dir.path().join("o"), 2).unwrap();
        let records = [record("1", &["a"]), record("2", &["a"]), record("3", &["a"])];
        let outcomes = outbox.push_all(&records).await;
        assert!(outcomes[0].is_ok() && outcomes[1].is_ok());
        assert!(matches!(outcomes[2], Err(PubSubError::BacklogFull { waiting: 2, max: 2 })), "{:?}", outcomes[2]);
        let ids: Vec<String> = outbox.records_after(None, 10).into_iter().map(|(_, r)| r.event.unwrap().id).collect();
        assert_eq!(ids, ["1", "2"]);
    }

    #[test]
    fn a_foreign_directory_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"mine").unwrap();
        let err = Outbox::open(dir.path(), 10).err().unwrap();
        assert!(err.to_string().contains(&dir.path().display().to_string()), "{err}");
        assert_eq!(std::fs::read(dir.path().join("notes.txt")).unwrap(), b"mine");
    }

    /// sled may hold its lock for a moment after the previous handle is dropped.
    fn reopen(path: &Path) -> Outbox {
        let start = std::time::Instant::now();
        loop {
            match Outbox::open(path, 10) {
                Ok(outbox) => return outbox,
                Err(e) if start.elapsed() < std::time::Duration::from_secs(5) => {
                    let _ = e;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("reopening the outbox: {e}"),
            }
        }
    }
}
