//! The mTLS scenario: what mutual TLS between the sidecars costs an invocation. Two meshes of
//! the invocation scenario run side by side (each its own etcd, app B and two tandemds) and
//! differ only in the hop between the sidecars: plaintext HTTP/2 in one, TLS 1.3 with client
//! certificates (SVIDs issued as `tandem certs` issues them) in the other. Connections are
//! long-lived, so the handshake is paid once per connection, not per call. The load takes the
//! two mesh routes in turn, so both see the same machine.

use anyhow::{Context, Result};
use tandem_tests::pki::{Root, TlsFiles};

use crate::invoke::{CALLEE, CALLER, Mesh, measure_side_by_side};
use crate::load::{self, RouteFigures, Settings};
use crate::machine::RunContext;
use crate::report::{Section, comparison_table, cpu_per_call_table, precise_times, side_by_side_method};
use crate::stats::ratio;

pub const MTLS_SECTION: Section = Section {
    heading: "## mTLS: the invocation with mutual TLS between the sidecars against plaintext",
    start_marker: "<!-- bench:mtls:start -->",
    end_marker: "<!-- bench:mtls:end -->",
};

/// Throughput with mTLS must be at least this fraction of plaintext's.
pub const MIN_THROUGHPUT_RATIO: f64 = 0.90;
/// Latency p50 with mTLS must be at most this multiple of plaintext's.
pub const MAX_P50_RATIO: f64 = 1.15;

#[derive(Debug, Clone)]
pub struct MtlsReport {
    pub context: RunContext,
    pub settings: Settings,
    pub plaintext: RouteFigures,
    pub mtls: RouteFigures,
}

/// Runs the scenario.
pub async fn run(settings: &Settings, context: RunContext) -> Result<MtlsReport> {
    eprintln!("starting two meshes (etcd, app {CALLEE}, tandemd {CALLEE}, tandemd {CALLER}), one with mTLS ...");
    let plaintext = Mesh::start().await.context("the plaintext mesh")?;
    let root = Root::new("bench root");
    let files: Vec<TlsFiles> = [CALLER, CALLEE].iter().map(|app| TlsFiles::new(&root.svid(app), &[&root])).collect();
    let mtls = Mesh::start_configured(|app_id, sidecar| files[usize::from(app_id == CALLEE)].apply(sidecar))
        .await
        .context("the mTLS mesh")?;
    let (plaintext_figures, mtls_figures) = measure_side_by_side(
        ("plaintext", &plaintext),
        ("mTLS", &mtls),
        &format!("caller, both apps {CALLEE}"),
        settings,
    )
    .await?;
    drop((plaintext, mtls));
    Ok(MtlsReport { context, settings: *settings, plaintext: plaintext_figures, mtls: mtls_figures })
}

impl MtlsReport {
    pub fn throughput_ratio(&self) -> Option<f64> {
        ratio(self.mtls.throughput.per_second(), self.plaintext.throughput.per_second())
    }

    pub fn p50_ratio(&self) -> Option<f64> {
        ratio(self.mtls.latency.p50.as_secs_f64(), self.plaintext.latency.p50.as_secs_f64())
    }

    pub fn cpu_windows(&self) -> impl Iterator<Item = &load::CpuWindow> {
        [&self.plaintext, &self.mtls].into_iter().flat_map(|f| [&f.latency_cpu, &f.throughput_cpu])
    }

    pub fn to_markdown(&self) -> String {
        let (c, s) = (&self.context, &self.settings);
        let (off, on) = (&self.plaintext, &self.mtls);
        let mut out = c.measured_line();
        out.push_str(&format!(
            "- Call: the invocation benchmark's mesh route (app B's `echo` with a {payload} B payload, \
             `SidecarClient::invoke` -> tandemd A -> tandemd B -> app B) on two meshes started side by side, \
             each with its own etcd, app B and tandemds (runtime threads: {workers}). **plaintext**: HTTP/2 \
             between the sidecars. **mTLS**: `--enable-mtls`, TLS 1.3 (rustls, ring) with ECDSA P-256 SVIDs \
             on both sides; one connection from A to B, made before the timed calls.\n",
            payload = s.payload_bytes,
            workers = c.tandemd_workers,
        ));
        out.push_str(&side_by_side_method(s));
        out.push_str(&comparison_table(("plaintext", off), ("mTLS", on), s.in_flight));
        let throughput = self.throughput_ratio();
        let p50 = self.p50_ratio();
        let verdict = |pass: bool| if pass { "PASS" } else { "**MISS**" };
        out.push_str("| target | measured | result |\n|---|---|---|\n");
        out.push_str(&format!(
            "| mTLS throughput >= {MIN_THROUGHPUT_RATIO:.2}x plaintext | {} | {} |\n",
            precise_times(throughput),
            verdict(throughput.is_some_and(|r| r >= MIN_THROUGHPUT_RATIO))
        ));
        out.push_str(&format!(
            "| mTLS latency p50 <= {MAX_P50_RATIO:.2}x plaintext | {} | {} |\n\n",
            precise_times(p50),
            verdict(p50.is_some_and(|r| r <= MAX_P50_RATIO))
        ));
        out.push_str(
            "CPU time per call during the throughput runs (user + system, from /proc/<pid>/stat), each column \
             with its own mesh's sidecars; the bench process serves both meshes' app B.\n\n",
        );
        out.push_str(&cpu_per_call_table(("plaintext", off), ("mTLS", on)));
        out
    }
}
