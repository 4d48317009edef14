//! The tracing scenario: what exporting every span costs an invocation. Two meshes of the
//! invocation scenario run side by side (each its own etcd, app B and two tandemds) and differ
//! only in tracing: the untraced one has no `OTEL_EXPORTER_OTLP_ENDPOINT` (no OpenTelemetry
//! spans are made, only the trace context is carried on); the traced one samples every call (`traceidratio`, 1.0) and
//! exports its spans over OTLP/gRPC to a collector inside this process on loopback. The load
//! takes the two mesh routes in turn, so both see the same machine.

use std::time::Duration;

use anyhow::{Context, Result};
use tandem_tests::otlp::Collector;

use crate::invoke::{CALLEE, CALLER, Mesh, measure_side_by_side};
use crate::load::{self, RouteFigures, Settings};
use crate::machine::RunContext;
use crate::prometheus::sum_of;
use crate::report::{Section, comparison_table, cpu_per_call_table, precise_times, side_by_side_method, thousands};
use crate::stats::ratio;

pub const TRACING_SECTION: Section = Section {
    heading: "## Tracing: the invocation with every span exported against none",
    start_marker: "<!-- bench:tracing:start -->",
    end_marker: "<!-- bench:tracing:end -->",
};

/// Traced throughput must be at least this fraction of untraced throughput.
pub const MIN_TRACED_THROUGHPUT_RATIO: f64 = 0.90;

/// What became of the traced mesh's spans.
#[derive(Debug, Clone, Copy, Default)]
pub struct SpanCounts {
    /// Received by the collector.
    pub received: u64,
    /// Reported exported by the two sidecars.
    pub exported: u64,
    /// Reported dropped by the two sidecars (queue full or export failed).
    pub dropped: u64,
}

#[derive(Debug, Clone)]
pub struct TracingReport {
    pub context: RunContext,
    pub settings: Settings,
    pub untraced: RouteFigures,
    pub traced: RouteFigures,
    pub spans: SpanCounts,
}

/// Runs the scenario.
pub async fn run(settings: &Settings, context: RunContext) -> Result<TracingReport> {
    let collector = Collector::counting().await;
    let endpoint = collector.endpoint();
    eprintln!("starting two meshes (etcd, app {CALLEE}, tandemd {CALLEE}, tandemd {CALLER}), one traced ...");
    let untraced = Mesh::start().await.context("the untraced mesh")?;
    let traced = Mesh::start_with_env(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_TRACES_SAMPLER", "traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "1.0"),
    ])
    .await
    .context("the traced mesh")?;
    let (untraced_figures, traced_figures) = measure_side_by_side(
        ("untraced", &untraced),
        ("traced", &traced),
        &format!("caller, both apps {CALLEE}, collector"),
        settings,
    )
    .await?;

    // Let the last batches reach the collector (the default schedule delay is 5 s).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut spans = SpanCounts { received: collector.count(), ..Default::default() };
    for text in traced.sidecar_metrics().await? {
        spans.exported += sum_of(&text, "tandem_trace_spans_exported_total") as u64;
        spans.dropped += sum_of(&text, "tandem_trace_spans_dropped_total") as u64;
    }
    drop((untraced, traced));
    Ok(TracingReport { context, settings: *settings, untraced: untraced_figures, traced: traced_figures, spans })
}

impl TracingReport {
    pub fn throughput_ratio(&self) -> Option<f64> {
        ratio(self.traced.throughput.per_second(), self.untraced.throughput.per_second())
    }

    pub fn cpu_windows(&self) -> impl Iterator<Item = &load::CpuWindow> {
        [&self.untraced, &self.traced].into_iter().flat_map(|f| [&f.latency_cpu, &f.throughput_cpu])
    }

    pub fn to_markdown(&self) -> String {
        let (c, s) = (&self.context, &self.settings);
        let (off, on) = (&self.untraced, &self.traced);
        let mut out = c.measured_line();
        out.push_str(&format!(
            "- Call: the invocation benchmark's mesh route (app B's `echo` with a {payload} B payload, \
             `SidecarClient::invoke` -> tandemd A -> tandemd B -> app B) on two meshes started side by side, \
             each with its own etcd, app B and tandemds (runtime threads: {workers}). **untraced**: no \
             `OTEL_EXPORTER_OTLP_ENDPOINT` (no OpenTelemetry spans, only the trace context carried on). **traced**: every call sampled \
             (`OTEL_TRACES_SAMPLER=traceidratio`, `OTEL_TRACES_SAMPLER_ARG=1.0`), three spans per call (A's API \
             call, A's attempt, B's inbound call) exported over OTLP/gRPC to a collector in the bench process on \
             loopback that decodes every export and counts its spans.\n",
            payload = s.payload_bytes,
            workers = c.tandemd_workers,
        ));
        out.push_str(&side_by_side_method(s));
        out.push_str(&comparison_table(("untraced", off), ("traced", on), s.in_flight));
        let ratio = self.throughput_ratio();
        let pass = ratio.is_some_and(|r| r >= MIN_TRACED_THROUGHPUT_RATIO);
        out.push_str("| target | measured | result |\n|---|---|---|\n");
        out.push_str(&format!(
            "| traced throughput >= {MIN_TRACED_THROUGHPUT_RATIO:.2}x untraced | {} | {} |\n\n",
            precise_times(ratio),
            if pass { "PASS" } else { "**MISS**" }
        ));
        let sp = &self.spans;
        out.push_str(&format!(
            "Spans of the traced mesh over the whole run (warm-ups included): {} received by the collector; the \
             sidecars counted {} exported and {} dropped.\n\n",
            thousands(sp.received),
            thousands(sp.exported),
            thousands(sp.dropped)
        ));
        out.push_str(
            "CPU time per call during the throughput runs (user + system, from /proc/<pid>/stat), each column \
             with its own mesh's sidecars; the bench process serves both meshes' app B and the collector.\n\n",
        );
        out.push_str(&cpu_per_call_table(("untraced", off), ("traced", on)));
        out
    }
}
