//! The machine a run happened on, and when: CPU count and model, load, build profile, UTC
//! date, git commit, tandemd's worker threads.

use std::time::SystemTime;

/// Where and when the figures were taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunContext {
    pub cpus: usize,
    pub cpu_model: String,
    /// The cargo profile of this binary (tandemd comes from the same target directory).
    pub profile: &'static str,
    /// `YYYY-MM-DD`, UTC.
    pub date: String,
    /// The 1-minute load average when the run started: other work on the machine shows here.
    pub load_average: String,
    /// The git commit of the working directory, when it is a repository: which code was measured.
    pub commit: String,
    /// tandemd's runtime threads: its `--worker-threads` default of 1 unless
    /// `TANDEM_WORKER_THREADS`, which the sidecars inherit from this process, says otherwise.
    pub tandemd_workers: String,
}

impl RunContext {
    /// The first line of every benchmark section: when, where, which build.
    pub fn measured_line(&self) -> String {
        format!(
            "Measured {} on {} x {}, {} build of {}; load average {} at the start.\n\n",
            self.date, self.cpus, self.cpu_model, self.profile, self.commit, self.load_average
        )
    }

    pub fn detect() -> RunContext {
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| cpu_model(&text))
            .unwrap_or_else(|| "unknown CPU".into());
        let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
        let load_average = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|text| text.split_whitespace().next().map(String::from))
            .unwrap_or_else(|| "unknown".into());
        let tandemd_workers = match std::env::var("TANDEM_WORKER_THREADS") {
            Ok(n) => format!("{n}, from TANDEM_WORKER_THREADS"),
            Err(_) => "1, tandemd's default".to_string(),
        };
        RunContext {
            cpus,
            cpu_model,
            profile,
            // The date part of the sidecar's own RFC 3339 rendering (UTC).
            date: tandem_sidecar::api::state::rfc3339(SystemTime::now())[..10].to_string(),
            load_average,
            commit: git_commit().unwrap_or_else(|| "unknown".into()),
            tandemd_workers,
        }
    }
}

#[cfg(test)]
impl RunContext {
    /// A fixed context for report tests.
    pub fn example(tandemd_workers: &str) -> RunContext {
        RunContext {
            cpus: 2,
            cpu_model: "Test CPU".into(),
            profile: "release",
            date: "2026-01-01".into(),
            load_average: "0.10".into(),
            commit: "abc1234".into(),
            tandemd_workers: tandemd_workers.into(),
        }
    }
}

/// `abc1234`, or `abc1234 plus uncommitted changes`, for the current directory. BENCHMARKS.md
/// does not count: one run writing several sections changes it before the later ones measure.
fn git_commit() -> Option<String> {
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git").args(args).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "--short", "HEAD"])?;
    let dirty = git(&["status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)BENCHMARKS.md"])
        .is_some_and(|s| !s.is_empty());
    Some(if dirty { format!("{commit} plus uncommitted changes") } else { commit })
}

/// The first `model name` in the text of /proc/cpuinfo.
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "model name").then(|| value.trim().to_string()).filter(|v| !v.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_model_name_is_the_cpu_model() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 1\nmodel name\t: AMD EPYC 7B13\n\n\
                       processor\t: 1\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(cpu_model(cpuinfo).as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(cpu_model("processor\t: 0\nmodel\t\t: 1\n"), None);
    }
}
