//! What Linux's /proc says: a process's resident memory (`/proc/<pid>/status`) and CPU time
//! (`/proc/<pid>/stat`), and how busy the whole machine's CPUs were (`/proc/stat`), which shows
//! how much of the machine other processes took during a measurement.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

/// Resident memory of a process, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// `VmRSS`: resident now.
    pub rss: u64,
    /// `VmHWM`: the most that was ever resident (the high-water mark).
    pub peak: u64,
}

impl Memory {
    /// Reads `/proc/<pid>/status`.
    pub fn of(pid: u32) -> Result<Memory> {
        let path = format!("/proc/{pid}/status");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        parse_status(&text).with_context(|| format!("parsing {path}"))
    }
}

/// Reads `VmRSS` and `VmHWM` from the text of `/proc/<pid>/status` (values in kB, which the
/// kernel means as KiB).
pub fn parse_status(text: &str) -> Result<Memory> {
    let field = |name: &str| -> Result<u64> {
        let line = text
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .with_context(|| format!("no {name} line (a kernel thread, or a process that has exited?)"))?;
        let mut parts = line.split_whitespace();
        let value: u64 = parts
            .next()
            .with_context(|| format!("{name} has no value"))?
            .parse()
            .with_context(|| format!("{name} is not a number: '{}'", line.trim()))?;
        match parts.next() {
            Some("kB") => Ok(value * 1024),
            unit => bail!("{name} is in an unknown unit: {unit:?}"),
        }
    };
    Ok(Memory { rss: field("VmRSS")?, peak: field("VmHWM")? })
}

/// Linux reports CPU times in `/proc/<pid>/stat` in clock ticks of `USER_HZ`, which is 100
/// on every architecture Linux runs on today (`getconf CLK_TCK`).
const TICKS_PER_SECOND: u64 = 100;

/// CPU time a process has used so far, user and system, over all its threads.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_stat_cpu(&text).with_context(|| format!("parsing {path}"))
}

/// `utime + stime` from the text of `/proc/<pid>/stat`. The process name (field 2) is in
/// parentheses and may itself hold spaces and parentheses, so fields are counted from the
/// last `)`.
pub fn parse_stat_cpu(text: &str) -> Result<Duration> {
    let after_name = text.rfind(')').map(|i| &text[i + 1..]).context("no ')' after the process name")?;
    // After the name come field 3 (state) onwards; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let tick = |field: usize| -> Result<u64> {
        let text = fields.get(field - 3).with_context(|| format!("field {field} is missing"))?;
        text.parse().with_context(|| format!("field {field} is not a number: '{text}'"))
    };
    let ticks = tick(14)? + tick(15)?;
    Ok(Duration::from_millis(ticks * 1000 / TICKS_PER_SECOND))
}

/// The pids of this machine's processes whose parent is `parent` and whose name (`comm`,
/// at most 15 bytes) is `name`: how the benchmark finds the etcd it started, whose pid the
/// harness keeps to itself.
pub fn children_named(parent: u32, name: &str) -> Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").context("reading /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        // A process may exit between the listing and the read.
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        if parse_stat_name_and_parent(&text).is_some_and(|(comm, ppid)| ppid == parent && comm == name) {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    Ok(pids)
}

/// The process name (field 2, without its parentheses) and the parent pid (field 4) from
/// the text of `/proc/<pid>/stat`.
pub fn parse_stat_name_and_parent(text: &str) -> Option<(&str, u32)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let name = text.get(open + 1..close)?;
    // After the name: field 3 (state), then field 4 (ppid).
    let ppid = text[close + 1..].split_whitespace().nth(1)?.parse().ok()?;
    Some((name, ppid))
}

/// CPU time the whole machine spent busy so far, summed over all CPUs: user, nice, system,
/// irq and softirq (guest time is part of user). Idle, iowait and steal are not busy.
pub fn machine_busy() -> Result<Duration> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    parse_machine_busy(&text).context("parsing /proc/stat")
}

/// The busy time from the aggregate `cpu` line of the text of `/proc/stat`.
pub fn parse_machine_busy(text: &str) -> Result<Duration> {
    let line = text.lines().find_map(|l| l.strip_prefix("cpu ")).context("no aggregate 'cpu' line")?;
    let ticks: Vec<u64> =
        line.split_whitespace().map(str::parse).collect::<Result<_, _>>().context("a non-numeric field")?;
    ensure!(ticks.len() >= 7, "{} fields on the 'cpu' line, expected at least 7", ticks.len());
    // user nice system idle iowait irq softirq [steal guest guest_nice]
    let busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6];
    Ok(Duration::from_millis(busy * 1000 / TICKS_PER_SECOND))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\ttandemd\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\n\
        VmPeak:\t  612345 kB\nVmSize:\t  600000 kB\nVmLck:\t       0 kB\nVmHWM:\t   14336 kB\n\
        VmRSS:\t   10240 kB\nRssAnon:\t    4096 kB\nThreads:\t3\n";

    #[test]
    fn rss_and_high_water_mark_are_read_in_bytes() {
        let memory = parse_status(STATUS).unwrap();
        assert_eq!(memory, Memory { rss: 10240 * 1024, peak: 14336 * 1024 });
    }

    #[test]
    fn a_status_without_memory_lines_is_an_error() {
        // Kernel threads have no Vm* lines.
        let err = parse_status("Name:\tkthreadd\nState:\tS (sleeping)\n").unwrap_err();
        assert!(format!("{err:#}").contains("no VmRSS line"), "{err:#}");
        let err = parse_status("VmRSS:\t12 MB\nVmHWM:\t1 kB\n").unwrap_err();
        assert!(format!("{err:#}").contains("unknown unit"), "{err:#}");
        let err = parse_status("VmRSS:\tmany kB\nVmHWM:\t1 kB\n").unwrap_err();
        assert!(format!("{err:#}").contains("not a number"), "{err:#}");
    }

    #[test]
    fn prefixes_of_other_fields_do_not_match() {
        // "VmRSSx" is not "VmRSS".
        let memory = parse_status("VmRSSx:\t1 kB\nVmRSS:\t2 kB\nVmHWM:\t3 kB\n").unwrap();
        assert_eq!(memory, Memory { rss: 2048, peak: 3072 });
    }

    #[test]
    fn cpu_time_is_user_plus_system_ticks() {
        let stat = "4242 (tandemd) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 3 0 73770 600000 2560 \
                    18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_stat_cpu(stat).unwrap(), Duration::from_secs(3));
    }

    #[test]
    fn a_process_name_with_spaces_and_parentheses_is_skipped_whole() {
        let stat = "7 (odd) name (x)) R 1 7 7 0 -1 0 0 0 0 0 12 3 0 0 20 0 1 0 5 100 10";
        assert_eq!(parse_stat_cpu(stat).unwrap(), Duration::from_millis(150));
        assert!(parse_stat_cpu("7 (short) R 1 2").is_err());
    }

    #[test]
    fn name_and_parent_come_from_around_the_last_parenthesis() {
        let stat = "4242 (etcd) S 77 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 3 0 73770";
        assert_eq!(parse_stat_name_and_parent(stat), Some(("etcd", 77)));
        let stat = "7 (odd) name (x)) R 1 7 7 0 -1 0 0 0 0 0 12 3 0 0 20 0 1 0 5 100 10";
        assert_eq!(parse_stat_name_and_parent(stat), Some(("odd) name (x)", 1)));
        assert_eq!(parse_stat_name_and_parent("7 (short) R"), None);
        assert_eq!(parse_stat_name_and_parent("no name here"), None);
    }

    #[test]
    fn machine_busy_time_leaves_out_idle_iowait_and_steal() {
        let stat = "cpu  300 20 100 5000 40 5 25 900 0 0\ncpu0 150 10 50 2500 20 2 12 450 0 0\nintr 1 2 3\n";
        assert_eq!(parse_machine_busy(stat).unwrap(), Duration::from_millis(4500));
        // Old kernels have only the first seven fields.
        assert_eq!(parse_machine_busy("cpu 1 0 1 9 0 0 0\n").unwrap(), Duration::from_millis(20));
        assert!(parse_machine_busy("cpu0 1 2 3 4 5 6 7\n").is_err());
        assert!(parse_machine_busy("cpu  1 2 3\n").is_err());
    }

    #[test]
    fn this_process_and_machine_can_be_read() {
        let pid = std::process::id();
        let memory = Memory::of(pid).unwrap();
        assert!(memory.rss > 0 && memory.peak >= memory.rss);
        cpu_time(pid).unwrap();
        machine_busy().unwrap();
        // This test process started no process of that name.
        assert_eq!(children_named(pid, "no-such-child").unwrap(), Vec::<u32>::new());
    }
}
