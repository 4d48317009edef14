//! The child processes of `tandem up`: started with their output in a log file, watched for an
//! early exit, and stopped in reverse start order (SIGTERM, a bounded wait, then SIGKILL).
//!
//! Each child runs in its own process group, so a Ctrl-C in the terminal reaches only `tandem`,
//! which then stops the children in order. Each child also gets SIGTERM from the kernel if
//! `tandem` itself dies without stopping them (`PR_SET_PDEATHSIG`), so none outlives it even
//! after a `kill -9` of `tandem`.

use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::error::CliError;
use crate::up::signals::Signals;

/// One started process.
pub struct Process {
    /// `etcd`, `tandemd:APP`, or the service's instance name (`ingest`, `preprocess-2`).
    pub name: String,
    pub pid: u32,
    pub log: PathBuf,
    child: Child,
    exit: Option<ExitStatus>,
}

/// A process that ended while it should have been running.
#[derive(Debug)]
pub struct Exited {
    pub name: String,
    pub pid: u32,
    pub status: ExitStatus,
    pub log: PathBuf,
}

impl Exited {
    /// "NAME (pid N) exited with code C; the last lines of its log (PATH):" and the lines.
    pub fn report(&self) -> String {
        format!(
            "{} (pid {}) {}; the last lines of its log ({}):\n{}",
            self.name,
            self.pid,
            describe(self.status),
            self.log.display(),
            indent(&log_tail(&self.log, 20))
        )
    }
}

/// How a process ended, in words.
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        _ => format!("ended ({status})"),
    }
}

fn indent(text: &str) -> String {
    if text.trim().is_empty() {
        return "    (the log is empty)".to_string();
    }
    text.lines().map(|line| format!("    {line}")).collect::<Vec<_>>().join("\n")
}

/// The last `lines` lines of a log file (reading at most its last 64 KiB).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = std::fs::File::open(path) else { return String::new() };
    let length = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = length.saturating_sub(64 * 1024);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut raw = Vec::new();
    let _ = file.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What stopping everything took.
#[derive(Debug, Default)]
pub struct StopReport {
    pub stopped: usize,
    /// Processes that did not exit within the timeout after SIGTERM and were killed.
    pub killed: Vec<String>,
    /// Processes that had already ended before the stop (with how).
    pub already_gone: Vec<String>,
}

/// Every process `tandem up` started, in start order; their pids also go to a file (`NAME
/// PID` per line) so that a person or a test can check on them.
pub struct Processes {
    list: Vec<Process>,
    pids_file: PathBuf,
}

impl Processes {
    pub fn new(pids_file: PathBuf) -> Self {
        Processes { list: Vec::new(), pids_file }
    }

    /// Starts `program` with `args`, stdout and stderr appended to `log`.
    pub fn spawn(
        &mut self,
        name: &str,
        program: &Path,
        args: &[OsString],
        envs: &[(&str, &str)],
        log: &Path,
    ) -> Result<&Process, CliError> {
        let cannot = |what: String| CliError::failed(format!("cannot start {name} ({}): {what}", program.display()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| cannot(format!("opening its log {}: {e}", log.display())))?;
        let stderr = file.try_clone().map_err(|e| cannot(e.to_string()))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(true);
        let parent = std::process::id();
        // SAFETY: runs in the forked child before exec and only makes async-signal-safe system
        // calls (prctl, getppid).
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before the prctl: then nothing would signal us.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::other("tandem exited while starting this process"));
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(|e| cannot(e.to_string()))?;
        let pid = child.id().ok_or_else(|| cannot("it exited at once".into()))?;
        if let Ok(mut pids) = std::fs::OpenOptions::new().create(true).append(true).open(&self.pids_file) {
            let _ = writeln!(pids, "{name} {pid}");
        }
        self.list.push(Process { name: name.to_string(), pid, log: log.to_path_buf(), child, exit: None });
        Ok(self.list.last().expect("just pushed"))
    }

    pub fn list(&self) -> &[Process] {
        &self.list
    }

    /// The first process that ended since the last check (it is reaped; its status kept).
    pub fn check_exits(&mut self) -> Option<Exited> {
        for process in &mut self.list {
            if process.exit.is_some() {
                continue;
            }
            if let Ok(Some(status)) = process.child.try_wait() {
                process.exit = Some(status);
                return Some(Exited { name: process.name.clone(), pid: process.pid, status, log: process.log.clone() });
            }
        }
        None
    }

    /// Stops every process still running, last started first: SIGTERM, up to `timeout` for it
    /// to exit, then SIGKILL. A signal arriving meanwhile (a second Ctrl-C) turns every
    /// remaining wait into an immediate SIGKILL. Every process is reaped before this returns.
    pub async fn stop_all(&mut self, timeout: Duration, signals: &mut Signals) -> StopReport {
        let mut report = StopReport::default();
        let mut hurry = false;
        for process in self.list.iter_mut().rev() {
            if let Some(status) = process.exit {
                report.already_gone.push(format!("{} {}", process.name, describe(status)));
                continue;
            }
            if let Ok(Some(status)) = process.child.try_wait() {
                process.exit = Some(status);
                report.already_gone.push(format!("{} {}", process.name, describe(status)));
                continue;
            }
            let mut exited = None;
            if !hurry {
                signal_group(process.pid, libc::SIGTERM);
                tokio::select! {
                    waited = tokio::time::timeout(timeout, process.child.wait()) => {
                        exited = waited.ok().and_then(Result::ok);
                    }
                    _ = signals.next() => hurry = true,
                }
            }
            let status = match exited {
                Some(status) => status,
                None => {
                    report.killed.push(process.name.clone());
                    signal_group(process.pid, libc::SIGKILL);
                    let _ = process.child.start_kill();
                    match tokio::time::timeout(Duration::from_secs(5), process.child.wait()).await {
                        Ok(Ok(status)) => status,
                        // Not reaped: kill_on_drop and PDEATHSIG remain.
                        _ => continue,
                    }
                }
            };
            process.exit = Some(status);
            report.stopped += 1;
        }
        report
    }
}

/// Sends `signal` to the process group the child leads (the child and anything it started).
/// The child is not reaped yet when this is called, so its pid (the group's id) cannot have
/// been reused.
fn signal_group(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) takes plain integers; a negative pid addresses the process group.
    unsafe {
        if libc::kill(-(pid as libc::pid_t), signal) != 0 {
            libc::kill(pid as libc::pid_t, signal);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_tail_is_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        let text: String = (1..=100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, text).unwrap();
        assert_eq!(log_tail(&path, 3), "line 98\nline 99\nline 100");
        assert_eq!(log_tail(&dir.path().join("missing.log"), 3), "");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_early_exit_is_reported_with_its_log_and_stop_reaps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let mut processes = Processes::new(dir.path().join("pids"));
        let sh = Path::new("/bin/sh");
        let sleeper: Vec<OsString> = vec!["-c".into(), "exec sleep 30".into()];
        let failing: Vec<OsString> = vec!["-c".into(), "echo 'cannot bind port 1'; exit 3".into()];
        // A process that ignores SIGTERM has to be killed.
        let stubborn: Vec<OsString> = vec!["-c".into(), "trap '' TERM; echo up; while :; do sleep 0.05; done".into()];
        processes.spawn("sleeper", sh, &sleeper, &[], &dir.path().join("sleeper.log")).unwrap();
        processes.spawn("stubborn", sh, &stubborn, &[], &dir.path().join("stubborn.log")).unwrap();
        processes.spawn("failing", sh, &failing, &[], &dir.path().join("failing.log")).unwrap();
        let exited = loop {
            if let Some(exited) = processes.check_exits() {
                break exited;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(exited.name, "failing");
        let report = exited.report();
        assert!(report.contains("exited with code 3") && report.contains("cannot bind port 1"), "{report}");
        let pids = std::fs::read_to_string(dir.path().join("pids")).unwrap();
        assert_eq!(pids.lines().count(), 3, "{pids}");

        // Wait until the stubborn one has its trap in place before stopping.
        let stubborn_log = dir.path().join("stubborn.log");
        while !std::fs::read_to_string(&stubborn_log).unwrap_or_default().contains("up") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut signals = Signals::install().unwrap();
        let report = processes.stop_all(Duration::from_millis(300), &mut signals).await;
        assert_eq!(report.stopped, 2);
        assert_eq!(report.killed, ["stubborn"]);
        assert_eq!(report.already_gone.len(), 1);
        for process in processes.list() {
            assert!(!Path::new(&format!("/proc/{}", process.pid)).exists(), "{} still exists", process.name);
        }
    }
}
