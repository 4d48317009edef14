//! `pubsub.jetstream`: the pub/sub building block on a NATS JetStream server.
//!
//! - **Publishing**: each event goes to subject `{prefix}.{topic}` of one stream per
//!   component; the publish is acknowledged only after JetStream's PubAck, i.e. once the
//!   server has stored it. The stream is created when missing, with interest retention: an
//!   event stays until every subscribed app-id has settled it, and a topic without
//!   subscribers keeps nothing (as with `pubsub.embedded`).
//! - **Message format**: header `Tandem-Format` says how the body reads. `envelope`: the whole
//!   `TopicEventRequest`, protobuf-encoded, so every CloudEvent attribute and extension
//!   travels. `raw` (a `rawPayload` publish, see [`super::raw`]): the payload itself, so any
//!   NATS client reading the stream gets the bytes as published, with the event's id in
//!   `Tandem-Event-Id` and its content type in `Content-Type`. A message without the header
//!   was put on the stream by another NATS client: it is delivered as a raw event, its id the
//!   `Nats-Msg-Id` header if it has one, else `{stream}:{sequence}` (the same on every
//!   redelivery), its content type the `Content-Type` header if any.
//! - **Delivery**: the subscriber's own sidecar consumes, through one durable pull consumer per
//!   (topic, app-id): replicas of an app share the consumer and so compete for events. SUCCESS
//!   acks, DROP terminates, RETRY and failures nak with a backoff delay; once an event has used
//!   its attempts it goes to the dead-letter topic if the subscription has one, otherwise it is
//!   terminated (dropped), logged and counted. Attempts are counted by JetStream (the
//!   message's delivery count), the limit applied here, so an event whose last attempt ended in
//!   a crash is still dead-lettered on its next delivery.
//! - **Order**: a subscription that asks for it (`tandem.ordered`) gets a consumer with
//!   `max_ack_pending` 1: one event at a time, in stream order.
//! - **Consumers that nobody uses** are removed by the server after
//!   `consumerInactiveThreshold` (24 h by default) without a pull. Replicas of an app-id share
//!   the consumer, so no sidecar can tell that a subscription is gone for good when its app stops
//!   listing it; the threshold makes NATS tell instead. The trade-off: an app-id away for longer
//!   than that loses its consumer, and with it (interest retention) the events only it still
//!   waited for; a new consumer starts per `deliverPolicy`. `0` keeps consumers until deleted
//!   by hand, and their events with them.
//!
//! Topic, app-id and namespace become subject tokens and consumer names through [`token`],
//! which keeps letters, digits and `-` and escapes everything else, so any topic name works.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::connection::State;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::stream::{DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, Message};
use prost::Message as _;
use prost::bytes::Bytes;
use tandem_proto::runtime::TopicEventRequest;
use tandem_proto::runtime::topic_event_response::TopicEventResponseStatus;
use tokio::sync::{OnceCell, Semaphore, watch};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::delivery::DeliveryError;
use super::local::LocalApp;
use super::raw;
use super::registry::PubSubContext;
use super::{DeliveryPolicy, DeliveryTargets, LocalSubscription, PubSub, PubSubError};
use crate::components::ComponentSpec;
use crate::config::parse_duration;
use crate::discovery::Backoff;
use crate::metrics::Metrics;

/// The component type.
pub const JETSTREAM: &str = "pubsub.jetstream";

/// Dapr's jetstream metadata that tandemd does not implement: refused rather than ignored, so
/// nobody believes they are in effect (authentication and TLS above all).
const UNSUPPORTED: &[&str] = &[
    "jwt",
    "seedKey",
    "tls_client_cert",
    "tls_client_key",
    "queueGroupName",
    "startSequence",
    "startTime",
    "flowControl",
    "rateLimit",
    "heartbeat",
    "domain",
    "apiPrefix",
    "concurrency",
];

/// How long a publish waits for a connection being (re)established before it fails.
const CONNECT_GRACE: Duration = Duration::from_secs(2);

/// How long to wait while the app cannot take events before looking again.
const APP_AWAY_POLL: Duration = Duration::from_millis(100);

/// The header that says how a message body reads (see the module docs), and its values.
const FORMAT_HEADER: &str = "Tandem-Format";
const ENVELOPE: &str = "envelope";
const RAW: &str = "raw";
/// The event id of a raw message.
const EVENT_ID_HEADER: &str = "Tandem-Event-Id";
const CONTENT_TYPE_HEADER: &str = "Content-Type";
/// The id another NATS client may give its message (JetStream's deduplication id).
const NATS_MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// The default of `consumerInactiveThreshold`.
const DEFAULT_INACTIVE_THRESHOLD: Duration = Duration::from_secs(24 * 60 * 60);

/// The component's settings, from its metadata (names follow Dapr's jetstream component).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// `natsURL` (required).
    pub url: String,
    /// `name`: the connection name the server shows.
    pub connection_name: Option<String>,
    /// `token`: token authentication.
    pub token: Option<String>,
    /// `streamName`; default `TANDEM__{namespace}__{component}`.
    pub stream_name: String,
    /// Subjects are `{subject_prefix}.{topic}`: `tandem.{namespace}.{component}`.
    pub subject_prefix: String,
    /// `durableName`: the first part of every consumer name (default `tandem`).
    pub durable_prefix: String,
    /// `deliverPolicy`: where a new subscription starts (`all`, the default, `new`, `last`).
    pub deliver_policy: DeliverPolicy,
    /// `ackWait`: an unsettled delivery is redelivered after this (default: the delivery
    /// timeout plus 5 s, so a slow app is not raced by its own redelivery).
    pub ack_wait: Duration,
    /// `maxAckPending` (or `maxInFlight`): deliveries in flight per subscription.
    pub max_ack_pending: usize,
    /// `backOff`: delays between attempts (the last repeats); empty: doubling from
    /// `initialRetryDelay` up to `maxRetryDelay`.
    pub backoff: Vec<Duration>,
    /// `replicas` of the stream.
    pub replicas: usize,
    /// `memoryStorage`: keep the stream in memory instead of files.
    pub memory_storage: bool,
    /// `maxBacklog`: events the stream holds at most; publishing beyond is refused.
    pub max_backlog: Option<i64>,
    /// `consumerInactiveThreshold`: the server removes a consumer nobody pulled from for this
    /// long (see the module docs); `None` (`0`): never.
    pub consumer_inactive_threshold: Option<Duration>,
}

impl Settings {
    pub fn from_component(
        spec: &ComponentSpec,
        namespace: &str,
        policy: &mut DeliveryPolicy,
    ) -> Result<Settings, String> {
        if let Some(key) = UNSUPPORTED.iter().find(|k| spec.metadata(k).is_some()) {
            return Err(format!("metadata '{key}' is not supported by tandemd's {JETSTREAM}"));
        }
        if let Some(policy) = spec.metadata("ackPolicy").filter(|p| !p.eq_ignore_ascii_case("explicit")) {
            return Err(format!("metadata 'ackPolicy' '{policy}': only 'explicit' keeps at-least-once delivery"));
        }
        let url = spec
            .metadata("natsURL")
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .ok_or_else(|| "metadata 'natsURL' is missing (the NATS server, e.g. nats://127.0.0.1:4222)".to_string())?
            .to_string();
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
        if let Some(n) = number("maxDeliver")? {
            policy.max_attempts = u32::try_from(n).map_err(|_| format!("metadata 'maxDeliver' {n} is too large"))?;
        }
        let max_ack_pending = number("maxAckPending")?.map(|n| n as usize).unwrap_or(policy.max_in_flight);
        let ack_wait = match spec.metadata("ackWait") {
            Some(v) => parse_duration(v).map_err(|e| format!("metadata 'ackWait': {e}"))?,
            None => policy.timeout + Duration::from_secs(5),
        };
        let backoff = match spec.metadata("backOff").map(str::trim).filter(|v| !v.is_empty()) {
            Some(list) => list
                .split(',')
                .map(|d| parse_duration(d.trim()).map_err(|e| format!("metadata 'backOff': {e}")))
                .collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };
        let deliver_policy = match spec.metadata("deliverPolicy").map(str::trim) {
            None | Some("") | Some("all") => DeliverPolicy::All,
            Some("new") => DeliverPolicy::New,
            Some("last") => DeliverPolicy::Last,
            Some(other) => return Err(format!("metadata 'deliverPolicy' '{other}': use all, new or last")),
        };
        let consumer_inactive_threshold = match spec.metadata("consumerInactiveThreshold").map(str::trim) {
            None | Some("") => Some(DEFAULT_INACTIVE_THRESHOLD),
            Some("0") => None,
            Some(v) => Some(parse_duration(v).map_err(|e| {
                format!("metadata 'consumerInactiveThreshold': {e}; e.g. 24h, or 0 to keep consumers until deleted")
            })?),
        };
        let memory_storage = match spec.metadata("memoryStorage").map(str::trim) {
            None | Some("") | Some("false") => false,
            Some("true") => true,
            Some(other) => return Err(format!("metadata 'memoryStorage' '{other}' is not true or false")),
        };
        let durable_prefix = match spec.metadata("durableName").map(str::trim).filter(|d| !d.is_empty()) {
            Some(name) if name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') => name.to_string(),
            Some(name) => {
                return Err(format!("metadata 'durableName' '{name}' may hold only letters, digits and '-'"));
            }
            None => "tandem".to_string(),
        };
        let stream_name = match spec.metadata("streamName").map(str::trim).filter(|s| !s.is_empty()) {
            Some(name) if name.chars().any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\')) => {
                return Err(format!("metadata 'streamName' '{name}' may not hold spaces, '.', '*', '>', '/' or '\\'"));
            }
            Some(name) => name.to_string(),
            None => format!("TANDEM__{}__{}", token(namespace), token(&spec.name)),
        };
        Ok(Settings {
            url,
            connection_name: spec.metadata("name").map(str::to_string),
            token: spec.metadata("token").map(str::to_string),
            stream_name,
            subject_prefix: format!("tandem.{}.{}", token(namespace), token(&spec.name)),
            durable_prefix,
            deliver_policy,
            ack_wait,
            max_ack_pending: max_ack_pending.max(1),
            backoff,
            replicas: number("replicas")?.map(|n| n as usize).unwrap_or(1),
            memory_storage,
            max_backlog: number("maxBacklog")?.map(|n| n as i64),
            consumer_inactive_threshold,
        })
    }
}

/// `text` as one NATS subject token or name part: letters, digits and `-` as they are, every
/// other byte as `_XX` (hex). Injective, and never contains `.`, `*`, `>`, spaces or `__`.
pub fn token(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("_{byte:02X}"));
        }
    }
    if out.is_empty() { "_".to_string() } else { out }
}

/// One `pubsub.jetstream` component of this sidecar.
pub struct JetStreamPubSub {
    name: String,
    app_id: String,
    settings: Settings,
    policy: DeliveryPolicy,
    client: async_nats::Client,
    js: jetstream::Context,
    /// Set once the stream is known to exist.
    stream_ready: OnceCell<()>,
    app_subscriptions: watch::Sender<Vec<LocalSubscription>>,
    metrics: Arc<Metrics>,
}

impl JetStreamPubSub {
    /// Reads the settings and starts connecting. An unreachable server does not stop the
    /// sidecar: the client keeps trying, publishing answers UNAVAILABLE meanwhile.
    pub async fn build(
        spec: &ComponentSpec,
        ctx: &PubSubContext<'_>,
        mut policy: DeliveryPolicy,
    ) -> Result<JetStreamPubSub, String> {
        let settings = Settings::from_component(spec, ctx.namespace, &mut policy)?;
        let component = spec.name.clone();
        let url = settings.url.clone();
        let mut options = async_nats::ConnectOptions::new()
            .name(settings.connection_name.clone().unwrap_or_else(|| format!("tandemd {}", ctx.app_id)))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .event_callback(move |event| {
                let (component, url) = (component.clone(), url.clone());
                async move {
                    match event {
                        async_nats::Event::Connected => tracing::info!(pubsub = %component, url, "connected to NATS"),
                        async_nats::Event::Disconnected => {
                            tracing::warn!(pubsub = %component, url, "disconnected from NATS; reconnecting")
                        }
                        other => tracing::debug!(pubsub = %component, url, event = %other, "NATS client event"),
                    }
                }
            });
        if let Some(token) = &settings.token {
            options = options.token(token.clone());
        }
        let client = options
            .connect(settings.url.as_str())
            .await
            .map_err(|e| format!("metadata 'natsURL' '{}': {e}", settings.url))?;
        let js = jetstream::new(client.clone());
        Ok(JetStreamPubSub {
            name: spec.name.clone(),
            app_id: ctx.app_id.to_string(),
            settings,
            policy,
            client,
            js,
            stream_ready: OnceCell::new(),
            app_subscriptions: watch::channel(Vec::new()).0,
            metrics: ctx.metrics.clone(),
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn subject(&self, topic: &str) -> String {
        format!("{}.{}", self.settings.subject_prefix, token(topic))
    }

    fn consumer_name(&self, topic: &str) -> String {
        format!("{}__{}__{}", self.settings.durable_prefix, token(&self.app_id), token(topic))
    }

    /// Connected, and the stream exists (created when missing).
    async fn ready(&self) -> Result<(), PubSubError> {
        // A connection being (re)established gets a moment before the caller hears about it.
        let waited = std::time::Instant::now();
        while self.client.connection_state() != State::Connected && waited.elapsed() < CONNECT_GRACE {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.client.connection_state() != State::Connected {
            return Err(PubSubError::Unavailable(format!(
                "pub/sub '{}': the NATS server at {} (natsURL) is not reachable",
                self.name, self.settings.url
            )));
        }
        self.stream_ready
            .get_or_try_init(|| async {
                let config = jetstream::stream::Config {
                    name: self.settings.stream_name.clone(),
                    description: Some(format!("Tandem pub/sub component '{}'", self.name)),
                    subjects: vec![format!("{}.>", self.settings.subject_prefix)],
                    retention: RetentionPolicy::Interest,
                    storage: if self.settings.memory_storage { StorageType::Memory } else { StorageType::File },
                    num_replicas: self.settings.replicas,
                    max_messages: self.settings.max_backlog.unwrap_or(-1),
                    discard: if self.settings.max_backlog.is_some() { DiscardPolicy::New } else { DiscardPolicy::Old },
                    ..Default::default()
                };
                self.js.get_or_create_stream(config).await.map(|_| ()).map_err(|e| {
                    PubSubError::Unavailable(format!(
                        "pub/sub '{}': JetStream stream '{}' on {} cannot be created or read: {e}",
                        self.name, self.settings.stream_name, self.settings.url
                    ))
                })
            })
            .await
            .map(|_| ())
    }

    fn publish_error(&self, subject: &str, error: async_nats::jetstream::context::PublishError) -> PubSubError {
        let (name, url) = (&self.name, &self.settings.url);
        match error.kind() {
            PublishErrorKind::TimedOut => PubSubError::Unavailable(format!(
                "pub/sub '{name}': JetStream at {url} did not acknowledge the event in time; it may or may not be stored"
            )),
            PublishErrorKind::StreamNotFound => PubSubError::Unavailable(format!(
                "pub/sub '{name}': no JetStream stream on {url} takes subject '{subject}' (stream '{}' deleted?)",
                self.settings.stream_name
            )),
            PublishErrorKind::BrokenPipe => {
                PubSubError::Unavailable(format!("pub/sub '{name}': the connection to {url} broke: {error}"))
            }
            _ => {
                // A full stream is the backlog limit the component set: say so in its terms.
                let hint = match self.settings.max_backlog {
                    Some(max) if error.to_string().contains("maximum messages") => {
                        format!(" (the stream holds at most maxBacklog {max} events; a subscriber is too slow or down)")
                    }
                    _ => String::new(),
                };
                PubSubError::Refused(format!("pub/sub '{name}': JetStream refused the event: {error}{hint}"))
            }
        }
    }

    /// Publishes `event` to its topic's subject and waits for the PubAck.
    async fn publish_one(&self, event: &TopicEventRequest) -> Result<(), PubSubError> {
        let subject = self.subject(&event.topic);
        let (headers, body) = encode(event);
        let ack = self
            .js
            .publish_with_headers(subject.clone(), headers, body)
            .await
            .map_err(|e| self.publish_error(&subject, e))?;
        ack.await.map(|_| ()).map_err(|e| self.publish_error(&subject, e))
    }

    /// Runs one consumer per subscription of the local app (listed or streaming), starting and
    /// stopping them as subscriptions come and go, until `stop`.
    async fn run_consumers(self: Arc<Self>, local: Arc<LocalApp>, stop: CancellationToken) {
        let mut listed = self.app_subscriptions.subscribe();
        let mut streams = local.streams.changes();
        let mut running: HashMap<String, (LocalSubscription, CancellationToken)> = HashMap::new();
        loop {
            let mut wanted: BTreeMap<String, LocalSubscription> = BTreeMap::new();
            let listed_now = listed.borrow_and_update().clone();
            for subscription in listed_now.into_iter().chain(local.streams.subscriptions_of(&self.name)) {
                wanted.entry(subscription.topic.clone()).or_insert(subscription);
            }
            running.retain(|topic, (subscription, token)| {
                let keep = wanted.get(topic) == Some(subscription);
                if !keep {
                    token.cancel();
                }
                keep
            });
            for (topic, subscription) in wanted {
                if running.contains_key(&topic) {
                    continue;
                }
                let token = stop.child_token();
                tokio::spawn(self.clone().consume(subscription.clone(), local.clone(), token.clone()));
                running.insert(topic, (subscription, token));
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = listed.changed() => {}
                _ = streams.changed() => {}
            }
        }
    }

    /// Consumes one subscription until `stop`, pulling only while the app can take events;
    /// starts over (with backoff) after errors.
    async fn consume(self: Arc<Self>, subscription: LocalSubscription, local: Arc<LocalApp>, stop: CancellationToken) {
        let mut backoff = Backoff::new();
        loop {
            while !local.can_take(&self.name, &subscription.topic) {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(APP_AWAY_POLL) => {}
                }
            }
            match self.consume_until_error(&subscription, &local, &stop).await {
                Ok(Paused::Stopped) => return,
                Ok(Paused::AppAway) => {
                    tracing::info!(pubsub = %self.name, topic = %subscription.topic, "the app cannot take events; consuming paused");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(pubsub = %self.name, topic = %subscription.topic, error = %e, "JetStream consumer failed; starting over")
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff.step()) => {}
            }
        }
    }

    async fn consume_until_error(
        self: &Arc<Self>,
        subscription: &LocalSubscription,
        local: &Arc<LocalApp>,
        stop: &CancellationToken,
    ) -> Result<Paused, String> {
        self.ready().await.map_err(|e| e.to_string())?;
        let in_flight = if subscription.ordered { 1 } else { self.settings.max_ack_pending };
        let name = self.consumer_name(&subscription.topic);
        let config = pull::Config {
            durable_name: Some(name.clone()),
            description: Some(format!("Tandem: app-id '{}', topic '{}'", self.app_id, subscription.topic)),
            filter_subject: self.subject(&subscription.topic),
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.settings.ack_wait,
            // Unlimited here: the attempt limit is applied by this sidecar (see the module docs).
            max_deliver: -1,
            max_ack_pending: in_flight as i64,
            deliver_policy: self.settings.deliver_policy,
            // Zero (never) is what the server assumes when the field is absent.
            inactive_threshold: self.settings.consumer_inactive_threshold.unwrap_or_default(),
            ..Default::default()
        };
        let stream = self.js.get_stream(&self.settings.stream_name).await.map_err(|e| e.to_string())?;
        let consumer: PullConsumer =
            stream.create_consumer(config).await.map_err(|e| format!("creating consumer '{name}': {e}"))?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(in_flight)
            .messages()
            .await
            .map_err(|e| format!("consumer '{name}': {e}"))?;
        tracing::info!(pubsub = %self.name, topic = %subscription.topic, consumer = %name, ordered = subscription.ordered, "consuming from JetStream");
        let permits = Arc::new(Semaphore::new(in_flight));
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return Ok(Paused::Stopped),
                next = messages.next() => next,
            };
            let message = match next {
                Some(Ok(message)) => message,
                Some(Err(e)) => return Err(format!("consumer '{name}': {e}")),
                None => return Err(format!("consumer '{name}': the message stream ended")),
            };
            // The app went away: stop pulling (dropping the pull subscription) rather than have
            // every event use up its attempts while it is gone. This one goes back at once; those
            // already pulled come back after ackWait, each one attempt down.
            if !local.can_take(&self.name, &subscription.topic) {
                settle(&message, AckKind::Nak(Some(APP_AWAY_POLL))).await;
                return Ok(Paused::AppAway);
            }
            let permit = tokio::select! {
                _ = stop.cancelled() => return Ok(Paused::Stopped),
                permit = permits.clone().acquire_owned() => permit.map_err(|e| e.to_string())?,
            };
            if subscription.ordered {
                self.handle(subscription, local, message).await;
                drop(permit);
            } else {
                let (this, subscription, local) = (self.clone(), subscription.clone(), local.clone());
                tokio::spawn(async move {
                    this.handle(&subscription, &local, message).await;
                    drop(permit);
                });
            }
        }
    }

    /// The wait before attempt `attempts + 1`.
    fn retry_delay(&self, attempts: u32) -> Duration {
        match self.settings.backoff.as_slice() {
            [] => self.policy.backoff(attempts),
            delays => delays[(attempts.max(1) as usize - 1).min(delays.len() - 1)],
        }
    }

    /// One delivery of `message` to the app, settled with JetStream.
    async fn handle(&self, subscription: &LocalSubscription, local: &LocalApp, message: Message) {
        let attempt = message.info().map(|i| i.delivered.max(1) as u32).unwrap_or(1);
        let topic = subscription.topic.as_str();
        let event = match self.decode(&message, topic) {
            Ok(event) => TopicEventRequest { path: subscription.path.clone(), ..event },
            Err(e) => {
                tracing::error!(pubsub = %self.name, topic, error = %e, "a message on the stream cannot be read as a Tandem event; dropped");
                self.metrics.pubsub_event(&self.name, topic, "dropped");
                settle(&message, AckKind::Term).await;
                return;
            }
        };
        let id = event.id.clone();
        // An attempt beyond the limit means the last one ended without settling (a crash).
        let outcome = if attempt > self.policy.max_attempts {
            Err(DeliveryError::Failed("the last attempt ended without an answer".into()))
        } else {
            // A span per attempt, child of the publish call (its context travels in the event).
            let span = crate::telemetry::delivery_span(&self.name, &event, &local.app_id);
            let in_flight = self.metrics.pubsub_delivery_in_flight(&self.name, topic);
            let outcome = local.deliver(event.clone(), self.policy.timeout).instrument(span.clone()).await;
            drop(in_flight);
            if !matches!(outcome, Ok(TopicEventResponseStatus::Success)) {
                crate::telemetry::record_error(&span);
            }
            outcome
        };
        match outcome {
            Ok(TopicEventResponseStatus::Success) => {
                settle(&message, AckKind::Ack).await;
                self.metrics.pubsub_event(&self.name, topic, "delivered");
            }
            Ok(TopicEventResponseStatus::Drop) => {
                settle(&message, AckKind::Term).await;
                self.metrics.pubsub_event(&self.name, topic, "dropped");
                tracing::warn!(pubsub = %self.name, topic, id, "the subscriber dropped the event");
            }
            failed => {
                let reason = match failed {
                    Err(DeliveryError::SubscriberAway(why) | DeliveryError::Failed(why)) => why,
                    Ok(_) => "the subscriber asked to retry".to_string(),
                };
                if attempt >= self.policy.max_attempts {
                    self.exhausted(subscription, event, &message, &reason).await;
                } else {
                    settle(&message, AckKind::Nak(Some(self.retry_delay(attempt)))).await;
                    self.metrics.pubsub_event(&self.name, topic, "retried");
                    tracing::debug!(pubsub = %self.name, topic, id, attempt, reason, "delivery will be retried");
                }
            }
        }
    }

    /// The event `message` carries (see the module docs for the formats); `topic` is the one
    /// it was consumed from.
    fn decode(&self, message: &Message, topic: &str) -> Result<TopicEventRequest, String> {
        let header = |name: &str| message.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str());
        match header(FORMAT_HEADER) {
            Some(ENVELOPE) => TopicEventRequest::decode(message.payload.as_ref()).map_err(|e| e.to_string()),
            Some(RAW) | None => {
                let id = match header(EVENT_ID_HEADER).or_else(|| header(NATS_MSG_ID_HEADER)) {
                    Some(id) => id.to_string(),
                    None => {
                        let info = message.info().map_err(|e| format!("a message without an id or its info: {e}"))?;
                        format!("{}:{}", info.stream, info.stream_sequence)
                    }
                };
                let content_type = header(CONTENT_TYPE_HEADER).unwrap_or_default();
                Ok(raw::event(id, &self.name, topic, message.payload.clone(), content_type))
            }
            Some(other) => Err(format!("header {FORMAT_HEADER} is '{other}', neither '{ENVELOPE}' nor '{RAW}'")),
        }
    }

    /// The event used its attempts: to the dead-letter topic, or dropped.
    async fn exhausted(
        &self,
        subscription: &LocalSubscription,
        event: TopicEventRequest,
        message: &Message,
        reason: &str,
    ) {
        let (topic, id, attempts) = (subscription.topic.as_str(), event.id.clone(), self.policy.max_attempts);
        let dead_letter_topic = subscription.dead_letter_topic.as_str();
        if dead_letter_topic.is_empty() {
            settle(message, AckKind::Term).await;
            self.metrics.pubsub_event(&self.name, topic, "dropped");
            tracing::error!(pubsub = %self.name, topic, id, attempts, reason, "event dropped after its last delivery attempt (no dead-letter topic)");
            return;
        }
        let dead = TopicEventRequest { topic: dead_letter_topic.to_string(), path: String::new(), ..event };
        match self.publish_one(&dead).await {
            Ok(()) => {
                settle(message, AckKind::Term).await;
                self.metrics.pubsub_event(&self.name, topic, "dead_lettered");
                tracing::warn!(pubsub = %self.name, topic, dead_letter_topic, id, attempts, reason, "event dead-lettered");
            }
            Err(e) => {
                // Not lost: it comes back after the delay and is dead-lettered then.
                settle(message, AckKind::Nak(Some(self.retry_delay(attempts)))).await;
                tracing::error!(pubsub = %self.name, topic, dead_letter_topic, id, error = %e, "cannot dead-letter the event yet; retrying");
            }
        }
    }
}

/// Why a consumer stopped pulling without an error.
enum Paused {
    Stopped,
    AppAway,
}

/// The headers and body of the message that carries `event` on the stream.
fn encode(event: &TopicEventRequest) -> (HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    if raw::is_raw(event) {
        // The API refuses content types a header cannot carry (raw::check_content_type).
        headers.insert(FORMAT_HEADER, RAW);
        headers.insert(EVENT_ID_HEADER, event.id.as_str());
        headers.insert(CONTENT_TYPE_HEADER, event.data_content_type.as_str());
        (headers, event.data.clone())
    } else {
        headers.insert(FORMAT_HEADER, ENVELOPE);
        (headers, event.encode_to_vec().into())
    }
}

async fn settle(message: &Message, kind: AckKind) {
    if let Err(e) = message.ack_with(kind).await {
        // Unsettled, the event is redelivered after ackWait: at least once still holds.
        tracing::debug!(error = %e, "cannot settle a JetStream message; it will be redelivered");
    }
}

#[tonic::async_trait]
impl PubSub for JetStreamPubSub {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        JETSTREAM
    }

    async fn publish_all(&self, events: Vec<TopicEventRequest>) -> Vec<Result<(), PubSubError>> {
        if let Err(e) = self.ready().await {
            let why = e.to_string();
            let unavailable = |_: &TopicEventRequest| Err(PubSubError::Unavailable(why.clone()));
            return events.iter().map(unavailable).collect();
        }
        let max_payload = self.client.server_info().max_payload;
        // Send every event first, then wait for the PubAcks: one round trip for a bulk publish.
        let mut sent = Vec::with_capacity(events.len());
        for event in &events {
            let subject = self.subject(&event.topic);
            let (headers, payload) = encode(event);
            if max_payload > 0 && payload.len() > max_payload {
                sent.push(Err(PubSubError::Refused(format!(
                    "pub/sub '{}': the event for topic '{}' is {} bytes encoded, over the NATS server's max_payload of {max_payload} bytes",
                    self.name,
                    event.topic,
                    payload.len()
                ))));
                continue;
            }
            match self.js.publish_with_headers(subject.clone(), headers, payload).await {
                Ok(ack) => sent.push(Ok((subject, ack))),
                Err(e) => sent.push(Err(self.publish_error(&subject, e))),
            }
        }
        let mut outcomes = Vec::with_capacity(sent.len());
        for (event, sent) in events.iter().zip(sent) {
            let outcome = match sent {
                Ok((subject, ack)) => ack.await.map(|_| ()).map_err(|e| self.publish_error(&subject, e)),
                Err(e) => Err(e),
            };
            if outcome.is_ok() {
                self.metrics.pubsub_event(&self.name, &event.topic, "published");
            }
            outcomes.push(outcome);
        }
        outcomes
    }

    fn start(self: Arc<Self>, targets: DeliveryTargets, stop: CancellationToken) {
        tokio::spawn(self.run_consumers(targets.local, stop));
    }

    fn set_app_subscriptions(&self, subscriptions: Vec<LocalSubscription>) {
        self.app_subscriptions.send_if_modified(|current| {
            let changed = *current != subscriptions;
            *current = subscriptions;
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(metadata: &[(&str, &str)]) -> ComponentSpec {
        ComponentSpec {
            name: "events".into(),
            kind: JETSTREAM.into(),
            version: "v1".into(),
            metadata: metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            file: "c.yaml".into(),
        }
    }

    fn settings(metadata: &[(&str, &str)]) -> Result<(Settings, DeliveryPolicy), String> {
        let mut policy = DeliveryPolicy::default();
        Settings::from_component(&spec(metadata), "default", &mut policy).map(|s| (s, policy))
    }

    #[test]
    fn tokens_keep_names_readable_and_escape_the_rest() {
        assert_eq!(token("orders"), "orders");
        assert_eq!(token("svc-a"), "svc-a");
        assert_eq!(token("a.b c*>"), "a_2Eb_20c_2A_3E");
        assert_eq!(token("under_score"), "under_5Fscore");
        assert_eq!(token(""), "_");
        assert!(!token("x__y").contains("__"));
    }

    #[test]
    fn settings_follow_dapr_names_with_tandem_defaults() {
        let (s, policy) = settings(&[("natsURL", "nats://127.0.0.1:4222")]).unwrap();
        assert_eq!(s.url, "nats://127.0.0.1:4222");
        assert_eq!(s.stream_name, "TANDEM__default__events");
        assert_eq!(s.subject_prefix, "tandem.default.events");
        assert_eq!(s.deliver_policy, DeliverPolicy::All);
        assert_eq!(s.ack_wait, policy.timeout + Duration::from_secs(5));
        assert_eq!(s.max_ack_pending, policy.max_in_flight);
        assert_eq!(s.max_backlog, None);
        assert_eq!(s.consumer_inactive_threshold, Some(Duration::from_secs(24 * 3600)));

        let (s, policy) = settings(&[
            ("natsURL", "nats://h:1"),
            ("maxDeliver", "3"),
            ("maxAckPending", "7"),
            ("backOff", "50ms, 1s"),
            ("deliverPolicy", "new"),
            ("streamName", "ORDERS"),
            ("maxBacklog", "10"),
            ("consumerInactiveThreshold", "2h"),
        ])
        .unwrap();
        assert_eq!(policy.max_attempts, 3);
        assert_eq!(s.max_ack_pending, 7);
        assert_eq!(s.backoff, [Duration::from_millis(50), Duration::from_secs(1)]);
        assert_eq!(s.deliver_policy, DeliverPolicy::New);
        assert_eq!(s.stream_name, "ORDERS");
        assert_eq!(s.max_backlog, Some(10));
        assert_eq!(s.consumer_inactive_threshold, Some(Duration::from_secs(7200)));
        let (s, _) = settings(&[("natsURL", "nats://h:1"), ("consumerInactiveThreshold", "0")]).unwrap();
        assert_eq!(s.consumer_inactive_threshold, None, "0 keeps consumers until deleted");
    }

    #[test]
    fn raw_events_go_on_the_stream_bare_and_cloudevents_in_their_envelope() {
        let raw = raw::event("e-1".into(), "events", "t", b"payload".to_vec(), "text/plain");
        let (headers, body) = encode(&raw);
        assert_eq!(body[..], b"payload"[..]);
        assert_eq!(headers.get(FORMAT_HEADER).map(|v| v.as_str()), Some(RAW));
        assert_eq!(headers.get(EVENT_ID_HEADER).map(|v| v.as_str()), Some("e-1"));
        assert_eq!(headers.get(CONTENT_TYPE_HEADER).map(|v| v.as_str()), Some("text/plain"));

        let cloud_event = TopicEventRequest { spec_version: "1.0".into(), ..raw };
        let (headers, body) = encode(&cloud_event);
        assert_eq!(headers.get(FORMAT_HEADER).map(|v| v.as_str()), Some(ENVELOPE));
        assert_eq!(TopicEventRequest::decode(&body[..]).unwrap(), cloud_event);
    }

    #[test]
    fn bad_or_unsupported_metadata_is_refused_by_name() {
        for (metadata, expected) in [
            (vec![], "'natsURL' is missing"),
            (vec![("natsURL", "nats://h:1"), ("jwt", "x")], "'jwt' is not supported"),
            (vec![("natsURL", "nats://h:1"), ("ackPolicy", "none")], "'ackPolicy'"),
            (vec![("natsURL", "nats://h:1"), ("deliverPolicy", "sometimes")], "'deliverPolicy'"),
            (vec![("natsURL", "nats://h:1"), ("streamName", "a.b")], "'streamName'"),
            (vec![("natsURL", "nats://h:1"), ("backOff", "soon")], "'backOff'"),
            (vec![("natsURL", "nats://h:1"), ("maxDeliver", "0")], "'maxDeliver'"),
            (vec![("natsURL", "nats://h:1"), ("consumerInactiveThreshold", "a day")], "'consumerInactiveThreshold'"),
            (vec![("natsURL", "nats://h:1"), ("consumerInactiveThreshold", "-5s")], "'consumerInactiveThreshold'"),
        ] {
            let err = settings(&metadata).unwrap_err();
            assert!(err.contains(expected), "expected '{expected}' in: {err}");
        }
    }
}
