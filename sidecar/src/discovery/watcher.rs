//! Keeps the [`RoutingTable`] in step with etcd: list discovery's three subtrees of the
//! namespace (apps, instances, subscriptions) at one revision, then watch each from there; on
//! any error keep the last table, back off, and list again.

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio_util::sync::CancellationToken;

use super::keys::{self, DiscoveryKey};
use super::routing::RoutingBuilder;
use super::routing::Subscriber;
use super::{Backoff, InstanceRecord, RoutingTable};

pub struct RoutingWatcher {
    client: Client,
    namespace: String,
    table: RoutingTable,
}

impl RoutingWatcher {
    pub fn new(client: Client, namespace: String, table: RoutingTable) -> Self {
        RoutingWatcher { client, namespace, table }
    }

    /// Runs until `stop` is cancelled.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut backoff = Backoff::new();
        let mut builder = RoutingBuilder::default();
        loop {
            let outcome = tokio::select! {
                _ = stop.cancelled() => return,
                outcome = self.list_and_watch(&mut builder, &mut backoff) => outcome,
            };
            if let Err(e) = outcome {
                tracing::warn!(error = %e, "discovery watch interrupted; keeping the last routing table");
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff.step()) => {}
            }
        }
    }

    async fn list_and_watch(&mut self, builder: &mut RoutingBuilder, backoff: &mut Backoff) -> Result<(), String> {
        let [apps, instances, subscriptions] = keys::discovery_prefixes(&self.namespace);
        // The first listing fixes the revision; the others read the same one.
        let mut revision = None;
        let mut listed = Vec::new();
        for prefix in [&apps, &instances, &subscriptions] {
            let mut options = GetOptions::new().with_prefix();
            if let Some(revision) = revision {
                options = options.with_revision(revision);
            }
            let listing =
                self.client.get(prefix.as_str(), Some(options)).await.map_err(|e| format!("listing {prefix}: {e}"))?;
            revision.get_or_insert(listing.header().map(|h| h.revision()).unwrap_or(0));
            listed.push(listing);
        }
        let revision = revision.unwrap_or(0);
        builder.clear();
        for kv in listed.iter().flat_map(|listing| listing.kvs()) {
            self.apply_put(builder, kv.key(), kv.value());
        }
        self.table.publish(builder.snapshot());
        tracing::debug!(revision, "routing table listed");

        let mut watches = Vec::new();
        for prefix in [&apps, &instances, &subscriptions] {
            let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
            let stream = self
                .client
                .watch(prefix.as_str(), Some(options))
                .await
                .map_err(|e| format!("watching {prefix}: {e}"))?;
            watches.push(stream);
        }
        let [apps, instances, subscriptions]: &mut [_; 3] =
            (&mut watches[..]).try_into().expect("one watch per subtree");
        backoff.reset();
        loop {
            let response = tokio::select! {
                response = super::next_watch_response(apps) => response?,
                response = super::next_watch_response(instances) => response?,
                response = super::next_watch_response(subscriptions) => response?,
            };
            let mut changed = false;
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                changed = true;
                match event.event_type() {
                    EventType::Put => self.apply_put(builder, kv.key(), kv.value()),
                    EventType::Delete => self.apply_delete(builder, kv.key()),
                }
            }
            if changed {
                self.table.publish(builder.snapshot());
            }
        }
    }

    fn apply_put(&self, builder: &mut RoutingBuilder, key: &[u8], value: &[u8]) {
        let Ok(key) = std::str::from_utf8(key) else { return };
        match keys::parse(&self.namespace, key) {
            Some(DiscoveryKey::App { app_id }) => builder.add_app(app_id),
            Some(DiscoveryKey::Instance { app_id, instance_id }) => {
                match serde_json::from_slice::<InstanceRecord>(value) {
                    Ok(record) if record.app_id == app_id && record.instance_id == instance_id => {
                        builder.add_instance(record)
                    }
                    Ok(_) => tracing::warn!(key, "instance record does not match its key; ignored"),
                    Err(e) => tracing::warn!(key, error = %e, "unreadable instance record; ignored"),
                }
            }
            Some(DiscoveryKey::Subscription { pubsub, topic, app_id }) => {
                match serde_json::from_slice::<Subscriber>(value) {
                    Ok(subscriber) if subscriber.app_id == app_id => {
                        builder.add_subscription(pubsub, &topic, subscriber)
                    }
                    Ok(_) => tracing::warn!(key, "subscription does not match its key; ignored"),
                    Err(e) => tracing::warn!(key, error = %e, "unreadable subscription; ignored"),
                }
            }
            None => {}
        }
    }

    fn apply_delete(&self, builder: &mut RoutingBuilder, key: &[u8]) {
        let Ok(key) = std::str::from_utf8(key) else { return };
        match keys::parse(&self.namespace, key) {
            Some(DiscoveryKey::App { app_id }) => builder.remove_app(app_id),
            Some(DiscoveryKey::Instance { app_id, instance_id }) => builder.remove_instance(app_id, instance_id),
            Some(DiscoveryKey::Subscription { pubsub, topic, app_id }) => {
                builder.remove_subscription(pubsub, &topic, app_id)
            }
            None => {}
        }
    }
}
