//! Declarative subscriptions: Dapr's `kind: Subscription` resources in `--resources-path`, in
//! both of Dapr's forms (`dapr.io/v2alpha1` with `routes`, and `dapr.io/v1alpha1` with one
//! `route`; an unknown version reads as v1alpha1, as in Dapr). A subscription whose `scopes`
//! list app-ids applies only to those apps. They join the subscriptions the app lists itself
//! (which win for a topic both name).
//!
//! ```yaml
//! apiVersion: dapr.io/v2alpha1
//! kind: Subscription
//! metadata: {name: orders}
//! spec:
//!   pubsubname: pubsub
//!   topic: orders
//!   routes: {default: /orders}
//!   deadLetterTopic: orders-dead   # optional
//! scopes: [shop]                   # optional
//! ```

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;
use tandem_proto::runtime::{TopicRoutes, TopicRule, TopicSubscription};

use crate::components::{documents, resource_files};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    metadata: Option<Named>,
    spec: Option<Spec>,
    #[serde(default)]
    scopes: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Named {
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    pubsubname: Option<String>,
    topic: Option<String>,
    #[serde(default)]
    route: Option<String>,
    #[serde(default)]
    routes: Option<Routes>,
    #[serde(default)]
    dead_letter_topic: Option<String>,
    #[serde(default)]
    metadata: HashMap<String, Value>,
}

#[derive(Debug, Default, Deserialize)]
struct Routes {
    #[serde(default)]
    rules: Vec<Rule>,
    #[serde(default)]
    default: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Rule {
    #[serde(default, rename = "match")]
    matches: String,
    path: String,
}

/// The declared subscriptions under `dir` that apply to `app_id`; malformed ones stop tandemd
/// at start, naming the file, the document and the field.
pub fn load_dir(dir: &Path, app_id: &str) -> Result<Vec<TopicSubscription>, String> {
    let mut subscriptions = Vec::new();
    for (file, text) in resource_files(dir)? {
        subscriptions.extend(parse(&text, &file, app_id)?);
    }
    Ok(subscriptions)
}

/// The subscriptions of one file that apply to `app_id`.
pub fn parse(text: &str, file: &Path, app_id: &str) -> Result<Vec<TopicSubscription>, String> {
    let mut subscriptions = Vec::new();
    for (index, document) in documents(text, file)?.into_iter().enumerate() {
        let Some(document) = document else { continue };
        if document.get("kind").and_then(Value::as_str) != Some("Subscription") {
            continue;
        }
        let at = |field: &str, what: &str| format!("{}: document {}: {field} {what}", file.display(), index + 1);
        let document: Document =
            serde_json::from_value(document).map_err(|e| at("the subscription", &format!("is malformed: {e}")))?;
        let name = document.metadata.and_then(|m| m.name).unwrap_or_default();
        if !document.scopes.is_empty() && !document.scopes.iter().any(|scope| scope == app_id) {
            continue;
        }
        let spec = document.spec.ok_or_else(|| at("spec", "is missing"))?;
        let pubsub_name =
            spec.pubsubname.filter(|p| !p.is_empty()).ok_or_else(|| at("spec.pubsubname", "is missing"))?;
        let topic = spec.topic.filter(|t| !t.is_empty()).ok_or_else(|| at("spec.topic", "is missing"))?;
        let routes = spec.routes.unwrap_or_default();
        let v2 = document.api_version == "dapr.io/v2alpha1";
        let default = if v2 { routes.default.clone() } else { spec.route.clone() }
            .or(spec.route)
            .or(routes.default)
            .unwrap_or_default();
        if default.is_empty() && routes.rules.is_empty() {
            return Err(at(
                "spec",
                &format!("of subscription '{name}' has no route (spec.routes.default or spec.route)"),
            ));
        }
        let metadata = metadata_strings(spec.metadata);
        subscriptions.push(TopicSubscription {
            pubsub_name,
            topic,
            metadata,
            routes: Some(TopicRoutes {
                rules: routes.rules.into_iter().map(|r| TopicRule { r#match: r.matches, path: r.path }).collect(),
                default,
            }),
            dead_letter_topic: spec.dead_letter_topic.unwrap_or_default(),
        });
    }
    Ok(subscriptions)
}

/// A subscription's metadata as Dapr passes it on: strings as they are, other values as JSON.
pub fn metadata_strings(metadata: HashMap<String, Value>) -> HashMap<String, String> {
    metadata
        .into_iter()
        .map(|(key, value)| match value {
            Value::String(text) => (key, text),
            other => (key, other.to_string()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "apiVersion: dapr.io/v2alpha1
kind: Subscription
metadata:
  name: orders
spec:
  pubsubname: pubsub
  topic: orders
  routes:
    default: /orders
  deadLetterTopic: orders-dead
  metadata:
    rawPayload: \"false\"
scopes: [shop]
---
apiVersion: dapr.io/v1alpha1
kind: Subscription
metadata:
  name: legacy
spec:
  pubsubname: pubsub
  topic: legacy
  route: /legacy
---
apiVersion: dapr.io/v1alpha1
kind: Component
metadata:
  name: statestore
spec:
  type: state.sled
";

    #[test]
    fn both_forms_are_read_and_scopes_apply() {
        let for_shop = parse(FILE, Path::new("subs.yaml"), "shop").unwrap();
        assert_eq!(for_shop.len(), 2);
        assert_eq!(for_shop[0].routes.as_ref().unwrap().default, "/orders");
        assert_eq!(for_shop[0].dead_letter_topic, "orders-dead");
        assert_eq!(for_shop[0].metadata["rawPayload"], "false");
        assert_eq!(
            (for_shop[1].topic.as_str(), for_shop[1].routes.as_ref().unwrap().default.as_str()),
            ("legacy", "/legacy")
        );
        let for_other = parse(FILE, Path::new("subs.yaml"), "billing").unwrap();
        assert_eq!(for_other.len(), 1, "the scoped one is not billing's");
    }

    #[test]
    fn malformed_subscriptions_name_the_file_and_field() {
        let cases = [
            (
                "kind: Subscription\napiVersion: dapr.io/v2alpha1\nspec:\n  topic: t\n  routes: {default: /t}\n",
                "spec.pubsubname is missing",
            ),
            (
                "kind: Subscription\napiVersion: dapr.io/v2alpha1\nspec:\n  pubsubname: p\n  routes: {default: /t}\n",
                "spec.topic is missing",
            ),
            (
                "kind: Subscription\napiVersion: dapr.io/v2alpha1\nmetadata: {name: s}\nspec:\n  pubsubname: p\n  topic: t\n",
                "has no route",
            ),
            ("kind: Subscription\napiVersion: dapr.io/v2alpha1\nspec: [1]\n", "is malformed"),
        ];
        for (text, expected) in cases {
            let err = parse(text, Path::new("subs.yaml"), "a").unwrap_err();
            assert!(err.starts_with("subs.yaml: document 1: ") && err.contains(expected), "{expected}: {err}");
        }
    }
}
