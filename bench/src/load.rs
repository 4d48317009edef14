//! The load both scenarios apply, whatever they call: warm-up, sequential calls for the
//! latency percentiles, then many calls in flight for throughput, both split into rounds that
//! take the routes in turn; and the CPU time the watched processes (and the whole machine)
//! spent meanwhile.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tonic::Status;

use crate::procfs;
use crate::stats::{LatencySummary, Throughput};

/// One kind of call a benchmark times: a route to app B's `echo`, or one state operation.
/// Clones share one connection, so that the calls in flight of a throughput run all go over it.
pub trait Call: Clone + Send + Sync + 'static {
    /// One call with `payload` (for the calls that send or expect one); also checks the answer.
    fn call(&self, payload: &[u8]) -> impl Future<Output = Result<(), Status>> + Send;
}

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

impl RouteFigures {
    /// The same figures with only the watched processes at `indices`, in that order.
    pub fn only_processes(mut self, indices: &[usize]) -> RouteFigures {
        for window in [&mut self.latency_cpu, &mut self.throughput_cpu] {
            window.processes = indices.iter().filter_map(|&i| window.processes.get(i).cloned()).collect();
        }
        self
    }
}

/// No call may take longer than this: a route (or a store) that stops answering fails
/// instead of stalling the whole benchmark.
pub const CALL_DEADLINE: Duration = Duration::from_secs(10);

/// What was measured of one route: each phase's figures, or why there are none.
#[derive(Debug, Clone)]
pub struct Measured {
    /// The sequential calls' latency, and CPU use meanwhile.
    pub latency: Result<(LatencySummary, CpuWindow), String>,
    /// The calls in flight, and CPU use meanwhile.
    pub throughput: Result<(Throughput, CpuWindow), String>,
}

impl Measured {
    /// All the figures, or the first phase's error.
    pub fn into_figures(self) -> Result<RouteFigures> {
        let (latency, latency_cpu) = self.latency.map_err(anyhow::Error::msg)?;
        let (throughput, throughput_cpu) = self.throughput.map_err(anyhow::Error::msg)?;
        Ok(RouteFigures { latency, latency_cpu, throughput, throughput_cpu })
    }
}

/// Measures each route: sequential latency after a sequential warm-up, then throughput after
/// a warm-up with the calls in flight (so that every route's sequential figures are taken
/// before any route is put under load). Both phases are split into `settings.rounds` rounds
/// that take the routes in turn (ABBA), so that other load on the machine, which comes and
/// goes, falls on every route alike. `watched` (label, pid) are the processes whose CPU time
/// is recorded.
///
/// A route whose call fails (or takes longer than [`CALL_DEADLINE`]) gets that error instead
/// of the phase's figures and is left out from then on; the other routes are still measured.
/// The outer error is for /proc that cannot be read.
pub async fn measure<R: Call>(routes: &[&R], settings: &Settings, watched: &[(String, u32)]) -> Result<Vec<Measured>> {
    let payload: Arc<[u8]> = (0..settings.payload_bytes).map(|i| i as u8).collect();
    let rounds = settings.rounds.max(1);
    // Why a route was left out, if it was.
    let mut failures: Vec<Option<String>> = routes.iter().map(|_| None).collect();
    // The routes not left out, in turn: forwards in even rounds, backwards in odd ones.
    let in_turn = |round: usize, failures: &[Option<String>]| -> Vec<usize> {
        let order = (0..routes.len()).filter(|&i| failures[i].is_none());
        if round.is_multiple_of(2) { order.collect() } else { order.rev().collect() }
    };

    for (i, &route) in routes.iter().enumerate() {
        for _ in 0..settings.warmup_calls {
            if let Err(status) = call_within(route, &payload).await {
                failures[i] = Some(failure("a warm-up call", &status));
                break;
            }
        }
    }

    let mut samples: Vec<Vec<Duration>> = routes.iter().map(|_| Vec::with_capacity(settings.calls)).collect();
    let mut latency_cpu: Vec<CpuWindow> = routes.iter().map(|_| CpuWindow::default()).collect();
    for round in 0..rounds {
        // Spread the calls over the rounds; the first rounds take the remainder.
        let calls = settings.calls / rounds + usize::from(round < settings.calls % rounds);
        for i in in_turn(round, &failures) {
            let cpu = CpuMeter::start(watched)?;
            for _ in 0..calls {
                let started = Instant::now();
                if let Err(status) = call_within(routes[i], &payload).await {
                    failures[i] = Some(failure("a sequential call", &status));
                    break;
                }
                samples[i].push(started.elapsed());
            }
            latency_cpu[i].add(cpu.stop()?);
        }
    }
    let latency: Vec<Result<(LatencySummary, CpuWindow), String>> = samples
        .into_iter()
        .zip(latency_cpu)
        .zip(&failures)
        .map(|((samples, cpu), failure)| match failure {
            Some(e) => Err(e.clone()),
            None => LatencySummary::from_samples(samples).map(|l| (l, cpu)).ok_or_else(|| "no calls".to_string()),
        })
        .collect();
    // Only the routes with latency figures are put under load.
    for (i, latency) in latency.iter().enumerate() {
        if latency.is_err() && failures[i].is_none() {
            failures[i] = Some("no sequential calls were measured".into());
        }
    }

    for i in in_turn(0, &failures) {
        if let Err(e) = saturate(routes[i], &payload, settings.in_flight, settings.warmup_duration).await {
            failures[i] = Some(format!("throughput warm-up: {e:#}"));
        }
    }
    let mut throughput: Vec<Throughput> = routes
        .iter()
        .map(|_| Throughput { calls: 0, elapsed: Duration::ZERO, in_flight: settings.in_flight })
        .collect();
    let mut throughput_cpu: Vec<CpuWindow> = routes.iter().map(|_| CpuWindow::default()).collect();
    for round in 0..rounds {
        for i in in_turn(round, &failures) {
            let cpu = CpuMeter::start(watched)?;
            match saturate(routes[i], &payload, settings.in_flight, settings.duration / rounds as u32).await {
                Ok((calls, elapsed)) => {
                    throughput_cpu[i].add(cpu.stop()?);
                    throughput[i].calls += calls;
                    throughput[i].elapsed += elapsed;
                }
                Err(e) => failures[i] = Some(format!("throughput run: {e:#}")),
            }
        }
    }

    Ok(latency
        .into_iter()
        .zip(throughput.into_iter().zip(throughput_cpu))
        .zip(failures)
        .map(|((latency, (throughput, cpu)), failure)| {
            let throughput = match (&latency, failure) {
                (Err(_), _) => Err("not measured: its sequential calls failed".to_string()),
                (Ok(_), Some(e)) => Err(e),
                (Ok(_), None) => Ok((throughput, cpu)),
            };
            Measured { latency, throughput }
        })
        .collect())
}

/// One call, failing with DEADLINE_EXCEEDED when it takes longer than [`CALL_DEADLINE`].
pub async fn call_within<R: Call>(route: &R, payload: &[u8]) -> Result<(), Status> {
    match tokio::time::timeout(CALL_DEADLINE, route.call(payload)).await {
        Ok(answer) => answer,
        Err(_) => Err(Status::deadline_exceeded(format!("no answer within {CALL_DEADLINE:?}"))),
    }
}

fn failure(what: &str, status: &Status) -> String {
    format!("{what} failed: {:?}: {}", status.code(), status.message())
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
async fn saturate<R: Call>(
    route: &R,
    payload: &Arc<[u8]>,
    in_flight: usize,
    duration: Duration,
) -> Result<(u64, Duration)> {
    let started = Instant::now();
    let stop_at = started + duration;
    let workers: Vec<_> = (0..in_flight)
        .map(|_| {
            let (route, payload) = (route.clone(), payload.clone());
            tokio::spawn(async move {
                let mut calls = 0u64;
                while Instant::now() < stop_at {
                    call_within(&route, &payload).await?;
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
