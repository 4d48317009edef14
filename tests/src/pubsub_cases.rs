//! The pub/sub cases every component must pass, run by the integration tests against each
//! ([`Broker`]): delivery across sidecars, competing replicas, RETRY and DROP, dead letters,
//! delivery resuming after restarts, order, streaming subscriptions, raw payloads and bad input.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_sdk::{AppServer, BulkEntry, Code, EventOutcome, SidecarClient};
use tokio::process::{Child, Command};
use tokio::sync::RwLock;

use crate::pubsub::{
    Inbox, RequestLog, holding_subscriber, not_a_probe, request_logging_subscriber, subscriber, wait_until_subscribed,
};
use crate::state::ResourcesDir;
use crate::{Etcd, Nats, RunningSidecar, Sidecar, TestApp, eventually, free_port, workspace_binary};

/// The pub/sub component a case runs against, named `pubsub` in every sidecar.
pub enum Broker {
    /// `pubsub.embedded`: no broker.
    Embedded,
    /// `pubsub.jetstream` on this NATS server (boxed: a running server is large, `Embedded` is
    /// nothing).
    JetStream(Box<Nats>),
}

impl Broker {
    /// `pubsub.jetstream` on a NATS server of its own.
    pub async fn jetstream() -> Broker {
        Broker::JetStream(Box::new(Nats::start().await))
    }

    /// The component type.
    pub fn kind(&self) -> &'static str {
        match self {
            Broker::Embedded => "pubsub.embedded",
            Broker::JetStream(_) => "pubsub.jetstream",
        }
    }

    /// A `--resources-path` declaring the component `pubsub` with `metadata`.
    pub fn resources(&self, metadata: &[(&str, &str)]) -> ResourcesDir {
        match self {
            Broker::Embedded => ResourcesDir::new(&[("pubsub", "pubsub.embedded", metadata)]),
            Broker::JetStream(nats) => nats.resources("pubsub", metadata),
        }
    }
}

/// A sidecar for `app_id` with the components of `resources`, in front of `app` if given.
pub async fn sidecar(app_id: &str, etcd: &Etcd, resources: &ResourcesDir, app: Option<&TestApp>) -> RunningSidecar {
    let mut sidecar = Sidecar::new(app_id).etcd(etcd).resources(resources.path());
    if let Some(app) = app {
        sidecar = sidecar.app_port(app.port());
    }
    sidecar.spawn().await
}

pub async fn events_travel_from_publisher_to_subscriber_as_cloudevents(broker: &Broker) {
    let etcd = Etcd::start().await;
    let res = broker.resources(&[]);
    let inbox = Inbox::default();
    let app = subscriber("orders", &inbox).await;
    let _sub = sidecar("shop", &etcd, &res, Some(&app)).await;
    let publisher = sidecar("checkout", &etcd, &res, None).await;
    let client = publisher.client();
    wait_until_subscribed(&client, "orders", &inbox).await;

    for i in 0..20 {
        client.publish("pubsub", "orders", format!(r#"{{"order":{i}}}"#).into_bytes(), "").await.unwrap();
    }
    eventually(Duration::from_secs(20), "20 orders delivered", || async {
        (0..20).all(|i| inbox.has(&format!(r#"{{"order":{i}}}"#)))
    })
    .await;
    // Nothing failed, so nothing came twice.
    for i in 0..20 {
        assert_eq!(inbox.count(&format!(r#"{{"order":{i}}}"#)), 1);
    }
    let events = inbox.events();
    let event = events.iter().find(|e| e.data == br#"{"order":0}"#).unwrap();
    assert_eq!(event.source, "checkout");
    assert_eq!(event.kind, "com.dapr.event.sent");
    assert_eq!(event.pubsub_name, "pubsub");
    assert_eq!(event.topic, "orders");
    assert_eq!(event.data_content_type, "application/json");
    assert!(!event.id.is_empty());
}

pub async fn replicas_of_a_subscriber_compete_for_events(broker: &Broker) {
    let etcd = Etcd::start().await;
    let res = broker.resources(&[]);
    let (inbox_1, inbox_2) = (Inbox::default(), Inbox::default());
    let (app_1, app_2) = (subscriber("raw", &inbox_1).await, subscriber("raw", &inbox_2).await);
    let _s1 = sidecar("prep", &etcd, &res, Some(&app_1)).await;
    let _s2 = sidecar("prep", &etcd, &res, Some(&app_2)).await;
    let publisher = sidecar("ingest", &etcd, &res, None).await;
    let client = publisher.client();
    wait_until_subscribed(&client, "raw", &inbox_1).await;
    // Both replicas must be routable before counting: wait until each has taken a probe.
    eventually(Duration::from_secs(20), "both replicas taking events", || {
        let client = client.clone();
        let (a, b) = (inbox_1.clone(), inbox_2.clone());
        async move {
            client.publish("pubsub", "raw", b"probe-x".to_vec(), "text/plain").await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            a.has("probe-x") && b.has("probe-x")
        }
    })
    .await;

    for i in 0..40 {
        client.publish("pubsub", "raw", format!("batch-{i}").into_bytes(), "text/plain").await.unwrap();
    }
    let all = |i: usize| format!("batch-{i}");
    eventually(Duration::from_secs(20), "40 batches delivered", || async {
        (0..40).all(|i| inbox_1.has(&all(i)) || inbox_2.has(&all(i)))
    })
    .await;
    for i in 0..40 {
        let total = inbox_1.count(&all(i)) + inbox_2.count(&all(i));
        assert_eq!(total, 1, "batch-{i} went to exactly one replica");
    }
    let (n1, n2) =
        ((0..40).filter(|i| inbox_1.has(&all(*i))).count(), (0..40).filter(|i| inbox_2.has(&all(*i))).count());
    assert!(n1 > 0 && n2 > 0, "both replicas share the work: {n1} and {n2}");
}

pub async fn retry_redelivers_drop_drops_and_exhausted_events_go_to_the_dead_letter_topic(broker: &Broker) {
    let etcd = Etcd::start().await;
    let res =
        broker.resources(&[("maxDeliveryAttempts", "3"), ("initialRetryDelay", "20ms"), ("maxRetryDelay", "100ms")]);
    let inbox = Inbox::default();
    let dead = Inbox::default();
    let attempts: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let (inbox_c, attempts_c) = (inbox.clone(), attempts.clone());
    let app = TestApp::start(
        AppServer::new()
            .subscribe_with_dead_letter("pubsub", "jobs", "jobs-dead", move |event| {
                let (inbox, attempts) = (inbox_c.clone(), attempts_c.clone());
                async move {
                    let payload = String::from_utf8_lossy(&event.data).into_owned();
                    inbox.push(event);
                    let n = {
                        let mut attempts = attempts.lock().unwrap();
                        let n = attempts.entry(payload.clone()).or_default();
                        *n += 1;
                        *n
                    };
                    match payload.as_str() {
                        "flaky" if n < 3 => EventOutcome::Retry,
                        "poison" => EventOutcome::Retry,
                        "bad" => EventOutcome::Drop,
                        _ => EventOutcome::Success,
                    }
                }
            })
            .subscribe("pubsub", "jobs-dead", dead.accept()),
    )
    .await;
    let _sub = sidecar("worker", &etcd, &res, Some(&app)).await;
    let publisher = sidecar("boss", &etcd, &res, None).await;
    let client = publisher.client();
    wait_until_subscribed(&client, "jobs", &inbox).await;

    for payload in ["flaky", "bad", "poison", "fine"] {
        client.publish("pubsub", "jobs", payload.as_bytes().to_vec(), "text/plain").await.unwrap();
    }
    eventually(Duration::from_secs(20), "the poison event in the dead-letter topic", || async { dead.has("poison") })
        .await;
    eventually(Duration::from_secs(20), "the flaky event's third attempt", || async { inbox.count("flaky") == 3 })
        .await;
    // RETRY redelivered "flaky" until it succeeded on the 3rd try; "poison" used its 3 attempts.
    assert_eq!(inbox.count("poison"), 3);
    assert_eq!(inbox.count("fine"), 1);
    assert_eq!(dead.count("poison"), 1);
    assert!(!dead.has("flaky") && !dead.has("bad"));
    // DROP ended "bad" at once: after everything else settled it was seen exactly once.
    assert_eq!(inbox.count("bad"), 1);
}

pub async fn events_wait_for_a_subscriber_that_is_down_and_survive_the_publishers_kill_9(broker: &Broker) {
    let etcd = Etcd::start().await;
    let res = broker.resources(&[("initialRetryDelay", "50ms"), ("maxRetryDelay", "200ms")]);
    let inbox = Inbox::default();
    let app = subscriber("models", &inbox).await;
    let mut sub = sidecar("serve", &etcd, &res, Some(&app)).await;
    let publisher_data = tempfile::tempdir().unwrap();
    let start_publisher =
        || Sidecar::new("train").etcd(&etcd).resources(res.path()).data_dir(publisher_data.path()).spawn();
    let mut publisher = start_publisher().await;
    wait_until_subscribed(&publisher.client(), "models", &inbox).await;

    // The subscriber's sidecar dies; events published now wait in the publisher's outbox.
    sub.kill9().await;
    for i in 0..10 {
        publisher.client().publish("pubsub", "models", format!("v{i}").into_bytes(), "text/plain").await.unwrap();
    }
    // The publisher's sidecar dies too, right after acknowledging.
    publisher.kill9().await;

    let _publisher = start_publisher().await;
    let _sub = sidecar("serve", &etcd, &res, Some(&app)).await;
    eventually(Duration::from_secs(30), "all 10 events delivered after both restarts", || async {
        (0..10).all(|i| inbox.has(&format!("v{i}")))
    })
    .await;
}

/// A subscriber that always fails uses its attempts and its events end in the dead-letter
/// topic, while another app-id subscribed to the same topic gets every event unhindered.
pub async fn an_always_failing_subscriber_ends_in_the_dead_letter_topic_without_blocking_others(broker: &Broker) {
    let etcd = Etcd::start().await;
    let res =
        broker.resources(&[("maxDeliveryAttempts", "3"), ("initialRetryDelay", "20ms"), ("maxRetryDelay", "50ms")]);
    let (failed, dead, healthy) = (Inbox::default(), Inbox::default(), Inbox::default());
    let failed_c = failed.clone();
    let failing = TestApp::start(
        AppServer::new()
            .subscribe_with_dead_letter("pubsub", "jobs", "jobs-dead", move |event| {
                let failed = failed_c.clone();
                async move {
                    failed.push(event);
                    EventOutcome::Retry
                }
            })
            .subscribe("pubsub", "jobs-dead", dead.accept()),
    )
    .await;
    let fine = subscriber("jobs", &healthy).await;
    let _failing_sidecar = sidecar("broken", &etcd, &res, Some(&failing)).await;
    let _fine_sidecar = sidecar("fine", &etcd, &res, Some(&fine)).await;
    let publisher = sidecar("boss", &etcd, &res, None).await;
    let client = publisher.client();
    wait_until_subscribed(&client, "jobs", &healthy).await;
    wait_until_subscribed(&client, "jobs", &failed).await;

    for i in 0..20 {
        client.publish("pubsub", "jobs", format!("job-{i}").into_bytes(), "text/plain").await.unwrap();
    }
    eventually(Duration::from_secs(20), "the healthy subscriber has every job", || async {
        (0..20).all(|i| healthy.has(&format!("job-{i}")))
    })
    .await;
    eventually(Duration::from_secs(30), "every job in the dead-letter topic", || async {
        (0..20).all(|i| dead.has(&format!("job-{i}")))
    })
    .await;
    for i in 0..20 {
        let job = format!("job-{i}");
        assert_eq!(failed.count(&job), 3, "{job}: exactly maxDeliveryAttempts attempts");
        assert_eq!(healthy.count(&job), 1, "{job}: once to the healthy subscriber");
    }
}

/// A subscriber that takes events and never answers holds `maxInFlight` of them and no more,
/// while another app-id subscribed to the same topic gets every event: the in-flight limit is
/// per subscription, so a slow subscriber holds back only its own events. Once it answers, it
/// gets the rest.
pub async fn a_stuck_subscriber_holds_back_only_its_own_events(broker: &Broker) {
    const MAX_IN_FLIGHT: usize = 3;
    let etcd = Etcd::start().await;
    let res = broker.resources(&[("maxInFlight", "3"), ("deliveryTimeout", "120s")]);
    let healthy = Inbox::default();
    let (stuck_app, stuck, release) = holding_subscriber("work", |_| true).await;
    let fine = subscriber("work", &healthy).await;
    let _stuck_sidecar = sidecar("stuck", &etcd, &res, Some(&stuck_app)).await;
    let _fine_sidecar = sidecar("fine", &etcd, &res, Some(&fine)).await;
    let publisher = sidecar("boss", &etcd, &res, None).await;
    let client = publisher.client();
    wait_until_subscribed(&client, "work", &healthy).await;
    // The stuck app's first probe stays in flight there; the probes go on until one reaches it.
    eventually(Duration::from_secs(20), "the stuck subscriber's first event", || async {
        let _ = client.publish("pubsub", "work", b"probe-stuck".to_vec(), "text/plain").await;
        !stuck.events().is_empty()
    })
    .await;

    for i in 0..50 {
        client.publish("pubsub", "work", format!("w-{i}").into_bytes(), "text/plain").await.unwrap();
    }
    eventually(Duration::from_secs(30), "the healthy subscriber has all 50 events", || async {
        (0..50).all(|i| healthy.has(&format!("w-{i}")))
    })
    .await;
    eventually(Duration::from_secs(10), "the stuck subscriber holds maxInFlight events", || async {
        stuck.events().len() == MAX_IN_FLIGHT
    })
    .await;
    // Another look after the healthy side is done: nothing more reached the stuck app.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stuck.events().len(), MAX_IN_FLIGHT, "a stuck subscriber gets no more than maxInFlight events");

    release.send(true).unwrap();
    eventually(Duration::from_secs(30), "the stuck subscriber gets every event once it answers", || async {
        (0..50).all(|i| stuck.has(&format!("w-{i}")))
    })
    .await;
    for i in 0..50 {
        assert_eq!(healthy.count(&format!("w-{i}")), 1, "w-{i}: once to the healthy subscriber");
    }
}

/// One slow event takes one place in the subscription's window, not its whole delivery batch:
/// while the app holds it, the events published after it keep arriving, and once it is
/// answered its place is free again.
pub async fn a_slow_event_holds_back_no_other(broker: &Broker) {
    let etcd = Etcd::start().await;
    let res = broker.resources(&[("maxInFlight", "3"), ("deliveryTimeout", "120s")]);
    let (app, inbox, release) = holding_subscriber("mixed", |data| data == b"slow").await;
    let _subscriber = sidecar("mixed", &etcd, &res, Some(&app)).await;
    let publisher = sidecar("boss", &etcd, &res, None).await;
    let client = publisher.client();
    wait_until_subscribed(&client, "mixed", &inbox).await;

    // In one bulk publish, so that they are stored together and the slow event shares its
    // delivery with others.
    let mut entries = vec![BulkEntry::new("slow", b"slow".to_vec(), "text/plain")];
    entries.extend((0..30).map(|i| BulkEntry::new(format!("f-{i}"), format!("f-{i}").into_bytes(), "text/plain")));
    let failed = client.bulk_publish("pubsub", "mixed", entries).await.unwrap();
    assert!(failed.is_empty(), "every entry is published: {failed:?}");
    eventually(Duration::from_secs(30), "all 30 events after the slow one, while the app holds it", || async {
        (0..30).all(|i| inbox.has(&format!("f-{i}")))
    })
    .await;
    assert_eq!(inbox.count("slow"), 1, "the slow event reached the app once and is held there");

    release.send(true).unwrap();
    client.publish("pubsub", "mixed", b"after".to_vec(), "text/plain").await.unwrap();
    eventually(Duration::from_secs(30), "an event published after the slow one was answered", || async {
        inbox.has("after")
    })
    .await;
    assert_eq!(inbox.count("slow"), 1, "the slow event, once answered, is not delivered again");
    for i in 0..30 {
        assert_eq!(inbox.count(&format!("f-{i}")), 1, "f-{i}: once, nothing failed");
    }
}

/// A subscriber that holds its events keeps them in the backlog; once `maxBacklog` events wait,
/// publishing answers RESOURCE_EXHAUSTED with the reason, and nothing accepted is lost: when the
/// subscriber answers, every accepted event arrives and publishing works again.
pub async fn a_full_backlog_refuses_publishes_until_the_subscriber_catches_up(broker: &Broker) {
    const MAX_BACKLOG: usize = 5;
    let etcd = Etcd::start().await;
    let res = broker.resources(&[("maxBacklog", "5"), ("deliveryTimeout", "120s")]);
    // Probes pass at once; the events under test wait for the release.
    let (app, inbox, release) = holding_subscriber("held", not_a_probe).await;
    let _subscriber = sidecar("holder", &etcd, &res, Some(&app)).await;
    let publisher = sidecar("boss", &etcd, &res, None).await;
    let client = publisher.client();
    wait_until_subscribed(&client, "held", &inbox).await;

    // Publish until the backlog refuses (the probes may still take a place for a moment).
    let mut accepted = Vec::new();
    let refusal = loop {
        assert!(accepted.len() <= 3 * MAX_BACKLOG, "{} events accepted and none refused", accepted.len());
        let payload = format!("h-{}", accepted.len());
        match client.publish("pubsub", "held", payload.clone().into_bytes(), "text/plain").await {
            Ok(()) => accepted.push(payload),
            Err(status) => break status,
        }
    };
    eprintln!("{}: refused after {} events: {}", broker.kind(), accepted.len(), refusal.message());
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    let reason = refusal.message().to_lowercase();
    assert!(reason.contains("maxbacklog 5"), "the reason names the limit: {refusal:?}");
    assert!(accepted.len() >= MAX_BACKLOG - 1, "only {} accepted before the refusal", accepted.len());

    release.send(true).unwrap();
    eventually(Duration::from_secs(30), "every accepted event delivered", || async {
        accepted.iter().all(|p| inbox.has(p))
    })
    .await;
    eventually(Duration::from_secs(30), "publishing works again once the backlog drained", || async {
        client.publish("pubsub", "held", b"after".to_vec(), "text/plain").await.is_ok()
    })
    .await;
    eventually(Duration::from_secs(30), "the event after the drain", || async { inbox.has("after") }).await;
}

pub async fn bad_publishes_are_refused_with_the_reason(broker: &Broker) {
    let etcd = Etcd::start().await;
    let res = broker.resources(&[]);
    let publisher = Sidecar::new("p").etcd(&etcd).resources(res.path()).arg("--max-body-size").arg("1Ki").spawn().await;
    let client = publisher.client();
    let err = client.publish("nope", "t", b"x".to_vec(), "").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("pubsub nope is not found") && err.message().contains("'pubsub'"), "{err:?}");
    let err = client.publish("pubsub", "", b"x".to_vec(), "").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("topic"), "{err:?}");
    let err = client.publish("pubsub", "t", vec![0u8; 2048], "").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("2048"), "{err:?}");
    // A topic without subscribers takes the event (and keeps nothing), as in Dapr; once the
    // sidecar is ready, since publishing needs its routing table.
    publisher.wait_ready().await;
    client.publish("pubsub", "t", b"x".to_vec(), "").await.unwrap();
}

/// `rawPayload: "true"` (PublishEvent, BulkPublishEvent, a bulk entry) sends the bare payload:
/// the app gets the data and content type as published and no CloudEvent attributes; a value
/// that is not a boolean refuses the publish, naming it.
pub async fn raw_payload_events_reach_the_app_without_a_cloudevent_envelope(broker: &Broker) {
    use tandem_proto::runtime::dapr_client::DaprClient;
    use tandem_proto::runtime::{BulkPublishRequest, BulkPublishRequestEntry, PublishEventRequest};

    let etcd = Etcd::start().await;
    let res = broker.resources(&[]);
    let (inbox, log) = (Inbox::default(), RequestLog::default());
    let port = request_logging_subscriber("feed", &inbox, &log).await;
    let _sub = Sidecar::new("reader").etcd(&etcd).resources(res.path()).app_port(port).spawn().await;
    let publisher = sidecar("writer", &etcd, &res, None).await;
    wait_until_subscribed(&publisher.client(), "feed", &inbox).await;
    let mut dapr = DaprClient::connect(format!("http://{}", publisher.grpc_addr())).await.unwrap();
    let metadata = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    };
    let publish = |data: &str, content_type: &str, raw: &str| PublishEventRequest {
        pubsub_name: "pubsub".into(),
        topic: "feed".into(),
        data: data.as_bytes().to_vec().into(),
        data_content_type: content_type.into(),
        metadata: metadata(&[("rawPayload", raw)]),
    };
    let entry = |id: &str, data: &str, raw: Option<&str>| BulkPublishRequestEntry {
        entry_id: id.into(),
        event: data.as_bytes().to_vec(),
        content_type: String::new(),
        metadata: raw.map(|raw| metadata(&[("rawPayload", raw)])).unwrap_or_default(),
    };
    let bulk = |raw: &str, entries| BulkPublishRequest {
        pubsub_name: "pubsub".into(),
        topic: "feed".into(),
        entries,
        metadata: metadata(&[("rawPayload", raw)]),
    };

    // Bad values first: nothing of a refused publish may arrive.
    let err = dapr.publish_event(publish("refused", "", "yes")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("'rawPayload'") && err.message().contains("'yes'"), "{err:?}");
    let err = dapr.bulk_publish_event(bulk("sometimes", vec![entry("a", "refused-a", None)])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("'rawPayload'") && err.message().contains("'sometimes'"), "{err:?}");
    let entries = vec![entry("b", "refused-b", None), entry("c", "refused-c", Some("maybe"))];
    let err = dapr.bulk_publish_event(bulk("true", entries)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("entry 'c'") && err.message().contains("'maybe'"), "{err:?}");

    dapr.publish_event(publish(r#"{"raw":1}"#, "", "true")).await.unwrap();
    dapr.publish_event(publish("raw text", "text/plain", "True")).await.unwrap();
    dapr.publish_event(publish("wrapped", "text/plain", "false")).await.unwrap();
    // The request asks for raw payloads; one entry asks otherwise.
    let entries = vec![entry("1", "bulk-raw", None), entry("2", "bulk-wrapped", Some("false"))];
    let answer = dapr.bulk_publish_event(bulk("true", entries)).await.unwrap().into_inner();
    assert!(answer.failed_entries.is_empty(), "{answer:?}");
    let all = [r#"{"raw":1}"#, "raw text", "wrapped", "bulk-raw", "bulk-wrapped"];
    eventually(Duration::from_secs(20), "the raw and wrapped events delivered", || async {
        all.iter().all(|p| inbox.has(p))
    })
    .await;
    assert!(!inbox.payloads().iter().any(|p| p.starts_with("refused")), "{:?}", inbox.payloads());

    for (data, content_type) in [
        (r#"{"raw":1}"#, "application/octet-stream"),
        ("raw text", "text/plain"),
        ("bulk-raw", "application/octet-stream"),
    ] {
        let event = log.find(data.as_bytes()).unwrap();
        assert_eq!(event.data_content_type, content_type, "{data}: as given, else bytes (no guessing)");
        assert_eq!((event.source.as_str(), event.r#type.as_str(), event.spec_version.as_str()), ("", "", ""), "{data}");
        assert_eq!(event.extensions, None, "{data}: no CloudEvent extensions, no traceparent");
        // What routing and answers need is there all the same.
        assert!(!event.id.is_empty(), "{data}");
        assert_eq!((event.topic.as_str(), event.pubsub_name.as_str()), ("feed", "pubsub"), "{data}");
    }
    for data in ["wrapped", "bulk-wrapped"] {
        let event = log.find(data.as_bytes()).unwrap();
        assert_eq!((event.source.as_str(), event.spec_version.as_str()), ("writer", "1.0"), "{data}");
        assert_eq!(event.r#type, "com.dapr.event.sent", "{data}");
    }
}

pub async fn a_subscription_that_asks_for_order_gets_events_in_publish_order(broker: &Broker) {
    let etcd = Etcd::start().await;
    let res = broker.resources(&[("initialRetryDelay", "20ms"), ("maxRetryDelay", "50ms")]);
    let inbox = Inbox::default();
    let retried_once: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
    let (inbox_c, retried_c) = (inbox.clone(), retried_once.clone());
    let options = tandem_sdk::SubscriptionOptions { ordered: true, ..Default::default() };
    let app = TestApp::start(AppServer::new().subscribe_with("pubsub", "steps", options, move |event| {
        let (inbox, retried) = (inbox_c.clone(), retried_c.clone());
        async move {
            let payload = String::from_utf8_lossy(&event.data).into_owned();
            // Every 7th step fails once: in order, the steps after it must wait for it.
            let number: usize = payload.trim_start_matches("step-").parse().unwrap_or(0);
            if number % 7 == 3 && retried.lock().unwrap().insert(payload.clone()) {
                return EventOutcome::Retry;
            }
            inbox.push(event);
            EventOutcome::Success
        }
    }))
    .await;
    let _sub = sidecar("trainer", &etcd, &res, Some(&app)).await;
    let publisher = sidecar("feeder", &etcd, &res, None).await;
    let client = publisher.client();
    wait_until_subscribed(&client, "steps", &inbox).await;

    for i in 0..40 {
        client.publish("pubsub", "steps", format!("step-{i}").into_bytes(), "text/plain").await.unwrap();
    }
    eventually(Duration::from_secs(30), "40 steps delivered", || async { inbox.has("step-39") && inbox.has("step-3") })
        .await;
    let steps: Vec<String> = inbox.payloads().into_iter().filter(|p| p.starts_with("step-")).collect();
    let expected: Vec<String> = (0..40).map(|i| format!("step-{i}")).collect();
    assert_eq!(steps, expected, "in publish order, each once, the retried ones in their place");
}

/// The SDK's streaming subscription ([`SidecarClient::subscribe`]): bad subscriptions refused by
/// name; RETRY redelivers, DROP does not, exhausted events reach the dead-letter topic (itself
/// read from a stream), with answers given from another task through [`tandem_sdk::StreamAnswers`].
pub async fn the_sdks_event_stream_retries_drops_and_dead_letters(broker: &Broker) {
    use tandem_sdk::SubscriptionOptions;

    let etcd = Etcd::start().await;
    let res =
        broker.resources(&[("maxDeliveryAttempts", "3"), ("initialRetryDelay", "20ms"), ("maxRetryDelay", "100ms")]);
    let sub = sidecar("stream-worker", &etcd, &res, None).await;
    let publisher = sidecar("stream-boss", &etcd, &res, None).await;
    sub.wait_ready().await;
    let client = sub.client();

    let routed = SubscriptionOptions { route: "/jobs".into(), ..Default::default() };
    let err = client.subscribe("pubsub", "jobs", &routed).await.err().expect("a route is refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("'jobs'") && err.message().contains("route"), "{err:?}");
    let err = client.subscribe("nope", "jobs", &Default::default()).await.err().expect("an unknown pub/sub");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("pubsub nope is not found"), "{err:?}");
    let err = client.subscribe("pubsub", "", &Default::default()).await.err().expect("an empty topic");
    assert_eq!(err.code(), Code::InvalidArgument);

    let options = SubscriptionOptions { dead_letter_topic: "jobs-dead".into(), ..Default::default() };
    let mut jobs = client.subscribe("pubsub", "jobs", &options).await.unwrap();
    let mut dead = client.subscribe("pubsub", "jobs-dead", &Default::default()).await.unwrap();
    let (inbox, dead_inbox) = (Inbox::default(), Inbox::default());
    let answers = jobs.answers();
    let seen = inbox.clone();
    tokio::spawn(async move {
        while let Ok(Some(event)) = jobs.next().await {
            let payload = String::from_utf8_lossy(&event.data).into_owned();
            let id = event.id.clone();
            seen.push(event);
            let outcome = match payload.as_str() {
                "retry-once" if seen.count("retry-once") == 1 => EventOutcome::Retry,
                "drop" => EventOutcome::Drop,
                "fail" => EventOutcome::Retry,
                _ => EventOutcome::Success,
            };
            let answers = answers.clone();
            tokio::spawn(async move { answers.answer(&id, outcome).expect("the stream is open") });
        }
    });
    let seen_dead = dead_inbox.clone();
    tokio::spawn(async move {
        while let Ok(Some(event)) = dead.next().await {
            let id = event.id.clone();
            seen_dead.push(event);
            dead.answer(&id, EventOutcome::Success).expect("the stream is open");
        }
    });

    let client = publisher.client();
    wait_until_subscribed(&client, "jobs", &inbox).await;
    for job in ["ok", "retry-once", "drop", "fail"] {
        client.publish("pubsub", "jobs", job.as_bytes().to_vec(), "text/plain").await.unwrap();
    }
    eventually(Duration::from_secs(20), "'fail' in the dead-letter topic", || async { dead_inbox.has("fail") }).await;
    eventually(Duration::from_secs(20), "'retry-once' redelivered", || async { inbox.count("retry-once") == 2 }).await;
    assert_eq!(inbox.count("fail"), 3, "exactly maxDeliveryAttempts attempts");
    assert_eq!(inbox.count("ok"), 1);
    assert_eq!(inbox.count("drop"), 1, "DROP is not delivered again");
    assert_eq!(dead_inbox.count("fail"), 1);
    assert!(!dead_inbox.has("drop") && !dead_inbox.has("ok"), "{:?}", dead_inbox.payloads());
}

/// Opens a streaming subscription to `topic` through `sidecar` (retrying while the sidecar has
/// not reached etcd) and answers SUCCESS to each event, kept in `inbox`; aborting the task
/// closes the stream.
pub async fn stream_into(sidecar: &RunningSidecar, topic: &str, inbox: &Inbox) -> tokio::task::JoinHandle<()> {
    let client = sidecar.client();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut stream = loop {
        match client.subscribe("pubsub", topic, &Default::default()).await {
            Ok(stream) => break stream,
            Err(e) => assert!(Instant::now() < deadline, "no stream opened within 20 s: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let seen = inbox.clone();
    tokio::spawn(async move {
        while let Ok(Some(event)) = stream.next().await {
            let id = event.id.clone();
            seen.push(event);
            let _ = stream.answer(&id, EventOutcome::Success);
        }
    })
}

/// While no stream of a streaming subscription is open its events wait for the next one, also
/// when the app serves `OnTopicEvent` for the topics it lists: they are not handed to it (an
/// app that does not list the topic would drop them, as the SDK does).
pub async fn a_closed_streams_events_wait_for_the_next_stream_not_for_the_app(broker: &Broker) {
    let etcd = Etcd::start().await;
    let res = broker.resources(&[]);
    let listed = Inbox::default();
    let app = TestApp::start(AppServer::new().subscribe("pubsub", "listed", listed.accept())).await;
    let sub = sidecar("two-ways", &etcd, &res, Some(&app)).await;
    let publisher = sidecar("two-ways-boss", &etcd, &res, None).await;
    let client = publisher.client();
    wait_until_subscribed(&client, "listed", &listed).await;
    let streamed = Inbox::default();
    let reader = stream_into(&sub, "streamed", &streamed).await;
    wait_until_subscribed(&client, "streamed", &streamed).await;

    reader.abort();
    sub.wait_for_log("streaming subscription closed").await;
    for i in 0..3 {
        client.publish("pubsub", "streamed", format!("meanwhile-{i}").into_bytes(), "text/plain").await.unwrap();
    }
    // Published after them: once it is at the app, their deliveries were under way too.
    client.publish("pubsub", "listed", b"marker".to_vec(), "text/plain").await.unwrap();
    eventually(Duration::from_secs(20), "the marker at the app", || async { listed.has("marker") }).await;

    let next = Inbox::default();
    let _reader = stream_into(&sub, "streamed", &next).await;
    eventually(Duration::from_secs(30), "every event published meanwhile on the next stream", || async {
        (0..3).all(|i| next.has(&format!("meanwhile-{i}")))
    })
    .await;
    assert!(!listed.payloads().iter().any(|p| p.starts_with("meanwhile-")), "{:?}", listed.payloads());
}

/// An app that serves `OnTopicEvent` for one topic and reads another from a stream: when its
/// sidecar records the app's own list (here: once the app comes up, after the stream opened),
/// the stream's subscription stays.
pub async fn an_apps_listed_subscriptions_leave_its_streams_alone(broker: &Broker) {
    let etcd = Etcd::start().await;
    let res = broker.resources(&[]);
    let app_port = free_port();
    let sub = Sidecar::new("mixed").etcd(&etcd).resources(res.path()).app_port(app_port).spawn().await;
    let publisher = sidecar("mixer", &etcd, &res, None).await;
    // The stream opens while the app is still down, so before its list is recorded.
    let streamed = Inbox::default();
    let _reader = stream_into(&sub, "streamed", &streamed).await;
    let listed = Inbox::default();
    let _app = TestApp::start_on(AppServer::new().subscribe("pubsub", "listed", listed.accept()), app_port).await;
    sub.wait_for_log("app subscriptions registered").await;

    let client = publisher.client();
    wait_until_subscribed(&client, "listed", &listed).await;
    wait_until_subscribed(&client, "streamed", &streamed).await;
    client.publish("pubsub", "streamed", b"after".to_vec(), "text/plain").await.unwrap();
    eventually(Duration::from_secs(20), "'after' on the stream", || async { streamed.has("after") }).await;
    assert!(!listed.has("after"), "{:?}", listed.payloads());
}

pub async fn a_streaming_subscription_receives_events_and_answers_on_the_stream(broker: &Broker) {
    use tandem_proto::runtime::dapr_client::DaprClient;
    use tandem_proto::runtime::subscribe_topic_events_request_alpha1::SubscribeTopicEventsRequestType as Req;
    use tandem_proto::runtime::subscribe_topic_events_response_alpha1::SubscribeTopicEventsResponseType as Resp;
    use tandem_proto::runtime::topic_event_response::TopicEventResponseStatus;
    use tandem_proto::runtime::{
        SubscribeTopicEventsRequestAlpha1, SubscribeTopicEventsRequestInitialAlpha1,
        SubscribeTopicEventsRequestProcessedAlpha1, TopicEventResponse,
    };

    let etcd = Etcd::start().await;
    let res = broker.resources(&[("initialRetryDelay", "20ms")]);
    // The subscriber serves no callback API at all: it only holds a stream open.
    let sub = sidecar("streamer", &etcd, &res, None).await;
    let publisher = sidecar("feeder", &etcd, &res, None).await;
    let mut raw = DaprClient::connect(format!("http://{}", sub.grpc_addr())).await.unwrap();
    let initial = |pubsub: &str, topic: &str| SubscribeTopicEventsRequestAlpha1 {
        subscribe_topic_events_request_type: Some(Req::InitialRequest(SubscribeTopicEventsRequestInitialAlpha1 {
            pubsub_name: pubsub.into(),
            topic: topic.into(),
            ..Default::default()
        })),
    };

    // Bad first messages are refused, naming the problem.
    let err = raw.subscribe_topic_events_alpha1(tokio_stream::iter(vec![initial("nope", "t")])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("pubsub nope is not found"), "{err:?}");
    let answer_first = SubscribeTopicEventsRequestAlpha1 {
        subscribe_topic_events_request_type: Some(Req::EventProcessed(
            SubscribeTopicEventsRequestProcessedAlpha1::default(),
        )),
    };
    let err = raw.subscribe_topic_events_alpha1(tokio_stream::iter(vec![answer_first])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let (requests, outgoing) = tokio::sync::mpsc::channel(16);
    requests.send(initial("pubsub", "ticks")).await.unwrap();
    let mut incoming = raw
        .subscribe_topic_events_alpha1(tokio_stream::wrappers::ReceiverStream::new(outgoing))
        .await
        .unwrap()
        .into_inner();
    let first = incoming.message().await.unwrap().unwrap();
    assert!(matches!(first.subscribe_topic_events_response_type, Some(Resp::InitialResponse(_))));

    // The app side: record each event; answer RETRY to "tick-3" the first time.
    let inbox = Inbox::default();
    let reader_inbox = inbox.clone();
    tokio::spawn(async move {
        let mut retried = false;
        while let Ok(Some(message)) = incoming.message().await {
            let Some(Resp::EventMessage(event)) = message.subscribe_topic_events_response_type else { continue };
            let status = if event.data[..] == b"tick-3"[..] && !retried {
                retried = true;
                TopicEventResponseStatus::Retry
            } else {
                TopicEventResponseStatus::Success
            };
            let id = event.id.clone();
            reader_inbox.push(tandem_sdk::TopicEvent::from(event));
            let processed = SubscribeTopicEventsRequestProcessedAlpha1 {
                id,
                status: Some(TopicEventResponse { status: status as i32 }),
            };
            let answer = SubscribeTopicEventsRequestAlpha1 {
                subscribe_topic_events_request_type: Some(Req::EventProcessed(processed)),
            };
            if requests.send(answer).await.is_err() {
                return;
            }
        }
    });

    let client = publisher.client();
    wait_until_subscribed(&client, "ticks", &inbox).await;
    for i in 0..10 {
        client.publish("pubsub", "ticks", format!("tick-{i}").into_bytes(), "text/plain").await.unwrap();
    }
    eventually(Duration::from_secs(20), "10 ticks on the stream", || async {
        (0..10).all(|i| inbox.has(&format!("tick-{i}")))
    })
    .await;
    eventually(Duration::from_secs(20), "tick-3 redelivered after RETRY", || async { inbox.count("tick-3") == 2 })
        .await;
    for i in (0..10).filter(|i| *i != 3) {
        assert_eq!(inbox.count(&format!("tick-{i}")), 1, "tick-{i}");
    }
}

const EVENTS: usize = 10_000;
const PUBLISHERS: usize = 16;

/// The `event_sink` binary (tests/src/bin): the subscriber app as a process of its own.
struct Sink {
    port: u16,
    file: std::path::PathBuf,
    child: Option<Child>,
}

impl Sink {
    async fn start(port: u16, file: &std::path::Path) -> Sink {
        let mut sink = Sink { port, file: file.to_path_buf(), child: None };
        sink.launch().await;
        sink
    }

    async fn launch(&mut self) {
        let child = Command::new(workspace_binary("event_sink"))
            .arg(self.port.to_string())
            .args(["pubsub", "work"])
            .arg(&self.file)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("starting event_sink");
        self.child = Some(child);
        let address = SocketAddr::from(([127, 0, 0, 1], self.port));
        eventually(Duration::from_secs(20), "event_sink listening", || async {
            tokio::net::TcpStream::connect(address).await.is_ok()
        })
        .await;
    }

    async fn kill9_and_restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill -9 event_sink");
        }
        self.launch().await;
    }

    /// How often each payload was received.
    fn received(&self) -> HashMap<String, usize> {
        let text = std::fs::read_to_string(&self.file).unwrap_or_default();
        let mut counts = HashMap::new();
        for line in text.lines() {
            *counts.entry(line.to_string()).or_default() += 1;
        }
        counts
    }
}

/// 10,000 events published while the subscriber app, its sidecar and the publisher's sidecar
/// are each `kill -9`ed and restarted once: every acknowledged event must reach the app; the
/// duplicates it sees are counted and printed. `metadata` is added to the component's.
pub async fn ten_thousand_events_survive_killing_the_app_its_sidecar_and_the_publishers_sidecar(
    broker: &Broker,
    metadata: &[(&str, &str)],
) {
    let etcd = Etcd::start().await;
    let mut all = vec![("initialRetryDelay", "50ms"), ("maxRetryDelay", "500ms"), ("maxDeliveryAttempts", "1000")];
    all.extend_from_slice(metadata);
    let res = broker.resources(&all);
    let dirs = tempfile::tempdir().unwrap();
    let (sub_data, pub_data) = (dirs.path().join("subscriber"), dirs.path().join("publisher"));
    let sink_port = free_port();
    let mut sink = Sink::start(sink_port, &dirs.path().join("received.txt")).await;
    let subscriber =
        || Sidecar::new("sink").etcd(&etcd).resources(res.path()).app_port(sink_port).data_dir(&sub_data).spawn();
    let publisher = || Sidecar::new("source").etcd(&etcd).resources(res.path()).data_dir(&pub_data).spawn();
    let mut sub_sidecar: RunningSidecar = subscriber().await;
    let mut pub_sidecar: RunningSidecar = publisher().await;

    // Wait until the publisher knows the subscription: a probe event arrives.
    let client = Arc::new(RwLock::new(pub_sidecar.client()));
    eventually(Duration::from_secs(30), "the subscription to reach the publisher", || {
        let client = client.clone();
        let received = sink.received();
        async move {
            if received.contains_key("probe") {
                return true;
            }
            let _ = client.read().await.publish("pubsub", "work", b"probe".to_vec(), "text/plain").await;
            false
        }
    })
    .await;

    // Publishers retry each event until the sidecar acknowledges it: only acknowledged events
    // are promised, and while the publisher's sidecar is down nothing is acknowledged.
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let acknowledged = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..PUBLISHERS)
        .map(|_| {
            let (client, next, acknowledged) = (client.clone(), next.clone(), acknowledged.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if i >= EVENTS {
                        return;
                    }
                    let payload = format!("event-{i}").into_bytes();
                    let started = Instant::now();
                    loop {
                        let sidecar: SidecarClient = client.read().await.clone();
                        if sidecar.publish("pubsub", "work", payload.clone(), "text/plain").await.is_ok() {
                            acknowledged.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            break;
                        }
                        assert!(started.elapsed() < Duration::from_secs(120), "event-{i} never acknowledged");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        })
        .collect();

    let progress = |n: usize| {
        let acknowledged = acknowledged.clone();
        async move {
            eventually(Duration::from_secs(120), &format!("{n} events acknowledged"), || {
                let acknowledged = acknowledged.clone();
                async move { acknowledged.load(std::sync::atomic::Ordering::SeqCst) >= n }
            })
            .await
        }
    };
    progress(EVENTS / 4).await;
    sink.kill9_and_restart().await;
    progress(EVENTS / 2).await;
    sub_sidecar.kill9().await;
    sub_sidecar = subscriber().await;
    progress(EVENTS * 3 / 4).await;
    pub_sidecar.kill9().await;
    pub_sidecar = publisher().await;
    *client.write().await = pub_sidecar.client();
    for worker in workers {
        worker.await.unwrap();
    }

    eventually(Duration::from_secs(180), "every acknowledged event at the app", || {
        let received = sink.received();
        async move { (0..EVENTS).all(|i| received.contains_key(&format!("event-{i}"))) }
    })
    .await;
    let received = sink.received();
    let duplicates: usize = (0..EVENTS).map(|i| received[&format!("event-{i}")] - 1).sum();
    let twice = (0..EVENTS).filter(|i| received[&format!("event-{i}")] > 1).count();
    println!(
        "pub/sub fault test ({}): {EVENTS} events acknowledged, all {EVENTS} delivered; {duplicates} duplicate deliveries ({twice} events seen more than once)",
        broker.kind()
    );
    drop(sub_sidecar);
}
