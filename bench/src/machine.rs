//! The machine a run happened on, and when: CPU count and model, load, build profile, UTC
//! date, git commit, tandemd's worker threads.

use std::time::{SystemTime, UNIX_EPOCH};

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
    pub fn detect() -> RunContext {
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| cpu_model(&text))
            .unwrap_or_else(|| "unknown CPU".into());
        let days = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() / 86_400).unwrap_or(0);
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
            date: civil_date(days as i64),
            load_average,
            commit: git_commit().unwrap_or_else(|| "unknown".into()),
            tandemd_workers,
        }
    }
}

/// `abc1234`, or `abc1234 plus uncommitted changes`, for the current directory.
fn git_commit() -> Option<String> {
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git").args(args).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "--short", "HEAD"])?;
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty { format!("{commit} plus uncommitted changes") } else { commit })
}

/// The first `model name` in the text of /proc/cpuinfo.
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "model name").then(|| value.trim().to_string()).filter(|v| !v.is_empty())
    })
}

/// `YYYY-MM-DD` of the day `days` after 1970-01-01 (proleptic Gregorian calendar; Howard
/// Hinnant's `civil_from_days`).
pub fn civil_date(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_from_days_since_the_epoch() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(59), "1970-03-01");
        assert_eq!(civil_date(10_957), "2000-01-01");
        assert_eq!(civil_date(11_016), "2000-02-29");
        assert_eq!(civil_date(19_782), "2024-02-29");
        assert_eq!(civil_date(20_454), "2026-01-01");
        assert_eq!(civil_date(-1), "1969-12-31");
    }

    #[test]
    fn the_first_model_name_is_the_cpu_model() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 1\nmodel name\t: AMD EPYC 7B13\n\n\
                       processor\t: 1\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(cpu_model(cpuinfo).as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(cpu_model("processor\t: 0\nmodel\t\t: 1\n"), None);
    }
}
