//! The figures as markdown: tables, targets with PASS/MISS, and BENCHMARKS.md upkeep, where
//! only the part between this benchmark's markers is replaced so that hand-written analysis
//! and other benchmarks' sections survive a rerun.

use std::time::Duration;

use crate::load::{CpuWindow, RouteFigures, Settings};
use crate::machine::RunContext;
use crate::procfs::Memory;
use crate::stats::ratio;

/// One benchmark's part of BENCHMARKS.md: its heading and the markers around the generated text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Section {
    pub heading: &'static str,
    pub start_marker: &'static str,
    pub end_marker: &'static str,
}

pub const INVOKE_SECTION: Section = Section {
    heading: "## Service invocation: direct gRPC against two sidecars",
    start_marker: "<!-- bench:invoke:start -->",
    end_marker: "<!-- bench:invoke:end -->",
};

pub const STATE_SECTION: Section =
    Section { heading: "## State", start_marker: "<!-- bench:state:start -->", end_marker: "<!-- bench:state:end -->" };

pub const PUBSUB_SECTION: Section = Section {
    heading: "## Pub/sub: durable publish to delivery",
    start_marker: "<!-- bench:pubsub:start -->",
    end_marker: "<!-- bench:pubsub:end -->",
};

/// Mesh p50 may be at most this many times direct p50.
pub const MAX_P50_RATIO: f64 = 3.3;
/// Through the HTTP API, p50 may be at most this many times p50 through the gRPC API.
pub const MAX_HTTP_P50_RATIO: f64 = 1.3;
/// Mesh throughput must be at least this fraction of direct throughput.
pub const MIN_THROUGHPUT_RATIO: f64 = 0.30;
/// tandemd's resident memory limits, in bytes (MB = 10^6 bytes).
pub const MAX_IDLE_RSS: u64 = 20_000_000;
pub const MAX_PEAK_RSS: u64 = 50_000_000;

/// Resident memory of one sidecar before and after the load.
#[derive(Debug, Clone)]
pub struct SidecarMemory {
    pub app_id: String,
    pub role: &'static str,
    /// Ready, connected, one call made, no load.
    pub idle: Memory,
    /// After both routes were measured; its `peak` is the high-water mark of the whole run.
    pub after_load: Memory,
}

/// Everything one run measured.
#[derive(Debug, Clone)]
pub struct InvokeReport {
    pub context: RunContext,
    pub settings: Settings,
    pub direct: RouteFigures,
    /// Through two sidecars from tandemd A's gRPC API.
    pub mesh: RouteFigures,
    /// Through two sidecars from tandemd A's Dapr HTTP API.
    pub http: RouteFigures,
    pub memory: Vec<SidecarMemory>,
}

/// One target and whether the run met it.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub target: String,
    pub measured: String,
    pub pass: bool,
}

impl InvokeReport {
    pub fn p50_ratio(&self) -> Option<f64> {
        ratio(nanos(self.mesh.latency.p50), nanos(self.direct.latency.p50))
    }

    pub fn p99_ratio(&self) -> Option<f64> {
        ratio(nanos(self.mesh.latency.p99), nanos(self.direct.latency.p99))
    }

    pub fn throughput_ratio(&self) -> Option<f64> {
        ratio(self.mesh.throughput.per_second(), self.direct.throughput.per_second())
    }

    /// HTTP API p50 over gRPC API p50, both through two sidecars.
    pub fn http_p50_ratio(&self) -> Option<f64> {
        ratio(nanos(self.http.latency.p50), nanos(self.mesh.latency.p50))
    }

    pub fn verdicts(&self) -> Vec<Verdict> {
        let memory = |pick: fn(&SidecarMemory) -> u64| -> String {
            self.memory.iter().map(|m| format!("{} {}", m.app_id, megabytes(pick(m)))).collect::<Vec<_>>().join(", ")
        };
        vec![
            Verdict {
                target: format!("mesh p50 <= {MAX_P50_RATIO}x direct p50"),
                measured: precise_times(self.p50_ratio()),
                pass: self.p50_ratio().is_some_and(|r| r <= MAX_P50_RATIO),
            },
            Verdict {
                target: format!("mesh throughput >= {MIN_THROUGHPUT_RATIO:.2}x direct"),
                measured: precise_times(self.throughput_ratio()),
                pass: self.throughput_ratio().is_some_and(|r| r >= MIN_THROUGHPUT_RATIO),
            },
            Verdict {
                target: format!("mesh p50, HTTP API <= {MAX_HTTP_P50_RATIO}x gRPC API"),
                measured: precise_times(self.http_p50_ratio()),
                pass: self.http_p50_ratio().is_some_and(|r| r <= MAX_HTTP_P50_RATIO),
            },
            Verdict {
                target: format!("tandemd RSS idle <= {}", megabytes(MAX_IDLE_RSS)),
                measured: memory(|m| m.idle.rss),
                pass: self.memory.iter().all(|m| m.idle.rss <= MAX_IDLE_RSS),
            },
            Verdict {
                target: format!("tandemd RSS peak <= {}", megabytes(MAX_PEAK_RSS)),
                measured: memory(|m| m.after_load.peak),
                pass: self.memory.iter().all(|m| m.after_load.peak <= MAX_PEAK_RSS),
            },
        ]
    }

    /// The markdown that goes between the markers.
    pub fn to_markdown(&self) -> String {
        let (c, s) = (&self.context, &self.settings);
        let (direct, mesh, http) = (&self.direct, &self.mesh, &self.http);
        let mut out = c.measured_line();
        out.push_str(&format!(
            "- Call: app B's `echo` with a {payload} payload. **direct**: the caller calls B's \
             `AppCallback.OnInvoke` over gRPC. **mesh**: the same call through two sidecars \
             (`SidecarClient::invoke` -> tandemd A -> tandemd B -> app B). **mesh, HTTP API**: the same \
             call through two sidecars from tandemd A's Dapr HTTP API (`POST /v1.0/invoke/bench-b/method/echo`, \
             keep-alive HTTP/1.1, one connection per call in flight).\n\
             - Processes, all on this machine: etcd, tandemd A and B (runtime threads: {workers}), and one bench \
             process (tokio, {cpus} workers) that is both the caller and app B.\n\
             - Latency: {calls} sequential calls per route after {warmup} warm-up calls. Throughput: \
             {in_flight} calls in flight for {secs} s per route after a {warm_secs} s warm-up, one shared \
             HTTP/2 connection per hop (but the caller's HTTP/1.1 hop of the HTTP API route). Both are split into {rounds} rounds that take the routes in turn, \
             so load from elsewhere falls on both alike.\n\n",
            cpus = c.cpus,
            workers = c.tandemd_workers,
            payload = bytes(s.payload_bytes),
            calls = thousands(s.calls as u64),
            warmup = thousands(s.warmup_calls as u64),
            in_flight = s.in_flight,
            secs = s.duration.as_secs_f64(),
            warm_secs = s.warmup_duration.as_secs_f64(),
            rounds = s.rounds,
        ));

        out.push_str(
            "| | direct (app -> app) | mesh (app -> tandemd -> tandemd -> app) | mesh / direct \
             | mesh, HTTP API | HTTP API / gRPC API |\n",
        );
        out.push_str("|---|---:|---:|---:|---:|---:|\n");
        out.push_str(&format!(
            "| latency p50 | {} | {} | {} | {} | {} |\n",
            latency(direct.latency.p50),
            latency(mesh.latency.p50),
            times(self.p50_ratio()),
            latency(http.latency.p50),
            times(self.http_p50_ratio())
        ));
        out.push_str(&format!(
            "| latency p99 | {} | {} | {} | {} | {} |\n",
            latency(direct.latency.p99),
            latency(mesh.latency.p99),
            times(self.p99_ratio()),
            latency(http.latency.p99),
            times(ratio(nanos(http.latency.p99), nanos(mesh.latency.p99)))
        ));
        out.push_str(&format!(
            "| throughput, {} in flight | {} calls/s | {} calls/s | {} | {} calls/s | {} |\n\n",
            s.in_flight,
            thousands(direct.throughput.per_second().round() as u64),
            thousands(mesh.throughput.per_second().round() as u64),
            times(self.throughput_ratio()),
            thousands(http.throughput.per_second().round() as u64),
            times(ratio(http.throughput.per_second(), mesh.throughput.per_second()))
        ));

        out.push_str("| target | measured | result |\n|---|---|---|\n");
        for verdict in self.verdicts() {
            let result = if verdict.pass { "PASS" } else { "**MISS**" };
            out.push_str(&format!("| {} | {} | {} |\n", verdict.target, verdict.measured, result));
        }

        out.push_str(
            "\nResident memory of tandemd (MB = 10^6 bytes). Idle: ready, connected, one call made, \
             before any load. Peak: the high-water mark (VmHWM) after both routes were measured.\n\n",
        );
        out.push_str("| sidecar | idle (VmRSS) | after load (VmRSS) | peak (VmHWM) |\n|---|---:|---:|---:|\n");
        for m in &self.memory {
            out.push_str(&format!(
                "| {} ({}) | {} | {} | {} |\n",
                m.app_id,
                m.role,
                megabytes(m.idle.rss),
                megabytes(m.after_load.rss),
                megabytes(m.after_load.peak)
            ));
        }

        out.push_str(
            "\nCPU time per call during the throughput runs (user + system, from /proc/<pid>/stat, 10 ms \
             resolution), and how many of the machine's cores were busy on average (from /proc/stat): with the \
             processes above, and with everything else (etcd, and whatever else the machine was doing).\n\n",
        );
        out.push_str("| CPU | direct | mesh | mesh, HTTP API |\n|---|---:|---:|---:|\n");
        let per_call = |figures: &RouteFigures, cpu: Duration| per_call(cpu, figures.throughput.calls);
        for (((label, direct_cpu), (_, mesh_cpu)), (_, http_cpu)) in direct
            .throughput_cpu
            .processes
            .iter()
            .zip(&mesh.throughput_cpu.processes)
            .zip(&http.throughput_cpu.processes)
        {
            out.push_str(&format!(
                "| {label} | {} | {} | {} |\n",
                per_call(direct, *direct_cpu),
                per_call(mesh, *mesh_cpu),
                per_call(http, *http_cpu)
            ));
        }
        out.push_str(&format!(
            "| **all of the above** | {} | {} | {} |\n",
            per_call(direct, direct.throughput_cpu.watched()),
            per_call(mesh, mesh.throughput_cpu.watched()),
            per_call(http, http.throughput_cpu.watched())
        ));
        out.push_str(&throughput_cpu_rows(&[&direct.throughput_cpu, &mesh.throughput_cpu, &http.throughput_cpu]));
        out.push_str(&format!(
            "| cores busy with everything else, latency runs | {:.2} | {:.2} | {:.2} |\n",
            direct.latency_cpu.others_cores(),
            mesh.latency_cpu.others_cores(),
            http.latency_cpu.others_cores()
        ));
        out
    }
}

/// The file's text with `block` between `section`'s markers: the markers' content is
/// replaced when both are there, a new section is appended when neither is, and a file with
/// only one of them (or both in the wrong order) is refused rather than guessed at.
pub fn splice(existing: Option<&str>, section: &Section, block: &str) -> Result<String, String> {
    let Section { start_marker, end_marker, .. } = *section;
    let text = match existing {
        Some(text) if !text.trim().is_empty() => text,
        _ => return Ok(format!("{}{}", FILE_HEADER, new_section(section, block))),
    };
    match (text.find(start_marker), text.find(end_marker)) {
        (Some(start), Some(end)) if start < end => {
            let head = &text[..start + start_marker.len()];
            Ok(format!("{head}\n{}\n{}", block.trim_end(), &text[end..]))
        }
        (None, None) => Ok(format!("{}\n\n{}", text.trim_end(), new_section(section, block))),
        _ => Err(format!(
            "the file has {start_marker} and {end_marker} out of order or only one of them; fix it by hand"
        )),
    }
}

const FILE_HEADER: &str = "# Tandem benchmarks\n\n\
    Written by `tandem-bench` (`cargo build --release -p tandem-bench -p tandem-sidecar`, then \
    `target/release/tandem-bench --write BENCHMARKS.md`). Each benchmark rewrites only the part between \
    its markers; the analysis around it is written by hand.\n\n";

fn new_section(section: &Section, block: &str) -> String {
    format!(
        "{}\n\n{}\n{}\n{}\n\n\
         ### What limits it\n\n_Not written yet: read the figures above and explain them here._\n",
        section.heading,
        section.start_marker,
        block.trim_end(),
        section.end_marker
    )
}

pub fn nanos(d: Duration) -> f64 {
    d.as_nanos() as f64
}

pub fn times(ratio: Option<f64>) -> String {
    ratio.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "n/a".into())
}

/// Three decimals, so that a ratio just on the wrong side of a target does not print as
/// the target itself.
pub fn precise_times(ratio: Option<f64>) -> String {
    ratio.map(|r| format!("{r:.3}x")).unwrap_or_else(|| "n/a".into())
}

/// CPU time per call, e.g. `42.0 µs/call`.
pub fn per_call(cpu: Duration, calls: u64) -> String {
    format!("{:.1} µs/call", cpu.as_secs_f64() * 1e6 / calls.max(1) as f64)
}

/// How many cores the watched processes kept busy on average, e.g. `1.58`.
pub fn cores_busy(cpu: &CpuWindow) -> String {
    format!("{:.2}", cpu.watched().as_secs_f64() / cpu.wall.as_secs_f64().max(1e-9))
}

/// The two table rows on how busy the cores were during two throughput runs side by side: with
/// the watched processes, and with everything else on the machine.
pub fn throughput_cpu_rows(windows: &[&CpuWindow]) -> String {
    let busy: String = windows.iter().map(|w| format!(" {} |", cores_busy(w))).collect();
    let others: String = windows.iter().map(|w| format!(" {:.2} |", w.others_cores())).collect();
    format!(
        "| cores busy with the above, throughput runs |{busy}\n\
         | cores busy with everything else, throughput runs |{others}\n"
    )
}

/// The method line of a side-by-side mesh benchmark: how many calls each route got, and how.
pub fn side_by_side_method(s: &Settings) -> String {
    format!(
        "- Latency: {calls} sequential calls per route after {warmup} warm-up calls. Throughput: {in_flight} \
         calls in flight for {secs} s per route after a {warm_secs} s warm-up. Both split into {rounds} \
         rounds that take the routes in turn.\n\n",
        calls = thousands(s.calls as u64),
        warmup = thousands(s.warmup_calls as u64),
        in_flight = s.in_flight,
        secs = s.duration.as_secs_f64(),
        warm_secs = s.warmup_duration.as_secs_f64(),
        rounds = s.rounds,
    )
}

/// Two mesh routes side by side (`(label, figures)` each): latency p50 and p99, throughput with
/// `in_flight` calls in flight, and the second's ratio to the first.
pub fn comparison_table(first: (&str, &RouteFigures), second: (&str, &RouteFigures), in_flight: usize) -> String {
    let ((a_label, a), (b_label, b)) = (first, second);
    let mut out = format!("| | {a_label} | {b_label} | {b_label} / {a_label} |\n|---|---:|---:|---:|\n");
    for (name, a_latency, b_latency) in [("p50", a.latency.p50, b.latency.p50), ("p99", a.latency.p99, b.latency.p99)] {
        out.push_str(&format!(
            "| latency {name} | {} | {} | {} |\n",
            latency(a_latency),
            latency(b_latency),
            times(ratio(b_latency.as_secs_f64(), a_latency.as_secs_f64()))
        ));
    }
    out.push_str(&format!(
        "| throughput, {in_flight} in flight | {} calls/s | {} calls/s | {} |\n\n",
        thousands(a.throughput.per_second().round() as u64),
        thousands(b.throughput.per_second().round() as u64),
        times(ratio(b.throughput.per_second(), a.throughput.per_second()))
    ));
    out
}

/// CPU time per call of each watched process during two throughput runs side by side, their
/// total, and how busy the cores were.
pub fn cpu_per_call_table(first: (&str, &RouteFigures), second: (&str, &RouteFigures)) -> String {
    let ((a_label, a), (b_label, b)) = (first, second);
    let mut out = format!("| CPU | {a_label} | {b_label} |\n|---|---:|---:|\n");
    for ((label, a_cpu), (_, b_cpu)) in a.throughput_cpu.processes.iter().zip(&b.throughput_cpu.processes) {
        out.push_str(&format!(
            "| {label} | {} | {} |\n",
            per_call(*a_cpu, a.throughput.calls),
            per_call(*b_cpu, b.throughput.calls)
        ));
    }
    out.push_str(&format!(
        "| **all of the above** | {} | {} |\n",
        per_call(a.throughput_cpu.watched(), a.throughput.calls),
        per_call(b.throughput_cpu.watched(), b.throughput.calls)
    ));
    out.push_str(&throughput_cpu_rows(&[&a.throughput_cpu, &b.throughput_cpu]));
    out
}

/// A latency in µs below 10 ms, with one decimal below 100 µs.
pub fn latency(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 100.0 {
        format!("{us:.1} µs")
    } else if us < 10_000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.1} ms", us / 1000.0)
    }
}

pub fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

pub fn bytes(n: usize) -> String {
    if n > 0 && n.is_multiple_of(1024) { format!("{} KiB", n / 1024) } else { format!("{n} B") }
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{LatencySummary, Throughput};

    const BLOCK: &str = "| a | b |\n|---|---|\n| 1 | 2 |\n";
    const START_MARKER: &str = INVOKE_SECTION.start_marker;
    const END_MARKER: &str = INVOKE_SECTION.end_marker;

    #[test]
    fn a_missing_or_empty_file_gets_a_header_a_section_and_markers() {
        for existing in [None, Some(""), Some("\n  \n")] {
            let text = splice(existing, &INVOKE_SECTION, BLOCK).unwrap();
            assert!(text.starts_with("# Tandem benchmarks"), "{text}");
            assert!(text.contains(&format!("{START_MARKER}\n{BLOCK}{END_MARKER}\n")), "{text}");
            assert!(text.contains("### What limits it"), "{text}");
        }
    }

    #[test]
    fn only_the_text_between_the_markers_is_replaced() {
        let existing = format!(
            "# Title\n\nintro\n\n{START_MARKER}\nold figures\nmore old figures\n{END_MARKER}\n\n\
             ### What limits it\n\nHand-written analysis.\n\n## Another benchmark\n\n\
             <!-- bench:other:start -->\nother\n<!-- bench:other:end -->\n"
        );
        let text = splice(Some(&existing), &INVOKE_SECTION, BLOCK).unwrap();
        assert_eq!(
            text,
            format!(
                "# Title\n\nintro\n\n{START_MARKER}\n{BLOCK}{END_MARKER}\n\n\
                 ### What limits it\n\nHand-written analysis.\n\n## Another benchmark\n\n\
                 <!-- bench:other:start -->\nother\n<!-- bench:other:end -->\n"
            )
        );
        // Splicing twice gives the same file.
        assert_eq!(splice(Some(&text), &INVOKE_SECTION, BLOCK).unwrap(), text);
    }

    #[test]
    fn a_file_without_markers_gets_the_section_appended() {
        let text = splice(Some("# Benchmarks\n\nSomeone else's section.\n\n\n"), &INVOKE_SECTION, BLOCK).unwrap();
        assert!(text.starts_with("# Benchmarks\n\nSomeone else's section.\n\n## Service invocation"), "{text}");
        assert!(text.contains(&format!("{START_MARKER}\n{BLOCK}{END_MARKER}")), "{text}");
    }

    #[test]
    fn a_file_with_broken_markers_is_refused() {
        assert!(splice(Some(&format!("x\n{START_MARKER}\ny\n")), &INVOKE_SECTION, BLOCK).is_err());
        assert!(splice(Some(&format!("x\n{END_MARKER}\ny\n")), &INVOKE_SECTION, BLOCK).is_err());
        assert!(splice(Some(&format!("{END_MARKER}\n{START_MARKER}\n")), &INVOKE_SECTION, BLOCK).is_err());
    }

    #[test]
    fn the_state_section_goes_after_the_invoke_section_and_leaves_it_alone() {
        let invoke_only = splice(None, &INVOKE_SECTION, BLOCK).unwrap();
        let both = splice(Some(&invoke_only), &STATE_SECTION, "state figures\n").unwrap();
        assert!(both.starts_with(invoke_only.trim_end()), "{both}");
        assert!(
            both.ends_with(
                "\n\n## State\n\n<!-- bench:state:start -->\nstate figures\n<!-- bench:state:end -->\n\n\
                 ### What limits it\n\n_Not written yet: read the figures above and explain them here._\n"
            ),
            "{both}"
        );
        // A rerun of either benchmark replaces only its own figures.
        let rerun = splice(Some(&both), &STATE_SECTION, "new state figures\n").unwrap();
        assert_eq!(rerun, both.replace("\nstate figures\n", "\nnew state figures\n"));
        let rerun = splice(Some(&rerun), &INVOKE_SECTION, "new invoke figures\n").unwrap();
        assert!(rerun.contains("<!-- bench:invoke:start -->\nnew invoke figures\n<!-- bench:invoke:end -->"));
        assert!(rerun.contains("<!-- bench:state:start -->\nnew state figures\n<!-- bench:state:end -->"));
        assert!(!rerun.contains("| 1 | 2 |"), "{rerun}");
    }

    #[test]
    fn number_formats() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(latency(Duration::from_nanos(85_260)), "85.3 µs");
        assert_eq!(latency(Duration::from_micros(412)), "412 µs");
        assert_eq!(latency(Duration::from_micros(12_345)), "12.3 ms");
        assert_eq!(megabytes(12_345_678), "12.3 MB");
        assert_eq!(bytes(1024), "1 KiB");
        assert_eq!(bytes(100), "100 B");
    }

    fn figures(p50_us: u64, p99_us: u64, calls_per_second: u64) -> RouteFigures {
        let us = Duration::from_micros;
        let secs = Duration::from_secs;
        let cpu = CpuWindow {
            wall: secs(5),
            processes: vec![("bench".into(), secs(5)), ("tandemd bench-a".into(), secs(2))],
            machine: secs(8),
        };
        RouteFigures {
            latency: LatencySummary { calls: 2000, p50: us(p50_us), p99: us(p99_us) },
            latency_cpu: CpuWindow { wall: secs(1), processes: vec![], machine: Duration::from_millis(500) },
            throughput: Throughput { calls: calls_per_second * 5, elapsed: secs(5), in_flight: 64 },
            throughput_cpu: cpu,
        }
    }

    fn report(mesh_p50_us: u64, mesh_calls_per_second: u64, peak_rss: u64, http_p50_us: u64) -> InvokeReport {
        let memory = Memory { rss: 9_000_000, peak: peak_rss };
        InvokeReport {
            context: RunContext::example("2"),
            settings: Settings {
                payload_bytes: 1024,
                warmup_calls: 500,
                calls: 2000,
                in_flight: 64,
                warmup_duration: Duration::from_secs(1),
                duration: Duration::from_secs(5),
                rounds: 5,
            },
            direct: figures(100, 200, 20_000),
            mesh: figures(mesh_p50_us, 900, mesh_calls_per_second),
            http: figures(http_p50_us, 1_800, mesh_calls_per_second / 2),
            memory: vec![SidecarMemory { app_id: "bench-a".into(), role: "caller", idle: memory, after_load: memory }],
        }
    }

    #[test]
    fn verdicts_compare_ratios_and_memory_with_the_targets() {
        let good = report(300, 7_000, 30_000_000, 330);
        assert_eq!(good.p50_ratio(), Some(3.0));
        assert!(good.verdicts().iter().all(|v| v.pass), "{:?}", good.verdicts());

        let bad = report(400, 5_000, 60_000_000, 600);
        let passes: Vec<bool> = bad.verdicts().iter().map(|v| v.pass).collect();
        assert_eq!(passes, [false, false, false, true, false]);
        assert_eq!(bad.verdicts()[2].measured, "1.500x");
        assert_eq!(bad.verdicts()[1].measured, "0.250x");
    }

    #[test]
    fn the_markdown_holds_the_figures_and_the_verdicts() {
        let text = report(400, 7_000, 30_000_000, 480).to_markdown();
        for expected in [
            "on 2 x Test CPU, release build of abc1234; load average 0.10 at the start",
            "| latency p50 | 100 µs | 400 µs | 4.00x | 480 µs | 1.20x |",
            "| latency p99 | 200 µs | 900 µs | 4.50x | 1800 µs | 2.00x |",
            "| throughput, 64 in flight | 20,000 calls/s | 7,000 calls/s | 0.35x | 3,500 calls/s | 0.50x |",
            "| mesh p50 <= 3.3x direct p50 | 4.000x | **MISS** |",
            "| mesh throughput >= 0.30x direct | 0.350x | PASS |",
            "| mesh p50, HTTP API <= 1.3x gRPC API | 1.200x | PASS |",
            "| bench-a (caller) | 9.0 MB | 9.0 MB | 30.0 MB |",
            "| bench | 50.0 µs/call | 142.9 µs/call | 285.7 µs/call |",
            "| cores busy with the above, throughput runs | 1.40 | 1.40 | 1.40 |",
            "| cores busy with everything else, throughput runs | 0.20 | 0.20 | 0.20 |",
            "| cores busy with everything else, latency runs | 0.50 | 0.50 | 0.50 |",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
    }
}
