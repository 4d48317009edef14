//! An HTTP app written for Dapr (Flask, `tests/python/flask_app.py`), unchanged, behind tandemd
//! with `--app-protocol http`: invoked through `/v1.0/invoke`, through a `dapr-app-id` header
//! and through the gRPC API; subscribed through `GET /dapr/subscribe` and through a
//! `Subscription` file; answering SUCCESS, RETRY, DROP, 404 and 500.

use std::time::Duration;

use serde_json::{Value, json};
use tandem_sdk::Code;
use tandem_tests::http::request;
use tandem_tests::{Etcd, Sidecar, eventually, free_port, python};

const SUBSCRIPTION_FILE: &str = "apiVersion: dapr.io/v2alpha1
kind: Subscription
metadata:
  name: declared
spec:
  pubsubname: pubsub
  topic: declared
  routes:
    default: /declared
scopes:
  - flaskapp
";

/// What the app received so far.
async fn received(port: u16) -> Vec<Value> {
    let address = format!("127.0.0.1:{port}").parse().unwrap();
    match request(address, "GET", "/received", &[], b"").await {
        Ok(response) if response.status == 200 => response.json().as_array().cloned().unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// How many deliveries of events whose data has `key` = `value` arrived.
async fn count(port: u16, key: &str, value: &str) -> usize {
    received(port).await.iter().filter(|r| r["event"]["data"][key] == value).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flask_app_is_invoked_and_gets_its_events_as_in_dapr() {
    let python = tokio::task::spawn_blocking(python::python).await.unwrap();
    let port = free_port();
    let _flask = tokio::process::Command::new(&python)
        .arg(python::scripts_dir().join("flask_app.py"))
        .arg(port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let etcd = Etcd::start().await;
    let resources = tempfile::tempdir().unwrap();
    std::fs::write(resources.path().join("subscriptions.yaml"), SUBSCRIPTION_FILE).unwrap();
    let app_sidecar = Sidecar::new("flaskapp")
        .etcd(&etcd)
        .app_port(port)
        .app_protocol("http")
        .resources(resources.path())
        .spawn()
        .await;
    app_sidecar.wait_ready().await;
    let caller = Sidecar::new("caller").etcd(&etcd).spawn().await;
    let http = |method: &'static str, path: String, headers: Vec<(&'static str, &'static str)>, body: Vec<u8>| {
        let address = caller.http_addr();
        async move { request(address, method, &path, &headers, &body).await.unwrap() }
    };
    eventually(Duration::from_secs(30), "the caller to route to the Flask app", || async {
        http("GET", "/v1.0/invoke/flaskapp/method/greet/probe".into(), vec![], vec![]).await.status == 201
    })
    .await;

    // Invocation: verb, path, query, headers and body reach the app; its status, headers and
    // body come back as they are.
    let answer = http(
        "POST",
        "/v1.0/invoke/flaskapp/method/greet/bob?lang=en".into(),
        vec![("content-type", "text/plain")],
        b"hello".to_vec(),
    )
    .await;
    assert_eq!(answer.status, 201, "{}", answer.text());
    assert_eq!(answer.header("x-greeted"), Some("bob"));
    assert_eq!(
        answer.json(),
        json!({"name": "bob", "verb": "POST", "query": "lang=en", "caller": "caller", "content_type": "text/plain", "body": "hello"})
    );
    let by_header = http("PUT", "/greet/ann".into(), vec![("dapr-app-id", "flaskapp")], b"x".to_vec()).await;
    assert_eq!((by_header.status, by_header.json()["verb"].as_str()), (201, Some("PUT")));
    let missing = http("GET", "/v1.0/invoke/flaskapp/method/no/such/page".into(), vec![], vec![]).await;
    assert_eq!(missing.status, 404, "the app's own 404 passes through: {}", missing.text());
    // Through the gRPC API: POST, as in Dapr; an app's error status is the gRPC error Dapr gives it.
    let client = caller.client();
    let reply = client.invoke("flaskapp", "greet/zed", b"from grpc".to_vec()).await.unwrap();
    let seen: Value = serde_json::from_slice(&reply.data).unwrap();
    assert_eq!((seen["verb"].as_str(), seen["body"].as_str()), (Some("POST"), Some("from grpc")));
    let err = client.invoke("flaskapp", "no/such/page", Vec::new()).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // Pub/sub: /dapr/subscribe's topic and the Subscription file's, with Dapr's outcome rules,
    // once the caller's sidecar knows the subscriptions (an event nobody subscribes to is dropped).
    let mut probe = 0;
    eventually(Duration::from_secs(30), "a probe event to reach the app", || {
        probe += 1;
        let data = json!({"answer": "SUCCESS", "probe": probe}).to_string().into_bytes();
        let publish =
            http("POST", "/v1.0/publish/pubsub/orders".into(), vec![("content-type", "application/json")], data);
        async move {
            publish.await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            received(port).await.iter().any(|r| r["event"]["data"]["probe"].is_number())
        }
    })
    .await;
    for answer in ["SUCCESS", "RETRY-ONCE", "DROP", "404", "500"] {
        let data = json!({"answer": answer, "n": answer}).to_string().into_bytes();
        let published =
            http("POST", "/v1.0/publish/pubsub/orders".into(), vec![("content-type", "application/json")], data).await;
        assert_eq!(published.status, 204, "{}", published.text());
    }
    let declared = http("POST", "/v1.0/publish/pubsub/declared".into(), vec![], b"from a file".to_vec()).await;
    assert_eq!(declared.status, 204);
    // A payload that is a CloudEvent is the event (Dapr fills only what it lacks).
    let envelope = json!({"id": "given-1", "source": "billing", "type": "order.created", "specversion": "1.0",
        "datacontenttype": "application/json", "data": {"n": "given"}, "region": "north"});
    let given = http(
        "POST",
        "/v1.0/publish/pubsub/orders".into(),
        vec![("content-type", "application/cloudevents+json")],
        envelope.to_string().into_bytes(),
    )
    .await;
    assert_eq!(given.status, 204, "{}", given.text());
    let not_json = http(
        "POST",
        "/v1.0/publish/pubsub/orders".into(),
        vec![("content-type", "application/cloudevents+json")],
        b"not an event".to_vec(),
    )
    .await;
    assert_eq!((not_json.status, not_json.json()["errorCode"].as_str()), (400, Some("ERR_PUBSUB_CLOUD_EVENTS_SER")));
    eventually(Duration::from_secs(30), "the events and their redeliveries", || async {
        count(port, "n", "SUCCESS").await == 1
            && count(port, "n", "RETRY-ONCE").await == 2
            && count(port, "n", "500").await >= 2
            && received(port).await.iter().any(|r| r["route"] == "/declared")
            && count(port, "n", "given").await == 1
    })
    .await;
    // Dropped events (DROP, 404) are not delivered again; a 500 is, and success ends it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count(port, "n", "DROP").await, 1);
    assert_eq!(count(port, "n", "404").await, 1);
    assert_eq!(count(port, "n", "SUCCESS").await, 1);
    assert_eq!(count(port, "n", "RETRY-ONCE").await, 2);

    let all = received(port).await;
    let delivery = all.iter().find(|r| r["event"]["data"]["n"] == "SUCCESS").unwrap();
    assert_eq!(delivery["content_type"], "application/cloudevents+json");
    assert_eq!(delivery["pubsubname_header"], "pubsub");
    let event = &delivery["event"];
    assert_eq!((event["topic"].as_str(), event["pubsubname"].as_str()), (Some("orders"), Some("pubsub")));
    assert_eq!((event["source"].as_str(), event["specversion"].as_str()), (Some("caller"), Some("1.0")));
    assert_eq!(event["type"], "com.dapr.event.sent");
    assert_eq!(event["datacontenttype"], "application/json");
    for attribute in ["traceid", "traceparent", "tracestate"] {
        assert!(event[attribute].is_string(), "{attribute} in {event}");
    }
    assert!(event["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{event}");
    let given = &all.iter().find(|r| r["event"]["data"]["n"] == "given").unwrap()["event"];
    assert_eq!(
        (given["id"].as_str(), given["source"].as_str(), given["type"].as_str(), given["region"].as_str()),
        (Some("given-1"), Some("billing"), Some("order.created"), Some("north"))
    );
    assert_eq!((given["topic"].as_str(), given["pubsubname"].as_str()), (Some("orders"), Some("pubsub")));
    // The routing rule `event.type == "order.created"` took it; the others took the default.
    let route_of = |n: &str| all.iter().find(|r| r["event"]["data"]["n"] == n).unwrap()["route"].clone();
    assert_eq!((route_of("given"), route_of("SUCCESS")), (json!("/created"), json!("/orders")));
    let from_file = all.iter().find(|r| r["route"] == "/declared").unwrap();
    assert_eq!(from_file["event"]["data"], "from a file");
    assert_eq!(from_file["event"]["datacontenttype"], "text/plain");
}
