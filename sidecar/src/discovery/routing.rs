//! The routing table: which apps are known and where their live instances are.
//!
//! Readers take an immutable [`RoutingSnapshot`] (an `Arc` clone, no lock held during a call);
//! the watcher publishes a new snapshot per etcd change. When etcd is lost the last snapshot
//! stays, so calls keep flowing on the last known routes.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;

use super::InstanceRecord;

/// A live instance of an app, as routing sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub instance_id: String,
    pub internal_address: String,
    /// Whether an app behind it serves the callback API (invocations need one; events can
    /// also go to a sidecar whose app holds a streaming subscription).
    pub has_app: bool,
}

/// An app-id's subscription to a topic, as published events find it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Subscriber {
    pub app_id: String,
    /// Where events that exhaust their deliveries go (same component); empty: dropped.
    #[serde(default)]
    pub dead_letter_topic: String,
    /// The subscription's route (`routes.default`), sent to the app as the event's `path`;
    /// empty when it has none (and in records written before routes existed).
    #[serde(default)]
    pub path: String,
    /// Whether the subscriber wants this topic's events in publish order (per publisher).
    #[serde(default)]
    pub ordered: bool,
    /// Recorded by a streaming subscription (`SubscribeTopicEventsAlpha1`), not from the app's
    /// `ListTopicSubscriptions`: the app's list never removes it.
    #[serde(default)]
    pub streaming: bool,
}

/// An immutable view of the namespace.
#[derive(Debug, Default, Clone)]
pub struct RoutingSnapshot {
    /// False until the first full listing from etcd; calls then answer "discovery not ready".
    pub synced: bool,
    /// Known app-ids and their live instances (sorted by instance id; possibly none).
    apps: BTreeMap<String, Vec<Instance>>,
    /// (pubsub, topic) -> the app-ids subscribed to it, sorted by app-id.
    subscriptions: BTreeMap<(String, String), Vec<Subscriber>>,
}

impl RoutingSnapshot {
    /// `None` when the app-id was never registered in the namespace.
    pub fn instances(&self, app_id: &str) -> Option<&[Instance]> {
        self.apps.get(app_id).map(Vec::as_slice)
    }

    pub fn apps(&self) -> impl Iterator<Item = (&str, &[Instance])> {
        self.apps.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// The subscribers of `topic` of component `pubsub` (none when nobody subscribes).
    pub fn subscribers(&self, pubsub: &str, topic: &str) -> &[Subscriber] {
        self.subscriptions.get(&(pubsub.to_string(), topic.to_string())).map(Vec::as_slice).unwrap_or_default()
    }

    pub fn addresses(&self) -> impl Iterator<Item = &str> {
        self.apps.values().flatten().map(|i| i.internal_address.as_str())
    }
}

/// Accumulates etcd state into snapshots; owned by the watcher.
#[derive(Debug, Default)]
pub struct RoutingBuilder {
    known: std::collections::BTreeSet<String>,
    instances: BTreeMap<(String, String), InstanceRecord>,
    /// (pubsub, topic, app-id) -> subscriber.
    subscriptions: BTreeMap<(String, String, String), Subscriber>,
}

impl RoutingBuilder {
    pub fn clear(&mut self) {
        self.known.clear();
        self.instances.clear();
        self.subscriptions.clear();
    }

    pub fn add_subscription(&mut self, pubsub: &str, topic: &str, subscriber: Subscriber) {
        self.subscriptions.insert((pubsub.to_string(), topic.to_string(), subscriber.app_id.clone()), subscriber);
    }

    pub fn remove_subscription(&mut self, pubsub: &str, topic: &str, app_id: &str) {
        self.subscriptions.remove(&(pubsub.to_string(), topic.to_string(), app_id.to_string()));
    }

    pub fn add_app(&mut self, app_id: &str) {
        self.known.insert(app_id.to_string());
    }

    pub fn remove_app(&mut self, app_id: &str) {
        self.known.remove(app_id);
    }

    pub fn add_instance(&mut self, record: InstanceRecord) {
        self.known.insert(record.app_id.clone());
        self.instances.insert((record.app_id.clone(), record.instance_id.clone()), record);
    }

    pub fn remove_instance(&mut self, app_id: &str, instance_id: &str) {
        self.instances.remove(&(app_id.to_string(), instance_id.to_string()));
    }

    pub fn snapshot(&self) -> RoutingSnapshot {
        let mut apps: BTreeMap<String, Vec<Instance>> = self.known.iter().map(|a| (a.clone(), Vec::new())).collect();
        for ((app_id, _), record) in &self.instances {
            apps.entry(app_id.clone()).or_default().push(Instance {
                instance_id: record.instance_id.clone(),
                internal_address: record.internal_address.clone(),
                has_app: record.has_app,
            });
        }
        let mut subscriptions: BTreeMap<(String, String), Vec<Subscriber>> = BTreeMap::new();
        for ((pubsub, topic, _), subscriber) in &self.subscriptions {
            subscriptions.entry((pubsub.clone(), topic.clone())).or_default().push(subscriber.clone());
        }
        RoutingSnapshot { synced: true, apps, subscriptions }
    }
}

/// Shared handle on the current snapshot.
#[derive(Debug, Clone)]
pub struct RoutingTable {
    tx: Arc<watch::Sender<Arc<RoutingSnapshot>>>,
}

impl Default for RoutingTable {
    fn default() -> Self {
        Self::new()
    }
}

impl RoutingTable {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Arc::new(RoutingSnapshot::default()));
        RoutingTable { tx: Arc::new(tx) }
    }

    pub fn current(&self) -> Arc<RoutingSnapshot> {
        self.tx.borrow().clone()
    }

    pub fn publish(&self, snapshot: RoutingSnapshot) {
        self.tx.send_replace(Arc::new(snapshot));
    }

    /// Notified on every change (used to drop connections to departed peers).
    pub fn subscribe(&self) -> watch::Receiver<Arc<RoutingSnapshot>> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(app: &str, id: &str, has_app: bool) -> InstanceRecord {
        InstanceRecord {
            app_id: app.into(),
            instance_id: id.into(),
            internal_address: format!("{id}:1"),
            has_app,
            runtime_version: "t".into(),
            api_address: None,
        }
    }

    #[test]
    fn known_apps_without_instances_stay_known() {
        let mut b = RoutingBuilder::default();
        b.add_instance(record("svc", "a", true));
        b.add_instance(record("svc", "b", true));
        b.add_app("other");
        let s = b.snapshot();
        assert!(s.synced);
        assert_eq!(s.instances("svc").unwrap().len(), 2);
        assert_eq!(s.instances("other").unwrap().len(), 0);
        assert!(s.instances("missing").is_none());

        b.remove_instance("svc", "a");
        b.remove_instance("svc", "b");
        assert_eq!(b.snapshot().instances("svc").unwrap().len(), 0);
    }

    #[test]
    fn instances_say_whether_an_app_is_behind_them() {
        let mut b = RoutingBuilder::default();
        b.add_instance(record("caller", "a", false));
        b.add_instance(record("caller", "b", true));
        let s = b.snapshot();
        let flags: Vec<bool> = s.instances("caller").unwrap().iter().map(|i| i.has_app).collect();
        assert_eq!(flags, [false, true]);
    }

    #[test]
    fn subscriptions_are_listed_per_topic() {
        let mut b = RoutingBuilder::default();
        let sub = |app: &str| Subscriber {
            app_id: app.into(),
            dead_letter_topic: String::new(),
            path: String::new(),
            ordered: false,
            streaming: false,
        };
        b.add_subscription("pubsub", "raw", sub("prep"));
        b.add_subscription("pubsub", "raw", sub("audit"));
        b.add_subscription("pubsub", "features", sub("train"));
        let s = b.snapshot();
        let apps: Vec<&str> = s.subscribers("pubsub", "raw").iter().map(|s| s.app_id.as_str()).collect();
        assert_eq!(apps, ["audit", "prep"]);
        assert!(s.subscribers("pubsub", "nothing").is_empty());
        assert!(s.subscribers("other", "raw").is_empty());
        b.remove_subscription("pubsub", "raw", "audit");
        assert_eq!(b.snapshot().subscribers("pubsub", "raw").len(), 1);
    }

    #[test]
    fn subscriber_records_without_a_path_still_parse() {
        let old: Subscriber = serde_json::from_str(r#"{"app_id":"prep","dead_letter_topic":"dead"}"#).unwrap();
        assert_eq!(old.path, "");
        assert_eq!(old.dead_letter_topic, "dead");
        let new = Subscriber { path: "/orders".into(), ..old };
        let back: Subscriber = serde_json::from_slice(&serde_json::to_vec(&new).unwrap()).unwrap();
        assert_eq!(back, new);
    }

    #[test]
    fn the_table_starts_unsynced_and_publishes_snapshots() {
        let table = RoutingTable::new();
        assert!(!table.current().synced);
        let mut rx = table.subscribe();
        let mut b = RoutingBuilder::default();
        b.add_app("x");
        table.publish(b.snapshot());
        assert!(rx.has_changed().unwrap());
        assert!(table.current().instances("x").is_some());
        rx.mark_unchanged();
    }
}
