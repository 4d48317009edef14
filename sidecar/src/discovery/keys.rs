//! etcd key layout of discovery. One place, so the registrar, the watcher and the CLI agree.

const ROOT: &str = "/tandem/v1";

/// Everything Tandem keeps for one namespace: discovery's keys, and also state stores'
/// (`state/`) and training groups' (`groups/`), which discovery must not read.
pub fn namespace_prefix(namespace: &str) -> String {
    format!("{ROOT}/{namespace}/")
}

/// The three subtrees discovery owns (apps, instances, subscriptions): what the watcher lists
/// and watches. Not the whole namespace: a state store there can hold values of many MiB
/// (train's model registry) that every sidecar would otherwise read at start and on each write.
pub fn discovery_prefixes(namespace: &str) -> [String; 3] {
    ["apps", "instances", "subscriptions"].map(|tree| format!("{ROOT}/{namespace}/{tree}/"))
}

/// Marks an app-id as known in the namespace; written without a lease.
pub fn app_key(namespace: &str, app_id: &str) -> String {
    format!("{ROOT}/{namespace}/apps/{app_id}")
}

/// One live instance, under its lease.
pub fn instance_key(namespace: &str, app_id: &str, instance_id: &str) -> String {
    format!("{}{instance_id}", instances_prefix(namespace, app_id))
}

/// Every live instance of one app (the prefix of its [`instance_key`]s).
pub fn instances_prefix(namespace: &str, app_id: &str) -> String {
    format!("{ROOT}/{namespace}/instances/{app_id}/")
}

/// An app-id's subscription to a topic; written without a lease, so events keep being
/// kept for a subscriber while all its instances are down.
pub fn subscription_key(namespace: &str, pubsub: &str, topic: &str, app_id: &str) -> String {
    format!("{ROOT}/{namespace}/subscriptions/{pubsub}/{}/{app_id}", encode_segment(topic))
}

/// Topics may contain '/', which would break the key's segments: '%' and '/' are escaped.
fn encode_segment(text: &str) -> String {
    text.replace('%', "%25").replace('/', "%2F")
}

fn decode_segment(text: &str) -> String {
    text.replace("%2F", "/").replace("%25", "%")
}

/// What a key under the namespace prefix stands for.
#[derive(Debug, PartialEq, Eq)]
pub enum DiscoveryKey<'a> {
    App { app_id: &'a str },
    Instance { app_id: &'a str, instance_id: &'a str },
    Subscription { pubsub: &'a str, topic: String, app_id: &'a str },
}

/// Parses a key under [`namespace_prefix`]; `None` for keys discovery does not own.
pub fn parse<'a>(namespace: &str, key: &'a str) -> Option<DiscoveryKey<'a>> {
    let prefix = namespace_prefix(namespace);
    let rest = key.strip_prefix(prefix.as_str())?;
    let mut parts = rest.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("apps"), Some(app_id), None, None) if !app_id.is_empty() => Some(DiscoveryKey::App { app_id }),
        (Some("instances"), Some(app_id), Some(instance_id), None) if !app_id.is_empty() && !instance_id.is_empty() => {
            Some(DiscoveryKey::Instance { app_id, instance_id })
        }
        (Some("subscriptions"), Some(pubsub), Some(topic), Some(app_id))
            if parts.next().is_none() && !pubsub.is_empty() && !topic.is_empty() && !app_id.is_empty() =>
        {
            Some(DiscoveryKey::Subscription { pubsub, topic: decode_segment(topic), app_id })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_reads_only_its_own_subtrees() {
        let prefixes = discovery_prefixes("ns");
        for key in [app_key("ns", "svc"), instance_key("ns", "svc", "i"), subscription_key("ns", "p", "t", "svc")] {
            assert_eq!(prefixes.iter().filter(|p| key.starts_with(p.as_str())).count(), 1, "{key}");
        }
        for foreign in ["/tandem/v1/ns/state/store/train||model/v1", "/tandem/v1/ns/groups/train/members/m"] {
            assert!(prefixes.iter().all(|p| !foreign.starts_with(p.as_str())), "{foreign}");
        }
    }

    #[test]
    fn keys_round_trip_through_parse() {
        let k = instance_key("ns", "svc", "i-1");
        assert_eq!(parse("ns", &k), Some(DiscoveryKey::Instance { app_id: "svc", instance_id: "i-1" }));
        let k = app_key("ns", "svc");
        assert_eq!(parse("ns", &k), Some(DiscoveryKey::App { app_id: "svc" }));
    }

    #[test]
    fn subscription_keys_round_trip_even_with_slashes_in_topics() {
        for topic in ["orders", "orders/created", "50%/off", "%2F"] {
            let k = subscription_key("ns", "pubsub", topic, "svc");
            assert_eq!(
                parse("ns", &k),
                Some(DiscoveryKey::Subscription { pubsub: "pubsub", topic: topic.to_string(), app_id: "svc" })
            );
        }
        assert_eq!(parse("ns", "/tandem/v1/ns/subscriptions/p/t/a/extra"), None);
    }

    #[test]
    fn foreign_keys_are_ignored() {
        assert_eq!(parse("ns", "/tandem/v1/other/apps/svc"), None);
        assert_eq!(parse("ns", "/tandem/v1/ns/apps/"), None);
        assert_eq!(parse("ns", "/tandem/v1/ns/instances/svc"), None);
        assert_eq!(parse("ns", "/tandem/v1/ns/instances/svc/i/extra"), None);
        assert_eq!(parse("ns", "/tandem/v1/ns/state/x"), None);
    }
}
