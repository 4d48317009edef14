//! Group commit for sled: writers that wait for durability at the same time share one flush.
//!
//! sled's `flush_async` fsyncs the whole database each time it is called, and concurrent calls
//! do not merge, so one flush per write caps durable writes at the disk's fsync rate. Here a
//! writer asks for a flush after its write; the flusher takes every request queued at that
//! moment, runs one flush, and answers them all. A request that arrives during a flush waits
//! for the next one, which covers its write.

use std::sync::OnceLock;

use tokio::sync::{mpsc, oneshot};

type Waiter = oneshot::Sender<Result<(), String>>;

/// A flush request: the database (each request brings its own handle, so the flusher holds
/// none while idle and a dropped store closes at once) and who waits for it.
type Request = (sled::Db, Waiter);

/// sled page caches are sized small: a sidecar keeps its hot data in memory through the
/// OS page cache, and sled's default (1 GiB) would let a sidecar grow far past its budget.
pub const SLED_CACHE_BYTES: u64 = 8 << 20;

/// Opens a sled database the way every Tandem store does.
pub fn sled_config(path: &std::path::Path) -> sled::Config {
    sled::Config::new().path(path).cache_capacity(SLED_CACHE_BYTES)
}

/// Flushes of all databases in the process, one at a time: sled 0.34 can deadlock when two
/// flushes run at once under write load (sled issue #1308), and the process shares its I/O lock.
static ONE_FLUSH_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One per database. The flusher task starts with the first flush (so a store can be opened
/// outside a runtime) and stops when the `GroupFlusher` is dropped.
#[derive(Debug, Default)]
pub struct GroupFlusher {
    requests: OnceLock<mpsc::UnboundedSender<Request>>,
}

impl GroupFlusher {
    pub fn new() -> GroupFlusher {
        GroupFlusher::default()
    }

    /// Returns once everything written to `db` before the call is on disk. Always pass the
    /// same database to one flusher.
    pub async fn flush(&self, db: &sled::Db) -> Result<(), String> {
        let (waiter, done) = oneshot::channel();
        let requests = self.requests.get_or_init(spawn_flusher);
        requests.send((db.clone(), waiter)).map_err(|_| "the flusher has stopped".to_string())?;
        done.await.map_err(|_| "the flusher has stopped".to_string())?
    }
}

fn spawn_flusher() -> mpsc::UnboundedSender<Request> {
    let (requests, mut queue) = mpsc::unbounded_channel::<Request>();
    tokio::spawn(async move {
        while let Some((db, first)) = queue.recv().await {
            let mut waiters = vec![first];
            while let Ok((_, waiter)) = queue.try_recv() {
                waiters.push(waiter);
            }
            let result = {
                let _only_flush = ONE_FLUSH_AT_A_TIME.lock().await;
                db.flush_async().await.map(|_| ()).map_err(|e| e.to_string())
            };
            drop(db);
            for waiter in waiters {
                let _ = waiter.send(result.clone());
            }
        }
    });
    requests
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn concurrent_writers_all_get_a_flush_and_their_data_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let flusher = std::sync::Arc::new(GroupFlusher::new());
        let writers: Vec<_> = (0..32u32)
            .map(|i| {
                let (db, flusher) = (db.clone(), flusher.clone());
                tokio::spawn(async move {
                    db.insert(i.to_be_bytes(), b"v".to_vec()).unwrap();
                    flusher.flush(&db).await
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap().unwrap();
        }
        assert_eq!(db.len(), 32);
    }
}
