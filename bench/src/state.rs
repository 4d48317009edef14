//! The state scenario: what Dapr's state API costs through tandemd, against a sidecar round
//! trip that touches no store.
//!
//! One run starts a real etcd and ONE tandemd (app-id [`APP_ID`], no app) whose resources dir
//! declares two state stores: `sled` (`state.sled`, embedded in tandemd) and `etcd`
//! (`state.etcd`, in the etcd tandemd also uses for discovery). The bench process calls
//! tandemd's gRPC API (`dapr.proto.runtime.v1.Dapr`) over one HTTP/2 connection:
//! - `GetMetadata`, the baseline: a round trip to the sidecar that reads no store;
//! - `GetState` of a key that holds a 1 KiB value;
//! - `SaveState` of a 1 KiB value, which tandemd answers only once the write is durable;
//!
//! for each store, with the same load as the invocation benchmark ([`crate::load::measure`]):
//! sequential latency, then throughput with many calls in flight, in rounds that take the
//! operations in turn.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tandem_proto::common::StateItem;
use tandem_proto::runtime::dapr_client::DaprClient;
use tandem_proto::runtime::{GetMetadataRequest, GetStateRequest, SaveStateRequest};
use tandem_tests::state::ResourcesDir;
use tandem_tests::{Etcd, RunningSidecar, Sidecar};
use tonic::Status;
use tonic::transport::{Channel, Endpoint};

use crate::load::{Call, CpuWindow, Measured, Settings};
use crate::machine::RunContext;
use crate::procfs::{self, Memory};
use crate::report::{Verdict, bytes, cores_busy, latency, megabytes, nanos, per_call, precise_times, thousands, times};
use crate::stats::{LatencySummary, Throughput, ratio};

/// App-id of the sidecar under test.
pub const APP_ID: &str = "bench-state";
/// The key every `GetState` reads; written once before the measurements.
const GET_KEY: &str = "bench-get";
/// `SaveState` writes rotate over this many keys (`bench-save-0` ...), so that the calls in
/// flight write different keys, as independent requests of real apps mostly do.
const SAVE_KEYS: u64 = 256;

/// sled `GetState` p50 may be at most this many times `GetMetadata` p50.
pub const MAX_GET_P50_RATIO: f64 = 1.2;
/// sled `SaveState` throughput must be at least this fraction of sled `GetState` throughput.
pub const MIN_SAVE_THROUGHPUT_RATIO: f64 = 0.5;

/// The two stores the sidecar is given, each a component named after its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    Sled,
    Etcd,
}

impl Store {
    pub const ALL: [Store; 2] = [Store::Sled, Store::Etcd];

    /// The component's name, which requests use as `store_name`.
    pub fn name(self) -> &'static str {
        match self {
            Store::Sled => "sled",
            Store::Etcd => "etcd",
        }
    }

    /// The component's `spec.type`.
    pub fn kind(self) -> &'static str {
        match self {
            Store::Sled => "state.sled",
            Store::Etcd => "state.etcd",
        }
    }
}

/// One operation the benchmark times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// The baseline: a sidecar round trip that reads no store.
    Metadata,
    Get(Store),
    Save(Store),
}

impl Operation {
    /// In the order they are measured and reported.
    pub const ALL: [Operation; 5] = [
        Operation::Metadata,
        Operation::Get(Store::Sled),
        Operation::Save(Store::Sled),
        Operation::Get(Store::Etcd),
        Operation::Save(Store::Etcd),
    ];

    pub fn label(self) -> String {
        match self {
            Operation::Metadata => "GetMetadata (no store)".into(),
            Operation::Get(store) => format!("{} GetState", store.name()),
            Operation::Save(store) => format!("{} SaveState", store.name()),
        }
    }
}

/// The key the `n`-th `SaveState` writes.
pub fn save_key(n: u64) -> String {
    format!("bench-save-{}", n % SAVE_KEYS)
}

/// The running processes; all stopped when dropped (fields drop in this order).
pub struct StateBench {
    sidecar: RunningSidecar,
    etcd: Etcd,
    _resources: ResourcesDir,
    client: DaprClient<Channel>,
}

impl StateBench {
    /// Starts etcd and tandemd with both stores, connects, checks that both stores are there,
    /// and writes the key `GetState` reads (`value`) into each.
    pub async fn start(value: &[u8]) -> Result<StateBench> {
        let etcd = Etcd::start().await;
        // Neither store needs metadata: sled lives under tandemd's --data-dir, and the etcd
        // store uses tandemd's --etcd-endpoints.
        let resources = ResourcesDir::new(&Store::ALL.map(|store| (store.name(), store.kind(), &[][..])));
        let sidecar = Sidecar::new(APP_ID).etcd(&etcd).resources(resources.path()).spawn().await;
        sidecar.wait_ready().await;
        let address = format!("http://{}", sidecar.grpc_addr());
        let channel = Endpoint::from_shared(address.clone())?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .with_context(|| format!("connecting to tandemd {APP_ID} at {address}"))?;
        let bench = StateBench { sidecar, etcd, _resources: resources, client: DaprClient::new(channel) };
        bench
            .check_and_seed(value)
            .await
            .with_context(|| format!("log of tandemd {APP_ID}:\n{}", bench.sidecar.log_tail()))?;
        Ok(bench)
    }

    async fn check_and_seed(&self, value: &[u8]) -> Result<()> {
        let metadata = self.client.clone().get_metadata(GetMetadataRequest {}).await?.into_inner();
        for store in Store::ALL {
            let listed =
                metadata.registered_components.iter().any(|c| c.name == store.name() && c.r#type == store.kind());
            ensure!(
                listed,
                "GetMetadata does not list the {} store '{}'; it lists {:?}",
                store.kind(),
                store.name(),
                metadata.registered_components.iter().map(|c| (&c.name, &c.r#type)).collect::<Vec<_>>()
            );
            let save = SaveStateRequest { store_name: store.name().into(), states: vec![item(GET_KEY, value)] };
            self.client
                .clone()
                .save_state(save)
                .await
                .with_context(|| format!("writing {GET_KEY} to {}", store.name()))?;
            self.call(Operation::Get(store)).call(value).await.with_context(|| format!("reading {GET_KEY} back"))?;
        }
        Ok(())
    }

    /// `operation` as a [`Call`] over this bench's connection.
    pub fn call(&self, operation: Operation) -> StateCall {
        StateCall { client: self.client.clone(), operation, saves: Arc::new(AtomicU64::new(0)) }
    }

    /// Who spends CPU on these calls: this process, tandemd, and etcd when it can be found
    /// (it is a child of this process).
    pub fn watched(&self) -> Result<Vec<(String, u32)>> {
        let mut watched =
            vec![("bench process".to_string(), std::process::id()), (format!("tandemd {APP_ID}"), self.sidecar_pid()?)];
        match procfs::children_named(std::process::id(), "etcd")?.as_slice() {
            [pid] => watched.push(("etcd".to_string(), *pid)),
            pids => {
                eprintln!("warning: {} etcd processes are children of this one; etcd's CPU is not shown", pids.len())
            }
        }
        Ok(watched)
    }

    fn sidecar_pid(&self) -> Result<u32> {
        self.sidecar.pid().with_context(|| format!("tandemd {APP_ID} has exited; etcd log:\n{}", self.etcd.log_tail()))
    }

    pub fn sidecar_memory(&self) -> Result<Memory> {
        Memory::of(self.sidecar_pid()?)
    }
}

fn item(key: &str, value: &[u8]) -> StateItem {
    StateItem { key: key.into(), value: value.to_vec(), ..Default::default() }
}

/// One [`Operation`] against the sidecar; clones share the connection and the key counter.
#[derive(Debug, Clone)]
pub struct StateCall {
    client: DaprClient<Channel>,
    operation: Operation,
    /// `SaveState` calls made so far, which picks the next key.
    saves: Arc<AtomicU64>,
}

impl Call for StateCall {
    /// `payload` is the value written, and the value `GetState` must find.
    async fn call(&self, payload: &[u8]) -> Result<(), Status> {
        let mut client = self.client.clone();
        match self.operation {
            Operation::Metadata => {
                let id = client.get_metadata(GetMetadataRequest {}).await?.into_inner().id;
                if id != APP_ID {
                    return Err(Status::internal(format!("GetMetadata answered app-id '{id}', not '{APP_ID}'")));
                }
            }
            Operation::Get(store) => {
                let request =
                    GetStateRequest { store_name: store.name().into(), key: GET_KEY.into(), ..Default::default() };
                let response = client.get_state(request).await?.into_inner();
                if response.data != payload || response.etag.is_empty() {
                    return Err(Status::data_loss(format!(
                        "GetState of {GET_KEY} in {} returned {} bytes and ETag '{}', expected the {} bytes written",
                        store.name(),
                        response.data.len(),
                        response.etag,
                        payload.len()
                    )));
                }
            }
            Operation::Save(store) => {
                let key = save_key(self.saves.fetch_add(1, Ordering::Relaxed));
                let request = SaveStateRequest { store_name: store.name().into(), states: vec![item(&key, payload)] };
                client.save_state(request).await?;
            }
        }
        Ok(())
    }
}

/// Everything one run measured.
#[derive(Debug, Clone)]
pub struct StateReport {
    pub context: RunContext,
    pub settings: Settings,
    /// What was measured of each operation, in [`Operation::ALL`]'s order: per phase, the
    /// figures or why there are none (a call failed or hung; the operation was left out).
    pub figures: Vec<(Operation, Measured)>,
    /// tandemd's memory when ready with both stores open, and after all the load.
    pub idle: Memory,
    pub after_load: Memory,
    /// Whether tandemd still answered GetMetadata after the measurements: when it did not,
    /// failures after the first one follow from it rather than from their own operation.
    pub answering_after: bool,
}

/// A target, and whether it binds: the targets are set for sled, the embedded store;
/// etcd's figures are held against the same ratios for reference only.
#[derive(Debug, Clone, PartialEq)]
pub struct StateVerdict {
    pub verdict: Verdict,
    pub binding: bool,
}

impl StateReport {
    fn of(&self, operation: Operation) -> Option<&Measured> {
        self.figures.iter().find(|(op, _)| *op == operation).map(|(_, m)| m)
    }

    /// The latency of `operation`, when it was measured.
    pub fn latency(&self, operation: Operation) -> Option<&LatencySummary> {
        self.of(operation)?.latency.as_ref().ok().map(|(latency, _)| latency)
    }

    /// The throughput of `operation`, when it was measured.
    pub fn throughput(&self, operation: Operation) -> Option<&Throughput> {
        self.of(operation)?.throughput.as_ref().ok().map(|(throughput, _)| throughput)
    }

    /// p50 of `operation` over `GetMetadata`'s p50.
    pub fn p50_over_baseline(&self, operation: Operation) -> Option<f64> {
        ratio(nanos(self.latency(operation)?.p50), nanos(self.latency(Operation::Metadata)?.p50))
    }

    /// Throughput of `operation` over `GetMetadata`'s.
    pub fn throughput_over_baseline(&self, operation: Operation) -> Option<f64> {
        ratio(self.throughput(operation)?.per_second(), self.throughput(Operation::Metadata)?.per_second())
    }

    /// `SaveState` throughput over `GetState` throughput, both of `store`.
    pub fn save_over_get_throughput(&self, store: Store) -> Option<f64> {
        let get = self.throughput(Operation::Get(store))?.per_second();
        ratio(self.throughput(Operation::Save(store))?.per_second(), get)
    }

    /// The CPU windows of every phase that was measured.
    pub fn cpu_windows(&self) -> impl Iterator<Item = &CpuWindow> {
        self.figures.iter().flat_map(|(_, m)| {
            let latency = m.latency.as_ref().ok().map(|(_, cpu)| cpu);
            latency.into_iter().chain(m.throughput.as_ref().ok().map(|(_, cpu)| cpu))
        })
    }

    pub fn verdicts(&self) -> Vec<StateVerdict> {
        let mut verdicts = Vec::new();
        for store in Store::ALL {
            let binding = store == Store::Sled;
            let note = if binding { "" } else { " (reference)" };
            let name = store.name();
            let get = self.p50_over_baseline(Operation::Get(store));
            verdicts.push(StateVerdict {
                verdict: Verdict {
                    target: format!("{name} GetState p50 <= {MAX_GET_P50_RATIO}x GetMetadata p50{note}"),
                    measured: precise_times(get),
                    pass: get.is_some_and(|r| r <= MAX_GET_P50_RATIO),
                },
                binding,
            });
            let save = self.save_over_get_throughput(store);
            verdicts.push(StateVerdict {
                verdict: Verdict {
                    target: format!(
                        "{name} SaveState throughput >= {MIN_SAVE_THROUGHPUT_RATIO:.2}x {name} GetState throughput{note}"
                    ),
                    measured: precise_times(save),
                    pass: save.is_some_and(|r| r >= MIN_SAVE_THROUGHPUT_RATIO),
                },
                binding,
            });
        }
        verdicts
    }

    /// The markdown that goes between the state markers.
    pub fn to_markdown(&self) -> String {
        let (c, s) = (&self.context, &self.settings);
        let mut out = c.measured_line();
        out.push_str(&format!(
            "- Calls to one tandemd's gRPC API (`dapr.proto.runtime.v1.Dapr`, tonic client, one HTTP/2 connection, \
             TCP_NODELAY). **GetMetadata**, the baseline: a sidecar round trip that reads no store. **GetState**: \
             one key holding {payload}. **SaveState**: one item of {payload}, no ETag (last write wins), keys \
             rotating over {keys}; tandemd answers once the write is durable.\n\
             - Stores: `sled` (`state.sled`, embedded in tandemd, on local disk) and `etcd` (`state.etcd`, the \
             single-member etcd that tandemd also uses for discovery, on the same disk).\n\
             - Processes, all on this machine: etcd, tandemd (runtime threads: {workers}), and one bench process \
             (tokio, {cpus} workers) that makes the calls.\n\
             - Latency: {calls} sequential calls per operation after {warmup} warm-up calls. Throughput: \
             {in_flight} calls in flight for {secs} s per operation after a {warm_secs} s warm-up. Both are split \
             into {rounds} rounds that take the operations in turn, so load from elsewhere falls on all alike.\n\n",
            cpus = c.cpus,
            workers = c.tandemd_workers,
            payload = bytes(s.payload_bytes),
            keys = SAVE_KEYS,
            calls = thousands(s.calls as u64),
            warmup = thousands(s.warmup_calls as u64),
            in_flight = s.in_flight,
            secs = s.duration.as_secs_f64(),
            warm_secs = s.warmup_duration.as_secs_f64(),
            rounds = s.rounds,
        ));

        out.push_str(&format!(
            "| operation | latency p50 | latency p99 | p50 / GetMetadata | throughput, {} in flight | \
             throughput / GetMetadata |\n|---|---:|---:|---:|---:|---:|\n",
            s.in_flight
        ));
        for &(operation, _) in &self.figures {
            let (p50, p99) = match self.latency(operation) {
                Some(l) => (latency(l.p50), latency(l.p99)),
                None => ("failed".to_string(), "failed".to_string()),
            };
            let throughput = match self.throughput(operation) {
                Some(t) => format!("{} calls/s", thousands(t.per_second().round() as u64)),
                None => "failed".to_string(),
            };
            out.push_str(&format!(
                "| {} | {p50} | {p99} | {} | {throughput} | {} |\n",
                operation.label(),
                times(self.p50_over_baseline(operation)),
                times(self.throughput_over_baseline(operation)),
            ));
        }

        for (operation, measured) in &self.figures {
            let failed = match (&measured.latency, &measured.throughput) {
                (Err(error), _) => Some(("its sequential calls", error)),
                (Ok(_), Err(error)) => Some(("its calls in flight", error)),
                _ => None,
            };
            if let Some((phase, error)) = failed {
                out.push_str(&format!(
                    "\n**{} failed** in {phase} and was left out from then on: {error}\n",
                    operation.label()
                ));
            }
        }
        if !self.answering_after {
            out.push_str(
                "\n**tandemd no longer answered at all** (not even GetMetadata) after the measurements: the \
                 failures that came after the first one follow from it.\n",
            );
        }

        out.push_str(
            "\nThe targets are set for sled, the embedded store; etcd's figures are held against the same \
             ratios for reference.\n\n| target | measured | result |\n|---|---|---|\n",
        );
        for StateVerdict { verdict, binding } in self.verdicts() {
            let result = match (binding, verdict.pass) {
                (true, true) => "PASS",
                (true, false) => "**MISS**",
                (false, true) => "met (not a target)",
                (false, false) => "not met (not a target)",
            };
            out.push_str(&format!("| {} | {} | {} |\n", verdict.target, verdict.measured, result));
        }

        out.push_str(&format!(
            "\nResident memory of tandemd (MB = 10^6 bytes): {} when ready with both stores open, {} after the \
             load, {} at its peak (VmHWM).\n\n",
            megabytes(self.idle.rss),
            megabytes(self.after_load.rss),
            megabytes(self.after_load.peak)
        ));

        out.push_str(
            "CPU time per call during the throughput runs (user + system, from /proc/<pid>/stat, 10 ms \
             resolution), and how many of the machine's cores were busy on average (from /proc/stat): with \
             the processes named here, and with everything else.\n\n",
        );
        let labels: Vec<&str> = self
            .cpu_windows()
            .find(|cpu| !cpu.processes.is_empty())
            .map(|cpu| cpu.processes.iter().map(|(label, _)| label.as_str()).collect())
            .unwrap_or_default();
        out.push_str("| operation |");
        for label in &labels {
            out.push_str(&format!(" {label} |"));
        }
        out.push_str(" **all of these** | cores busy with these | cores busy with everything else (throughput, latency runs) |\n|---|");
        out.push_str(&"---:|".repeat(labels.len() + 3));
        out.push('\n');
        for (operation, measured) in &self.figures {
            let (Ok((_, latency_cpu)), Ok((throughput, cpu))) = (&measured.latency, &measured.throughput) else {
                out.push_str(&format!(
                    "| {} |{} n/a | n/a | n/a |\n",
                    operation.label(),
                    " n/a |".repeat(labels.len())
                ));
                continue;
            };
            out.push_str(&format!("| {} |", operation.label()));
            for (_, used) in &cpu.processes {
                out.push_str(&format!(" {} |", per_call(*used, throughput.calls)));
            }
            out.push_str(&format!(
                " {} | {} | {:.2}, {:.2} |\n",
                per_call(cpu.watched(), throughput.calls),
                cores_busy(cpu),
                cpu.others_cores(),
                latency_cpu.others_cores()
            ));
        }
        out
    }
}

/// Starts the processes, measures every [`Operation`], stops the processes.
pub async fn run(settings: &Settings, context: RunContext) -> Result<StateReport> {
    let value: Vec<u8> = (0..settings.payload_bytes).map(|i| i as u8).collect();
    eprintln!("starting etcd and tandemd {APP_ID} with the stores 'sled' and 'etcd' ...");
    let bench = StateBench::start(&value).await?;
    let idle = bench.sidecar_memory()?;
    let watched = bench.watched()?;
    let calls: Vec<StateCall> = Operation::ALL.iter().map(|op| bench.call(*op)).collect();
    eprintln!(
        "measuring {} operations in {} rounds: {} sequential calls, then {} in flight for {:?}, per operation ...",
        calls.len(),
        settings.rounds,
        settings.calls,
        settings.in_flight,
        settings.duration
    );
    let measured = crate::load::measure(&calls.iter().collect::<Vec<_>>(), settings, &watched).await?;
    let after_load = bench.sidecar_memory()?;
    let answering_after = crate::load::call_within(&bench.call(Operation::Metadata), &value).await.is_ok();
    ensure!(
        measured.len() == Operation::ALL.len(),
        "{} sets of figures for {} operations",
        measured.len(),
        calls.len()
    );
    let figures: Vec<(Operation, Measured)> = Operation::ALL.into_iter().zip(measured).collect();
    let log = bench.sidecar.log_tail();
    if figures.iter().any(|(_, m)| m.latency.is_err() || m.throughput.is_err()) && !log.trim().is_empty() {
        eprintln!("some operations failed; the last lines of tandemd's log:\n{log}");
    }
    Ok(StateReport { context, settings: *settings, figures, idle, after_load, answering_after })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::RouteFigures;

    #[test]
    fn saves_rotate_over_a_fixed_set_of_keys() {
        assert_eq!(save_key(0), "bench-save-0");
        assert_eq!(save_key(SAVE_KEYS - 1), format!("bench-save-{}", SAVE_KEYS - 1));
        assert_eq!(save_key(SAVE_KEYS), "bench-save-0");
        assert_ne!(save_key(1), GET_KEY);
    }

    fn figures(p50_us: u64, calls_per_second: u64) -> RouteFigures {
        let secs = Duration::from_secs;
        let cpu = CpuWindow {
            wall: secs(5),
            processes: vec![
                ("bench process".into(), secs(4)),
                ("tandemd bench-state".into(), secs(2)),
                ("etcd".into(), secs(1)),
            ],
            machine: secs(8),
        };
        RouteFigures {
            latency: LatencySummary {
                calls: 2000,
                p50: Duration::from_micros(p50_us),
                p99: Duration::from_micros(p50_us * 2),
            },
            latency_cpu: CpuWindow { wall: secs(1), processes: vec![], machine: Duration::from_millis(100) },
            throughput: Throughput { calls: calls_per_second * 5, elapsed: secs(5), in_flight: 64 },
            throughput_cpu: cpu,
        }
    }

    fn measured(f: RouteFigures) -> Measured {
        Measured { latency: Ok((f.latency, f.latency_cpu)), throughput: Ok((f.throughput, f.throughput_cpu)) }
    }

    /// (p50 µs, calls/s) for: metadata, sled get, sled save, etcd get, etcd save.
    fn report(values: [(u64, u64); 5]) -> StateReport {
        let memory = Memory { rss: 9_000_000, peak: 12_000_000 };
        StateReport {
            context: RunContext::example("1, tandemd's default"),
            settings: Settings {
                payload_bytes: 1024,
                warmup_calls: 500,
                calls: 2000,
                in_flight: 64,
                warmup_duration: Duration::from_secs(1),
                duration: Duration::from_secs(5),
                rounds: 10,
            },
            figures: Operation::ALL
                .into_iter()
                .zip(values)
                .map(|(op, (p50, cps))| (op, measured(figures(p50, cps))))
                .collect(),
            idle: memory,
            after_load: memory,
            answering_after: true,
        }
    }

    #[test]
    fn ratios_compare_with_the_baseline_and_with_the_stores_own_get() {
        let r = report([(100, 10_000), (110, 9_000), (400, 3_000), (300, 4_000), (2_000, 1_000)]);
        assert_eq!(r.p50_over_baseline(Operation::Metadata), Some(1.0));
        assert_eq!(r.p50_over_baseline(Operation::Get(Store::Sled)), Some(1.1));
        assert_eq!(r.throughput_over_baseline(Operation::Save(Store::Etcd)), Some(0.1));
        assert_eq!(r.save_over_get_throughput(Store::Sled), Some(3_000.0 / 9_000.0));
        assert_eq!(r.save_over_get_throughput(Store::Etcd), Some(0.25));
    }

    #[test]
    fn only_sled_verdicts_bind() {
        let r = report([(100, 10_000), (110, 9_000), (400, 6_000), (300, 4_000), (2_000, 1_000)]);
        let summary: Vec<(bool, bool)> = r.verdicts().iter().map(|v| (v.binding, v.verdict.pass)).collect();
        assert_eq!(summary, [(true, true), (true, true), (false, false), (false, false)]);
        let r = report([(100, 10_000), (121, 9_000), (400, 4_000), (110, 4_000), (2_000, 3_000)]);
        let summary: Vec<(bool, bool)> = r.verdicts().iter().map(|v| (v.binding, v.verdict.pass)).collect();
        assert_eq!(summary, [(true, false), (true, false), (false, true), (false, true)]);
        assert_eq!(r.verdicts()[0].verdict.measured, "1.210x");
    }

    #[test]
    fn a_missing_operation_gives_no_ratio_and_fails_its_target() {
        let mut r = report([(100, 10_000), (110, 9_000), (400, 6_000), (300, 4_000), (2_000, 1_000)]);
        r.figures.retain(|(op, _)| *op != Operation::Metadata);
        assert_eq!(r.p50_over_baseline(Operation::Get(Store::Sled)), None);
        assert!(!r.verdicts()[0].verdict.pass);
        assert_eq!(r.verdicts()[0].verdict.measured, "n/a");
    }

    #[test]
    fn a_failed_operation_is_reported_with_its_error_and_misses_its_target() {
        let mut r = report([(100, 10_000), (110, 9_000), (400, 6_000), (300, 4_000), (2_000, 1_000)]);
        r.figures[2].1.throughput = Err("throughput warm-up: DeadlineExceeded: no answer within 10s".into());
        assert_eq!(r.save_over_get_throughput(Store::Sled), None);
        let passes: Vec<bool> = r.verdicts().iter().map(|v| v.verdict.pass).collect();
        assert_eq!(passes, [true, false, false, false]);
        let text = r.to_markdown();
        for expected in [
            // Its latency was measured before it failed under load.
            "| sled SaveState | 400 µs | 800 µs | 4.00x | failed | n/a |",
            "**sled SaveState failed** in its calls in flight and was left out from then on: throughput warm-up: \
             DeadlineExceeded",
            "| sled SaveState throughput >= 0.50x sled GetState throughput | n/a | **MISS** |",
            "| sled SaveState | n/a | n/a | n/a | n/a | n/a | n/a |",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        let cells = |line: &str| line.matches('|').count();
        let cpu_table: Vec<&str> = text.lines().skip_while(|l| !l.starts_with("| operation | bench")).collect();
        assert!(cpu_table.iter().all(|line| cells(line) == cells(cpu_table[0])), "{cpu_table:?}");
        assert!(!text.contains("no longer answered"), "{text}");
        r.figures[4].1 = Measured {
            latency: Err("a sequential call failed: Unavailable: etcd is down".into()),
            throughput: Err("not measured: its sequential calls failed".into()),
        };
        let text = r.to_markdown();
        assert!(text.contains("| etcd SaveState | failed | failed | n/a | failed | n/a |"), "{text}");
        assert!(
            text.contains(
                "**etcd SaveState failed** in its sequential calls and was left out from then on: a sequential"
            ),
            "{text}"
        );
        r.answering_after = false;
        assert!(r.to_markdown().contains("**tandemd no longer answered at all** (not even GetMetadata)"));
    }

    #[test]
    fn the_markdown_holds_the_figures_and_the_verdicts() {
        let text = report([(100, 10_000), (110, 9_000), (400, 3_000), (300, 4_000), (2_000, 1_000)]).to_markdown();
        for expected in [
            "on 2 x Test CPU, release build of abc1234; load average 0.10 at the start",
            "| GetMetadata (no store) | 100 µs | 200 µs | 1.00x | 10,000 calls/s | 1.00x |",
            "| sled GetState | 110 µs | 220 µs | 1.10x | 9,000 calls/s | 0.90x |",
            "| etcd SaveState | 2000 µs | 4000 µs | 20.00x | 1,000 calls/s | 0.10x |",
            "| sled GetState p50 <= 1.2x GetMetadata p50 | 1.100x | PASS |",
            "| sled SaveState throughput >= 0.50x sled GetState throughput | 0.333x | **MISS** |",
            "| etcd GetState p50 <= 1.2x GetMetadata p50 (reference) | 3.000x | not met (not a target) |",
            "| etcd SaveState throughput >= 0.50x etcd GetState throughput (reference) | 0.250x | not met (not a target) |",
            "9.0 MB when ready with both stores open, 9.0 MB after the load, 12.0 MB at its peak",
            "| operation | bench process | tandemd bench-state | etcd | **all of these** |",
            // 2 s of tandemd CPU over 5 s x 3,000 calls/s.
            "| sled SaveState | 266.7 µs/call | 133.3 µs/call | 66.7 µs/call | 466.7 µs/call | 1.40 | 0.20, 0.10 |",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        // Every table row has as many cells as its header.
        let cpu_table: Vec<&str> = text.lines().skip_while(|l| !l.starts_with("| operation | bench")).collect();
        let cells = |line: &str| line.matches('|').count();
        assert!(cpu_table.len() >= 7);
        assert!(cpu_table.iter().all(|line| cells(line) == cells(cpu_table[0])), "{cpu_table:?}");
    }
}
