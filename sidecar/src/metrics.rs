//! Prometheus metrics, served as text on the admin port's `/metrics`.
//!
//! - `tandem_api_requests_total` and `tandem_api_request_duration_seconds`: every call of the
//!   app-facing API, by method and gRPC code.
//! - `tandem_invocations_total`: service invocations by target app-id and code;
//!   `tandem_invoke_ejections_total`: instances of a target app-id ejected from balancing
//!   after a failed call.
//! - `tandem_state_operations_total`: state operations by store, operation and outcome.
//! - `tandem_pubsub_events_total`: pub/sub events by component, topic and what happened
//!   (`published`, `delivered`, `retried`, `dead_lettered`, `dropped`, and `unsubscribed`: kept
//!   for a subscription that was then removed, and released);
//!   `tandem_pubsub_backlog`: events waiting in a component's outbox;
//!   `tandem_pubsub_in_flight`: events handed to a subscriber and not yet answered, per topic;
//!   `tandem_pubsub_delivery_batch_size`: events per call to a subscriber's sidecar.
//! - `tandem_live_instances`: live instances per app-id, from discovery.
//! - Training groups, per group: `tandem_group_rounds_total` (rounds this sidecar's member
//!   entered), `tandem_group_members` (the world size of its current round, 0 when in none),
//!   `tandem_group_all_reduce_seconds` and `tandem_group_all_reduce_bytes_total` (bytes this
//!   sidecar sent to other members), `tandem_group_step_seconds` (from one all-reduce's end to
//!   the next one's: a training step as the group sees it).
//! - `process_resident_memory_bytes`, `process_cpu_seconds_total`: this process.
//! - `tandem_trace_context_invalid_total`: malformed `traceparent` values (ignored: a new trace
//!   started); `tandem_trace_spans_exported_total` and `tandem_trace_spans_dropped_total`:
//!   spans the OTLP collector took, and spans dropped (export queue full, or export failed).
//!   These are process-wide (see [`crate::telemetry::counters`]).
//!
//! Gauges that mirror other state (instances, backlog, process) are refreshed at each scrape.

use std::future::Future;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tonic::Status;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub method: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InvocationLabels {
    pub target_app: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub store: String,
    pub operation: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PubSubLabels {
    pub pubsub: String,
    pub topic: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutboxLabels {
    pub store: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabels {
    pub pubsub: String,
    pub topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ComponentLabels {
    pub pubsub: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    pub group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppLabels {
    pub app_id: String,
}

fn latency_histogram() -> Histogram {
    // 50 µs to about 26 s.
    Histogram::new(exponential_buckets(0.00005, 2.0, 20))
}

fn batch_histogram() -> Histogram {
    // 1, 2, 4, ... 64 events (the most one call carries), then more.
    Histogram::new(exponential_buckets(1.0, 2.0, 7))
}

pub struct Metrics {
    registry: Registry,
    api_requests: Family<ApiLabels, Counter>,
    api_latency: Family<ApiLabels, Histogram, fn() -> Histogram>,
    invocations: Family<InvocationLabels, Counter>,
    invoke_ejections: Family<AppLabels, Counter>,
    state_operations: Family<StateLabels, Counter>,
    pubsub_events: Family<PubSubLabels, Counter>,
    outbox_events: Family<OutboxLabels, Counter>,
    pubsub_backlog: Family<ComponentLabels, Gauge>,
    pubsub_in_flight: Family<TopicLabels, Gauge>,
    pubsub_delivery_batch: Family<ComponentLabels, Histogram, fn() -> Histogram>,
    live_instances: Family<AppLabels, Gauge>,
    group_rounds: Family<GroupLabels, Counter>,
    group_members: Family<GroupLabels, Gauge>,
    group_all_reduce: Family<GroupLabels, Histogram, fn() -> Histogram>,
    group_all_reduce_bytes: Family<GroupLabels, Counter>,
    group_step: Family<GroupLabels, Histogram, fn() -> Histogram>,
    resident_memory: Gauge,
    cpu_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let api_requests = Family::<ApiLabels, Counter>::default();
        let api_latency = Family::<ApiLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let invocations = Family::<InvocationLabels, Counter>::default();
        let invoke_ejections = Family::<AppLabels, Counter>::default();
        let state_operations = Family::<StateLabels, Counter>::default();
        let pubsub_events = Family::<PubSubLabels, Counter>::default();
        let outbox_events = Family::<OutboxLabels, Counter>::default();
        let pubsub_backlog = Family::<ComponentLabels, Gauge>::default();
        let pubsub_in_flight = Family::<TopicLabels, Gauge>::default();
        let pubsub_delivery_batch =
            Family::<ComponentLabels, Histogram, fn() -> Histogram>::new_with_constructor(batch_histogram);
        let live_instances = Family::<AppLabels, Gauge>::default();
        let group_rounds = Family::<GroupLabels, Counter>::default();
        let group_members = Family::<GroupLabels, Gauge>::default();
        let group_all_reduce =
            Family::<GroupLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let group_all_reduce_bytes = Family::<GroupLabels, Counter>::default();
        let group_step = Family::<GroupLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let resident_memory = Gauge::default();
        let cpu_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register("tandem_api_requests", "Calls of the app-facing API", api_requests.clone());
        registry.register("tandem_api_request_duration_seconds", "Latency of the app-facing API", api_latency.clone());
        registry.register("tandem_invocations", "Service invocations by target app", invocations.clone());
        registry.register(
            "tandem_invoke_ejections",
            "Instances of a target app ejected from balancing after a failed call",
            invoke_ejections.clone(),
        );
        registry.register("tandem_state_operations", "State operations by store", state_operations.clone());
        registry.register("tandem_pubsub_events", "Pub/sub events by topic and outcome", pubsub_events.clone());
        registry.register(
            "tandem_outbox_events",
            "Events of the transactional outbox: recorded with a transaction, published",
            outbox_events.clone(),
        );
        registry.register("tandem_pubsub_backlog", "Events waiting in a pub/sub outbox", pubsub_backlog.clone());
        registry.register(
            "tandem_pubsub_in_flight",
            "Events handed to a subscriber and not yet answered",
            pubsub_in_flight.clone(),
        );
        registry.register(
            "tandem_pubsub_delivery_batch_size",
            "Events per delivery call to a subscriber's sidecar",
            pubsub_delivery_batch.clone(),
        );
        registry.register("tandem_live_instances", "Live instances per app-id", live_instances.clone());
        registry.register(
            "tandem_group_rounds",
            "Rounds of a training group this member entered",
            group_rounds.clone(),
        );
        registry.register("tandem_group_members", "World size of the member's current round", group_members.clone());
        registry.register(
            "tandem_group_all_reduce_seconds",
            "Time of one all-reduce of a training group",
            group_all_reduce.clone(),
        );
        registry.register(
            "tandem_group_all_reduce_bytes",
            "Bytes this sidecar sent to other members in all-reduces",
            group_all_reduce_bytes.clone(),
        );
        registry.register(
            "tandem_group_step_seconds",
            "Time from one all-reduce's end to the next one's",
            group_step.clone(),
        );
        registry.register("process_resident_memory_bytes", "Resident memory of this process", resident_memory.clone());
        registry.register("process_cpu_seconds_total", "CPU time of this process (user + system)", cpu_seconds.clone());
        let trace = crate::telemetry::counters();
        registry.register(
            "tandem_trace_context_invalid",
            "Malformed traceparent values, ignored (a new trace started)",
            trace.invalid_trace_context.clone(),
        );
        registry.register(
            "tandem_trace_spans_exported",
            "Spans taken by the OTLP collector",
            trace.spans_exported.clone(),
        );
        registry.register(
            "tandem_trace_spans_dropped",
            "Spans not exported: the export queue was full or the export failed",
            trace.spans_dropped.clone(),
        );
        Metrics {
            registry,
            api_requests,
            api_latency,
            invocations,
            invoke_ejections,
            state_operations,
            pubsub_events,
            outbox_events,
            pubsub_backlog,
            pubsub_in_flight,
            pubsub_delivery_batch,
            live_instances,
            group_rounds,
            group_members,
            group_all_reduce,
            group_all_reduce_bytes,
            group_step,
            resident_memory,
            cpu_seconds,
        }
    }

    /// Runs one API call, counting it and its latency by method and answer. A combinator, not
    /// an async fn: that would hold `call` twice (as its argument and while awaiting it).
    pub fn observe_api<'a, T: 'a>(
        &'a self,
        method: &'static str,
        call: impl Future<Output = Result<T, Status>> + 'a,
    ) -> impl Future<Output = Result<T, Status>> + 'a {
        use futures_util::FutureExt;
        let started = Instant::now();
        call.map(move |result| {
            let labels = ApiLabels { method: method.to_string(), code: code_of(&result) };
            self.api_latency.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
            self.api_requests.get_or_create(&labels).inc();
            result
        })
    }

    pub fn invocation<T>(&self, target_app: &str, result: &Result<T, Status>) {
        self.invocations
            .get_or_create(&InvocationLabels { target_app: target_app.to_string(), code: code_of(result) })
            .inc();
    }

    /// The ejection counter the invoker's balancer adds to.
    pub fn invoke_ejections(&self) -> Family<AppLabels, Counter> {
        self.invoke_ejections.clone()
    }

    pub fn state_operation(&self, store: &str, operation: &str, ok: bool) {
        let labels = StateLabels {
            store: store.to_string(),
            operation: operation.to_string(),
            outcome: if ok { "ok" } else { "error" }.to_string(),
        };
        self.state_operations.get_or_create(&labels).inc();
    }

    pub fn pubsub_event(&self, pubsub: &str, topic: &str, outcome: &str) {
        let labels =
            PubSubLabels { pubsub: pubsub.to_string(), topic: topic.to_string(), outcome: outcome.to_string() };
        self.pubsub_events.get_or_create(&labels).inc();
    }

    /// Counts `events` events of a store's transactional outbox as `outcome` (`recorded` with a
    /// committed transaction, `published`).
    pub fn outbox_events(&self, store: &str, outcome: &str, events: usize) {
        let labels = OutboxLabels { store: store.to_string(), outcome: outcome.to_string() };
        self.outbox_events.get_or_create(&labels).inc_by(events as u64);
    }

    /// Counts one delivery of a `topic` event as in flight until the returned guard is dropped.
    pub fn pubsub_delivery_in_flight(&self, pubsub: &str, topic: &str) -> InFlight {
        let gauge =
            self.pubsub_in_flight.get_or_create(&TopicLabels { pubsub: pubsub.into(), topic: topic.into() }).clone();
        gauge.inc();
        InFlight(gauge)
    }

    /// Counts one delivery call carrying `events` events.
    pub fn pubsub_delivery_batch(&self, pubsub: &str, events: usize) {
        self.pubsub_delivery_batch.get_or_create(&ComponentLabels { pubsub: pubsub.into() }).observe(events as f64);
    }

    /// This sidecar's member of `group` entered a round of `world` members.
    pub fn group_round(&self, group: &str, world: usize) {
        let labels = GroupLabels { group: group.into() };
        self.group_rounds.get_or_create(&labels).inc();
        self.group_members.get_or_create(&labels).set(world as i64);
    }

    /// This sidecar's member of `group` left it.
    pub fn group_left(&self, group: &str) {
        self.group_members.get_or_create(&GroupLabels { group: group.into() }).set(0);
    }

    /// One all-reduce of `group`: its time, the bytes sent, and the time since the previous one ended.
    pub fn group_all_reduce(&self, group: &str, took: Duration, bytes_sent: u64, step: Option<Duration>) {
        let labels = GroupLabels { group: group.into() };
        self.group_all_reduce.get_or_create(&labels).observe(took.as_secs_f64());
        self.group_all_reduce_bytes.get_or_create(&labels).inc_by(bytes_sent);
        if let Some(step) = step {
            self.group_step.get_or_create(&labels).observe(step.as_secs_f64());
        }
    }

    /// Refreshes the gauges that mirror other state, then renders everything as Prometheus text.
    pub fn render(&self, live_instances: &[(String, usize)], backlogs: &[(String, usize)]) -> String {
        self.live_instances.clear();
        for (app_id, count) in live_instances {
            self.live_instances.get_or_create(&AppLabels { app_id: app_id.clone() }).set(*count as i64);
        }
        for (pubsub, waiting) in backlogs {
            self.pubsub_backlog.get_or_create(&ComponentLabels { pubsub: pubsub.clone() }).set(*waiting as i64);
        }
        if let Some((rss, cpu)) = process_usage() {
            self.resident_memory.set(rss as i64);
            self.cpu_seconds.set(cpu);
        }
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        text
    }
}

/// A delivery in flight: the gauge it was counted in goes down when this is dropped.
#[derive(Debug)]
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn code_of<T>(result: &Result<T, Status>) -> String {
    match result {
        Ok(_) => "OK".to_string(),
        Err(status) => format!("{:?}", status.code()),
    }
}

/// Resident bytes and CPU seconds of this process, from /proc.
fn process_usage() -> Option<(u64, f64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let rss_kib: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()?;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces) start at ") ".
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    let (utime, stime): (f64, f64) = (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
    // Linux reports in clock ticks of 1/100 s (USER_HZ) on every architecture Tandem runs on.
    Some((rss_kib * 1024, (utime + stime) / 100.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_are_counted_by_method_and_code() {
        let m = Metrics::new();
        let _ = m.observe_api("GetState", async { Ok::<_, Status>(()) }).await;
        let _ = m.observe_api("GetState", async { Err::<(), _>(Status::not_found("x")) }).await;
        m.state_operation("statestore", "get", true);
        m.pubsub_event("pubsub", "orders", "delivered");
        let text = m.render(&[("svc-b".into(), 2)], &[("pubsub".into(), 5)]);
        assert!(text.contains(r#"tandem_api_requests_total{method="GetState",code="OK"} 1"#), "{text}");
        assert!(text.contains(r#"tandem_api_requests_total{method="GetState",code="NotFound"} 1"#), "{text}");
        assert!(text.contains(r#"tandem_state_operations_total{store="statestore",operation="get",outcome="ok"} 1"#));
        assert!(text.contains(r#"tandem_pubsub_events_total{pubsub="pubsub",topic="orders",outcome="delivered"} 1"#));
        assert!(text.contains(r#"tandem_live_instances{app_id="svc-b"} 2"#), "{text}");
        assert!(text.contains(r#"tandem_pubsub_backlog{pubsub="pubsub"} 5"#), "{text}");
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
        assert!(text.contains("tandem_api_request_duration_seconds_bucket"), "{text}");
    }
}
