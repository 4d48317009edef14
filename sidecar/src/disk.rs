//! Free space under `--data-dir`: writes are refused before the disk is full, not after.
//!
//! A store that runs out of space in the middle of a write is in an unknown state (sled 0.34
//! keeps the first I/O error and fails every later operation with it, reads included), so
//! tandemd checks the free space of the data dir's file system before each state write and
//! each publish, and refuses with [`DiskFull`] (RESOURCE_EXHAUSTED, naming the directory) while
//! less than `--min-free-disk` would be left. Reads go on; `/readyz` says the data dir is full.
//!
//! A sidecar must also be able to start on a disk that filled up while it was down (opening
//! sled writes): tandemd keeps a reserve file (`DATA_DIR/.tandem-reserve`, `--disk-reserve`)
//! while there is room, and deletes it at start when the disk is full, so the stores open and
//! serve reads; it writes the reserve again once the space is back.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The reserve file's name in the data dir.
pub const RESERVE_FILE: &str = ".tandem-reserve";

/// Writing would leave less than the minimum free space.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the data dir {dir} is full: {free} bytes free, and writes need {min_free} bytes left over (--min-free-disk)")]
pub struct DiskFull {
    pub dir: String,
    pub free: u64,
    pub min_free: u64,
}

/// The data dir's free space and its reserve.
#[derive(Debug)]
pub struct DiskSpace {
    dir: PathBuf,
    min_free: u64,
    reserve_bytes: u64,
    /// The last check's answer, for `/readyz`.
    full: Mutex<Option<DiskFull>>,
}

impl DiskSpace {
    pub fn new(dir: &Path, min_free: u64, reserve_bytes: u64) -> DiskSpace {
        DiskSpace { dir: dir.to_path_buf(), min_free, reserve_bytes, full: Mutex::new(None) }
    }

    /// Bytes an unprivileged process may still write on the data dir's file system.
    pub fn free_bytes(&self) -> std::io::Result<u64> {
        free_bytes(&self.dir)
    }

    /// `Err` when writing about `bytes` would leave less than `--min-free-disk`. A file system
    /// whose free space cannot be read is not refused here (the write itself will say).
    pub fn check(&self, bytes: u64) -> Result<(), DiskFull> {
        let Ok(free) = self.free_bytes() else { return Ok(()) };
        let full = free < self.min_free.saturating_add(bytes);
        let problem = full.then(|| DiskFull { dir: self.dir.display().to_string(), free, min_free: self.min_free });
        *self.full.lock().unwrap_or_else(|p| p.into_inner()) = problem.clone();
        problem.map_or(Ok(()), Err)
    }

    /// Why writes are refused now, if they are (for `/readyz`).
    pub fn problem(&self) -> Option<String> {
        self.full.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|full| format!("{full}; writes are refused"))
    }

    /// At start, before the stores open: when the disk is full, deletes the reserve so they
    /// can; otherwise makes sure the reserve is there.
    pub fn prepare(&self) {
        let reserve = self.dir.join(RESERVE_FILE);
        if self.check(0).is_err() && reserve.exists() {
            match std::fs::remove_file(&reserve) {
                Ok(()) => tracing::warn!(
                    dir = %self.dir.display(),
                    released = self.reserve_bytes,
                    "the data dir is full: released its reserve so the stores can open; writes are refused until space is freed"
                ),
                Err(e) => tracing::error!(file = %reserve.display(), error = %e, "cannot release the disk reserve"),
            }
        }
        self.keep_reserve();
        let _ = self.check(0);
    }

    /// Writes the reserve when it is missing and there is room for it beyond the minimum.
    fn keep_reserve(&self) {
        let reserve = self.dir.join(RESERVE_FILE);
        if self.reserve_bytes == 0 || reserve.exists() {
            return;
        }
        match self.free_bytes() {
            Ok(free) if free >= self.min_free.saturating_add(self.reserve_bytes).saturating_mul(2) => {}
            _ => return,
        }
        if let Err(e) = write_reserve(&reserve, self.reserve_bytes) {
            let _ = std::fs::remove_file(&reserve);
            tracing::warn!(file = %reserve.display(), error = %e, "cannot write the disk reserve");
        }
    }

    /// Whether the reserve file is missing.
    fn reserve_missing(&self) -> bool {
        self.reserve_bytes > 0 && !self.dir.join(RESERVE_FILE).exists()
    }

    /// Re-checks the free space every `every` (so `/readyz` follows space freed by others) and
    /// writes the reserve again once there is room. Ends once the sidecar drops its stores.
    pub fn spawn_monitor(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let disk = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let Some(disk) = disk.upgrade() else { return };
                let was_full = disk.problem().is_some();
                let full = disk.check(0).is_err();
                if was_full && !full {
                    tracing::info!(dir = %disk.dir.display(), "the data dir has room again; writes are accepted");
                }
                if !full && disk.reserve_missing() {
                    let _ = tokio::task::spawn_blocking(move || disk.keep_reserve()).await;
                }
            }
        })
    }
}

/// Reserves `bytes` for the file at `path`: allocated blocks (fallocate), not a sparse file.
fn write_reserve(path: &Path, bytes: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::create(path)?;
    let length = i64::try_from(bytes).map_err(|_| std::io::Error::other("the reserve is too large"))?;
    // SAFETY: the descriptor is open for writing for the duration of the call.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, length) } == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(error);
    }
    // A file system without fallocate: write the bytes.
    let mut file = file;
    let chunk = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    file.sync_all()
}

/// `statvfs(2)`: blocks available to unprivileged users times the fragment size.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let path = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    // SAFETY: `path` is NUL-terminated and `stat` is written by the call before it is read.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_refused_below_the_minimum_and_the_reserve_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        assert!(free > 0);
        let roomy = DiskSpace::new(dir.path(), 1 << 20, 1 << 20);
        roomy.prepare();
        assert_eq!(std::fs::metadata(dir.path().join(RESERVE_FILE)).unwrap().len(), 1 << 20);
        assert_eq!(roomy.check(4096), Ok(()));
        assert_eq!(roomy.problem(), None);
        // A minimum above what the disk has: every write is refused, naming the directory.
        let cramped = DiskSpace::new(dir.path(), u64::MAX / 2, 1 << 20);
        let err = cramped.check(1).unwrap_err();
        assert_eq!(err.dir, dir.path().display().to_string());
        assert!(err.to_string().starts_with(&format!("the data dir {} is full", dir.path().display())), "{err}");
        assert!(cramped.problem().unwrap().ends_with("writes are refused"));
        // At start on a "full" disk the reserve is released.
        cramped.prepare();
        assert!(!dir.path().join(RESERVE_FILE).exists());
    }
}
