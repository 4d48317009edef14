//! Streaming subscriptions (`SubscribeTopicEventsAlpha1`): an app subscribes over a
//! bidirectional stream instead of serving `OnTopicEvent`. The sidecar records the
//! subscription in etcd like any other (so publishers keep events for it), and hands events
//! that reach this sidecar for the topic to one of the app's open streams, waiting for the
//! app's answer on the same stream. A subscription stays registered when its stream closes:
//! events wait for the next stream, as they wait for a subscriber that is down.
//!
//! So this is also where an event that reaches the sidecar learns its way to the app
//! ([`StreamSubscriptions::deliver`]): to an open stream of its topic; else to `OnTopicEvent`
//! if the app lists the topic ([`StreamSubscriptions::set_listed`]), with the route its routing
//! rules pick ([`super::routing`]); else nowhere yet: it waits for a stream, since an app that
//! does not list a topic would drop its events.
//!
//! Components that consume on the subscriber's side (`pubsub.jetstream`) learn which streams
//! are open here through [`StreamSubscriptions::subscriptions_of`] and [`StreamSubscriptions::changes`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use etcd_client::Client;
use tandem_proto::runtime::TopicEventRequest;
use tandem_proto::runtime::topic_event_response::TopicEventResponseStatus;
use tokio::sync::{mpsc, oneshot, watch};

use super::LocalSubscription;
use super::routing::Rules;
use crate::discovery::{Subscriber, keys};

/// Events queued per stream before delivery waits.
const STREAM_BUFFER: usize = 64;

type Answer = oneshot::Sender<TopicEventResponseStatus>;

struct OpenStream {
    id: u64,
    subscription: LocalSubscription,
    events: mpsc::Sender<TopicEventRequest>,
    /// Events sent and not answered yet, by event id.
    waiting: Mutex<HashMap<String, Answer>>,
}

/// Where subscriptions are written: set once the sidecar reaches etcd.
struct Registry {
    client: Client,
    namespace: String,
    app_id: String,
}

/// Topic -> its routing rules, when it has any with a `match`.
type ListedTopics = HashMap<String, Option<Arc<Rules>>>;

/// (pubsub, topic) -> the streams open for it.
type OpenStreams = HashMap<(String, String), Vec<Arc<OpenStream>>>;

/// Where [`StreamSubscriptions::deliver`] left an event.
// The event is handed on by value, once; boxing it would cost an allocation per event.
#[allow(clippy::large_enum_variant)]
pub enum Handover {
    /// An open stream of its topic took it: the app's answer, or why none came.
    Answered(Result<TopicEventResponseStatus, String>),
    /// No stream of its topic is open here, and the app lists the topic: for `OnTopicEvent`.
    ToApp(TopicEventRequest),
    /// No stream of its topic is open here, and the app does not list the topic: it waits for a
    /// stream. Why, in words.
    Waits(String),
}

/// The open streams of this sidecar, by (pubsub, topic).
pub struct StreamSubscriptions {
    streams: Mutex<OpenStreams>,
    /// pubsub -> the topics the app lists in `ListTopicSubscriptions` (as last recorded), each
    /// with its routing rules when it has any with a `match`.
    listed: Mutex<HashMap<String, ListedTopics>>,
    next_id: AtomicU64,
    round_robin: AtomicUsize,
    registry: OnceLock<Registry>,
    /// Bumped whenever a stream opens or closes.
    changed: watch::Sender<u64>,
}

impl Default for StreamSubscriptions {
    fn default() -> Self {
        StreamSubscriptions {
            streams: Mutex::default(),
            listed: Mutex::default(),
            next_id: AtomicU64::default(),
            round_robin: AtomicUsize::default(),
            registry: OnceLock::new(),
            changed: watch::channel(0).0,
        }
    }
}

/// One open stream, as the API holds it; closes the stream when dropped.
pub struct StreamHandle {
    owner: Arc<StreamSubscriptions>,
    key: (String, String),
    stream: Arc<OpenStream>,
}

impl StreamHandle {
    /// The app's answer to event `id`.
    pub fn answer(&self, id: &str, status: TopicEventResponseStatus) {
        if let Some(waiter) = self.stream.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(id) {
            let _ = waiter.send(status);
        }
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        let mut streams = self.owner.streams.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(open) = streams.get_mut(&self.key) {
            open.retain(|s| s.id != self.stream.id);
            if open.is_empty() {
                streams.remove(&self.key);
            }
        }
        drop(streams);
        // Dropping the waiters tells deliveries in flight that no answer will come.
        self.stream.waiting.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.owner.changed.send_modify(|n| *n += 1);
        tracing::info!(pubsub = %self.key.0, topic = %self.key.1, "streaming subscription closed");
    }
}

impl StreamSubscriptions {
    /// Called once etcd is reachable; until then opening a stream answers UNAVAILABLE.
    pub fn set_registry(&self, client: Client, namespace: String, app_id: String) {
        let _ = self.registry.set(Registry { client, namespace, app_id });
    }

    /// Records the subscription in etcd and opens a stream for it.
    pub async fn open(
        self: &Arc<Self>,
        pubsub: &str,
        topic: &str,
        dead_letter_topic: &str,
        ordered: bool,
    ) -> Result<(StreamHandle, mpsc::Receiver<TopicEventRequest>), String> {
        let registry = self.registry.get().ok_or("the sidecar has not reached etcd yet; subscribe again shortly")?;
        let key = keys::subscription_key(&registry.namespace, pubsub, topic, &registry.app_id);
        let mut client = registry.client.clone();
        // The app may also list the topic: its route stays, for `OnTopicEvent` while no stream
        // is open.
        let recorded =
            client.get(key.as_str(), None).await.map_err(|e| format!("reading the subscription in etcd: {e}"))?;
        let listed_route = recorded.kvs().first().and_then(|kv| serde_json::from_slice::<Subscriber>(kv.value()).ok());
        let subscriber = Subscriber {
            app_id: registry.app_id.clone(),
            dead_letter_topic: dead_letter_topic.to_string(),
            path: listed_route.map(|s| s.path).unwrap_or_default(),
            ordered,
            streaming: true,
        };
        let value = serde_json::to_vec(&subscriber).map_err(|e| e.to_string())?;
        client.put(key.as_str(), value, None).await.map_err(|e| format!("recording the subscription in etcd: {e}"))?;

        let (events, receiver) = mpsc::channel(STREAM_BUFFER);
        let stream = Arc::new(OpenStream {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            subscription: LocalSubscription {
                topic: topic.to_string(),
                dead_letter_topic: dead_letter_topic.to_string(),
                path: String::new(),
                ordered,
            },
            events,
            waiting: Mutex::default(),
        });
        let key = (pubsub.to_string(), topic.to_string());
        self.streams.lock().unwrap_or_else(|p| p.into_inner()).entry(key.clone()).or_default().push(stream.clone());
        self.changed.send_modify(|n| *n += 1);
        Ok((StreamHandle { owner: self.clone(), key, stream }, receiver))
    }

    /// The app's own subscriptions, (pubsub, topic, routing rules), from its
    /// `ListTopicSubscriptions`; none while it is away, until its list is read again.
    pub fn set_listed(&self, listed: impl IntoIterator<Item = (String, String, Option<Arc<Rules>>)>) {
        let mut by_pubsub: HashMap<String, ListedTopics> = HashMap::new();
        for (pubsub, topic, rules) in listed {
            by_pubsub.entry(pubsub).or_default().insert(topic, rules);
        }
        *self.listed.lock().unwrap_or_else(|p| p.into_inner()) = by_pubsub;
    }

    /// Whether the app lists `topic` of `pubsub` itself (so `OnTopicEvent` takes its events).
    pub fn is_listed(&self, pubsub: &str, topic: &str) -> bool {
        self.listed.lock().unwrap_or_else(|p| p.into_inner()).get(pubsub).is_some_and(|t| t.contains_key(topic))
    }

    /// The app lists the topic of `event`: `Some` with its routing rules, if any.
    fn listing(&self, event: &TopicEventRequest) -> Option<Option<Arc<Rules>>> {
        let listed = self.listed.lock().unwrap_or_else(|p| p.into_inner());
        listed.get(&event.pubsub_name).and_then(|topics| topics.get(&event.topic)).cloned()
    }

    /// Whether a stream of `topic` of `pubsub` is open here.
    pub fn has_stream(&self, pubsub: &str, topic: &str) -> bool {
        self.streams.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&(pubsub.to_string(), topic.to_string()))
    }

    /// The subscriptions of the streams open for `pubsub`, one per topic (the first opened).
    pub fn subscriptions_of(&self, pubsub: &str) -> Vec<LocalSubscription> {
        let streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        streams
            .iter()
            .filter(|((name, _), _)| name == pubsub)
            .filter_map(|(_, open)| open.first().map(|s| s.subscription.clone()))
            .collect()
    }

    /// Changes whenever a stream opens or closes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Hands `event` to one open stream of its topic and waits for the app's answer; when none
    /// is open, says where the event goes instead (see [`Handover`]).
    pub async fn deliver(&self, event: TopicEventRequest, timeout: Duration) -> Handover {
        let stream = {
            let streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
            // Most apps open no stream: no key to build then.
            let open = match streams.is_empty() {
                true => None,
                false => streams.get(&(event.pubsub_name.clone(), event.topic.clone())),
            };
            match open {
                Some(open) => open[self.round_robin.fetch_add(1, Ordering::Relaxed) % open.len()].clone(),
                None => {
                    drop(streams);
                    return self.without_stream(event);
                }
            }
        };
        let (answer, answered) = oneshot::channel();
        let id = event.id.clone();
        stream.waiting.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone(), answer);
        let outcome = async {
            stream.events.send(event).await.map_err(|_| "the subscription stream closed".to_string())?;
            answered.await.map_err(|_| "the subscription stream closed before the app answered".to_string())
        };
        let result = match tokio::time::timeout(timeout, outcome).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer on the subscription stream within {timeout:?}")),
        };
        stream.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        Handover::Answered(result)
    }

    /// Where an event goes while no stream of its topic is open here.
    fn without_stream(&self, mut event: TopicEventRequest) -> Handover {
        if let Some(rules) = self.listing(&event) {
            // The app's routing rules pick the event's route here, where they are known.
            if let Some(rules) = rules {
                event.path = rules.route(&event).to_string();
            }
            return Handover::ToApp(event);
        }
        Handover::Waits(format!(
            "no streaming subscription to topic '{}' of '{}' is open, and the app does not list the topic; \
             the event waits for a stream",
            event.topic, event.pubsub_name
        ))
    }
}
