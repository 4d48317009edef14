//! What etcd says about a namespace: the known app-ids, their live instances (with the address
//! of each instance's sidecar API) and the topic subscriptions. Read with the key layout of
//! tandem-sidecar's `discovery::keys`, so the CLI and the sidecars agree by construction.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use etcd_client::GetOptions;
use serde::Serialize;
use tandem_sidecar::discovery::keys::{self, DiscoveryKey};
use tandem_sidecar::discovery::{EtcdTls, InstanceRecord, Subscriber};

use crate::error::CliError;

/// An etcd client error in a few words: a gRPC status's message and its root cause (e.g.
/// "tcp connect error: Connection refused (os error 111)") rather than the whole debug chain.
fn describe(error: &etcd_client::Error) -> String {
    let etcd_client::Error::GRpcStatus(status) = error else { return error.to_string() };
    let mut root: Option<&dyn std::error::Error> = std::error::Error::source(status);
    while let Some(next) = root.and_then(std::error::Error::source) {
        root = Some(next);
    }
    match root {
        Some(cause) => format!("{}: {cause}", status.message()),
        None => status.message().to_string(),
    }
}

/// Where etcd is and how to reach it (the global `--etcd` flags).
#[derive(Debug, Clone)]
pub struct EtcdAccess {
    pub endpoints: Vec<String>,
    pub tls: Option<EtcdTls>,
}

/// Runs `request` on a client of the etcd at `etcd`'s endpoints, connecting included, within 6 s; a
/// clear error when etcd cannot be reached.
async fn with_etcd<T, Request, Answer>(etcd: &EtcdAccess, request: Request) -> Result<T, CliError>
where
    Request: FnOnce(etcd_client::Client) -> Answer,
    Answer: Future<Output = Result<T, etcd_client::Error>>,
{
    let endpoints = &etcd.endpoints;
    let unreachable = |e: &dyn std::fmt::Display| {
        CliError::unreachable(format!(
            "cannot reach etcd at {}: {e}. Is it running? (`tandem up` starts one; --etcd or \
             TANDEM_ETCD_ENDPOINTS names another)",
            endpoints.join(",")
        ))
    };
    let work = async {
        let client = tandem_sidecar::discovery::etcd_client(endpoints, etcd.tls.as_ref())
            .await
            .map_err(|e| unreachable(&describe(&e)))?;
        request(client).await.map_err(|e| unreachable(&describe(&e)))
    };
    tokio::time::timeout(Duration::from_secs(6), work).await.map_err(|_| unreachable(&"no answer within 6 s"))?
}

/// Deletes `app_id`'s subscription to `topic` of `pubsub` in `namespace`; whether it was there.
pub async fn remove_subscription(
    etcd: &EtcdAccess,
    namespace: &str,
    pubsub: &str,
    topic: &str,
    app_id: &str,
) -> Result<bool, CliError> {
    let key = keys::subscription_key(namespace, pubsub, topic, app_id);
    let response = with_etcd(etcd, |mut client| async move { client.delete(key, None).await }).await?;
    Ok(response.deleted() > 0)
}

/// One namespace's discovery data, read at one moment.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Registry {
    pub namespace: String,
    /// Every known app-id (also those without a live instance) and its live instances, sorted
    /// by instance id.
    pub apps: BTreeMap<String, Vec<InstanceRecord>>,
    /// `(pubsub, topic)` -> its subscribers, as recorded (an unreadable record: the app-id from
    /// its key and nothing else).
    #[serde(skip)]
    pub subscriptions: BTreeMap<(String, String), Vec<Subscriber>>,
}

impl Registry {
    /// Reads the namespace from etcd; a clear error when etcd cannot be reached.
    pub async fn load(etcd: &EtcdAccess, namespace: &str) -> Result<Registry, CliError> {
        // Only discovery's subtrees: state stores share the namespace and may hold huge values.
        let prefixes = keys::discovery_prefixes(namespace);
        let responses = with_etcd(etcd, |mut client| async move {
            let mut responses = Vec::new();
            for prefix in prefixes {
                responses.push(client.get(prefix, Some(GetOptions::new().with_prefix())).await?);
            }
            Ok(responses)
        })
        .await?;
        let mut registry = Registry { namespace: namespace.to_string(), ..Default::default() };
        for kv in responses.iter().flat_map(|response| response.kvs()) {
            let Ok(key) = std::str::from_utf8(kv.key()) else { continue };
            registry.add(key, kv.value());
        }
        for instances in registry.apps.values_mut() {
            instances.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        }
        Ok(registry)
    }

    /// Files one key-value pair; keys discovery does not own and unreadable records are skipped
    /// (the sidecars skip them too).
    fn add(&mut self, key: &str, value: &[u8]) {
        match keys::parse(&self.namespace, key) {
            Some(DiscoveryKey::App { app_id }) => {
                self.apps.entry(app_id.to_string()).or_default();
            }
            Some(DiscoveryKey::Instance { app_id, instance_id }) => {
                if let Ok(record) = serde_json::from_slice::<InstanceRecord>(value)
                    && record.app_id == app_id
                    && record.instance_id == instance_id
                {
                    self.apps.entry(app_id.to_string()).or_default().push(record);
                }
            }
            Some(DiscoveryKey::Subscription { pubsub, topic, app_id }) => {
                let subscriber = serde_json::from_slice::<Subscriber>(value)
                    .ok()
                    .filter(|s| s.app_id == app_id)
                    .unwrap_or_else(|| Subscriber { app_id: app_id.to_string(), ..Default::default() });
                self.subscriptions.entry((pubsub.to_string(), topic)).or_default().push(subscriber);
            }
            None => {}
        }
    }

    /// The live instances of `app_id`, or a NotFound error listing the known app-ids.
    pub fn instances(&self, app_id: &str) -> Result<&[InstanceRecord], CliError> {
        self.apps.get(app_id).map(Vec::as_slice).ok_or_else(|| self.unknown_app(app_id))
    }

    fn unknown_app(&self, app_id: &str) -> CliError {
        let known = if self.apps.is_empty() {
            "no app is registered there".to_string()
        } else {
            format!("known apps: {}", self.apps.keys().cloned().collect::<Vec<_>>().join(", "))
        };
        CliError::not_found(format!("unknown app '{app_id}' in namespace '{}' ({known})", self.namespace))
    }

    /// Checks that `app_id`'s subscription to `topic` of `pubsub` may be removed: it exists
    /// (else NotFound, naming the app's subscriptions), and the app has no live instance, whose
    /// sidecar would record it again (else a usage error), unless `force`.
    pub fn check_unsubscribe(&self, pubsub: &str, topic: &str, app_id: &str, force: bool) -> Result<(), CliError> {
        let subscribed = self
            .subscriptions
            .get(&(pubsub.to_string(), topic.to_string()))
            .is_some_and(|subscribers| subscribers.iter().any(|s| s.app_id == app_id));
        if !subscribed {
            let of_app: Vec<String> = self
                .subscriptions
                .iter()
                .filter(|(_, subscribers)| subscribers.iter().any(|s| s.app_id == app_id))
                .map(|((pubsub, topic), _)| format!("{pubsub}/{topic}"))
                .collect();
            let known = match of_app.is_empty() {
                true => "it has none".to_string(),
                false => format!("its subscriptions: {}", of_app.join(", ")),
            };
            return Err(CliError::not_found(format!(
                "app '{app_id}' has no subscription to topic '{topic}' of pub/sub '{pubsub}' in namespace '{}' ({known})",
                self.namespace
            )));
        }
        let live = self.apps.get(app_id).map_or(0, Vec::len);
        if live > 0 && !force {
            return Err(CliError::usage(format!(
                "app '{app_id}' has {live} live instance(s): its sidecar records the subscription again when the \
                 app restarts or opens a stream for the topic. Stop the app first (the subscription is for an \
                 app that is gone for good), or pass --force"
            )));
        }
        Ok(())
    }

    /// The API address of a sidecar of `app_id` itself: the instance named `instance`, or the
    /// first one.
    pub fn sidecar_of(&self, app_id: &str, instance: Option<&str>) -> Result<(String, &InstanceRecord), CliError> {
        let instances = self.instances(app_id)?;
        let record = match instance {
            Some(wanted) => instances.iter().find(|r| r.instance_id == wanted).ok_or_else(|| {
                let ids: Vec<&str> = instances.iter().map(|r| r.instance_id.as_str()).collect();
                CliError::not_found(format!(
                    "app '{app_id}' has no live instance '{wanted}' (its instances: {})",
                    if ids.is_empty() { "none".to_string() } else { ids.join(", ") }
                ))
            })?,
            None => instances.first().ok_or_else(|| {
                CliError::unreachable(format!(
                    "app '{app_id}' is known in namespace '{}' but has no live instance",
                    self.namespace
                ))
            })?,
        };
        let address = record.api_address.clone().ok_or_else(|| {
            CliError::unreachable(format!(
                "instance {} of app '{app_id}' does not record its sidecar's API address (a tandemd \
                 older than this CLI); pass --sidecar http://HOST:PORT",
                record.instance_id
            ))
        })?;
        Ok((address, record))
    }

    /// The API address of some live sidecar: one of `preferred`'s when it has one, else the
    /// first of any app (by app-id, then instance id); `None` when no sidecar records one.
    pub fn any_sidecar(&self, preferred: Option<&str>) -> Option<(String, &InstanceRecord)> {
        fn with_address(records: &[InstanceRecord]) -> Option<(String, &InstanceRecord)> {
            records.iter().find_map(|r| r.api_address.clone().map(|address| (address, r)))
        }
        let own = preferred.and_then(|app| self.apps.get(app)).and_then(|records| with_address(records));
        own.or_else(|| self.apps.values().find_map(|records| with_address(records)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(app: &str, id: &str, api: Option<&str>) -> Vec<u8> {
        serde_json::to_vec(&InstanceRecord {
            app_id: app.into(),
            instance_id: id.into(),
            internal_address: "127.0.0.1:2".into(),
            has_app: true,
            runtime_version: "tandem-test".into(),
            api_address: api.map(String::from),
        })
        .unwrap()
    }

    fn registry() -> Registry {
        let mut r = Registry { namespace: "ns".into(), ..Default::default() };
        r.add(&keys::app_key("ns", "serve"), b"{}");
        r.add(&keys::instance_key("ns", "serve", "s1"), &record("serve", "s1", Some("127.0.0.1:7")));
        r.add(&keys::app_key("ns", "old"), b"{}");
        r.add(&keys::instance_key("ns", "old", "o1"), &record("old", "o1", None));
        r.add(&keys::app_key("ns", "gone"), b"{}");
        r.add(&keys::instance_key("ns", "serve", "x"), &record("other", "x", Some("127.0.0.1:9")));
        r.add(&keys::subscription_key("ns", "pubsub", "model.ready", "serve"), b"{}");
        r.add("/tandem/v1/other/apps/elsewhere", b"{}");
        r
    }

    #[test]
    fn apps_instances_and_subscriptions_are_read_from_their_keys() {
        let r = registry();
        assert_eq!(r.apps.keys().collect::<Vec<_>>(), ["gone", "old", "serve"]);
        assert_eq!(r.instances("serve").unwrap().len(), 1, "a record under another app's key is skipped");
        assert!(r.instances("gone").unwrap().is_empty());
        let subscribers = &r.subscriptions[&("pubsub".to_string(), "model.ready".to_string())];
        assert_eq!(subscribers.iter().map(|s| s.app_id.as_str()).collect::<Vec<_>>(), ["serve"]);
    }

    #[test]
    fn only_an_existing_subscription_of_an_app_without_live_instances_is_removed_unforced() {
        let mut r = registry();
        r.add(&keys::subscription_key("ns", "pubsub", "model.ready", "gone"), b"{}");
        assert!(r.check_unsubscribe("pubsub", "model.ready", "gone", false).is_ok());
        let e = r.check_unsubscribe("pubsub", "model.ready", "serve", false).unwrap_err();
        assert_eq!(e.kind, crate::ExitKind::Usage);
        assert!(e.message.contains("1 live instance(s)") && e.message.contains("--force"), "{}", e.message);
        assert!(r.check_unsubscribe("pubsub", "model.ready", "serve", true).is_ok());
        let e = r.check_unsubscribe("pubsub", "other", "serve", true).unwrap_err();
        assert_eq!(e.kind, crate::ExitKind::NotFound);
        assert_eq!(
            e.message,
            "app 'serve' has no subscription to topic 'other' of pub/sub 'pubsub' in namespace 'ns' (its \
             subscriptions: pubsub/model.ready)"
        );
        let e = r.check_unsubscribe("events", "model.ready", "old", false).unwrap_err();
        assert!(e.message.ends_with("(it has none)"), "{}", e.message);
    }

    #[test]
    fn an_unknown_app_is_named_with_the_known_ones() {
        let e = registry().instances("nope").unwrap_err();
        assert_eq!(e.kind, crate::ExitKind::NotFound);
        assert_eq!(e.message, "unknown app 'nope' in namespace 'ns' (known apps: gone, old, serve)");
    }

    #[test]
    fn the_sidecar_of_an_app_comes_from_its_record() {
        let r = registry();
        assert_eq!(r.sidecar_of("serve", None).unwrap().0, "127.0.0.1:7");
        assert_eq!(r.sidecar_of("serve", Some("s1")).unwrap().0, "127.0.0.1:7");
        assert_eq!(r.sidecar_of("serve", Some("zz")).unwrap_err().kind, crate::ExitKind::NotFound);
        let e = r.sidecar_of("gone", None).unwrap_err();
        assert_eq!(e.kind, crate::ExitKind::Unreachable);
        assert!(e.message.contains("no live instance"), "{}", e.message);
        let e = r.sidecar_of("old", None).unwrap_err();
        assert!(e.message.contains("--sidecar"), "{}", e.message);
    }

    #[test]
    fn any_sidecar_prefers_the_named_app_and_skips_records_without_an_address() {
        let r = registry();
        assert_eq!(r.any_sidecar(Some("serve")).unwrap().0, "127.0.0.1:7");
        assert_eq!(r.any_sidecar(Some("old")).unwrap().0, "127.0.0.1:7");
        assert_eq!(r.any_sidecar(None).unwrap().0, "127.0.0.1:7");
        assert!(Registry::default().any_sidecar(None).is_none());
    }
}
