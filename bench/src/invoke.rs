//! The invocation scenario: app B's `echo` called directly over gRPC, and the same call
//! through two sidecars (caller -> tandemd A -> tandemd B -> app B).
//!
//! Everything runs on this machine as real processes, started with the integration-test
//! harness: etcd, tandemd for B (fronting app B), tandemd for the caller A (no app). App B
//! and the load generator share this process's tokio runtime, for both routes alike.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tandem_proto::common::InvokeRequest;
use tandem_proto::prost_types::Any;
use tandem_proto::runtime::app_callback_client::AppCallbackClient;
use tandem_sdk::{AppServer, Reply, SidecarClient, Status};
use tandem_tests::{Etcd, RunningSidecar, Sidecar, TestApp};
use tonic::transport::{Channel, Endpoint};

use crate::procfs::{self, Memory};
use crate::stats::{LatencySummary, Throughput};

/// App-id of the called app and its sidecar.
pub const CALLEE: &str = "bench-b";
/// App-id of the calling side's sidecar.
pub const CALLER: &str = "bench-a";
const METHOD: &str = "echo";
/// How long a freshly started mesh gets to route its first call.
const REACH_TIMEOUT: Duration = Duration::from_secs(30);

/// How much load to apply.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub payload_bytes: usize,
    pub warmup_calls: usize,
    pub calls: usize,
    pub in_flight: usize,
    pub warmup_duration: Duration,
    pub duration: Duration,
    /// Rounds the measurements are split into, taking the routes in turn.
    pub rounds: usize,
}

/// The running processes; all stopped when dropped (fields drop in this order).
pub struct Mesh {
    caller: RunningSidecar,
    callee: RunningSidecar,
    app: TestApp,
    _etcd: Etcd,
}

impl Mesh {
    /// Starts etcd, app B, tandemd for B and for A, and waits until a call from A reaches B.
    pub async fn start() -> Result<Mesh> {
        let etcd = Etcd::start().await;
        let app =
            TestApp::start(AppServer::new().handler(METHOD, |call| async move { Ok(Reply::bytes(call.data)) })).await;
        let callee = Sidecar::new(CALLEE).etcd(&etcd).app_port(app.port()).spawn().await;
        let caller = Sidecar::new(CALLER).etcd(&etcd).spawn().await;
        callee.wait_ready().await;
        caller.wait_ready().await;
        let mesh = Mesh { caller, callee, app, _etcd: etcd };
        mesh.wait_until_routed().await?;
        Ok(mesh)
    }

    /// Polls a call through the mesh until it succeeds (A learns of B from etcd's watch).
    async fn wait_until_routed(&self) -> Result<()> {
        let route = self.mesh_route();
        let payload = vec![0u8; 16];
        let started = Instant::now();
        loop {
            let last_error = match route.call(&payload).await {
                Ok(()) => return Ok(()),
                Err(status) => status,
            };
            if started.elapsed() > REACH_TIMEOUT {
                bail!(
                    "a call from {CALLER} did not reach {CALLEE} within {REACH_TIMEOUT:?}; last error: {:?}: {}\n\
                     log of tandemd {CALLER}:\n{}\nlog of tandemd {CALLEE}:\n{}",
                    last_error.code(),
                    last_error.message(),
                    self.caller.log_tail(),
                    self.callee.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// App B's callback API, called directly over one HTTP/2 connection (TCP_NODELAY on).
    pub async fn direct_route(&self) -> Result<Route> {
        let address = format!("http://{}", self.app.address);
        let channel = Endpoint::from_shared(address.clone())?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .with_context(|| format!("connecting to app {CALLEE} at {address}"))?;
        Ok(Route::Direct(AppCallbackClient::new(channel)))
    }

    /// The SDK's `invoke` against tandemd A, which forwards to tandemd B, which calls app B.
    pub fn mesh_route(&self) -> Route {
        Route::Mesh(self.caller.client())
    }

    /// The sidecars' pids, caller first.
    pub fn sidecar_pids(&self) -> Result<[(&'static str, u32); 2]> {
        let pid =
            |sidecar: &RunningSidecar| sidecar.pid().with_context(|| format!("tandemd {} has exited", sidecar.app_id));
        Ok([(CALLER, pid(&self.caller)?), (CALLEE, pid(&self.callee)?)])
    }

    /// Resident memory of both sidecars now, caller first.
    pub fn sidecar_memory(&self) -> Result<[(&'static str, Memory); 2]> {
        let [(a, a_pid), (b, b_pid)] = self.sidecar_pids()?;
        Ok([(a, Memory::of(a_pid)?), (b, Memory::of(b_pid)?)])
    }
}

/// One way of calling app B's `echo`; cheap to clone (clones share one connection).
#[derive(Debug, Clone)]
pub enum Route {
    Direct(AppCallbackClient<Channel>),
    Mesh(SidecarClient),
}

impl Route {
    /// One call; also checks that the whole payload came back.
    pub async fn call(&self, payload: &[u8]) -> Result<(), Status> {
        let returned = match self {
            Route::Direct(client) => {
                let request = InvokeRequest {
                    method: METHOD.into(),
                    data: Some(Any { type_url: String::new(), value: payload.to_vec() }),
                    content_type: "application/octet-stream".into(),
                    http_extension: None,
                };
                let response = client.clone().on_invoke(request).await?.into_inner();
                response.data.map(|any| any.value.len()).unwrap_or(0)
            }
            Route::Mesh(client) => client.invoke(CALLEE, METHOD, payload).await?.data.len(),
        };
        if returned != payload.len() {
            return Err(Status::data_loss(format!("echo returned {returned} bytes for {} sent", payload.len())));
        }
        Ok(())
    }
}

/// CPU time spent while some calls ran: per watched process, and by the whole machine.
#[derive(Debug, Clone, Default)]
pub struct CpuWindow {
    pub wall: Duration,
    /// Per watched process (label, CPU time), in watch order.
    pub processes: Vec<(String, Duration)>,
    /// Busy time of all CPUs together, whoever used them.
    pub machine: Duration,
}

impl CpuWindow {
    /// CPU time of the watched processes together.
    pub fn watched(&self) -> Duration {
        self.processes.iter().map(|(_, d)| *d).sum()
    }

    /// CPUs kept busy by everything else on the machine (etcd, other people's work), on average.
    pub fn others_cores(&self) -> f64 {
        self.machine.saturating_sub(self.watched()).as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
    }

    fn add(&mut self, other: CpuWindow) {
        self.wall += other.wall;
        self.machine += other.machine;
        if self.processes.is_empty() {
            self.processes = other.processes;
        } else {
            for ((_, total), (_, more)) in self.processes.iter_mut().zip(other.processes) {
                *total += more;
            }
        }
    }
}

/// The figures of one route.
#[derive(Debug, Clone)]
pub struct RouteFigures {
    pub latency: LatencySummary,
    /// CPU use during the sequential calls.
    pub latency_cpu: CpuWindow,
    pub throughput: Throughput,
    /// CPU use during the throughput runs.
    pub throughput_cpu: CpuWindow,
}

/// Measures each route: first a warm-up of each, then sequential latency, then throughput.
/// Both phases are split into `settings.rounds` rounds that take the routes in turn (ABBA),
/// so that other load on the machine, which comes and goes, falls on every route alike.
/// `watched` (label, pid) are the processes whose CPU time is recorded.
pub async fn measure(routes: &[&Route], settings: &Settings, watched: &[(String, u32)]) -> Result<Vec<RouteFigures>> {
    let payload: Arc<[u8]> = (0..settings.payload_bytes).map(|i| i as u8).collect();
    let rounds = settings.rounds.max(1);
    let in_turn = |round: usize| -> Vec<usize> {
        let order: Vec<usize> = (0..routes.len()).collect();
        if round.is_multiple_of(2) { order } else { order.into_iter().rev().collect() }
    };

    for route in routes {
        for _ in 0..settings.warmup_calls {
            route.call(&payload).await.context("warm-up call")?;
        }
        saturate(route, &payload, settings.in_flight, settings.warmup_duration).await.context("throughput warm-up")?;
    }

    let mut samples: Vec<Vec<Duration>> = routes.iter().map(|_| Vec::with_capacity(settings.calls)).collect();
    let mut latency_cpu: Vec<CpuWindow> = routes.iter().map(|_| CpuWindow::default()).collect();
    for round in 0..rounds {
        // Spread the calls over the rounds; the first rounds take the remainder.
        let calls = settings.calls / rounds + usize::from(round < settings.calls % rounds);
        for i in in_turn(round) {
            let cpu = CpuMeter::start(watched)?;
            for _ in 0..calls {
                let started = Instant::now();
                routes[i].call(&payload).await.context("sequential call")?;
                samples[i].push(started.elapsed());
            }
            latency_cpu[i].add(cpu.stop()?);
        }
    }

    let mut throughput: Vec<Throughput> = routes
        .iter()
        .map(|_| Throughput { calls: 0, elapsed: Duration::ZERO, in_flight: settings.in_flight })
        .collect();
    let mut throughput_cpu: Vec<CpuWindow> = routes.iter().map(|_| CpuWindow::default()).collect();
    for round in 0..rounds {
        for i in in_turn(round) {
            let cpu = CpuMeter::start(watched)?;
            let (calls, elapsed) =
                saturate(routes[i], &payload, settings.in_flight, settings.duration / rounds as u32).await?;
            throughput_cpu[i].add(cpu.stop()?);
            throughput[i].calls += calls;
            throughput[i].elapsed += elapsed;
        }
    }

    samples
        .into_iter()
        .zip(latency_cpu)
        .zip(throughput.into_iter().zip(throughput_cpu))
        .map(|((samples, latency_cpu), (throughput, throughput_cpu))| {
            let latency = LatencySummary::from_samples(samples).context("no calls were measured")?;
            Ok(RouteFigures { latency, latency_cpu, throughput, throughput_cpu })
        })
        .collect()
}

/// CPU times at the start of a window.
struct CpuMeter<'a> {
    watched: &'a [(String, u32)],
    started: Instant,
    processes: Vec<Duration>,
    machine: Duration,
}

impl<'a> CpuMeter<'a> {
    fn start(watched: &'a [(String, u32)]) -> Result<Self> {
        let processes = watched.iter().map(|(_, pid)| procfs::cpu_time(*pid)).collect::<Result<_>>()?;
        Ok(CpuMeter { watched, started: Instant::now(), processes, machine: procfs::machine_busy()? })
    }

    fn stop(self) -> Result<CpuWindow> {
        let wall = self.started.elapsed();
        let machine = procfs::machine_busy()?.saturating_sub(self.machine);
        let mut processes = Vec::with_capacity(self.watched.len());
        for ((label, pid), before) in self.watched.iter().zip(self.processes) {
            processes.push((label.clone(), procfs::cpu_time(*pid)?.saturating_sub(before)));
        }
        Ok(CpuWindow { wall, processes, machine })
    }
}

/// Keeps `in_flight` calls going (one task each, over the route's shared connection) until
/// `duration` has passed; calls in progress then finish and count. Returns the calls made
/// and the time they took.
async fn saturate(route: &Route, payload: &Arc<[u8]>, in_flight: usize, duration: Duration) -> Result<(u64, Duration)> {
    let started = Instant::now();
    let stop_at = started + duration;
    let workers: Vec<_> = (0..in_flight)
        .map(|_| {
            let (route, payload) = (route.clone(), payload.clone());
            tokio::spawn(async move {
                let mut calls = 0u64;
                while Instant::now() < stop_at {
                    route.call(&payload).await?;
                    calls += 1;
                }
                Ok::<u64, Status>(calls)
            })
        })
        .collect();
    let mut calls = 0;
    let mut first_error = None;
    for worker in workers {
        match worker.await.context("a load task panicked")? {
            Ok(n) => calls += n,
            Err(status) => {
                first_error.get_or_insert(status);
            }
        }
    }
    let elapsed = started.elapsed();
    if let Some(status) = first_error {
        bail!("a call failed under load ({in_flight} in flight): {:?}: {}", status.code(), status.message());
    }
    Ok((calls, elapsed))
}
