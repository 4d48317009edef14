//! Which instance a call goes to: power of two choices on this sidecar's own count of calls in
//! flight per instance (the default, as tower's `p2c` and Ray Serve's router do), or round
//! robin; and outlier ejection, which takes an instance that keeps failing out of the choice
//! for a while.
//!
//! - In flight: every call and event delivery this sidecar sends holds a [`CallGuard`] on the
//!   instance it went to until the answer comes back, so a slow or overloaded instance, whose
//!   calls take longer, is seen with more in flight and picked less.
//! - Cost: of the two, p2c takes the one with the lower `(calls in flight + 1) x latency`, the
//!   latency being a peak-sensitive moving average of its answers (tower's and Linkerd's
//!   `PeakEwma`) that decays toward zero while it gets no calls, and at least the mean age of
//!   the calls it holds. With equal latencies that is the count of calls in flight; an
//!   instance ten times slower takes a call only when the other holds ten times as many, and
//!   an idle slow instance is tried again once its estimate has decayed.
//! - Ejection: a call that fails with UNAVAILABLE, or that could not be sent (connection
//!   refused or broken), ejects the instance for `base` doubled for every ejection in a row,
//!   up to `max`. Once the time is up it takes calls again; one that succeeds ends the run of
//!   ejections. When every instance is ejected they are all tried anyway (a call should not
//!   fail only because its target failed a moment ago).
//! - Concurrency limit (`--concurrency-limit adaptive`, the default): an instance that refuses
//!   a call as busy (RESOURCE_EXHAUSTED, e.g. serve's full queue) teaches this sidecar how many
//!   calls it can hold: the limit drops to 90% of the calls that were in flight to it when it
//!   refused (at most once per round trip of a refusal, so one burst of refusals counts once)
//!   and, while it holds calls back, grows by one for every limit's worth of answers (AIMD, as
//!   TCP's congestion window and Netflix's concurrency-limits do). A call that would go past every instance's limit is
//!   shed by this sidecar at once, without crossing the mesh to be refused there: under
//!   overload the refusals then cost the callee nothing. An instance that never refused has no
//!   limit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::discovery::Instance;
use crate::metrics::AppLabels;

/// How the first instance of a call is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LbPolicy {
    /// Power of two choices: of two instances picked at random, the one with fewer calls in
    /// flight from this sidecar.
    P2c,
    /// Each instance in turn.
    RoundRobin,
}

/// Whether the calls in flight to an instance are limited by what its refusals taught.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConcurrencyLimit {
    /// Learned from the instance's refusals (AIMD); calls beyond it are shed by this sidecar.
    Adaptive,
    /// No limit: every call is sent, and the instance's own queue refuses what it cannot take.
    Off,
}

/// How long an instance that fails stays out of the choice.
#[derive(Debug, Clone, Copy)]
pub struct Ejection {
    /// The first ejection's length; each one in a row doubles it.
    pub base: Duration,
    /// The longest ejection.
    pub max: Duration,
}

/// What a call to an instance showed of its health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// It answered (whatever the answer): its latency is a sample of the instance's.
    Answered,
    /// It refused the call as busy at once: no ejection, but its latency estimate is raised
    /// as if it had answered slowly (at least [`REFUSAL_LATENCY`]), so that it takes fewer calls
    /// until its estimate decays, and for [`REFUSAL_HOLD`] it counts as refusing (see
    /// [`Balancer::refusing`]).
    Refused { reason: String },
    /// It failed with UNAVAILABLE, or the call could not be sent: eject it.
    Failed,
}

/// How fast an idle instance's latency estimate decays toward zero (e-folding time).
const LATENCY_DECAY: Duration = Duration::from_secs(1);
/// Weight of a sample below the estimate in the moving average.
const SAMPLE_WEIGHT: f64 = 0.25;
/// The least latency a refusal counts as.
const REFUSAL_LATENCY: Duration = Duration::from_millis(5);
/// How long after a refusal an instance counts as refusing: when every instance of an app-id
/// does, the caller's sidecar sheds the call itself instead of sending it across the mesh to be
/// refused there. Short, so the instances' queues, not this guess, decide what runs.
pub const REFUSAL_HOLD: Duration = Duration::from_millis(1);
/// Added to every latency in the cost, so that instances with no estimate yet still compare
/// by calls in flight.
const LATENCY_FLOOR_NS: f64 = 20_000.0;
/// What a refusal leaves of the calls that were in flight, as the instance's limit.
const LIMIT_BACKOFF: f64 = 0.9;
/// The least time between two cuts of a limit, when refusals come back faster.
const LIMIT_CUT_SPACING: Duration = Duration::from_millis(1);
/// A limit grown past this many calls is no limit.
const LIMIT_CEILING: f64 = 1024.0;

/// The balancer of one sidecar, over every app-id it calls.
#[derive(Debug)]
pub struct Balancer {
    policy: LbPolicy,
    ejection: Ejection,
    limit: ConcurrencyLimit,
    next: AtomicUsize,
    random: AtomicU64,
    endpoints: Mutex<Endpoints>,
    ejections: Family<AppLabels, Counter>,
    /// The zero of the call start times kept per endpoint.
    origin: Instant,
}

#[derive(Debug, Default)]
struct Endpoints {
    by_instance: HashMap<String, Arc<Endpoint>>,
    /// Size of `by_instance` after the last sweep of instances long unused.
    swept_at: usize,
}

/// What this sidecar knows of one instance.
#[derive(Debug)]
struct Endpoint {
    in_flight: AtomicUsize,
    /// Sum of the start times (microseconds after the balancer's origin) of the calls in flight.
    started_sum_us: AtomicU64,
    state: Mutex<EndpointState>,
}

#[derive(Debug)]
struct EndpointState {
    ejected_until: Option<Instant>,
    /// Until when it counts as refusing, and why it refused.
    refusing: Option<(Instant, String)>,
    /// Ejections since the instance last answered.
    ejections_in_a_row: u32,
    /// The most calls in flight it is sent (adaptive limit; `None` until it refuses one).
    limit: Option<f64>,
    /// When the limit was last cut.
    limit_cut_at: Option<Instant>,
    last_used: Instant,
    /// Latency estimate in nanoseconds as of `latency_at` (0: none yet).
    latency_ns: f64,
    latency_at: Instant,
}

impl EndpointState {
    /// The estimate at `now`, decayed toward zero since the last sample.
    fn latency_at(&self, now: Instant) -> f64 {
        let idle = now.saturating_duration_since(self.latency_at).as_secs_f64();
        self.latency_ns * (-idle / LATENCY_DECAY.as_secs_f64()).exp()
    }

    /// Peak-sensitive: a slower answer sets the estimate, a faster one moves it part way.
    fn sample(&mut self, latency: Duration, now: Instant) {
        let current = self.latency_at(now);
        let sample = latency.as_nanos() as f64;
        self.latency_ns = if sample > current { sample } else { current + (sample - current) * SAMPLE_WEIGHT };
        self.latency_at = now;
    }
}

/// An instance's place in an attempt order, with what the choice looked at.
struct Candidate {
    instance: Instance,
    ejected: bool,
    cost: f64,
}

impl Balancer {
    pub fn new(
        policy: LbPolicy,
        ejection: Ejection,
        limit: ConcurrencyLimit,
        ejections: Family<AppLabels, Counter>,
    ) -> Balancer {
        // Seeded per process, so that sidecars calling the same instances do not pick in step.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9)
            ^ u64::from(std::process::id()).rotate_left(32);
        Balancer {
            policy,
            ejection,
            limit,
            next: AtomicUsize::new(0),
            random: AtomicU64::new(seed),
            endpoints: Mutex::new(Endpoints::default()),
            ejections,
            origin: Instant::now(),
        }
    }

    /// The order in which a call tries `instances`: the policy's choice first, then the other
    /// instances that are not ejected (cheapest first), then the ejected ones.
    pub fn order(&self, instances: Vec<Instance>) -> Vec<Instance> {
        self.order_at(instances, Instant::now())
    }

    fn order_at(&self, instances: Vec<Instance>, now: Instant) -> Vec<Instance> {
        let mut candidates: Vec<Candidate> = {
            let mut endpoints = self.endpoints.lock().unwrap();
            let candidates = instances
                .into_iter()
                .map(|instance| {
                    let endpoint = endpoints.entry(&instance.instance_id, now);
                    let (ejected, cost) = self.judge(&endpoint, now);
                    Candidate { instance, ejected, cost }
                })
                .collect();
            endpoints.sweep(now);
            candidates
        };
        // Ejected instances last, in the order they came.
        candidates.sort_by_key(|c| c.ejected);
        let available = candidates.iter().filter(|c| !c.ejected).count();
        let choosable = if available == 0 { candidates.len() } else { available };
        if choosable > 1 {
            match self.policy {
                LbPolicy::RoundRobin => {
                    let first = self.next.fetch_add(1, Ordering::Relaxed) % choosable;
                    candidates[..choosable].rotate_left(first);
                }
                LbPolicy::P2c => {
                    let (a, b) = self.two_distinct(choosable);
                    let first = if candidates[b].cost < candidates[a].cost { b } else { a };
                    candidates.swap(0, first);
                    candidates[1..choosable].sort_by(|x, y| x.cost.total_cmp(&y.cost));
                }
            }
        }
        candidates.into_iter().map(|c| c.instance).collect()
    }

    /// Whether `endpoint` is ejected at `now`, and its cost: calls in flight (this one
    /// included) times its latency, which is at least how long the calls it holds have taken.
    fn judge(&self, endpoint: &Endpoint, now: Instant) -> (bool, f64) {
        let in_flight = endpoint.in_flight.load(Ordering::Relaxed);
        let held_ns = if in_flight == 0 {
            0.0
        } else {
            let mean_start_us = endpoint.started_sum_us.load(Ordering::Relaxed) as f64 / in_flight as f64;
            (self.micros(now) as f64 - mean_start_us).max(0.0) * 1_000.0
        };
        let state = endpoint.state.lock().unwrap();
        let ejected = state.ejected_until.is_some_and(|until| until > now);
        let latency = state.latency_at(now).max(held_ns) + LATENCY_FLOOR_NS;
        (ejected, (in_flight + 1) as f64 * latency)
    }

    fn micros(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_micros() as u64
    }

    /// When every one of `instances` refused a call within [`REFUSAL_HOLD`] and answered none
    /// since: the reason of the latest refusal. The caller then sheds the call at once.
    pub fn refusing(&self, instances: &[Instance]) -> Option<String> {
        self.refusing_at(instances, Instant::now())
    }

    fn refusing_at(&self, instances: &[Instance], now: Instant) -> Option<String> {
        let endpoints = self.endpoints.lock().unwrap();
        let mut latest: Option<(Instant, String)> = None;
        for instance in instances {
            let endpoint = endpoints.by_instance.get(&instance.instance_id)?;
            let state = endpoint.state.lock().unwrap();
            let (until, reason) = state.refusing.as_ref().filter(|(until, _)| *until > now)?;
            if latest.as_ref().is_none_or(|(latest, _)| until > latest) {
                latest = Some((*until, reason.clone()));
            }
        }
        latest.map(|(_, reason)| reason)
    }

    /// Like [`Balancer::start`], unless one more call would go past `instance`'s concurrency
    /// limit: then nothing is counted, and the error holds the calls in flight and the limit.
    /// Counted first and taken back when over, so concurrent calls cannot both slip past it.
    pub fn try_start(&self, app_id: &str, instance: &Instance) -> Result<CallGuard<'_>, (usize, usize)> {
        let call = self.start(app_id, instance);
        let limit = call.endpoint.state.lock().unwrap().limit;
        let in_flight = call.endpoint.in_flight();
        match limit {
            Some(limit) if in_flight as f64 > limit => Err((in_flight - 1, limit.floor() as usize)),
            _ => Ok(call),
        }
    }

    /// Counts a call to `instance` as in flight until the guard is dropped.
    pub fn start(&self, app_id: &str, instance: &Instance) -> CallGuard<'_> {
        let started = Instant::now();
        let endpoint = self.endpoints.lock().unwrap().entry(&instance.instance_id, started);
        let started_us = self.micros(started);
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        endpoint.started_sum_us.fetch_add(started_us, Ordering::Relaxed);
        CallGuard {
            balancer: self,
            app_id: app_id.to_string(),
            instance_id: instance.instance_id.clone(),
            endpoint,
            started,
            started_us,
        }
    }

    /// Calls from this sidecar in flight to `instance_id` now.
    pub fn in_flight(&self, instance_id: &str) -> usize {
        self.endpoints.lock().unwrap().by_instance.get(instance_id).map_or(0, |e| e.in_flight())
    }

    /// What a call that took `latency` (when known) showed of the instance.
    fn record_call(
        &self,
        app_id: &str,
        instance_id: &str,
        endpoint: &Endpoint,
        health: Health,
        latency: Option<Duration>,
        now: Instant,
    ) {
        let mut state = endpoint.state.lock().unwrap();
        match health {
            Health::Refused { reason } => {
                let estimate = state.latency_at(now);
                if self.limit == ConcurrencyLimit::Adaptive {
                    // Once per round trip of a refusal: the refusals of one burst count once.
                    let spacing = latency.unwrap_or_default().max(LIMIT_CUT_SPACING);
                    if state.limit_cut_at.is_none_or(|at| now.saturating_duration_since(at) >= spacing) {
                        // In flight: this call too, which it refused.
                        let in_flight = endpoint.in_flight() as f64;
                        let base = state.limit.map_or(in_flight, |limit| limit.min(in_flight));
                        state.limit = Some((base * LIMIT_BACKOFF).max(1.0));
                        state.limit_cut_at = Some(now);
                    }
                }
                let doubled = Duration::from_nanos((2.0 * estimate) as u64);
                state.sample(latency.unwrap_or_default().max(doubled).max(REFUSAL_LATENCY), now);
                state.refusing = Some((now + REFUSAL_HOLD, reason));
            }
            Health::Answered => {
                state.refusing = None;
                // Raised only while the limit holds calls back (no room for one more, this one
                // counted): an instance seldom used does not earn a larger limit untested.
                let full = |limit: f64| (endpoint.in_flight() + 1) as f64 > limit;
                if let Some(limit) = state.limit.filter(|limit| full(*limit)) {
                    state.limit = Some(limit + 1.0 / limit).filter(|limit| *limit < LIMIT_CEILING);
                }
                if let Some(latency) = latency {
                    state.sample(latency, now);
                }
                if state.ejected_until.is_none_or(|until| until <= now) {
                    state.ejected_until = None;
                    state.ejections_in_a_row = 0;
                }
            }
            // Calls that were in flight when it was ejected fail too: one ejection for them all.
            Health::Failed if state.ejected_until.is_some_and(|until| until > now) => {}
            Health::Failed => {
                let length = self.ejection_length(state.ejections_in_a_row);
                state.ejections_in_a_row = state.ejections_in_a_row.saturating_add(1);
                state.ejected_until = Some(now + length);
                self.ejections.get_or_create(&AppLabels { app_id: app_id.to_string() }).inc();
                tracing::warn!(
                    target_app = app_id,
                    instance = instance_id,
                    ejected_for = ?length,
                    in_a_row = state.ejections_in_a_row,
                    "an instance failed a call; ejected from balancing for a while"
                );
            }
        }
    }

    /// How long the ejection after `in_a_row` earlier ones lasts.
    fn ejection_length(&self, in_a_row: u32) -> Duration {
        let factor = 1u32.checked_shl(in_a_row.min(31)).unwrap_or(u32::MAX);
        self.ejection.base.saturating_mul(factor).min(self.ejection.max)
    }

    /// Two different indices below `n` (n >= 2), at random.
    fn two_distinct(&self, n: usize) -> (usize, usize) {
        let r = self.next_random();
        let a = (r % n as u64) as usize;
        let b = (a + 1 + ((r >> 32) % (n as u64 - 1)) as usize) % n;
        (a, b)
    }

    /// splitmix64: fast, and good enough to spread picks.
    fn next_random(&self) -> u64 {
        let mut z = self.random.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl Endpoints {
    fn entry(&mut self, instance_id: &str, now: Instant) -> Arc<Endpoint> {
        let endpoint = self.by_instance.entry(instance_id.to_string()).or_insert_with(|| {
            Arc::new(Endpoint {
                in_flight: AtomicUsize::new(0),
                started_sum_us: AtomicU64::new(0),
                state: Mutex::new(EndpointState {
                    ejected_until: None,
                    refusing: None,
                    ejections_in_a_row: 0,
                    limit: None,
                    limit_cut_at: None,
                    last_used: now,
                    latency_ns: 0.0,
                    latency_at: now,
                }),
            })
        });
        endpoint.state.lock().unwrap().last_used = now;
        endpoint.clone()
    }

    /// Forgets instances unused for a while (gone from discovery, most likely), once the map
    /// has doubled since the last sweep: the cost stays constant per call.
    fn sweep(&mut self, now: Instant) {
        const UNUSED_FOR: Duration = Duration::from_secs(300);
        if self.by_instance.len() <= 2 * self.swept_at + 16 {
            return;
        }
        self.by_instance.retain(|_, e| {
            let state = e.state.lock().unwrap();
            e.in_flight() > 0
                || state.ejected_until.is_some_and(|until| until > now)
                || now.duration_since(state.last_used) < UNUSED_FOR
        });
        self.swept_at = self.by_instance.len();
    }
}

impl Endpoint {
    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// One call in flight to one instance; dropping it without [`CallGuard::finish`] (the call was
/// cancelled) only ends the count.
pub struct CallGuard<'a> {
    balancer: &'a Balancer,
    app_id: String,
    instance_id: String,
    endpoint: Arc<Endpoint>,
    started: Instant,
    started_us: u64,
}

impl CallGuard<'_> {
    /// Ends the call with what it showed of the instance's health.
    pub fn finish(self, health: Health) {
        let now = Instant::now();
        let latency = now.saturating_duration_since(self.started);
        self.balancer.record_call(&self.app_id, &self.instance_id, &self.endpoint, health, Some(latency), now);
    }
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        self.endpoint.started_sum_us.fetch_sub(self.started_us, Ordering::Relaxed);
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instances(ids: &[&str]) -> Vec<Instance> {
        ids.iter()
            .map(|id| Instance { instance_id: id.to_string(), internal_address: format!("{id}:1"), has_app: true })
            .collect()
    }

    /// Whether `b` would send one more call to `a` now (nothing stays counted).
    fn admits(b: &Balancer, a: &Instance) -> Result<(), (usize, usize)> {
        b.try_start("svc", a).map(drop)
    }

    fn balancer(policy: LbPolicy) -> Balancer {
        let ejection = Ejection { base: Duration::from_millis(100), max: Duration::from_millis(350) };
        Balancer::new(policy, ejection, ConcurrencyLimit::Adaptive, Family::default())
    }

    fn first(b: &Balancer, ids: &[&str]) -> String {
        b.order(instances(ids))[0].instance_id.clone()
    }

    #[test]
    fn p2c_between_two_always_takes_the_one_with_fewer_calls_in_flight() {
        let b = balancer(LbPolicy::P2c);
        let all = instances(&["a", "b"]);
        let _held = [b.start("svc", &all[0]), b.start("svc", &all[0])];
        let _one = b.start("svc", &all[1]);
        for _ in 0..200 {
            let order = b.order(all.clone());
            assert_eq!(order[0].instance_id, "b", "b has 1 in flight, a 2");
            assert_eq!(order.len(), 2, "the other instance stays as a fallback");
        }
    }

    #[test]
    fn p2c_spreads_calls_over_idle_instances() {
        let b = balancer(LbPolicy::P2c);
        let mut picks: HashMap<String, usize> = HashMap::new();
        for _ in 0..3000 {
            *picks.entry(first(&b, &["a", "b", "c"])).or_default() += 1;
        }
        for id in ["a", "b", "c"] {
            let n = picks.get(id).copied().unwrap_or(0);
            assert!((700..=1300).contains(&n), "{id} picked {n} times of 3000: {picks:?}");
        }
    }

    #[test]
    fn p2c_never_picks_the_busiest_of_three() {
        let b = balancer(LbPolicy::P2c);
        let all = instances(&["a", "b", "c"]);
        let _busy: Vec<_> = (0..5).map(|_| b.start("svc", &all[2])).collect();
        for _ in 0..300 {
            let order = b.order(all.clone());
            assert_ne!(order[0].instance_id, "c", "of any two, c has more in flight");
            assert_eq!(order[2].instance_id, "c", "the fallbacks are ordered by calls in flight");
        }
    }

    #[test]
    fn p2c_avoids_a_slow_instance_until_its_estimate_decays() {
        let b = balancer(LbPolicy::P2c);
        let t0 = Instant::now();
        for (id, latency) in [("slow", 20), ("fast", 1)] {
            let endpoint = b.endpoints.lock().unwrap().entry(id, t0);
            b.record_call("svc", id, &endpoint, Health::Answered, Some(Duration::from_millis(latency)), t0);
        }
        let first = |at: Instant| b.order_at(instances(&["slow", "fast"]), at)[0].instance_id.clone();
        for _ in 0..100 {
            assert_eq!(first(t0), "fast", "20 ms against 1 ms, nothing in flight");
        }
        // Four fast calls in flight for 1 ms each cost less than one call to the slow one.
        let all = instances(&["slow", "fast"]);
        let held: Vec<_> = (0..4).map(|_| b.start("svc", &all[1])).collect();
        assert_eq!(first(t0), "fast");
        drop(held);
        // Idle for 5 s, the slow one's estimate has decayed below the fast one's: tried again.
        let later = t0 + Duration::from_secs(5);
        let fast = b.endpoints.lock().unwrap().entry("fast", later);
        b.record_call("svc", "fast", &fast, Health::Answered, Some(Duration::from_millis(1)), later);
        assert_eq!(first(later), "slow");
        // A quick refusal counts as a slow answer: the busy instance is avoided again.
        let slow = b.endpoints.lock().unwrap().entry("slow", later);
        let refused = Health::Refused { reason: "queue full".into() };
        b.record_call("svc", "slow", &slow, refused, Some(Duration::from_micros(1)), later);
        assert!(slow.state.lock().unwrap().latency_at(later) >= REFUSAL_LATENCY.as_nanos() as f64);
        assert_eq!(first(later), "fast");
    }

    #[test]
    fn a_refusal_sets_a_limit_below_the_calls_in_flight_which_answers_raise_again() {
        let b = balancer(LbPolicy::P2c);
        let all = instances(&["a"]);
        let a = &all[0];
        assert_eq!(admits(&b, a), Ok(()), "never called");
        let mut held: Vec<_> = (0..10).map(|_| b.start("svc", a)).collect();
        assert_eq!(admits(&b, a), Ok(()), "no refusal yet: no limit");

        // The 10th call is refused: the limit is 90% of the 10 in flight.
        let refused = || Health::Refused { reason: "queue full".into() };
        held.pop().unwrap().finish(refused());
        assert_eq!(admits(&b, a), Err((9, 9)), "9 in flight, a limit of 9: no tenth");
        // Refusals of the same burst (within the round trip of the first) do not cut it again.
        let endpoint = b.endpoints.lock().unwrap().entry("a", Instant::now());
        b.record_call("svc", "a", &endpoint, refused(), Some(Duration::from_secs(60)), Instant::now());
        assert_eq!(endpoint.state.lock().unwrap().limit, Some(9.0));
        held.truncate(8);
        assert_eq!(admits(&b, a), Ok(()), "8 in flight under a limit of 9");

        // Answers raise it by one per limit's worth of answers, while it holds calls back.
        held.push(b.start("svc", a));
        held.pop().unwrap().finish(Health::Answered);
        let limit = endpoint.state.lock().unwrap().limit.unwrap();
        assert!(limit > 9.1 && limit < 9.2, "9 in flight under 9: {limit}");
        for guard in held.drain(..) {
            guard.finish(Health::Answered);
        }
        assert_eq!(endpoint.state.lock().unwrap().limit, Some(limit), "answers with room to spare raise nothing");

        // With the limit off, refusals teach nothing.
        let off = Balancer::new(
            LbPolicy::P2c,
            Ejection { base: Duration::from_millis(100), max: Duration::from_millis(350) },
            ConcurrencyLimit::Off,
            Family::default(),
        );
        let held: Vec<_> = (0..3).map(|_| off.start("svc", a)).collect();
        held.into_iter().for_each(|guard| guard.finish(refused()));
        assert_eq!(admits(&off, a), Ok(()));
    }

    #[test]
    fn a_limit_cut_to_one_still_admits_one_call_and_grows_back_while_it_holds_calls_back() {
        let b = balancer(LbPolicy::P2c);
        let a = &instances(&["a"])[0];
        let endpoint = b.endpoints.lock().unwrap().entry("a", Instant::now());
        let t0 = Instant::now();
        for i in 0..20 {
            // Far enough apart that each cuts: the floor is one call.
            let at = t0 + Duration::from_millis(10 * i);
            let guard = b.start("svc", a);
            b.record_call("svc", "a", &endpoint, Health::Refused { reason: "full".into() }, None, at);
            drop(guard);
        }
        assert_eq!(endpoint.state.lock().unwrap().limit, Some(1.0));
        assert_eq!(admits(&b, a), Ok(()), "nothing in flight: one call goes");
        let guard = b.start("svc", a);
        assert_eq!(admits(&b, a), Err((1, 1)));
        drop(guard);
        // Answers while the limit holds calls back raise it until it is gone.
        let mut held = Vec::new();
        for _ in 0..600_000 {
            let Some(limit) = endpoint.state.lock().unwrap().limit else { break };
            while (held.len() as f64) + 1.0 <= limit {
                held.push(b.start("svc", a));
            }
            b.record_call("svc", "a", &endpoint, Health::Answered, None, t0);
        }
        assert_eq!(endpoint.state.lock().unwrap().limit, None, "grown past the ceiling: no limit");
    }

    #[test]
    fn while_every_instance_just_refused_the_caller_sheds_and_an_answer_ends_it() {
        let b = balancer(LbPolicy::P2c);
        let all = instances(&["a", "b"]);
        let t0 = Instant::now();
        let refuse = |id: &str, reason: &str, at: Instant| {
            let endpoint = b.endpoints.lock().unwrap().entry(id, at);
            b.record_call("svc", id, &endpoint, Health::Refused { reason: reason.into() }, None, at);
        };
        assert_eq!(b.refusing_at(&all, t0), None, "never called");
        refuse("a", "a is full", t0);
        assert_eq!(b.refusing_at(&all, t0), None, "b may have room");
        refuse("b", "b is full", t0 + Duration::from_micros(10));
        let now = t0 + Duration::from_micros(20);
        assert_eq!(b.refusing_at(&all, now).as_deref(), Some("b is full"), "the latest refusal");
        assert_eq!(b.refusing_at(&all, t0 + REFUSAL_HOLD * 2), None, "the hold is over");
        let endpoint = b.endpoints.lock().unwrap().entry("a", now);
        b.record_call("svc", "a", &endpoint, Health::Answered, None, now);
        assert_eq!(b.refusing_at(&all, now), None, "a answered since");
    }

    #[test]
    fn the_calls_an_instance_holds_count_as_its_latency() {
        let b = balancer(LbPolicy::P2c);
        let t0 = Instant::now();
        let all = instances(&["holder", "quick"]);
        for id in ["holder", "quick"] {
            let endpoint = b.endpoints.lock().unwrap().entry(id, t0);
            b.record_call("svc", id, &endpoint, Health::Answered, Some(Duration::from_millis(1)), t0);
        }
        let _held = b.start("svc", &all[0]);
        // The held call is 50 ms old: holder costs 2 x 50 ms, quick 1 x 1 ms.
        let later = Instant::now() + Duration::from_millis(50);
        for _ in 0..50 {
            assert_eq!(b.order_at(all.clone(), later)[0].instance_id, "quick");
        }
    }

    #[test]
    fn round_robin_takes_each_in_turn() {
        let b = balancer(LbPolicy::RoundRobin);
        let picks: Vec<String> = (0..6).map(|_| first(&b, &["a", "b", "c"])).collect();
        assert_eq!(picks, ["a", "b", "c", "a", "b", "c"]);
    }

    #[test]
    fn the_in_flight_count_ends_with_the_call() {
        let b = balancer(LbPolicy::P2c);
        let all = instances(&["a"]);
        let guard = b.start("svc", &all[0]);
        assert_eq!(b.in_flight("a"), 1);
        guard.finish(Health::Answered);
        let cancelled = b.start("svc", &all[0]);
        drop(cancelled);
        assert_eq!(b.in_flight("a"), 0);
    }

    #[test]
    fn a_failing_instance_is_ejected_for_longer_each_time_and_comes_back() {
        let b = balancer(LbPolicy::RoundRobin);
        let all = instances(&["a", "b"]);
        let t0 = Instant::now();
        let endpoint = b.endpoints.lock().unwrap().entry("a", t0);
        let ejected_until = || endpoint.state.lock().unwrap().ejected_until;

        b.record_call("svc", "a", &endpoint, Health::Failed, None, t0);
        assert_eq!(ejected_until(), Some(t0 + Duration::from_millis(100)));
        for _ in 0..4 {
            assert_eq!(first(&b, &["a", "b"]), "b", "ejected: never first while another is available");
        }
        let order = b.order(all.clone());
        assert_eq!(order[1].instance_id, "a", "an ejected instance stays the last resort");
        // Calls that were in flight when it failed add nothing.
        b.record_call("svc", "a", &endpoint, Health::Failed, None, t0 + Duration::from_millis(10));
        assert_eq!(ejected_until(), Some(t0 + Duration::from_millis(100)));

        // Back after its time, fails again: twice as long, then capped.
        let t1 = t0 + Duration::from_millis(150);
        b.record_call("svc", "a", &endpoint, Health::Failed, None, t1);
        assert_eq!(ejected_until(), Some(t1 + Duration::from_millis(200)));
        let t2 = t1 + Duration::from_millis(250);
        b.record_call("svc", "a", &endpoint, Health::Failed, None, t2);
        assert_eq!(ejected_until(), Some(t2 + Duration::from_millis(350)), "capped at max");
        assert_eq!(b.ejections.get_or_create(&AppLabels { app_id: "svc".into() }).get(), 3);

        // An answer after the ejection ends the run: the next failure is a first one again.
        let t3 = t2 + Duration::from_millis(400);
        b.record_call("svc", "a", &endpoint, Health::Answered, None, t3);
        assert_eq!(ejected_until(), None);
        b.record_call("svc", "a", &endpoint, Health::Failed, None, t3);
        assert_eq!(ejected_until(), Some(t3 + Duration::from_millis(100)));
    }

    #[test]
    fn when_every_instance_is_ejected_all_are_still_tried() {
        let b = balancer(LbPolicy::P2c);
        let now = Instant::now();
        for id in ["a", "b"] {
            let endpoint = b.endpoints.lock().unwrap().entry(id, now);
            b.record_call("svc", id, &endpoint, Health::Failed, None, now);
        }
        let order = b.order(instances(&["a", "b"]));
        assert_eq!(order.len(), 2);
    }

    #[test]
    fn instances_long_unused_are_forgotten() {
        let b = balancer(LbPolicy::P2c);
        let old = Instant::now();
        let later = old + Duration::from_secs(600);
        let mut endpoints = b.endpoints.lock().unwrap();
        for i in 0..40 {
            endpoints.entry(&format!("gone-{i}"), old);
        }
        endpoints.entry("live", later);
        endpoints.sweep(later);
        assert_eq!(endpoints.by_instance.keys().collect::<Vec<_>>(), ["live"]);
    }
}
