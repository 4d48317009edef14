//! How Tandem opens and flushes sled databases (the state store; the pub/sub outbox of older
//! Tandems, converted at start). Group commit, where concurrent writers share one flush, is the
//! state store's writer thread's (see `state::sled`).

use std::sync::Mutex;

/// sled page caches are sized small: a sidecar keeps its hot data in memory through the
/// OS page cache, and sled's default (1 GiB) would let a sidecar grow far past its budget.
pub const SLED_CACHE_BYTES: u64 = 8 << 20;

/// Opens a sled database the way every Tandem store does.
pub fn sled_config(path: &std::path::Path) -> sled::Config {
    sled::Config::new().path(path).cache_capacity(SLED_CACHE_BYTES)
}

/// Flushes of all databases in the process, one at a time: sled 0.34 can deadlock when two
/// flushes run at once under write load (sled issue #1308), and the process shares its I/O lock.
static ONE_FLUSH_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Flushes `db` to disk, after any other flush of the process has finished. Blocking: for a
/// thread of its own, never a runtime thread.
pub fn flush(db: &sled::Db) -> Result<(), String> {
    let _only_flush = ONE_FLUSH_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    db.flush().map(|_| ()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushes_from_several_threads_take_turns_and_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled_config(dir.path()).flush_every_ms(None).open().unwrap();
        std::thread::scope(|scope| {
            for i in 0..8u32 {
                let db = &db;
                scope.spawn(move || {
                    db.insert(i.to_be_bytes(), b"v".to_vec()).unwrap();
                    flush(db).unwrap();
                });
            }
        });
        assert_eq!(db.len(), 8);
    }
}
