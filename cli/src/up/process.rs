//! The child processes of `tandem up`: started with their output in a log file, watched for an
//! early exit, stopped one by one (the rest of a restarted pair) or all in reverse start order
//! (SIGTERM, a bounded wait, then SIGKILL).
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

/// How stopping one process went.
#[derive(Debug)]
pub struct Stopped {
    /// How it ended; `None` if it could not be reaped even after SIGKILL.
    pub status: Option<ExitStatus>,
    /// It did not exit within the timeout after SIGTERM (or a signal cut the wait short) and
    /// was killed.
    pub killed: bool,
    /// The signal (SIGINT, SIGTERM, SIGHUP) that arrived while waiting, if one did.
    pub interrupted_by: Option<i32>,
}

/// Every process `tandem up` started, in start order (a restarted pair replaces the one that
/// died, at the end); their pids also go to a file (`NAME PID` per line, rewritten whenever the
/// list changes) so that a person or a test can check on them.
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
        self.list.push(Process { name: name.to_string(), pid, log: log.to_path_buf(), child, exit: None });
        self.write_pids();
        Ok(self.list.last().expect("just pushed"))
    }

    pub fn list(&self) -> &[Process] {
        &self.list
    }

    /// Whether `name` was started and has not ended (as far as the last check knows).
    pub fn is_running(&self, name: &str) -> bool {
        self.list.iter().any(|p| p.name == name && p.exit.is_none())
    }

    /// Removes `name` from the list (and the pids file) once it has ended and been reaped: a
    /// restarted pair takes its place. A process still running is left alone.
    pub fn forget(&mut self, name: &str) {
        let before = self.list.len();
        self.list.retain(|p| !(p.name == name && p.exit.is_some()));
        if self.list.len() != before {
            self.write_pids();
        }
    }

    /// Stops `name` alone, as [`Processes::stop_all`] stops each process; a signal arriving
    /// meanwhile kills it at once and is returned in [`Stopped::interrupted_by`]. `None` if no
    /// such process is running.
    pub async fn stop(&mut self, name: &str, timeout: Duration, signals: &mut Signals) -> Option<Stopped> {
        let process = self.list.iter_mut().find(|p| p.name == name && p.exit.is_none())?;
        Some(stop_process(process, timeout, false, signals).await)
    }

    /// Writes the pids file anew (through a temp file, so a reader sees the old or the new list).
    fn write_pids(&self) {
        let text: String = self.list.iter().map(|p| format!("{} {}\n", p.name, p.pid)).collect();
        let temp = self.pids_file.with_extension("new");
        let written = std::fs::File::create(&temp).and_then(|mut file| file.write_all(text.as_bytes()));
        if written.is_ok() {
            let _ = std::fs::rename(&temp, &self.pids_file);
        }
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
            let stopped = stop_process(process, timeout, hurry, signals).await;
            hurry |= stopped.interrupted_by.is_some();
            if stopped.killed {
                report.killed.push(process.name.clone());
            }
            if stopped.status.is_some() {
                report.stopped += 1;
            }
        }
        report
    }
}

/// SIGTERM (skipped when `hurry`), up to `timeout` for the process to exit (cut short by a
/// signal), then SIGKILL and up to 5 s more to reap it.
async fn stop_process(process: &mut Process, timeout: Duration, hurry: bool, signals: &mut Signals) -> Stopped {
    let mut exited = None;
    let mut interrupted_by = None;
    if !hurry {
        signal_group(process.pid, libc::SIGTERM);
        tokio::select! {
            waited = tokio::time::timeout(timeout, process.child.wait()) => {
                exited = waited.ok().and_then(Result::ok);
            }
            signal = signals.next() => interrupted_by = Some(signal),
        }
    }
    if let Some(status) = exited {
        process.exit = Some(status);
        return Stopped { status: Some(status), killed: false, interrupted_by };
    }
    signal_group(process.pid, libc::SIGKILL);
    let _ = process.child.start_kill();
    // Not reaped within 5 s: kill_on_drop and PDEATHSIG remain.
    let status = tokio::time::timeout(Duration::from_secs(5), process.child.wait()).await.ok().and_then(Result::ok);
    process.exit = status;
    Stopped { status, killed: true, interrupted_by }
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
    async fn one_process_is_stopped_and_forgotten_and_the_pids_file_follows() {
        let dir = tempfile::tempdir().unwrap();
        let pids_file = dir.path().join("pids");
        let mut processes = Processes::new(pids_file.clone());
        let sh = Path::new("/bin/sh");
        let sleeper: Vec<OsString> = vec!["-c".into(), "exec sleep 30".into()];
        let first = processes.spawn("a", sh, &sleeper, &[], &dir.path().join("a.log")).unwrap().pid;
        processes.spawn("b", sh, &sleeper, &[], &dir.path().join("b.log")).unwrap();
        let mut signals = Signals::install().unwrap();

        processes.forget("a");
        assert!(processes.is_running("a"), "a running process is not forgotten");
        let stopped = processes.stop("a", Duration::from_secs(5), &mut signals).await.expect("a runs");
        assert!(stopped.status.is_some() && !stopped.killed && stopped.interrupted_by.is_none(), "{stopped:?}");
        assert!(!processes.is_running("a"));
        assert!(processes.stop("a", Duration::from_secs(5), &mut signals).await.is_none(), "stopped already");
        processes.forget("a");
        let again = processes.spawn("a", sh, &sleeper, &[], &dir.path().join("a.log")).unwrap().pid;
        let names: Vec<&str> = processes.list().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["b", "a"], "the new one is last, so it is stopped first");
        let pids = std::fs::read_to_string(&pids_file).unwrap();
        assert_eq!(pids.lines().count(), 2, "{pids}");
        assert!(pids.contains(&format!("a {again}")) && !pids.contains(&format!("a {first}\n")), "{pids}");
        let report = processes.stop_all(Duration::from_secs(5), &mut signals).await;
        assert_eq!(report.stopped, 2);
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
