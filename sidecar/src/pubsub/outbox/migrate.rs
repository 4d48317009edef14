//! Converts an outbox written by an earlier Tandem, a sled database with one tree of
//! `OutboxRecord`s keyed by big-endian sequence number, into the log.
//!
//! The records are written as one segment and synced before the directory is marked as a log
//! outbox; only then are sled's files removed. A conversion cut short by a crash leaves sled's
//! files in place and starts over at the next open.

use std::path::Path;

use prost::Message;
use tandem_proto::internal::OutboxRecord;

use super::log::{self, Kind};

/// The sled tree the earlier outbox kept its records in.
const SLED_TREE: &str = "tandem_outbox";
/// What sled keeps in a database directory.
const SLED_FILES: &[&str] = &["conf", "db", "blobs", "snap."];

/// Whether `dir` holds a sled database.
pub fn holds_sled(dir: &Path) -> bool {
    dir.join("conf").is_file() && dir.join("db").is_file()
}

/// Writes every record of the sled outbox in `dir` into the first segment of a log; returns
/// how many. Records that do not decode are reported and left out (they could never be
/// delivered).
pub fn from_sled(dir: &Path) -> Result<usize, String> {
    for id in log::segment_ids(dir).map_err(|e| e.to_string())? {
        std::fs::remove_file(log::segment_path(dir, id)).map_err(|e| e.to_string())?;
    }
    // No background flusher: nothing writes sled's files once the handle is dropped.
    let db = crate::durability::sled_config(dir).flush_every_ms(None).open().map_err(|e| format!("opening it: {e}"))?;
    let tree = db.open_tree(SLED_TREE).map_err(|e| e.to_string())?;
    let mut records = Vec::new();
    for item in tree.iter() {
        let (key, value) = item.map_err(|e| format!("reading it: {e}"))?;
        let Ok(seq) = <[u8; 8]>::try_from(key.as_ref()).map(u64::from_be_bytes) else { continue };
        match OutboxRecord::decode(value.as_ref()) {
            Ok(record) if !record.deliveries.is_empty() => records.push((seq, record)),
            Ok(_) => {}
            Err(e) => {
                tracing::error!(outbox = %dir.display(), seq, error = %e, "unreadable sled outbox record; left out")
            }
        }
    }
    drop(tree);
    drop(db);
    let next_seq = records.last().map_or(0, |(seq, _)| seq + 1);
    let mut bytes = Vec::new();
    log::frame(Kind::SegmentStart, next_seq, &(), &mut bytes);
    for (seq, record) in &records {
        log::frame(Kind::Record, *seq, record, &mut bytes);
    }
    let file = log::open_segment(dir, 1, true).map_err(|e| e.to_string())?;
    std::os::unix::fs::FileExt::write_all_at(&file, &bytes, 0).map_err(|e| e.to_string())?;
    file.sync_all().map_err(|e| e.to_string())?;
    Ok(records.len())
}

/// Removes sled's files from `dir` (after a finished conversion).
pub fn remove_sled_files(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !SLED_FILES.iter().any(|f| name == *f || (f.ends_with('.') && name.starts_with(f))) {
            continue;
        }
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(entry.path())?;
        } else {
            std::fs::remove_file(entry.path())?;
        }
    }
    log::sync_dir(dir)
}
