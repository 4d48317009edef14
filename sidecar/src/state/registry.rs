//! The one place where a component's type string becomes a state store, and where a store's
//! name and key prefix are attached to it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::StateStore;
use super::etcd::EtcdStore;
use super::sled::SledStore;
use crate::components::ComponentSpec;
use crate::discovery::EtcdTls;
use crate::disk::DiskSpace;

/// The state store types tandemd can build.
pub const KINDS: &[&str] = &["state.sled", "state.etcd"];

/// The name of the store that exists when no component declares one.
pub const DEFAULT_STORE: &str = "statestore";

/// How often expired keys of embedded stores are purged.
const PURGE_EVERY: Duration = Duration::from_secs(30);

/// How app keys become store keys (Dapr's `keyPrefix` metadata).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPrefix {
    /// `{app-id}||{key}`, Dapr's default: each app sees only its own keys.
    AppId(String),
    /// `{store name}||{key}`: every app using the store shares its keys.
    Name(String),
    /// The key as given.
    None,
    /// `{prefix}||{key}` for any other value.
    Custom(String),
}

impl KeyPrefix {
    pub fn from_metadata(value: Option<&str>, app_id: &str, store: &str) -> Result<KeyPrefix, String> {
        Ok(match value.map(str::trim) {
            None | Some("") | Some("appid") => KeyPrefix::AppId(app_id.to_string()),
            Some("name") => KeyPrefix::Name(store.to_string()),
            Some("none") => KeyPrefix::None,
            Some(custom) if custom.contains("||") => return Err(format!("keyPrefix '{custom}' may not contain '||'")),
            // `@` starts the keys tandemd keeps for itself (the outbox's records).
            Some(custom) if custom.starts_with('@') => {
                return Err(format!("keyPrefix '{custom}' may not start with '@' (reserved for tandemd's own keys)"));
            }
            Some(custom) => KeyPrefix::Custom(custom.to_string()),
        })
    }

    pub fn apply(&self, key: &str) -> String {
        match self {
            KeyPrefix::AppId(prefix) | KeyPrefix::Name(prefix) | KeyPrefix::Custom(prefix) => {
                format!("{prefix}||{key}")
            }
            KeyPrefix::None => key.to_string(),
        }
    }
}

/// A store as the API sees it.
#[derive(Clone)]
pub struct NamedStore {
    pub name: String,
    pub kind: &'static str,
    pub key_prefix: KeyPrefix,
    pub store: Arc<dyn StateStore>,
    /// Where its transactions publish their writes (Dapr's transactional outbox), if anywhere.
    pub outbox: Option<OutboxSettings>,
}

/// A store's transactional outbox, from Dapr's component metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxSettings {
    /// `outboxPublishPubsub`: the pub/sub the events go to.
    pub pubsub: String,
    /// `outboxPublishTopic`.
    pub topic: String,
}

impl OutboxSettings {
    /// The outbox a state component asks for: both `outboxPublishPubsub` and
    /// `outboxPublishTopic`, or neither. Dapr's `outboxPubsub` (the pub/sub for its internal
    /// topic) and `outboxDiscardWhenMissingState` are accepted and have nothing to do here: the
    /// events wait in the store itself, written with the transaction.
    pub fn from_metadata(spec: &ComponentSpec) -> Result<Option<OutboxSettings>, String> {
        let value = |name: &str| spec.metadata(name).map(str::trim).filter(|v| !v.is_empty());
        match (value("outboxPublishPubsub"), value("outboxPublishTopic")) {
            (Some(pubsub), Some(topic)) => {
                Ok(Some(OutboxSettings { pubsub: pubsub.to_string(), topic: topic.to_string() }))
            }
            (None, None) => Ok(None),
            (Some(_), None) => Err("metadata 'outboxPublishPubsub' is set without 'outboxPublishTopic'".into()),
            (None, Some(_)) => Err("metadata 'outboxPublishTopic' is set without 'outboxPublishPubsub'".into()),
        }
    }
}

/// What stores need from the sidecar's own settings.
#[derive(Debug, Clone)]
pub struct StoreContext<'a> {
    pub app_id: &'a str,
    pub namespace: &'a str,
    pub data_dir: &'a Path,
    pub etcd_endpoints: &'a [String],
    /// TLS to etcd, for `state.etcd` stores.
    pub etcd_tls: Option<&'a EtcdTls>,
    /// The data dir's free space (state.sled writes there).
    pub disk: &'a Arc<DiskSpace>,
}

/// Builds every state component in `specs` (other building blocks are skipped); with none,
/// the default sled store. Errors name the component's file and what is wrong.
pub async fn build_all(
    specs: &[ComponentSpec],
    ctx: &StoreContext<'_>,
) -> Result<BTreeMap<String, NamedStore>, String> {
    let mut stores = BTreeMap::new();
    for spec in specs.iter().filter(|s| s.block() == "state") {
        let store =
            build(spec, ctx).await.map_err(|e| format!("{}: component '{}': {e}", spec.file.display(), spec.name))?;
        stores.insert(spec.name.clone(), store);
    }
    if stores.is_empty() {
        let path = ctx.data_dir.join("state").join(DEFAULT_STORE);
        let store = open_sled(&path, ctx.disk)?;
        stores.insert(
            DEFAULT_STORE.to_string(),
            NamedStore {
                name: DEFAULT_STORE.into(),
                kind: "state.sled",
                key_prefix: KeyPrefix::AppId(ctx.app_id.to_string()),
                store,
                outbox: None,
            },
        );
    }
    Ok(stores)
}

async fn build(spec: &ComponentSpec, ctx: &StoreContext<'_>) -> Result<NamedStore, String> {
    let key_prefix = KeyPrefix::from_metadata(spec.metadata("keyPrefix"), ctx.app_id, &spec.name)?;
    let outbox = OutboxSettings::from_metadata(spec)?;
    let (kind, store): (&'static str, Arc<dyn StateStore>) = match spec.kind.as_str() {
        "state.sled" => {
            let path = match spec.metadata("path") {
                Some(path) if !path.is_empty() => Path::new(path).to_path_buf(),
                _ => ctx.data_dir.join("state").join(&spec.name),
            };
            ("state.sled", open_sled(&path, ctx.disk)?)
        }
        "state.etcd" => {
            let endpoints: Vec<String> = match spec.metadata("endpoints") {
                Some(list) if !list.trim().is_empty() => list.split(',').map(|e| e.trim().to_string()).collect(),
                _ => ctx.etcd_endpoints.to_vec(),
            };
            let client = crate::discovery::etcd_client(&endpoints, ctx.etcd_tls)
                .await
                .map_err(|e| format!("metadata 'endpoints' {endpoints:?}: {e}"))?;
            let prefix = format!("/tandem/v1/{}/state/{}/", ctx.namespace, spec.name);
            ("state.etcd", Arc::new(EtcdStore::new(client, prefix)))
        }
        other => {
            return Err(format!(
                "spec.type '{other}' is not a state store tandemd knows (known: {})",
                KINDS.join(", ")
            ));
        }
    };
    Ok(NamedStore { name: spec.name.clone(), kind, key_prefix, store, outbox })
}

fn open_sled(path: &Path, disk: &Arc<DiskSpace>) -> Result<Arc<dyn StateStore>, String> {
    let store = SledStore::open(path).map_err(|e| e.to_string())?.with_disk(disk.clone());
    store.spawn_purger(PURGE_EVERY);
    Ok(Arc::new(store))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_prefixes_follow_dapr() {
        let p = |v: Option<&str>| KeyPrefix::from_metadata(v, "app", "store").unwrap();
        assert_eq!(p(None).apply("k"), "app||k");
        assert_eq!(p(Some("appid")).apply("k"), "app||k");
        assert_eq!(p(Some("name")).apply("k"), "store||k");
        assert_eq!(p(Some("none")).apply("k"), "k");
        assert_eq!(p(Some("team")).apply("k"), "team||k");
        assert!(KeyPrefix::from_metadata(Some("a||b"), "app", "s").unwrap_err().contains("'a||b'"));
    }

    #[test]
    fn an_outbox_needs_its_pubsub_and_its_topic() {
        let spec = |pairs: &[(&str, &str)]| ComponentSpec {
            name: "orders".into(),
            kind: "state.sled".into(),
            version: "v1".into(),
            metadata: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            file: "orders.yaml".into(),
        };
        assert_eq!(OutboxSettings::from_metadata(&spec(&[])).unwrap(), None);
        assert_eq!(
            OutboxSettings::from_metadata(&spec(&[("outboxPublishPubsub", "pubsub"), ("outboxPublishTopic", "new")]))
                .unwrap(),
            Some(OutboxSettings { pubsub: "pubsub".into(), topic: "new".into() })
        );
        let half = OutboxSettings::from_metadata(&spec(&[("outboxPublishPubsub", "pubsub")])).unwrap_err();
        assert!(half.contains("without 'outboxPublishTopic'"), "{half}");
    }
}
