//! Dapr's transactional outbox on real sidecars: a state store with `outboxPublishPubsub` and
//! `outboxPublishTopic` publishes each upsert of a committed transaction (or its projection),
//! nothing of a failed one, and an event committed but not yet published survives `kill -9`.

use std::collections::HashMap;
use std::time::Duration;

use dapr::dapr::proto::common::v1 as dapr_common;
use dapr::dapr::proto::runtime::v1 as dapr_runtime;
use dapr_runtime::dapr_client::DaprClient;
use serde_json::{Value, json};
use tandem_tests::http;
use tandem_tests::pubsub::{
    Inbox, RequestLog, holding_subscriber, not_a_probe, request_logging_subscriber, wait_until_subscribed,
};
use tandem_tests::sidecar::run_until_exit;
use tandem_tests::state::ResourcesDir;
use tandem_tests::{Etcd, RunningSidecar, Sidecar, eventually};
use tonic::Code;

const TOPIC: &str = "neworders";

/// A pub/sub `pubsub` (embedded, with `pubsub_metadata`) and a store `orders` whose
/// transactions publish to its topic [`TOPIC`].
fn resources(pubsub_metadata: &[(&str, &str)]) -> ResourcesDir {
    ResourcesDir::new(&[
        ("pubsub", "pubsub.embedded", pubsub_metadata),
        ("orders", "state.sled", &[("outboxPublishPubsub", "pubsub"), ("outboxPublishTopic", TOPIC)]),
    ])
}

async fn transaction(sidecar: &RunningSidecar, body: Value) -> http::HttpResponse {
    let path = "/v1.0/state/orders/transaction";
    http::request(
        sidecar.http_addr(),
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
    .await
    .unwrap()
}

async fn outbox_events(sidecar: &RunningSidecar, outcome: &str) -> f64 {
    sidecar.metric(&format!(r#"tandem_outbox_events_total{{store="orders",outcome="{outcome}"}}"#)).await
}

fn upsert(key: &str, value: &[u8], metadata: &[(&str, &str)]) -> dapr_runtime::TransactionalStateOperation {
    dapr_runtime::TransactionalStateOperation {
        operation_type: "upsert".into(),
        request: Some(dapr_common::StateItem {
            key: key.into(),
            value: value.to_vec(),
            metadata: metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        }),
    }
}

fn extension(log: &RequestLog, data: &[u8], name: &str) -> Option<String> {
    let request = log.find(data)?;
    let value = request.extensions?.fields.remove(name)?;
    match value.kind? {
        prost_types::value::Kind::StringValue(text) => Some(text),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_transaction_publishes_its_upserts_and_a_failed_one_nothing() {
    let etcd = Etcd::start().await;
    let res = resources(&[]);
    let (inbox, log) = (Inbox::default(), RequestLog::default());
    let port = request_logging_subscriber(TOPIC, &inbox, &log).await;
    let _shipping = Sidecar::new("shipping").etcd(&etcd).resources(res.path()).app_port(port).spawn().await;
    let shop = Sidecar::new("shop").etcd(&etcd).resources(res.path()).spawn().await;
    wait_until_subscribed(&shop.client(), TOPIC, &inbox).await;

    // Over the HTTP API: two upserts (one with a projection) and a delete.
    let committed = transaction(
        &shop,
        json!({"operations": [
            {"operation": "upsert", "request": {"key": "order-1", "value": {"item": "book"}}},
            {"operation": "upsert", "request": {"key": "order-2", "value": "full record"}},
            {"operation": "upsert", "request": {"key": "order-2", "value": {"summary": "2"},
                "metadata": {"outbox.projection": "true", "contentType": "application/json"}}},
            {"operation": "delete", "request": {"key": "gone"}},
        ]}),
    )
    .await;
    assert_eq!(committed.status, 204, "{}", committed.text());
    eventually(Duration::from_secs(20), "both events of the transaction delivered", || async {
        inbox.has(r#"{"item":"book"}"#) && inbox.has(r#"{"summary":"2"}"#)
    })
    .await;
    let stored = http::request(shop.http_addr(), "GET", "/v1.0/state/orders/order-2", &[], b"").await.unwrap();
    assert_eq!(stored.text(), r#""full record""#, "the projection is published, not stored");
    let event = log.find(br#"{"item":"book"}"#).unwrap();
    assert!(event.id.starts_with("outbox-"), "{event:?}");
    assert_eq!((event.source.as_str(), event.topic.as_str(), event.pubsub_name.as_str()), ("shop", TOPIC, "pubsub"));
    let projected = log.find(br#"{"summary":"2"}"#).unwrap();
    assert_eq!(projected.data_content_type, "application/json");
    assert!(extension(&log, br#"{"item":"book"}"#, "time").is_some_and(|t| !t.is_empty()));

    // Over the gRPC API with Dapr's generated client: a stale ETag fails the whole transaction,
    // and nothing of it is stored or published.
    let mut dapr = DaprClient::connect(format!("http://{}", shop.grpc_addr())).await.unwrap();
    let mut stale = upsert("order-3", b"never", &[]);
    stale.request.as_mut().unwrap().etag = Some(dapr_common::Etag { value: "999999".into() });
    let failed = dapr
        .execute_state_transaction(dapr_runtime::ExecuteStateTransactionRequest {
            store_name: "orders".into(),
            operations: vec![upsert("order-4", b"never either", &[]), stale],
            metadata: HashMap::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(failed.code(), Code::Aborted, "{failed:?}");
    // A projection of a key the transaction does not upsert is refused, as Dapr documents.
    let orphan = transaction(
        &shop,
        json!({"operations": [
            {"operation": "upsert", "request": {"key": "order-5", "value": 5}},
            {"operation": "upsert", "request": {"key": "order-6", "value": 6, "metadata": {"outbox.projection": "true"}}},
        ]}),
    )
    .await;
    assert_eq!(orphan.status, 400, "{}", orphan.text());
    assert!(orphan.text().contains("'order-6'"), "{}", orphan.text());

    dapr.execute_state_transaction(dapr_runtime::ExecuteStateTransactionRequest {
        store_name: "orders".into(),
        operations: vec![upsert("order-7", b"seven", &[("contentType", "text/plain"), ("region", "eu")])],
        metadata: HashMap::new(),
    })
    .await
    .unwrap();
    eventually(Duration::from_secs(20), "the last transaction's event delivered", || async { inbox.has("seven") })
        .await;
    assert_eq!(extension(&log, b"seven", "region").as_deref(), Some("eu"), "metadata travels as attributes");
    // Exactly the events of the two committed transactions were recorded and published.
    assert_eq!(outbox_events(&shop, "recorded").await, 3.0);
    eventually(Duration::from_secs(10), "3 outbox events published", || async {
        outbox_events(&shop, "published").await == 3.0
    })
    .await;
    for never in ["never", "never either", "5"] {
        assert!(!inbox.has(never), "{never} of a failed transaction was published");
    }
    for key in ["order-3", "order-4", "order-5", "order-6"] {
        let path = format!("/v1.0/state/orders/{key}");
        let read = http::request(shop.http_addr(), "GET", &path, &[], b"").await.unwrap();
        assert_eq!(read.status, 204, "{key} of a failed transaction is stored: {}", read.text());
    }
    assert_eq!(inbox.count(r#"{"item":"book"}"#), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_committed_but_not_yet_published_survives_kill_9() {
    let etcd = Etcd::start().await;
    // A backlog of one event, held by the subscriber: the outbox cannot publish for now.
    let res = resources(&[("maxBacklog", "1"), ("deliveryTimeout", "120s")]);
    let (app, inbox, release) = holding_subscriber(TOPIC, not_a_probe).await;
    let _shipping = Sidecar::new("shipping").etcd(&etcd).resources(res.path()).app_port(app.port()).spawn().await;
    let data = tempfile::tempdir().unwrap();
    let start_shop = || Sidecar::new("shop").etcd(&etcd).resources(res.path()).data_dir(data.path()).spawn();
    let mut shop = start_shop().await;
    wait_until_subscribed(&shop.client(), TOPIC, &inbox).await;
    eventually(Duration::from_secs(20), "one held event fills the backlog", || async {
        shop.client().publish("pubsub", TOPIC, b"held".to_vec(), "text/plain").await.is_ok()
            && shop.client().publish("pubsub", TOPIC, b"refused".to_vec(), "text/plain").await.is_err()
    })
    .await;

    let committed = transaction(
        &shop,
        json!({"operations": [{"operation": "upsert", "request": {"key": "order-k", "value": "kept"}}]}),
    )
    .await;
    assert_eq!(committed.status, 204, "{}", committed.text());
    shop.wait_for_log("outbox: publishing to topic neworders in pubsub pubsub failed").await;
    assert_eq!(outbox_events(&shop, "published").await, 0.0);
    shop.kill9().await;

    let shop = start_shop().await;
    shop.wait_for_log("outbox: publishing a record left by").await;
    release.send(true).unwrap();
    eventually(Duration::from_secs(30), "the committed event delivered after the restart", || async {
        inbox.has(r#""kept""#)
    })
    .await;
    eventually(Duration::from_secs(10), "the restarted sidecar published it", || async {
        outbox_events(&shop, "published").await == 1.0
    })
    .await;
    assert_eq!(inbox.count(r#""kept""#), 1);
    let stored = http::request(shop.http_addr(), "GET", "/v1.0/state/orders/order-k", &[], b"").await.unwrap();
    assert_eq!(stored.text(), r#""kept""#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_naming_a_missing_pubsub_stops_tandemd_at_start() {
    let res = ResourcesDir::new(&[(
        "orders",
        "state.sled",
        &[("outboxPublishPubsub", "nowhere"), ("outboxPublishTopic", TOPIC)],
    )]);
    let data = tempfile::tempdir().unwrap();
    let out = run_until_exit(&[
        "--app-id",
        "shop",
        "--resources-path",
        res.path().to_str().unwrap(),
        "--data-dir",
        data.path().to_str().unwrap(),
        "--grpc-port",
        "0",
        "--http-port",
        "0",
        "--internal-port",
        "0",
        "--admin-port",
        "0",
    ])
    .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("outboxPublishPubsub 'nowhere' is not a pub/sub component"), "{stderr}");
}
