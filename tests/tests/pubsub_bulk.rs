//! BulkPublishEvent and subscription routes through real sidecars: a bulk of events delivered
//! once each, an oversized entry failing alone, bad bulk requests refused whole, and a
//! subscription's route reaching the app as the event's `path` (`match` rules ignored). Each
//! case runs against `pubsub.embedded` and against `pubsub.jetstream` on a real nats-server.

use std::collections::HashSet;
use std::time::Duration;

use dapr::dapr::proto::runtime::v1 as dapr_runtime;
use tandem_proto::runtime::app_callback_server::{AppCallback, AppCallbackServer};
use tandem_proto::runtime::topic_event_response::TopicEventResponseStatus;
use tandem_proto::runtime::{
    ListTopicSubscriptionsResponse, TopicEventRequest, TopicEventResponse, TopicRoutes, TopicRule, TopicSubscription,
};
use tandem_sdk::proto::common::{InvokeRequest, InvokeResponse};
use tandem_sdk::{AppServer, BulkEntry, BulkFailure, Code, EventOutcome, SubscriptionOptions, TopicEvent};
use tandem_tests::pubsub::{Inbox, subscriber, wait_until_subscribed};
use tandem_tests::pubsub_cases::Broker;
use tandem_tests::state::ResourcesDir;
use tandem_tests::{Etcd, RunningSidecar, Sidecar, TestApp, eventually};
use tonic::{Request, Response, Status};

/// Tests `NAME::embedded` and `NAME::jetstream` that run the case `NAME` against each component.
macro_rules! against_both_components {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$case(&Broker::Embedded).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn jetstream() {
                super::$case(&Broker::jetstream().await).await;
            }
        }
    )*};
}

against_both_components!(
    fifty_entries_of_a_bulk_publish_are_delivered_once_each,
    an_oversized_entry_fails_alone_and_the_others_are_delivered,
    bad_bulk_requests_are_refused_whole_with_the_reason,
    a_subscriptions_route_reaches_the_app_as_the_events_path,
);

async fn subscriber_sidecar(app_id: &str, etcd: &Etcd, res: &ResourcesDir, app_port: u16) -> RunningSidecar {
    Sidecar::new(app_id).etcd(etcd).resources(res.path()).app_port(app_port).spawn().await
}

fn entries(prefix: &str, n: usize) -> Vec<BulkEntry> {
    (0..n).map(|i| BulkEntry::new(format!("{prefix}-{i}"), format!("{prefix}-{i}"), "")).collect()
}

async fn fifty_entries_of_a_bulk_publish_are_delivered_once_each(broker: &Broker) {
    let etcd = Etcd::start().await;
    let res = broker.resources(&[]);
    let inbox = Inbox::default();
    let app = subscriber("readings", &inbox).await;
    let _sub = subscriber_sidecar("meter", &etcd, &res, app.port()).await;
    let publisher = Sidecar::new("sensor").etcd(&etcd).resources(res.path()).spawn().await;
    let client = publisher.client();
    wait_until_subscribed(&client, "readings", &inbox).await;

    let mut bulk = entries("r", 49);
    bulk.push(BulkEntry::new("json", r#"{"reading":1}"#, ""));
    let failed = client.bulk_publish("pubsub", "readings", bulk).await.unwrap();
    assert_eq!(failed, []);
    let payloads: Vec<String> = (0..49).map(|i| format!("r-{i}")).chain([r#"{"reading":1}"#.to_string()]).collect();
    eventually(Duration::from_secs(20), "50 bulk entries delivered", || async {
        payloads.iter().all(|p| inbox.has(p))
    })
    .await;
    for payload in &payloads {
        assert_eq!(inbox.count(payload), 1, "'{payload}' delivered once");
    }
    // Each entry is its own CloudEvent with its own id; the content type defaults per entry.
    let events: Vec<TopicEvent> = inbox.events().into_iter().filter(|e| !e.data.starts_with(b"probe-")).collect();
    assert_eq!(events.iter().map(|e| e.id.as_str()).collect::<HashSet<_>>().len(), 50);
    let json = events.iter().find(|e| e.data == br#"{"reading":1}"#).unwrap();
    assert_eq!(json.data_content_type, "application/json");
    assert_eq!(
        (json.source.as_str(), json.kind.as_str(), json.topic.as_str()),
        ("sensor", "com.dapr.event.sent", "readings")
    );
    let text = events.iter().find(|e| e.data == b"r-0").unwrap();
    assert_eq!(text.data_content_type, "application/octet-stream");
}

async fn an_oversized_entry_fails_alone_and_the_others_are_delivered(broker: &Broker) {
    let etcd = Etcd::start().await;
    let res = broker.resources(&[]);
    let inbox = Inbox::default();
    let app = subscriber("uploads", &inbox).await;
    let _sub = subscriber_sidecar("store", &etcd, &res, app.port()).await;
    let publisher =
        Sidecar::new("client").etcd(&etcd).resources(res.path()).arg("--max-body-size").arg("1Ki").spawn().await;
    let client = publisher.client();
    wait_until_subscribed(&client, "uploads", &inbox).await;

    let mut bulk = entries("u", 4);
    bulk.insert(2, BulkEntry::new("big", vec![b'x'; 2048], "text/plain"));
    let failed = client.bulk_publish("pubsub", "uploads", bulk).await.unwrap();
    assert_eq!(failed.len(), 1, "{failed:?}");
    let BulkFailure { entry_id, error } = &failed[0];
    assert_eq!(entry_id, "big");
    assert!(error.contains("2048") && error.contains("--max-body-size"), "{error}");
    eventually(Duration::from_secs(20), "the 4 small entries delivered", || async {
        (0..4).all(|i| inbox.has(&format!("u-{i}")))
    })
    .await;
    // The big entry was never stored, so it cannot arrive later either.
    assert!(!inbox.events().iter().any(|e| e.data.len() == 2048));
}

async fn bad_bulk_requests_are_refused_whole_with_the_reason(broker: &Broker) {
    let etcd = Etcd::start().await;
    let res = broker.resources(&[]);
    let inbox = Inbox::default();
    let app = subscriber("jobs", &inbox).await;
    let _sub = subscriber_sidecar("worker", &etcd, &res, app.port()).await;
    let publisher = Sidecar::new("boss").etcd(&etcd).resources(res.path()).spawn().await;
    let client = publisher.client();
    wait_until_subscribed(&client, "jobs", &inbox).await;

    // The same checks and messages as PublishEvent for the pub/sub and the topic.
    let err = client.bulk_publish("nope", "jobs", entries("a", 2)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("pubsub nope is not found") && err.message().contains("'pubsub'"), "{err:?}");
    let single = client.publish("nope", "jobs", b"x".to_vec(), "").await.unwrap_err();
    assert_eq!(err.message(), single.message());
    let err = client.bulk_publish("pubsub", "", entries("b", 2)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("topic is empty"), "{err:?}");

    // Entry ids must be present and unique; one bad id refuses the whole request.
    let mut repeated = entries("c", 3);
    repeated.push(BulkEntry::new("c-1", "c-again", ""));
    let err = client.bulk_publish("pubsub", "jobs", repeated).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("'c-1'") && err.message().contains("more than once"), "{err:?}");
    let mut unnamed = entries("d", 3);
    unnamed.push(BulkEntry::new("", "d-unnamed", ""));
    let err = client.bulk_publish("pubsub", "jobs", unnamed).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("entry 3") && err.message().contains("empty entry_id"), "{err:?}");

    // Dapr's own generated client, on both names: refused the same way, and accepted.
    let mut dapr =
        dapr_runtime::dapr_client::DaprClient::connect(format!("http://{}", publisher.grpc_addr())).await.unwrap();
    let entry = |id: &str, data: &str| dapr_runtime::BulkPublishRequestEntry {
        entry_id: id.into(),
        event: data.as_bytes().to_vec(),
        content_type: "text/plain".into(),
        metadata: Default::default(),
    };
    let request = |entries| dapr_runtime::BulkPublishRequest {
        pubsub_name: "pubsub".into(),
        topic: "jobs".into(),
        entries,
        metadata: Default::default(),
    };
    let err = dapr.bulk_publish_event(request(vec![entry("e", "e-1"), entry("e", "e-2")])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Dapr deprecates the Alpha1 name, but SDKs of its time still call it.
    #[allow(deprecated)]
    let answer = dapr.bulk_publish_event_alpha1(request(vec![entry("ok", "marker")])).await.unwrap().into_inner();
    assert!(answer.failed_entries.is_empty(), "{answer:?}");

    // Once the marker (published after every refused request) is in, nothing refused ever came.
    eventually(Duration::from_secs(20), "the marker delivered", || async { inbox.has("marker") }).await;
    let refused = ["a-0", "b-0", "c-0", "c-again", "d-0", "d-unnamed", "e-1", "e-2"];
    assert!(refused.iter().all(|p| !inbox.has(p)), "refused entries were delivered: {:?}", inbox.payloads());
}

/// A Dapr-style app whose subscription has a routing rule with a `match` (unsupported) and a
/// default route; records each event with the path it came with.
struct RoutedApp {
    inbox: Inbox,
}

#[tonic::async_trait]
impl AppCallback for RoutedApp {
    async fn on_invoke(&self, _: Request<InvokeRequest>) -> Result<Response<InvokeResponse>, Status> {
        Err(Status::unimplemented("no methods"))
    }

    async fn list_topic_subscriptions(
        &self,
        _: Request<()>,
    ) -> Result<Response<ListTopicSubscriptionsResponse>, Status> {
        Ok(Response::new(ListTopicSubscriptionsResponse {
            subscriptions: vec![TopicSubscription {
                pubsub_name: "pubsub".into(),
                topic: "payments".into(),
                routes: Some(TopicRoutes {
                    rules: vec![
                        TopicRule { r#match: r#"event.type == "refund""#.into(), path: "/refunds".into() },
                        TopicRule { r#match: "event.data.amount > 100".into(), path: "/big".into() },
                    ],
                    default: "/payments".into(),
                }),
                ..Default::default()
            }],
        }))
    }

    async fn on_topic_event(
        &self,
        request: Request<TopicEventRequest>,
    ) -> Result<Response<TopicEventResponse>, Status> {
        let event = request.into_inner();
        self.inbox.push(TopicEvent::from(event));
        Ok(Response::new(TopicEventResponse { status: TopicEventResponseStatus::Success as i32 }))
    }
}

async fn a_subscriptions_route_reaches_the_app_as_the_events_path(broker: &Broker) {
    let etcd = Etcd::start().await;
    let res = broker.resources(&[]);
    // An SDK app: one topic with a route, one without.
    let (routed, plain) = (Inbox::default(), Inbox::default());
    let (routed_c, plain_c) = (routed.clone(), plain.clone());
    let options = SubscriptionOptions { route: "/orders/v2".into(), ..Default::default() };
    let app = TestApp::start(
        AppServer::new()
            .subscribe_with("pubsub", "orders", options, move |event| {
                let inbox = routed_c.clone();
                async move {
                    inbox.push(event);
                    EventOutcome::Success
                }
            })
            .subscribe("pubsub", "notes", move |event| {
                let inbox = plain_c.clone();
                async move {
                    inbox.push(event);
                    EventOutcome::Success
                }
            }),
    )
    .await;
    let _sub = subscriber_sidecar("shop", &etcd, &res, app.port()).await;
    // A raw app listing rules with a `match` (CEL): the first that matches takes the event.
    let ruled = Inbox::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ruled_port = listener.local_addr().unwrap().port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AppCallbackServer::new(RoutedApp { inbox: ruled.clone() }))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let _ruled_sidecar = subscriber_sidecar("bank", &etcd, &res, ruled_port).await;
    let publisher = Sidecar::new("checkout").etcd(&etcd).resources(res.path()).spawn().await;
    let client = publisher.client();
    wait_until_subscribed(&client, "orders", &routed).await;
    wait_until_subscribed(&client, "notes", &plain).await;
    wait_until_subscribed(&client, "payments", &ruled).await;

    client.publish("pubsub", "orders", b"single".to_vec(), "text/plain").await.unwrap();
    let failed = client.bulk_publish("pubsub", "orders", entries("bulk", 3)).await.unwrap();
    assert_eq!(failed, []);
    client.publish("pubsub", "notes", b"note".to_vec(), "text/plain").await.unwrap();
    client.publish("pubsub", "payments", b"refund".to_vec(), "text/plain").await.unwrap();
    let typed = br#"{"type": "refund", "data": "typed refund", "datacontenttype": "text/plain"}"#;
    client.publish("pubsub", "payments", typed.to_vec(), "application/cloudevents+json").await.unwrap();
    client.publish("pubsub", "payments", br#"{"amount":500}"#.to_vec(), "application/json").await.unwrap();
    client.publish("pubsub", "payments", br#"{"amount":5}"#.to_vec(), "application/json").await.unwrap();
    eventually(Duration::from_secs(20), "every event delivered", || async {
        ["single", "bulk-0", "bulk-1", "bulk-2"].iter().all(|p| routed.has(p))
            && plain.has("note")
            && ["refund", "typed refund", r#"{"amount":500}"#, r#"{"amount":5}"#].iter().all(|p| ruled.has(p))
    })
    .await;
    let path_of = |inbox: &Inbox, payload: &[u8]| inbox.events().into_iter().find(|e| e.data == payload).unwrap().path;
    for payload in ["single", "bulk-0", "bulk-1", "bulk-2"] {
        assert_eq!(path_of(&routed, payload.as_bytes()), "/orders/v2", "{payload}");
    }
    assert_eq!(path_of(&plain, b"note"), "");
    assert_eq!(path_of(&ruled, b"refund"), "/payments", "no rule matches: routes.default");
    assert_eq!(path_of(&ruled, b"typed refund"), "/refunds");
    assert_eq!(path_of(&ruled, br#"{"amount":500}"#), "/big");
    assert_eq!(path_of(&ruled, br#"{"amount":5}"#), "/payments");
}
