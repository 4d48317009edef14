//! The subscriber side: asks the app which topics it subscribes to and records them in etcd,
//! where every publisher's routing table finds them. Done whenever the app becomes healthy
//! (so an app restarted with other subscriptions is picked up); subscriptions the app no
//! longer lists are removed (and publishers release what they kept for them), except those of
//! streaming subscriptions ([`StreamSubscriptions`]), which the app does not list: they stay,
//! as when their stream closes. A topic both listed and read by a stream is one subscription
//! with the list's route that stays like a stream's. Each pub/sub component also hears the app's list
//! ([`crate::pubsub::PubSub::set_app_subscriptions`]), for components that consume on the
//! subscriber's side.
//!
//! The list is what the app answers (gRPC `ListTopicSubscriptions`, HTTP `GET /dapr/subscribe`)
//! and the `Subscription` files of `--resources-path` that apply to the app.
//!
//! Routes: a subscription's `routes.default` (or its first rule without a `match`, which Dapr
//! takes for every event) is recorded with it and reaches the app as each event's `path`,
//! unless one of its routing rules with a `match` (CEL) takes the event: those are evaluated
//! here, as each event is handed to the app ([`super::routing`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, GetOptions};
use tandem_proto::runtime::TopicSubscription;
use tokio_util::sync::CancellationToken;

use crate::app_channel::AppChannel;
use crate::discovery::{Backoff, Subscriber, keys};
use crate::pubsub::routing::Rules;
use crate::pubsub::streams::StreamSubscriptions;
use crate::pubsub::{LocalSubscription, PubSubs};
use crate::readiness::Readiness;

pub struct SubscriptionRegistrar {
    pub client: Client,
    pub namespace: String,
    pub app_id: String,
    pub app: AppChannel,
    /// The pub/sub components of this sidecar; subscriptions to others are refused (logged).
    pub pubsubs: PubSubs,
    pub readiness: Arc<Readiness>,
    /// The streaming subscriptions open here, whose records stay whatever the app lists.
    pub streams: Arc<StreamSubscriptions>,
    /// Subscriptions declared in `--resources-path` ([`crate::pubsub::declared`]): they join
    /// the app's list; the app's own wins for a topic both name.
    pub declared: Vec<TopicSubscription>,
}

impl SubscriptionRegistrar {
    /// Registers the app's subscriptions each time it becomes healthy, until `stop`.
    pub async fn run(mut self, stop: CancellationToken) {
        let poll = Duration::from_millis(200);
        loop {
            // Wait for a healthy app.
            while !self.readiness.app_is_healthy() {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(poll) => {}
                }
            }
            let mut backoff = Backoff::new();
            loop {
                match self.register().await {
                    Ok(count) => {
                        tracing::info!(subscriptions = count, "app subscriptions registered");
                        break;
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot register the app's subscriptions; retrying"),
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff.step()) => {}
                }
            }
            // Wait until the app goes away, then start over when it is back. Its topics take no
            // events meanwhile: the app that comes back may list others.
            while self.readiness.app_is_healthy() {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(poll) => {}
                }
            }
            self.streams.set_listed([]);
        }
    }

    async fn register(&mut self) -> Result<usize, String> {
        let mut listed = self.app.subscriptions().await?;
        for declared in &self.declared {
            if listed.iter().any(|s| s.pubsub_name == declared.pubsub_name && s.topic == declared.topic) {
                tracing::warn!(pubsub = %declared.pubsub_name, topic = %declared.topic, "the app lists a topic a Subscription file declares too; the app's subscription is kept");
            } else {
                listed.push(declared.clone());
            }
        }
        // The app takes the events of the topics it lists from now on, whatever etcd says, with
        // the routes its rules pick.
        let with_rules = listed.iter().map(|subscription| {
            let (rules, errors) = Rules::of(subscription);
            for error in errors {
                tracing::error!("{error}");
            }
            (subscription.pubsub_name.clone(), subscription.topic.clone(), rules)
        });
        self.streams.set_listed(with_rules.collect::<Vec<_>>());
        // This app's subscriptions in etcd, each with whether a stream reads it: read first, so
        // that a listed topic a stream also reads keeps that mark (the app's next list, without
        // the topic, does not end the stream's subscription then).
        let prefix = format!("{}subscriptions/", keys::namespace_prefix(&self.namespace));
        let existing = self
            .client
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| format!("listing {prefix}: {e}"))?;
        let mut recorded = BTreeMap::new();
        for kv in existing.kvs() {
            let Ok(key) = std::str::from_utf8(kv.key()) else { continue };
            let Some(keys::DiscoveryKey::Subscription { pubsub, topic, app_id }) = keys::parse(&self.namespace, key)
            else {
                continue;
            };
            if app_id == self.app_id {
                let streaming = serde_json::from_slice::<Subscriber>(kv.value()).is_ok_and(|s| s.streaming)
                    || self.streams.has_stream(pubsub, &topic);
                recorded.insert(key.to_string(), streaming);
            }
        }
        let mut wanted = BTreeSet::new();
        let mut local: BTreeMap<&str, Vec<LocalSubscription>> =
            self.pubsubs.keys().map(|n| (n.as_str(), Vec::new())).collect();
        for subscription in listed {
            let Some(for_component) = local.get_mut(subscription.pubsub_name.as_str()) else {
                tracing::error!(
                    pubsub = %subscription.pubsub_name,
                    topic = %subscription.topic,
                    known = ?self.pubsubs.keys().collect::<Vec<_>>(),
                    "the app subscribes to a pub/sub component this sidecar does not have; ignored"
                );
                continue;
            };
            if subscription.topic.is_empty() {
                tracing::error!(pubsub = %subscription.pubsub_name, "the app lists a subscription without a topic; ignored");
                continue;
            }
            let key =
                keys::subscription_key(&self.namespace, &subscription.pubsub_name, &subscription.topic, &self.app_id);
            let subscriber = Subscriber {
                app_id: self.app_id.clone(),
                dead_letter_topic: subscription.dead_letter_topic.clone(),
                path: route_of(&subscription),
                ordered: wants_order(&subscription.metadata),
                streaming: recorded.get(&key).copied().unwrap_or(false)
                    || self.streams.has_stream(&subscription.pubsub_name, &subscription.topic),
            };
            let value = serde_json::to_vec(&subscriber).map_err(|e| e.to_string())?;
            for_component.push(LocalSubscription {
                topic: subscription.topic.clone(),
                dead_letter_topic: subscriber.dead_letter_topic,
                path: subscriber.path,
                ordered: subscriber.ordered,
            });
            self.client.put(key.as_str(), value, None).await.map_err(|e| format!("writing {key}: {e}"))?;
            wanted.insert(key);
        }
        // Remove this app's subscriptions that the app no longer lists, but not those that
        // streams read.
        for (key, streaming) in &recorded {
            if !wanted.contains(key) && !streaming {
                self.client.delete(key.as_str(), None).await.map_err(|e| format!("removing {key}: {e}"))?;
                tracing::info!(key, "removed a subscription the app no longer lists");
            }
        }
        for (name, subscriptions) in local {
            self.pubsubs[name].set_app_subscriptions(subscriptions);
        }
        Ok(wanted.len())
    }
}

/// The route recorded for `subscription`: where its events go when no routing rule with a
/// `match` takes them (those are evaluated per event where the app is, [`super::routing`]). As
/// in Dapr, a rule without a `match` takes every event that reaches it, before the default.
fn route_of(subscription: &TopicSubscription) -> String {
    let Some(routes) = &subscription.routes else { return String::new() };
    match routes.rules.iter().find(|r| r.r#match.trim().is_empty()) {
        Some(catch_all) => catch_all.path.clone(),
        None => routes.default.clone(),
    }
}

/// Whether the subscription asks for events in publish order.
fn wants_order(metadata: &std::collections::HashMap<String, String>) -> bool {
    metadata.get(tandem_proto::SUBSCRIPTION_ORDERED).is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_proto::runtime::{TopicRoutes, TopicRule};

    #[test]
    fn the_recorded_route_is_the_one_events_take_when_no_match_rule_does() {
        let mut subscription =
            TopicSubscription { pubsub_name: "pubsub".into(), topic: "orders".into(), ..Default::default() };
        assert_eq!(route_of(&subscription), "");
        subscription.routes = Some(TopicRoutes {
            rules: vec![TopicRule { r#match: "event.type == \"big\"".into(), path: "/big".into() }],
            default: "/orders".into(),
        });
        assert_eq!(route_of(&subscription), "/orders");
        // A rule without a match takes every event, before the default.
        subscription.routes.as_mut().unwrap().rules.push(TopicRule { r#match: String::new(), path: "/all".into() });
        assert_eq!(route_of(&subscription), "/all");
    }
}
