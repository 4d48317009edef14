//! `pubsub.embedded` through real sidecars: delivery across sidecars, competing replicas,
//! RETRY and DROP, dead letters, delivery resuming after restarts, and bad input.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_sdk::{AppServer, Code, EventOutcome};
use tandem_tests::pubsub::{Inbox, subscriber, wait_until_subscribed};
use tandem_tests::state::ResourcesDir;
use tandem_tests::{Etcd, RunningSidecar, Sidecar, TestApp, eventually};

fn resources(metadata: &[(&str, &str)]) -> ResourcesDir {
    ResourcesDir::new(&[("pubsub", "pubsub.embedded", metadata)])
}

async fn sidecar(app_id: &str, etcd: &Etcd, resources: &ResourcesDir, app: Option<&TestApp>) -> RunningSidecar {
    let mut sidecar = Sidecar::new(app_id).etcd(etcd).resources(resources.path());
    if let Some(app) = app {
        sidecar = sidecar.app_port(app.port());
    }
    sidecar.spawn().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_travel_from_publisher_to_subscriber_as_cloudevents() {
    let etcd = Etcd::start().await;
    let res = resources(&[]);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_of_a_subscriber_compete_for_events() {
    let etcd = Etcd::start().await;
    let res = resources(&[]);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_redelivers_drop_drops_and_exhausted_events_go_to_the_dead_letter_topic() {
    let etcd = Etcd::start().await;
    let res = resources(&[("maxDeliveryAttempts", "3"), ("initialRetryDelay", "20ms"), ("maxRetryDelay", "100ms")]);
    let inbox = Inbox::default();
    let dead = Inbox::default();
    let attempts: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let (inbox_c, dead_c, attempts_c) = (inbox.clone(), dead.clone(), attempts.clone());
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
            .subscribe("pubsub", "jobs-dead", move |event| {
                let dead = dead_c.clone();
                async move {
                    dead.push(event);
                    EventOutcome::Success
                }
            }),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_for_a_subscriber_that_is_down_and_survive_the_publishers_kill_9() {
    let etcd = Etcd::start().await;
    let res = resources(&[("initialRetryDelay", "50ms"), ("maxRetryDelay", "200ms")]);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_publishes_are_refused_with_the_reason() {
    let etcd = Etcd::start().await;
    let res = resources(&[]);
    let publisher = Sidecar::new("p").etcd(&etcd).resources(res.path()).arg("--max-body-size").arg("1Ki").spawn().await;
    let client = publisher.client();
    let err = client.publish("nope", "t", b"x".to_vec(), "").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("'nope'") && err.message().contains("'pubsub'"), "{err:?}");
    let err = client.publish("pubsub", "", b"x".to_vec(), "").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("topic"), "{err:?}");
    let err = client.publish("pubsub", "t", vec![0u8; 2048], "").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("2048"), "{err:?}");
    // A topic without subscribers takes the event (and keeps nothing), as in Dapr.
    client.publish("pubsub", "t", b"x".to_vec(), "").await.unwrap();

    // The official Dapr SDK publishes too.
    let mut dapr = dapr::Client::<dapr::client::TonicClientWithAuth>::connect_with_address(format!(
        "http://{}",
        publisher.grpc_addr()
    ))
    .await
    .unwrap();
    dapr.publish_event("pubsub", "t", "application/json", br#"{"from":"dapr"}"#.to_vec(), None).await.unwrap();
    let err = dapr.publish_event("nope", "t", "text/plain", b"x".to_vec(), None).await.unwrap_err();
    assert!(format!("{err:?}").contains("InvalidArgument"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_that_asks_for_order_gets_events_in_publish_order() {
    let etcd = Etcd::start().await;
    let res = resources(&[("initialRetryDelay", "20ms"), ("maxRetryDelay", "50ms")]);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_subscription_receives_events_and_answers_on_the_stream() {
    use tandem_proto::runtime::dapr_client::DaprClient;
    use tandem_proto::runtime::subscribe_topic_events_request_alpha1::SubscribeTopicEventsRequestType as Req;
    use tandem_proto::runtime::subscribe_topic_events_response_alpha1::SubscribeTopicEventsResponseType as Resp;
    use tandem_proto::runtime::topic_event_response::TopicEventResponseStatus;
    use tandem_proto::runtime::{
        SubscribeTopicEventsRequestAlpha1, SubscribeTopicEventsRequestInitialAlpha1,
        SubscribeTopicEventsRequestProcessedAlpha1, TopicEventResponse,
    };

    let etcd = Etcd::start().await;
    let res = resources(&[("initialRetryDelay", "20ms")]);
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
    assert!(err.message().contains("'nope'"), "{err:?}");
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
            let status = if event.data == b"tick-3" && !retried {
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
