//! An HTTP app, as Dapr calls one (a Flask, FastAPI, Express or ASP.NET app, unchanged):
//!
//! - an invocation is `{VERB} /{method}?{query}` with the caller's headers, content type and
//!   body (POST when the call did not come through the HTTP API); the app's status, headers and
//!   body go back as they are;
//! - subscriptions come from `GET /dapr/subscribe` (Dapr's v1 `route` and v2 `routes` forms;
//!   404 means none);
//! - an event is POSTed to its route as `application/cloudevents+json` (the CloudEvent with
//!   `data`, or `data_base64` for binary data) with a `pubsubname` header; the outcome follows
//!   Dapr's rules: 2xx is SUCCESS unless its JSON body says `{"status": "RETRY"}` or `"DROP"`
//!   (an unknown status retries), 404 drops, anything else retries;
//! - health: `GET` on `--app-health-check-path` with `--enable-app-health-check` (2xx is
//!   healthy), otherwise an app that accepts connections is healthy.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::{Map, Value};
use tandem_proto::common::http_extension::Verb;
use tandem_proto::common::{InvokeRequest, InvokeResponse};
use tandem_proto::prost_types::{Any, Struct, value::Kind};
use tandem_proto::runtime::topic_event_response::TopicEventResponseStatus;
use tandem_proto::runtime::{TopicEventRequest, TopicEventResponse, TopicRoutes, TopicRule, TopicSubscription};
use tonic::metadata::{KeyAndValueRef, MetadataMap};
use tonic::{ConnectError, Request, Status};

use super::AppAnswer;
use crate::invoke::headers;

/// How long a call waits when its caller set no deadline (events have their own).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The CloudEvents content type events are POSTed with.
pub const CLOUD_EVENT_JSON: &str = "application/cloudevents+json";

/// Headers of the app's answer that describe the hop, not the answer: they do not travel back.
const HOP_RESPONSE_HEADERS: &[&str] =
    &["content-type", "content-length", "connection", "keep-alive", "transfer-encoding", "date", "server"];

#[derive(Debug, Clone)]
pub struct HttpApp {
    /// `http://host:port`.
    base: String,
    address: String,
    client: Client<HttpConnector, Full<Bytes>>,
    /// `--app-health-check-path` when `--enable-app-health-check`; else a TCP connect is the probe.
    health_path: Option<String>,
    /// `APP_API_TOKEN`, sent in the `dapr-api-token` header of every request.
    token: Option<hyper::header::HeaderValue>,
}

impl HttpApp {
    pub fn new(host: &str, port: u16, health_path: Option<String>, token: Option<&str>) -> Result<Self, String> {
        let token = token
            .map(|token| {
                let mut value = hyper::header::HeaderValue::from_str(token)
                    .map_err(|_| "APP_API_TOKEN is not valid as a header value".to_string())?;
                value.set_sensitive(true);
                Ok::<_, String>(value)
            })
            .transpose()?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(60)).build(connector);
        let health_path = health_path.map(|path| if path.starts_with('/') { path } else { format!("/{path}") });
        Ok(HttpApp {
            base: format!("http://{host}:{port}"),
            address: format!("{host}:{port}"),
            client,
            health_path,
            token,
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// Sends one request to the app; a refused connection is a status that says "never sent".
    async fn send(
        &self,
        mut request: hyper::Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<(hyper::http::response::Parts, Bytes), Status> {
        if let Some(token) = &self.token {
            request.headers_mut().insert(crate::api::token::HEADER, token.clone());
        }
        let what = format!("{} {}", request.method(), request.uri().path());
        let response = match tokio::time::timeout(timeout, self.client.request(request)).await {
            Err(_) => {
                return Err(Status::deadline_exceeded(format!("{what}: the app did not answer within {timeout:?}")));
            }
            Ok(Err(error)) if error.is_connect() => {
                let message = format!("the app is not listening on {}: {error}", self.address);
                let mut status = Status::unavailable(message);
                status.set_source(std::sync::Arc::new(ConnectError(Box::new(error))));
                return Err(status);
            }
            Ok(Err(error)) => return Err(Status::unavailable(format!("{what}: {error}"))),
            Ok(Ok(response)) => response,
        };
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| Status::unavailable(format!("{what}: reading the answer: {e}")))?;
        Ok((parts, body.to_bytes()))
    }

    pub async fn invoke(&self, request: Request<InvokeRequest>) -> Result<AppAnswer, Status> {
        let (metadata, _, message) = request.into_parts();
        let timeout = crate::deadline::from_metadata(&metadata)
            .ok()
            .flatten()
            .map(crate::deadline::remaining)
            .unwrap_or(DEFAULT_TIMEOUT);
        let (verb, query) = match &message.http_extension {
            Some(http) => (Verb::try_from(http.verb).unwrap_or(Verb::None), http.querystring.clone()),
            None => (Verb::None, String::new()),
        };
        let method = match verb {
            Verb::Get => "GET",
            Verb::Head => "HEAD",
            Verb::Put => "PUT",
            Verb::Delete => "DELETE",
            Verb::Connect => "CONNECT",
            Verb::Options => "OPTIONS",
            Verb::Trace => "TRACE",
            Verb::Patch => "PATCH",
            // Calls made through the gRPC API name no verb: POST, as in Dapr.
            Verb::Post | Verb::None => "POST",
        };
        let path = message.method.trim_start_matches('/');
        let uri =
            if query.is_empty() { format!("{}/{path}", self.base) } else { format!("{}/{path}?{query}", self.base) };
        let mut builder = hyper::Request::builder().method(method).uri(&uri);
        for (name, value) in request_headers(&metadata) {
            builder = builder.header(name, value);
        }
        if !message.content_type.is_empty() {
            builder = builder.header(hyper::header::CONTENT_TYPE, &message.content_type);
        }
        let body = message.data.map(|any| any.value).unwrap_or_default();
        let request = builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| Status::invalid_argument(format!("the call cannot be made as HTTP ({method} {uri}): {e}")))?;
        let (parts, body) = self.send(request, timeout).await?;
        let content_type = parts
            .headers
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let metadata = parts
            .headers
            .iter()
            .filter(|(name, _)| !HOP_RESPONSE_HEADERS.contains(&name.as_str()))
            .filter_map(|(name, value)| Some((name.as_str().to_string(), value.to_str().ok()?.to_string())))
            .filter(|(name, _)| headers::travels(name))
            .collect();
        Ok(AppAnswer {
            message: InvokeResponse { data: Some(Any { type_url: String::new(), value: body.to_vec() }), content_type },
            metadata,
            http_status: Some(parts.status.as_u16()),
        })
    }

    pub async fn topic_event(&self, request: Request<TopicEventRequest>) -> Result<TopicEventResponse, Status> {
        let (metadata, _, event) = request.into_parts();
        let timeout = crate::deadline::from_metadata(&metadata)
            .ok()
            .flatten()
            .map(crate::deadline::remaining)
            .unwrap_or(DEFAULT_TIMEOUT);
        if event.path.is_empty() {
            return Err(Status::failed_precondition(format!(
                "the subscription to topic '{}' of '{}' has no route to POST its events to",
                event.topic, event.pubsub_name
            )));
        }
        let uri = format!("{}/{}", self.base, event.path.trim_start_matches('/'));
        let mut builder = hyper::Request::builder()
            .method("POST")
            .uri(&uri)
            .header(hyper::header::CONTENT_TYPE, CLOUD_EVENT_JSON)
            .header("pubsubname", &event.pubsub_name);
        for (name, value) in request_headers(&metadata) {
            builder = builder.header(name, value);
        }
        let body = cloud_event(&event).to_string();
        let request = builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| Status::invalid_argument(format!("the event cannot be POSTed to {uri}: {e}")))?;
        let (parts, body) = self.send(request, timeout).await?;
        let status = outcome(parts.status.as_u16(), &body);
        if parts.status == hyper::StatusCode::NOT_FOUND {
            tracing::error!(path = %event.path, topic = %event.topic, "the app has no route for the event (404); dropped");
        }
        Ok(TopicEventResponse { status: status as i32 })
    }

    pub async fn subscriptions(&self) -> Result<Vec<TopicSubscription>, String> {
        let request = hyper::Request::builder()
            .method("GET")
            .uri(format!("{}/dapr/subscribe", self.base))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let (parts, body) =
            self.send(request, DEFAULT_TIMEOUT).await.map_err(|s| format!("GET /dapr/subscribe: {}", s.message()))?;
        match parts.status.as_u16() {
            // The app subscribes to nothing.
            404 => Ok(Vec::new()),
            200..=299 => parse_subscriptions(&body),
            status => Err(format!("GET /dapr/subscribe answered {status}: {}", String::from_utf8_lossy(&body))),
        }
    }

    pub async fn check_health(&self, timeout: Duration) -> Option<String> {
        let Some(path) = &self.health_path else {
            return match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&self.address)).await {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(format!("app is not listening on {}: {e}", self.address)),
                Err(_) => Some(format!("connecting to the app timed out after {timeout:?}")),
            };
        };
        let request = hyper::Request::builder()
            .method("GET")
            .uri(format!("{}{path}", self.base))
            .body(Full::new(Bytes::new()))
            .expect("a GET of a path always builds");
        match self.send(request, timeout).await {
            Ok((parts, _)) if parts.status.is_success() => None,
            Ok((parts, _)) => Some(format!("GET {path} answered {}", parts.status.as_u16())),
            Err(status) => Some(status.message().to_string()),
        }
    }
}

/// The call's metadata as HTTP headers: what travels between apps plus the identity and trace
/// headers the sidecars set, without gRPC's own (`grpc-timeout`, `te`, ...).
fn request_headers(metadata: &MetadataMap) -> Vec<(String, String)> {
    metadata
        .iter()
        .filter_map(|entry| match entry {
            KeyAndValueRef::Ascii(key, value) => Some((key.as_str().to_string(), value.to_str().ok()?.to_string())),
            KeyAndValueRef::Binary(..) => None,
        })
        .filter(|(key, _)| !key.starts_with("grpc-") && !matches!(key.as_str(), "te" | "content-type" | "user-agent"))
        .collect()
}

/// Dapr's outcome rules for an event POSTed to an HTTP app.
fn outcome(status: u16, body: &[u8]) -> TopicEventResponseStatus {
    #[derive(Deserialize)]
    struct Answer {
        status: Option<String>,
    }
    match status {
        200..=299 => match serde_json::from_slice::<Answer>(body) {
            // An empty or unreadable body is a success.
            Err(_) => TopicEventResponseStatus::Success,
            Ok(answer) => match answer.status.as_deref() {
                None | Some("") | Some("SUCCESS") => TopicEventResponseStatus::Success,
                Some("DROP") => TopicEventResponseStatus::Drop,
                // RETRY, and any status Dapr does not know (they are case-sensitive).
                Some(_) => TopicEventResponseStatus::Retry,
            },
        },
        404 => TopicEventResponseStatus::Drop,
        _ => TopicEventResponseStatus::Retry,
    }
}

/// The event as the CloudEvent JSON Dapr POSTs: its attributes, its extensions (trace context,
/// ...), and the data as JSON for a JSON content type, as a string for text, else base64.
pub fn cloud_event(event: &TopicEventRequest) -> Value {
    let mut object = Map::new();
    if let Some(extensions) = &event.extensions {
        object.extend(struct_to_json(extensions));
    }
    for (key, value) in [
        ("id", &event.id),
        ("source", &event.source),
        ("type", &event.r#type),
        ("specversion", &event.spec_version),
        ("datacontenttype", &event.data_content_type),
        ("topic", &event.topic),
        ("pubsubname", &event.pubsub_name),
    ] {
        object.insert(key.into(), Value::String(value.clone()));
    }
    let content_type = event.data_content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    let is_json = content_type == "application/json" || content_type.ends_with("+json");
    let is_text = content_type.starts_with("text/") || content_type == "application/xml";
    match (is_json, is_text) {
        (true, _) => {
            let data = serde_json::from_slice(&event.data)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&event.data).into_owned()));
            object.insert("data".into(), data);
        }
        (false, true) if std::str::from_utf8(&event.data).is_ok() => {
            object.insert("data".into(), Value::String(String::from_utf8_lossy(&event.data).into_owned()));
        }
        _ => {
            object.insert(
                "data_base64".into(),
                Value::String(base64::engine::general_purpose::STANDARD.encode(&event.data)),
            );
        }
    }
    Value::Object(object)
}

fn struct_to_json(fields: &Struct) -> Map<String, Value> {
    fields.fields.iter().map(|(key, value)| (key.clone(), kind_to_json(value.kind.as_ref()))).collect()
}

fn kind_to_json(kind: Option<&Kind>) -> Value {
    match kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StructValue(s)) => Value::Object(struct_to_json(s)),
        Some(Kind::ListValue(list)) => {
            Value::Array(list.values.iter().map(|v| kind_to_json(v.kind.as_ref())).collect())
        }
    }
}

/// One entry of `GET /dapr/subscribe`: Dapr's v1 (`route`) and v2 (`routes`) forms.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HttpSubscription {
    pubsubname: String,
    topic: String,
    #[serde(default)]
    route: Option<String>,
    #[serde(default)]
    routes: Option<HttpRoutes>,
    #[serde(default)]
    dead_letter_topic: Option<String>,
    #[serde(default)]
    metadata: HashMap<String, Value>,
}

#[derive(Debug, Default, Deserialize)]
struct HttpRoutes {
    #[serde(default)]
    rules: Vec<HttpRule>,
    #[serde(default)]
    default: Option<String>,
}

#[derive(Debug, Deserialize)]
struct HttpRule {
    #[serde(default, rename = "match")]
    matches: String,
    path: String,
}

/// The subscriptions of a `GET /dapr/subscribe` answer; an entry without any route is left out
/// (as in Dapr: there is nowhere to POST its events), with a warning.
pub fn parse_subscriptions(body: &[u8]) -> Result<Vec<TopicSubscription>, String> {
    let listed: Vec<HttpSubscription> = serde_json::from_slice(body)
        .map_err(|e| format!("GET /dapr/subscribe did not answer a JSON array of subscriptions: {e}"))?;
    let mut subscriptions = Vec::new();
    for entry in listed {
        let routes = entry.routes.unwrap_or_default();
        let default = routes.default.filter(|d| !d.is_empty()).or(entry.route.filter(|r| !r.is_empty()));
        if default.is_none() && routes.rules.is_empty() {
            tracing::warn!(pubsub = %entry.pubsubname, topic = %entry.topic, "a subscription of the app has no route; left out");
            continue;
        }
        let metadata = crate::pubsub::declared::metadata_strings(entry.metadata);
        subscriptions.push(TopicSubscription {
            pubsub_name: entry.pubsubname,
            topic: entry.topic,
            metadata,
            routes: Some(TopicRoutes {
                rules: routes.rules.into_iter().map(|r| TopicRule { r#match: r.matches, path: r.path }).collect(),
                default: default.unwrap_or_default(),
            }),
            dead_letter_topic: entry.dead_letter_topic.unwrap_or_default(),
        });
    }
    Ok(subscriptions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_follow_daprs_rules() {
        assert_eq!(outcome(200, b""), TopicEventResponseStatus::Success);
        assert_eq!(outcome(204, b"null"), TopicEventResponseStatus::Success);
        assert_eq!(outcome(200, br#"{"status":"SUCCESS"}"#), TopicEventResponseStatus::Success);
        assert_eq!(outcome(200, br#"{"status":"RETRY"}"#), TopicEventResponseStatus::Retry);
        assert_eq!(outcome(200, br#"{"status":"DROP"}"#), TopicEventResponseStatus::Drop);
        assert_eq!(outcome(200, br#"{"status":"success"}"#), TopicEventResponseStatus::Retry, "case-sensitive");
        assert_eq!(outcome(200, b"not json"), TopicEventResponseStatus::Success);
        assert_eq!(outcome(404, b""), TopicEventResponseStatus::Drop);
        assert_eq!(outcome(500, br#"{"status":"SUCCESS"}"#), TopicEventResponseStatus::Retry);
        assert_eq!(outcome(400, b""), TopicEventResponseStatus::Retry);
    }

    #[test]
    fn subscriptions_are_read_in_both_of_daprs_forms() {
        let body = br#"[
            {"pubsubname":"pubsub","topic":"orders","route":"/orders","deadLetterTopic":"dead","metadata":{"rawPayload":"true"}},
            {"pubsubname":"pubsub","topic":"widgets","routes":{"rules":[{"match":"event.type == \"big\"","path":"/big"}],"default":"/widgets"}},
            {"pubsubname":"pubsub","topic":"lost"}
        ]"#;
        let subscriptions = parse_subscriptions(body).unwrap();
        assert_eq!(subscriptions.len(), 2, "the one without a route is left out");
        assert_eq!(subscriptions[0].routes.as_ref().unwrap().default, "/orders");
        assert_eq!(subscriptions[0].dead_letter_topic, "dead");
        assert_eq!(subscriptions[0].metadata["rawPayload"], "true");
        let widgets = subscriptions[1].routes.as_ref().unwrap();
        assert_eq!((widgets.default.as_str(), widgets.rules[0].path.as_str()), ("/widgets", "/big"));
        assert!(parse_subscriptions(b"{}").unwrap_err().contains("JSON array"));
    }

    #[test]
    fn events_become_cloud_events_with_data_as_json_text_or_base64() {
        let event = |content_type: &str, data: &[u8]| TopicEventRequest {
            id: "1".into(),
            source: "shop".into(),
            r#type: "com.dapr.event.sent".into(),
            spec_version: "1.0".into(),
            data_content_type: content_type.into(),
            data: Bytes::copy_from_slice(data),
            topic: "orders".into(),
            pubsub_name: "pubsub".into(),
            ..Default::default()
        };
        let json = cloud_event(&event("application/json", br#"{"n":1}"#));
        assert_eq!(json["data"], serde_json::json!({"n": 1}));
        assert_eq!(
            (json["id"].as_str(), json["topic"].as_str(), json["pubsubname"].as_str()),
            (Some("1"), Some("orders"), Some("pubsub"))
        );
        assert_eq!(cloud_event(&event("text/plain", b"hi"))["data"], "hi");
        let binary = cloud_event(&event("application/octet-stream", &[0, 1]));
        assert_eq!(binary["data_base64"], "AAE=");
        assert!(binary.get("data").is_none());
    }
}
