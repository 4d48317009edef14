//! Which instance a call goes to: power of two choices on this sidecar's own count of calls in
//! flight per instance (the default, as tower's `p2c` and Ray Serve's router do), or round
//! robin; and outlier ejection, which takes an instance that keeps failing out of the choice
//! for a while.
//!
//! - In flight: every call and event delivery this sidecar sends holds a [`CallGuard`] on the
//!   instance it went to until the answer comes back, so a slow or overloaded instance, whose
//!   calls take longer, is seen with more in flight and picked less.
//! - Ejection: a call that fails with UNAVAILABLE, or that could not be sent (connection
//!   refused or broken), ejects the instance for `base` doubled for every ejection in a row,
//!   up to `max`. Once the time is up it takes calls again; one that succeeds ends the run of
//!   ejections. When every instance is ejected they are all tried anyway (a call should not
//!   fail only because its target failed a moment ago).

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

/// How long an instance that fails stays out of the choice.
#[derive(Debug, Clone, Copy)]
pub struct Ejection {
    /// The first ejection's length; each one in a row doubles it.
    pub base: Duration,
    /// The longest ejection.
    pub max: Duration,
}

/// What a call to an instance showed of its health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// It answered (whatever the answer).
    Answered,
    /// It failed with UNAVAILABLE, or the call could not be sent: eject it.
    Failed,
}

/// The balancer of one sidecar, over every app-id it calls.
#[derive(Debug)]
pub struct Balancer {
    policy: LbPolicy,
    ejection: Ejection,
    next: AtomicUsize,
    random: AtomicU64,
    endpoints: Mutex<Endpoints>,
    ejections: Family<AppLabels, Counter>,
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
    state: Mutex<EndpointState>,
}

#[derive(Debug)]
struct EndpointState {
    ejected_until: Option<Instant>,
    /// Ejections since the instance last answered.
    ejections_in_a_row: u32,
    last_used: Instant,
}

/// An instance's place in an attempt order, with what the choice looked at.
struct Candidate {
    instance: Instance,
    endpoint: Arc<Endpoint>,
    ejected: bool,
}

impl Balancer {
    pub fn new(policy: LbPolicy, ejection: Ejection, ejections: Family<AppLabels, Counter>) -> Balancer {
        // Seeded per process, so that sidecars calling the same instances do not pick in step.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9)
            ^ u64::from(std::process::id()).rotate_left(32);
        Balancer {
            policy,
            ejection,
            next: AtomicUsize::new(0),
            random: AtomicU64::new(seed),
            endpoints: Mutex::new(Endpoints::default()),
            ejections,
        }
    }

    pub fn policy(&self) -> LbPolicy {
        self.policy
    }

    /// The order in which a call tries `instances`: the policy's choice first, then the other
    /// instances that are not ejected (fewest in flight first), then the ejected ones.
    pub fn order(&self, instances: Vec<Instance>) -> Vec<Instance> {
        let now = Instant::now();
        let mut candidates: Vec<Candidate> = {
            let mut endpoints = self.endpoints.lock().unwrap();
            let candidates = instances
                .into_iter()
                .map(|instance| {
                    let endpoint = endpoints.entry(&instance.instance_id, now);
                    let ejected = endpoint.state.lock().unwrap().ejected_until.is_some_and(|until| until > now);
                    Candidate { instance, endpoint, ejected }
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
            let first = match self.policy {
                LbPolicy::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % choosable,
                LbPolicy::P2c => {
                    let (a, b) = self.two_distinct(choosable);
                    if candidates[b].endpoint.in_flight() < candidates[a].endpoint.in_flight() { b } else { a }
                }
            };
            match self.policy {
                LbPolicy::RoundRobin => candidates[..choosable].rotate_left(first),
                LbPolicy::P2c => {
                    candidates.swap(0, first);
                    candidates[1..choosable].sort_by_key(|c| c.endpoint.in_flight());
                }
            }
        }
        candidates.into_iter().map(|c| c.instance).collect()
    }

    /// Counts a call to `instance` as in flight until the guard is dropped.
    pub fn start(&self, app_id: &str, instance: &Instance) -> CallGuard<'_> {
        let endpoint = self.endpoints.lock().unwrap().entry(&instance.instance_id, Instant::now());
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        CallGuard { balancer: self, app_id: app_id.to_string(), instance_id: instance.instance_id.clone(), endpoint }
    }

    /// Calls from this sidecar in flight to `instance_id` now.
    pub fn in_flight(&self, instance_id: &str) -> usize {
        self.endpoints.lock().unwrap().by_instance.get(instance_id).map_or(0, |e| e.in_flight())
    }

    fn record(&self, app_id: &str, instance_id: &str, endpoint: &Endpoint, health: Health, now: Instant) {
        let mut state = endpoint.state.lock().unwrap();
        match health {
            Health::Answered => {
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
                state: Mutex::new(EndpointState { ejected_until: None, ejections_in_a_row: 0, last_used: now }),
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
}

impl CallGuard<'_> {
    /// Ends the call with what it showed of the instance's health.
    pub fn finish(self, health: Health) {
        self.balancer.record(&self.app_id, &self.instance_id, &self.endpoint, health, Instant::now());
    }
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
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

    fn balancer(policy: LbPolicy) -> Balancer {
        let ejection = Ejection { base: Duration::from_millis(100), max: Duration::from_millis(350) };
        Balancer::new(policy, ejection, Family::default())
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

        b.record("svc", "a", &endpoint, Health::Failed, t0);
        assert_eq!(ejected_until(), Some(t0 + Duration::from_millis(100)));
        for _ in 0..4 {
            assert_eq!(first(&b, &["a", "b"]), "b", "ejected: never first while another is available");
        }
        let order = b.order(all.clone());
        assert_eq!(order[1].instance_id, "a", "an ejected instance stays the last resort");
        // Calls that were in flight when it failed add nothing.
        b.record("svc", "a", &endpoint, Health::Failed, t0 + Duration::from_millis(10));
        assert_eq!(ejected_until(), Some(t0 + Duration::from_millis(100)));

        // Back after its time, fails again: twice as long, then capped.
        let t1 = t0 + Duration::from_millis(150);
        b.record("svc", "a", &endpoint, Health::Failed, t1);
        assert_eq!(ejected_until(), Some(t1 + Duration::from_millis(200)));
        let t2 = t1 + Duration::from_millis(250);
        b.record("svc", "a", &endpoint, Health::Failed, t2);
        assert_eq!(ejected_until(), Some(t2 + Duration::from_millis(350)), "capped at max");
        assert_eq!(b.ejections.get_or_create(&AppLabels { app_id: "svc".into() }).get(), 3);

        // An answer after the ejection ends the run: the next failure is a first one again.
        let t3 = t2 + Duration::from_millis(400);
        b.record("svc", "a", &endpoint, Health::Answered, t3);
        assert_eq!(ejected_until(), None);
        b.record("svc", "a", &endpoint, Health::Failed, t3);
        assert_eq!(ejected_until(), Some(t3 + Duration::from_millis(100)));
    }

    #[test]
    fn when_every_instance_is_ejected_all_are_still_tried() {
        let b = balancer(LbPolicy::P2c);
        let now = Instant::now();
        for id in ["a", "b"] {
            let endpoint = b.endpoints.lock().unwrap().entry(id, now);
            b.record("svc", id, &endpoint, Health::Failed, now);
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
