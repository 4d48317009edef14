//! The pub/sub building block, `pubsub.embedded`: durable at-least-once delivery between
//! sidecars, with no broker.
//!
//! - The publishing sidecar looks up the topic's subscribers (app-ids, from etcd through the
//!   routing table), stores the event with one pending delivery per subscriber in its
//!   [`outbox`], flushes, and only then acknowledges the publish.
//! - Its [`delivery`] loop hands each pending delivery to one live instance of the subscriber
//!   app (replicas compete for events) through the subscriber's sidecar, which calls the app's
//!   `OnTopicEvent`, taking them from the in-memory [`schedule`] (at most `maxInFlight` in
//!   flight per subscription, so a slow subscriber holds back only its own events). SUCCESS
//!   and DROP end the delivery; RETRY, errors and timeouts retry it with exponential backoff
//!   until `maxDeliveryAttempts`, then the event goes to the subscription's dead-letter topic,
//!   or is dropped and logged.
//! - [`subscriptions`]: each subscriber's sidecar asks its app for its subscriptions
//!   (`ListTopicSubscriptions`) and records them in etcd, without a lease, so events are kept for
//!   a subscriber whose instances are all down and delivered when one comes back. A
//!   subscription whose record leaves etcd (the app stops listing it, or `tandem unsubscribe`)
//!   has what the publisher kept for it released, not delivered ([`delivery`]).
//! - [`streams`]: streaming subscriptions (`SubscribeTopicEventsAlpha1`), an alternative to
//!   `OnTopicEvent` for apps that would rather not serve the callback API.
//! - Routes: a subscription's `routes.default` is recorded with it, kept in each pending
//!   delivery and sent to the app as the event's `path`; routing rules with a `match`
//!   expression (CEL) are evaluated by the subscriber's sidecar as it hands each event to the
//!   app ([`routing`]).
//! - [`raw`]: events published with `rawPayload: "true"` travel without a CloudEvent envelope.
//!
//! Every pub/sub component implements [`PubSub`]; the API and the runtime see nothing else, and
//! never a NATS or sled type. [`registry`] builds components by type:
//! - `pubsub.embedded` ([`EmbeddedPubSub`], this module, [`outbox`], [`delivery`]): no broker;
//!   the publisher's sidecar delivers to each subscriber's sidecar.
//! - `pubsub.jetstream` ([`jetstream`]): a NATS JetStream server holds the events; each
//!   subscriber's own sidecar consumes them through a durable consumer and hands them to its
//!   app ([`local`]).

pub mod declared;
pub mod delivery;
pub mod jetstream;
pub mod local;
pub mod outbox;
pub mod raw;
pub mod registry;
pub mod routing;
pub mod schedule;
pub mod streams;
pub mod subscriptions;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tandem_proto::internal::{OutboxRecord, PendingDelivery};
use tandem_proto::runtime::TopicEventRequest;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::components::ComponentSpec;
use crate::config::parse_duration;
use crate::discovery::RoutingTable;
use crate::disk::DiskSpace;
use crate::metrics::Metrics;
use delivery::Deliver;
use local::LocalApp;
use outbox::Outbox;
use schedule::{Schedule, SubscriptionKey};

/// The component type of the embedded pub/sub.
pub const EMBEDDED: &str = "pubsub.embedded";
/// The component that exists when no file declares a pub/sub.
pub const DEFAULT_PUBSUB: &str = "pubsub";

#[derive(Debug, thiserror::Error)]
pub enum PubSubError {
    #[error(
        "the backlog is full: {waiting} events wait for delivery (maxBacklog {max}); a subscriber is too slow or down"
    )]
    BacklogFull { waiting: usize, max: usize },
    #[error("the routing table is not loaded from etcd yet, so the topic's subscribers are unknown")]
    RoutingNotReady,
    #[error("{0}")]
    Storage(String),
    /// The data dir has too little space left to keep the event: nothing was kept.
    #[error(transparent)]
    DiskFull(#[from] crate::disk::DiskFull),
    /// The broker cannot be reached or did not confirm in time; retrying later may work.
    #[error("{0}")]
    Unavailable(String),
    /// The broker refused the event for its size or its limits.
    #[error("{0}")]
    Refused(String),
}

/// A subscription of the app behind this sidecar (from `ListTopicSubscriptions` or a streaming
/// subscription), as components that consume on the subscriber's side need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSubscription {
    pub topic: String,
    pub dead_letter_topic: String,
    /// The route events take (`TopicEventRequest.path`).
    pub path: String,
    /// Events one at a time, in publish order (`tandem.ordered`).
    pub ordered: bool,
}

/// Where a component's deliveries go.
#[derive(Clone)]
pub struct DeliveryTargets {
    /// To one live instance of a subscriber app-id, through its sidecar (`pubsub.embedded`).
    pub remote: Arc<dyn Deliver>,
    /// To the app behind this sidecar (components that consume on the subscriber's side).
    pub local: Arc<LocalApp>,
}

/// A pub/sub component. Implementations never expose their broker's or store's types.
#[tonic::async_trait]
pub trait PubSub: Send + Sync + 'static {
    fn name(&self) -> &str;

    /// The component type, e.g. `pubsub.embedded`.
    fn kind(&self) -> &'static str;

    /// Accepts `events` durably: each `Ok` means the event survives a crash of this sidecar
    /// and will be delivered at least once to every subscriber. One outcome per event, in order.
    async fn publish_all(&self, events: Vec<TopicEventRequest>) -> Vec<Result<(), PubSubError>>;

    /// [`PubSub::publish_all`] for one event.
    async fn publish(&self, event: TopicEventRequest) -> Result<(), PubSubError> {
        self.publish_all(vec![event]).await.pop().expect("one outcome per event")
    }

    /// Events this sidecar holds for delivery, where it holds them itself.
    fn backlog(&self) -> Option<usize> {
        None
    }

    /// Starts delivering events to subscribers until `stop`.
    fn start(self: Arc<Self>, targets: DeliveryTargets, stop: CancellationToken);

    /// The app behind this sidecar subscribes to `subscriptions` of this component (its whole
    /// list, replacing the previous one). Components that deliver from the publisher's side
    /// find subscribers through etcd instead and ignore this.
    fn set_app_subscriptions(&self, subscriptions: Vec<LocalSubscription>) {
        let _ = subscriptions;
    }
}

/// How deliveries are retried (component metadata).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryPolicy {
    /// Attempts per event and subscriber before dead-lettering or dropping it.
    pub max_attempts: u32,
    pub initial_retry_delay: Duration,
    pub max_retry_delay: Duration,
    /// How long one delivery may take before it counts as failed.
    pub timeout: Duration,
    /// Deliveries in flight at once per subscription (subscriber app-id and topic).
    pub max_in_flight: usize,
    /// Events kept waiting at most; publishing beyond answers RESOURCE_EXHAUSTED.
    pub max_backlog: usize,
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        DeliveryPolicy {
            max_attempts: 10,
            initial_retry_delay: Duration::from_millis(100),
            max_retry_delay: Duration::from_secs(10),
            timeout: Duration::from_secs(30),
            max_in_flight: 64,
            max_backlog: 100_000,
        }
    }
}

impl DeliveryPolicy {
    /// Reads the policy from a component's metadata; unknown keys are left to the caller.
    pub fn from_component(spec: &ComponentSpec) -> Result<DeliveryPolicy, String> {
        let mut policy = DeliveryPolicy::default();
        let number = |key: &str| -> Result<Option<u64>, String> {
            spec.metadata(key)
                .map(|v| {
                    v.trim()
                        .parse::<u64>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| format!("metadata '{key}' '{v}' is not a positive number"))
                })
                .transpose()
        };
        let duration = |key: &str| -> Result<Option<Duration>, String> {
            spec.metadata(key).map(|v| parse_duration(v).map_err(|e| format!("metadata '{key}': {e}"))).transpose()
        };
        if let Some(n) = number("maxDeliveryAttempts")? {
            policy.max_attempts =
                u32::try_from(n).map_err(|_| format!("metadata 'maxDeliveryAttempts' {n} is too large"))?;
        }
        if let Some(n) = number("maxInFlight")? {
            policy.max_in_flight = n as usize;
        }
        if let Some(n) = number("maxBacklog")? {
            policy.max_backlog = n as usize;
        }
        if let Some(d) = duration("initialRetryDelay")? {
            policy.initial_retry_delay = d;
        }
        if let Some(d) = duration("maxRetryDelay")? {
            policy.max_retry_delay = d;
        }
        if let Some(d) = duration("deliveryTimeout")? {
            policy.timeout = d;
        }
        Ok(policy)
    }

    /// The wait before attempt `attempts + 1`: doubling from the initial delay, capped.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempts.saturating_sub(1));
        self.initial_retry_delay.saturating_mul(factor).min(self.max_retry_delay)
    }
}

/// One `pubsub.embedded` component of this sidecar.
pub struct EmbeddedPubSub {
    pub name: String,
    outbox: Arc<Outbox>,
    /// The outbox's pending deliveries, queued per subscription.
    schedule: Schedule,
    routing: RoutingTable,
    wake: Arc<Notify>,
    pub policy: DeliveryPolicy,
    metrics: Arc<Metrics>,
    /// The data dir's free space, checked before an event is kept (none in unit tests).
    disk: Option<Arc<DiskSpace>>,
}

impl EmbeddedPubSub {
    /// Opens the component's outbox at `path` and schedules the deliveries it holds.
    pub fn open(
        name: &str,
        path: &Path,
        routing: RoutingTable,
        policy: DeliveryPolicy,
        metrics: Arc<Metrics>,
    ) -> Result<Self, PubSubError> {
        let outbox = Arc::new(Outbox::open(path, policy.max_backlog)?);
        // A subscriber that is away is probed again at most this often.
        let away_pause = (policy.initial_retry_delay, policy.max_retry_delay.min(Duration::from_secs(1)));
        let schedule = Schedule::new(policy.max_in_flight, away_pause.0, away_pause.1);
        // What a previous run left undelivered, read once in chunks (publishes start later).
        let mut after = None;
        loop {
            let chunk = outbox.records_after(after, 1024);
            let Some((last, _)) = chunk.last() else { break };
            after = Some(*last);
            for (seq, record) in chunk {
                let Some(event) = record.event else { continue };
                for pending in record.deliveries {
                    let key = SubscriptionKey::new(&pending.app_id, &event.topic);
                    schedule.add(&key, seq, pending.next_attempt_unix_ms, pending.ordered);
                }
            }
        }
        if !schedule.is_empty() {
            tracing::info!(
                pubsub = name,
                events = outbox.len(),
                deliveries = schedule.len(),
                "resuming deliveries left in the outbox"
            );
        }
        Ok(EmbeddedPubSub {
            name: name.to_string(),
            outbox,
            schedule,
            routing,
            wake: Arc::new(Notify::new()),
            policy,
            metrics,
            disk: None,
        })
    }

    /// Refuses publishes while `disk` has too little space left to keep them.
    pub fn with_disk(mut self, disk: Arc<DiskSpace>) -> Self {
        self.disk = Some(disk);
        self
    }

    /// Stores `event` for every current subscriber of its topic; returns once it is durable.
    /// A topic without subscribers takes the event and keeps nothing, as in Dapr.
    pub async fn publish(&self, event: TopicEventRequest) -> Result<usize, PubSubError> {
        self.publish_all(vec![event]).await.pop().expect("one outcome per event")
    }

    /// [`EmbeddedPubSub::publish`] for several events (a bulk publish): one outcome per event,
    /// in order, each the number of subscribers it was stored for. One flush makes them all
    /// durable, which is what makes a bulk publish cheaper than one publish per event.
    pub async fn publish_all(&self, events: Vec<TopicEventRequest>) -> Vec<Result<usize, PubSubError>> {
        let routing = self.routing.current();
        if !routing.synced {
            return events.iter().map(|_| Err(PubSubError::RoutingNotReady)).collect();
        }
        let now = delivery::now_ms();
        let mut outcomes = Vec::with_capacity(events.len());
        // The records to store, each with the index of its event's outcome.
        let mut records = Vec::with_capacity(events.len());
        let topics: Vec<String> = events.iter().map(|e| e.topic.clone()).collect();
        for event in events {
            let subscribers = routing.subscribers(&self.name, &event.topic);
            if subscribers.is_empty() {
                tracing::debug!(pubsub = %self.name, topic = %event.topic, "no subscribers; event not kept");
                outcomes.push(Ok(0));
                continue;
            }
            let deliveries = subscribers
                .iter()
                .map(|s| PendingDelivery {
                    app_id: s.app_id.clone(),
                    attempts: 0,
                    next_attempt_unix_ms: now,
                    dead_letter_topic: s.dead_letter_topic.clone(),
                    path: s.path.clone(),
                    ordered: s.ordered,
                })
                .collect::<Vec<_>>();
            outcomes.push(Ok(deliveries.len()));
            records.push((outcomes.len() - 1, OutboxRecord { event: Some(event), deliveries }));
        }
        if let Some(disk) = self.disk.as_ref().filter(|_| !records.is_empty()) {
            let bytes: usize = records
                .iter()
                .filter_map(|(_, record)| record.event.as_ref())
                .map(|event| event.data.len() + event.topic.len() + 1024)
                .sum();
            if let Err(full) = disk.check(bytes as u64) {
                for (index, _) in records.drain(..) {
                    outcomes[index] = Err(PubSubError::DiskFull(full.clone()));
                }
            }
        }
        if !records.is_empty() {
            let stored = self.outbox.push_all(records.iter().map(|(_, record)| record)).await;
            for ((index, record), result) in records.iter().zip(stored) {
                match result {
                    Ok(seq) => {
                        let topic = record.event.as_ref().map_or("", |e| e.topic.as_str());
                        for pending in &record.deliveries {
                            let key = SubscriptionKey::new(&pending.app_id, topic);
                            self.schedule.add(&key, seq, pending.next_attempt_unix_ms, pending.ordered);
                        }
                    }
                    Err(e) => outcomes[*index] = Err(e),
                }
            }
            self.wake.notify_one();
        }
        for (topic, outcome) in topics.iter().zip(&outcomes) {
            if outcome.is_ok() {
                self.metrics.pubsub_event(&self.name, topic, "published");
            }
        }
        outcomes
    }

    /// Events waiting for at least one subscriber.
    pub fn backlog(&self) -> usize {
        self.outbox.len()
    }
}

#[tonic::async_trait]
impl PubSub for EmbeddedPubSub {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        EMBEDDED
    }

    async fn publish_all(&self, events: Vec<TopicEventRequest>) -> Vec<Result<(), PubSubError>> {
        EmbeddedPubSub::publish_all(self, events).await.into_iter().map(|outcome| outcome.map(|_| ())).collect()
    }

    fn backlog(&self) -> Option<usize> {
        Some(EmbeddedPubSub::backlog(self))
    }

    fn start(self: Arc<Self>, targets: DeliveryTargets, stop: CancellationToken) {
        tokio::spawn(delivery::run(self, targets.remote, stop));
    }
}

/// The pub/sub components of this sidecar, by name.
pub type PubSubs = BTreeMap<String, Arc<dyn PubSub>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn spec(metadata: &[(&str, &str)]) -> ComponentSpec {
        ComponentSpec {
            name: "events".into(),
            kind: EMBEDDED.into(),
            version: "v1".into(),
            metadata: metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>(),
            file: "c.yaml".into(),
        }
    }

    #[test]
    fn the_policy_comes_from_component_metadata() {
        let p = DeliveryPolicy::from_component(&spec(&[("maxDeliveryAttempts", "3"), ("initialRetryDelay", "50ms")]))
            .unwrap();
        assert_eq!(p.max_attempts, 3);
        assert_eq!(p.initial_retry_delay, Duration::from_millis(50));
        assert_eq!(p.max_backlog, DeliveryPolicy::default().max_backlog);
        let err = DeliveryPolicy::from_component(&spec(&[("maxDeliveryAttempts", "many")])).unwrap_err();
        assert!(err.contains("maxDeliveryAttempts") && err.contains("'many'"), "{err}");
        assert!(DeliveryPolicy::from_component(&spec(&[("maxBacklog", "0")])).is_err());
        assert!(DeliveryPolicy::from_component(&spec(&[("deliveryTimeout", "soon")])).is_err());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = DeliveryPolicy {
            initial_retry_delay: Duration::from_millis(100),
            max_retry_delay: Duration::from_secs(1),
            ..Default::default()
        };
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(2), Duration::from_millis(200));
        assert_eq!(p.backoff(4), Duration::from_millis(800));
        assert_eq!(p.backoff(5), Duration::from_secs(1));
        assert_eq!(p.backoff(60), Duration::from_secs(1));
    }
}
