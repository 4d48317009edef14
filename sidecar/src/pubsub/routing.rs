//! Dapr's routing rules: a subscription's `routes.rules` each name a `path` and a `match`
//! expression in CEL over the event (`event.type == "widget"`, `event.data.price > 100`); an
//! event goes to the path of the first rule that matches (a rule without `match` matches every
//! event), else to `routes.default`.
//!
//! The subscriber's sidecar evaluates them when it hands an event to its app (both for events
//! delivered to it and for events it consumes itself), since only it knows its app's rules;
//! the route recorded in etcd for publishers is the one an event takes when no rule matches.
//! In an expression, `event` is the CloudEvent as Dapr gives it to CEL: `id`, `source`, `type`,
//! `specversion`, `datacontenttype`, `topic`, `pubsubname`, the extensions (`time`,
//! `traceid`, `subject`, ...) and `data`, parsed when it is JSON, else text (binary data is
//! `data_base64`), as an HTTP app receives it.
//!
//! Unlike Dapr, an expression that fails to evaluate for an event (it reads a field the event
//! lacks, compares a string with a number) does not match that event, instead of failing its
//! delivery; it is logged.

use std::sync::Arc;

use cel_interpreter::objects::{Key, Map};
use cel_interpreter::{Context, Program, Value};
use tandem_proto::runtime::{TopicEventRequest, TopicSubscription};

/// One rule: its expression (compiled) and where its events go.
struct Rule {
    expression: String,
    /// `None`: no `match`, the rule takes every event.
    program: Option<Program>,
    path: String,
}

/// The routing rules of one subscription.
pub struct Rules {
    rules: Vec<Rule>,
    default: String,
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rules: Vec<(&str, &str)> = self.rules.iter().map(|r| (r.expression.as_str(), r.path.as_str())).collect();
        f.debug_struct("Rules").field("rules", &rules).field("default", &self.default).finish()
    }
}

impl Rules {
    /// The rules of `subscription` when it has any with a `match` (none else: its events take
    /// the recorded route). A rule whose expression is not CEL is left out and reported in the
    /// errors, naming the subscription and the expression.
    pub fn of(subscription: &TopicSubscription) -> (Option<Arc<Rules>>, Vec<String>) {
        let Some(routes) = &subscription.routes else { return (None, Vec::new()) };
        if routes.rules.iter().all(|rule| rule.r#match.trim().is_empty()) {
            return (None, Vec::new());
        }
        let mut errors = Vec::new();
        let mut rules = Vec::new();
        for rule in &routes.rules {
            let expression = rule.r#match.trim().to_string();
            let program = if expression.is_empty() {
                None
            } else {
                match compile(&expression) {
                    Ok(program) => Some(program),
                    Err(e) => {
                        errors.push(format!(
                            "topic '{}' of '{}': the routing rule match '{expression}' (path '{}') is not a valid CEL \
                             expression and is ignored: {e}",
                            subscription.topic, subscription.pubsub_name, rule.path
                        ));
                        continue;
                    }
                }
            };
            rules.push(Rule { expression, program, path: rule.path.clone() });
        }
        (Some(Arc::new(Rules { rules, default: routes.default.clone() })), errors)
    }

    /// The path `event` takes: the first rule that matches, else the default.
    pub fn route(&self, event: &TopicEventRequest) -> &str {
        let mut context: Option<Context> = None;
        for rule in &self.rules {
            let Some(program) = &rule.program else { return &rule.path };
            let context = context.get_or_insert_with(|| {
                let mut context = Context::default();
                context.add_variable_from_value("event", event_value(event));
                context
            });
            match execute(program, context) {
                Ok(Value::Bool(true)) => return &rule.path,
                Ok(Value::Bool(false)) => {}
                Ok(other) => tracing::warn!(
                    topic = %event.topic, rule_match = %rule.expression,
                    "a routing rule's match gave {other:?}, not a bool; it does not match"
                ),
                Err(e) => tracing::debug!(
                    topic = %event.topic, rule_match = %rule.expression, event_id = %event.id,
                    "a routing rule's match could not be evaluated for the event ({e}); it does not match"
                ),
            }
        }
        &self.default
    }
}

/// `expression` compiled. The parser panics on some malformed input instead of answering an
/// error: that is an error here too, never a crash of the sidecar.
fn compile(expression: &str) -> Result<Program, String> {
    match std::panic::catch_unwind(|| Program::compile(expression)) {
        Ok(compiled) => compiled.map_err(|e| e.to_string()),
        Err(_) => Err("the CEL parser could not read it".into()),
    }
}

/// `program` run over `context`, a panic of the interpreter taken as an error.
fn execute(program: &Program, context: &Context) -> Result<Value, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| program.execute(context))) {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err("the CEL interpreter failed on it".into()),
    }
}

/// The CloudEvent as a CEL map: the JSON an HTTP app is POSTed, which is what Dapr evaluates.
fn event_value(event: &TopicEventRequest) -> Value {
    json_value(&crate::app_channel::http::cloud_event(event))
}

/// JSON as CEL: whole numbers become `int` (so `event.data.n > 100` compares as written),
/// others `double`.
fn json_value(json: &serde_json::Value) -> Value {
    match json {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::Int(i),
            (None, Some(u)) => Value::UInt(u),
            _ => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::String(Arc::new(s.clone())),
        serde_json::Value::Array(items) => Value::List(Arc::new(items.iter().map(json_value).collect())),
        serde_json::Value::Object(entries) => {
            let map = entries.iter().map(|(k, v)| (Key::from(k.as_str()), json_value(v))).collect();
            Value::Map(Map { map: Arc::new(map) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_proto::prost_types;
    use tandem_proto::runtime::{TopicRoutes, TopicRule};

    fn subscription(rules: &[(&str, &str)], default: &str) -> TopicSubscription {
        TopicSubscription {
            pubsub_name: "pubsub".into(),
            topic: "orders".into(),
            routes: Some(TopicRoutes {
                rules: rules.iter().map(|(m, p)| TopicRule { r#match: m.to_string(), path: p.to_string() }).collect(),
                default: default.into(),
            }),
            ..Default::default()
        }
    }

    fn event(kind: &str, data: &str, content_type: &str) -> TopicEventRequest {
        TopicEventRequest {
            id: "1".into(),
            r#type: kind.into(),
            topic: "orders".into(),
            pubsub_name: "pubsub".into(),
            data: data.as_bytes().to_vec().into(),
            data_content_type: content_type.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_first_matching_rule_takes_the_event_else_the_default() {
        let (rules, errors) = Rules::of(&subscription(
            &[
                (r#"event.type == "widget""#, "/widgets"),
                ("event.data.price > 100 && event.data.tags.exists(t, t == 'rush')", "/rush"),
                ("event.data.price > 100", "/big"),
            ],
            "/orders",
        ));
        assert!(errors.is_empty(), "{errors:?}");
        let rules = rules.unwrap();
        assert_eq!(rules.route(&event("widget", "{}", "application/json")), "/widgets");
        assert_eq!(rules.route(&event("order", r#"{"price":500,"tags":["rush"]}"#, "application/json")), "/rush");
        assert_eq!(rules.route(&event("order", r#"{"price":500,"tags":[]}"#, "application/json")), "/big");
        assert_eq!(rules.route(&event("order", r#"{"price":5}"#, "application/json")), "/orders");
        // A field the event lacks, or data that is not JSON: no match, not a failure.
        assert_eq!(rules.route(&event("order", r#"{"other":1}"#, "application/json")), "/orders");
        assert_eq!(rules.route(&event("order", "price > 100", "text/plain")), "/orders");
    }

    #[test]
    fn a_rule_without_match_takes_every_event_that_reaches_it() {
        let (rules, _) = Rules::of(&subscription(&[(r#"event.source == "shop""#, "/shop"), ("", "/all")], "/d"));
        let rules = rules.unwrap();
        let mut from_shop = event("x", "1", "application/json");
        from_shop.source = "shop".into();
        assert_eq!(rules.route(&from_shop), "/shop");
        assert_eq!(rules.route(&event("x", "1", "application/json")), "/all");
    }

    #[test]
    fn without_match_rules_there_is_nothing_to_evaluate_and_bad_cel_is_reported() {
        assert!(Rules::of(&subscription(&[("", "/all")], "/d")).0.is_none());
        assert!(Rules::of(&TopicSubscription::default()).0.is_none());
        let (rules, errors) = Rules::of(&subscription(&[("event.type ==", "/bad"), ("true", "/ok")], "/d"));
        assert_eq!(errors.len(), 1);
        assert!(errors[0].contains("'event.type =='") && errors[0].contains("'/bad'"), "{errors:?}");
        assert_eq!(rules.unwrap().route(&event("x", "", "")), "/ok");
    }

    #[test]
    fn extensions_are_attributes_of_the_event() {
        let (rules, _) = Rules::of(&subscription(&[(r#"event.region == "eu""#, "/eu")], "/d"));
        let mut eu = event("x", "", "");
        eu.extensions = Some(prost_types::Struct {
            fields: [(
                "region".to_string(),
                prost_types::Value { kind: Some(prost_types::value::Kind::StringValue("eu".into())) },
            )]
            .into(),
        });
        assert_eq!(rules.unwrap().route(&eu), "/eu");
    }
}
