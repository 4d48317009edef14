//! `pubsub.jetstream` through real sidecars and a real `nats-server -js`: the cases every
//! pub/sub component passes (`tandem_tests::pubsub_cases`), the fault test, and what is
//! particular to a broker (unreachable, its payload limit, the messages other NATS clients
//! read and write on the stream, consumers that nobody uses any more).

use std::time::Duration;

use async_nats::jetstream::consumer::{PullConsumer, pull};
use tandem_sdk::{BulkEntry, Code};
use tandem_tests::pubsub::{Inbox, RequestLog, request_logging_subscriber, subscriber, wait_until_subscribed};
use tandem_tests::pubsub_cases::{self as cases, Broker, sidecar};
use tandem_tests::state::ResourcesDir;
use tandem_tests::{Etcd, Nats, Sidecar, eventually, free_port};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_travel_from_publisher_to_subscriber_as_cloudevents() {
    cases::events_travel_from_publisher_to_subscriber_as_cloudevents(&Broker::jetstream().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_of_a_subscriber_compete_for_events() {
    cases::replicas_of_a_subscriber_compete_for_events(&Broker::jetstream().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_redelivers_drop_drops_and_exhausted_events_go_to_the_dead_letter_topic() {
    cases::retry_redelivers_drop_drops_and_exhausted_events_go_to_the_dead_letter_topic(&Broker::jetstream().await)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backlog_refuses_publishes_until_the_subscriber_catches_up() {
    let broker = Broker::jetstream().await;
    cases::a_full_backlog_refuses_publishes_until_the_subscriber_catches_up(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_event_holds_back_no_other() {
    let broker = Broker::jetstream().await;
    cases::a_slow_event_holds_back_no_other(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_subscriber_holds_back_only_its_own_events() {
    let broker = Broker::jetstream().await;
    cases::a_stuck_subscriber_holds_back_only_its_own_events(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_always_failing_subscriber_ends_in_the_dead_letter_topic_without_blocking_others() {
    let broker = Broker::jetstream().await;
    cases::an_always_failing_subscriber_ends_in_the_dead_letter_topic_without_blocking_others(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_for_a_subscriber_that_is_down_and_survive_the_publishers_kill_9() {
    let broker = Broker::jetstream().await;
    cases::events_wait_for_a_subscriber_that_is_down_and_survive_the_publishers_kill_9(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_publishes_are_refused_with_the_reason() {
    cases::bad_publishes_are_refused_with_the_reason(&Broker::jetstream().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_payload_events_reach_the_app_without_a_cloudevent_envelope() {
    cases::raw_payload_events_reach_the_app_without_a_cloudevent_envelope(&Broker::jetstream().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_that_asks_for_order_gets_events_in_publish_order() {
    cases::a_subscription_that_asks_for_order_gets_events_in_publish_order(&Broker::jetstream().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdks_event_stream_retries_drops_and_dead_letters() {
    cases::the_sdks_event_stream_retries_drops_and_dead_letters(&Broker::jetstream().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apps_listed_subscriptions_leave_its_streams_alone() {
    cases::an_apps_listed_subscriptions_leave_its_streams_alone(&Broker::jetstream().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_streams_events_wait_for_the_next_stream_not_for_the_app() {
    cases::a_closed_streams_events_wait_for_the_next_stream_not_for_the_app(&Broker::jetstream().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_subscription_receives_events_and_answers_on_the_stream() {
    cases::a_streaming_subscription_receives_events_and_answers_on_the_stream(&Broker::jetstream().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_survive_killing_the_app_its_sidecar_and_the_publishers_sidecar() {
    // Deliveries cut off by the subscriber sidecar's kill come back after ackWait.
    let metadata = [("ackWait", "5s"), ("deliveryTimeout", "4s")];
    cases::ten_thousand_events_survive_killing_the_app_its_sidecar_and_the_publishers_sidecar(
        &Broker::jetstream().await,
        &metadata,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_nats_server_is_a_clear_unavailable_until_it_is_back() {
    let etcd = Etcd::start().await;
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let res = ResourcesDir::new(&[("pubsub", "pubsub.jetstream", &[("natsURL", url.as_str())])]);
    // The sidecar starts without NATS and says so on publish.
    let inbox = Inbox::default();
    let app = subscriber("later", &inbox).await;
    let _sub = sidecar("reader", &etcd, &res, Some(&app)).await;
    let publisher = sidecar("writer", &etcd, &res, None).await;
    let client = publisher.client();
    let err = client.publish("pubsub", "later", b"x".to_vec(), "text/plain").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains(&url) && err.message().contains("not reachable"), "{err:?}");

    // Once the server is there, both sidecars connect by themselves.
    let _nats = Nats::start_on(port).await;
    wait_until_subscribed(&client, "later", &inbox).await;
    client.publish("pubsub", "later", b"after".to_vec(), "text/plain").await.unwrap();
    eventually(Duration::from_secs(20), "the event after NATS came up", || async { inbox.has("after") }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_over_the_nats_payload_limit_is_refused_naming_it() {
    let etcd = Etcd::start().await;
    let nats = Nats::start().await;
    let res = nats.resources("pubsub", &[]);
    let publisher = Sidecar::new("p").etcd(&etcd).resources(res.path()).arg("--max-body-size").arg("4Mi").spawn().await;
    // Under --max-body-size, over nats-server's default max_payload of 1 MiB.
    let err = publisher.client().publish("pubsub", "big", vec![7u8; 2 << 20], "").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("max_payload"), "{err:?}");
    // In a bulk publish such an entry fails alone, with the same reason.
    let entries = vec![
        BulkEntry::new("small-1", "s1", ""),
        BulkEntry::new("big", vec![7u8; 2 << 20], ""),
        BulkEntry::new("small-2", "s2", ""),
    ];
    let failed = publisher.client().bulk_publish("pubsub", "big", entries).await.unwrap();
    assert_eq!(failed.iter().map(|f| f.entry_id.as_str()).collect::<Vec<_>>(), ["big"], "{failed:?}");
    assert!(failed[0].error.contains("max_payload"), "{failed:?}");
    // The component's configuration errors stop tandemd at start, naming the field.
    let bad = ResourcesDir::new(&[("pubsub", "pubsub.jetstream", &[("natsURL", "nats://127.0.0.1:1"), ("jwt", "x")])]);
    let output = tandem_tests::sidecar::run_until_exit(&[
        "--app-id",
        "x",
        "--resources-path",
        &bad.path().to_string_lossy(),
        "--grpc-port",
        "0",
        "--internal-port",
        "0",
        "--admin-port",
        "0",
    ])
    .await;
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("'jwt'") && stderr.contains("pubsub.yaml"), "{stderr}");
}

/// The stream and a topic's subject of component `pubsub` in namespace `default`.
const STREAM: &str = "TANDEM__default__pubsub";
const SUBJECT_PREFIX: &str = "tandem.default.pubsub";

async fn jetstream_of(nats: &Nats) -> async_nats::jetstream::Context {
    async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("connecting to nats-server"))
}

/// With `rawPayload` the stream holds the bare payload, so a reader of the stream that is not
/// Tandem gets the bytes as published; and a message another NATS client puts on a topic's
/// subject reaches the subscribing app as a raw event, not dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_payloads_are_bare_on_the_stream_and_other_clients_messages_arrive_raw() {
    use tandem_proto::runtime::PublishEventRequest;
    use tandem_proto::runtime::dapr_client::DaprClient;
    use tokio_stream::StreamExt;

    let etcd = Etcd::start().await;
    let nats = Nats::start().await;
    let res = nats.resources("pubsub", &[]);
    let (inbox, log) = (Inbox::default(), RequestLog::default());
    let port = request_logging_subscriber("ext", &inbox, &log).await;
    let _sub = Sidecar::new("reader").etcd(&etcd).resources(res.path()).app_port(port).spawn().await;
    let publisher = sidecar("writer", &etcd, &res, None).await;
    wait_until_subscribed(&publisher.client(), "ext", &inbox).await;

    // A reader of its own on the topic's subject, as a service outside Tandem would have.
    let js = jetstream_of(&nats).await;
    let subject = format!("{SUBJECT_PREFIX}.ext");
    let outsider: PullConsumer = js
        .get_stream(STREAM)
        .await
        .unwrap()
        .create_consumer(pull::Config {
            durable_name: Some("outsider".into()),
            filter_subject: subject.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut dapr = DaprClient::connect(format!("http://{}", publisher.grpc_addr())).await.unwrap();
    dapr.publish_event(PublishEventRequest {
        pubsub_name: "pubsub".into(),
        topic: "ext".into(),
        data: b"bare bytes".to_vec().into(),
        data_content_type: "text/plain".into(),
        metadata: [("rawPayload".to_string(), "true".to_string())].into(),
    })
    .await
    .unwrap();
    // Another NATS client publishes to the topic's subject: without headers, and with an id
    // and a content type.
    js.publish(subject.clone(), "from-outside".into()).await.unwrap().await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "outside-2");
    headers.insert("Content-Type", "application/x-thing");
    js.publish_with_headers(subject.clone(), headers, "from-outside-with-id".into()).await.unwrap().await.unwrap();

    let mut messages = outsider.messages().await.unwrap();
    let bare = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let message = messages.next().await.expect("the outsider's messages").expect("a message");
            message.ack().await.unwrap();
            if message.payload.as_ref() == b"bare bytes" {
                return message;
            }
        }
    })
    .await
    .expect("the raw event on the stream within 20 s");
    let header = |name: &str| bare.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_string());
    assert_eq!(header("Tandem-Format").as_deref(), Some("raw"));
    assert_eq!(header("Content-Type").as_deref(), Some("text/plain"));

    eventually(Duration::from_secs(20), "the raw event and both outside messages at the app", || async {
        ["bare bytes", "from-outside", "from-outside-with-id"].iter().all(|p| inbox.has(p))
    })
    .await;
    let delivered = log.find(b"bare bytes").unwrap();
    assert_eq!(header("Tandem-Event-Id"), Some(delivered.id.clone()), "one id on the stream and at the app");
    assert_eq!(delivered.data_content_type, "text/plain");
    for (data, id, content_type) in [
        ("from-outside", None, "application/octet-stream"),
        ("from-outside-with-id", Some("outside-2"), "application/x-thing"),
    ] {
        let event = log.find(data.as_bytes()).unwrap();
        assert_eq!((event.source.as_str(), event.spec_version.as_str()), ("", ""), "{data}: raw");
        assert_eq!((event.topic.as_str(), event.pubsub_name.as_str()), ("ext", "pubsub"), "{data}");
        assert_eq!(event.data_content_type, content_type, "{data}");
        match id {
            Some(id) => assert_eq!(event.id, id, "{data}: the message's Nats-Msg-Id"),
            None => assert!(event.id.starts_with(&format!("{STREAM}:")), "{data}: stream and sequence: {}", event.id),
        }
    }
}

/// Durable consumers carry `consumerInactiveThreshold`: one that a sidecar pulls from stays,
/// and once no sidecar pulls from it any more NATS removes it, rather than keep the app-id's
/// events forever. A consumer made without one (`0`, or by an older tandemd) takes it when a
/// sidecar with the setting starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_nobody_pulls_from_is_removed_after_the_inactive_threshold() {
    let etcd = Etcd::start().await;
    let nats = Nats::start().await;
    let inbox = Inbox::default();
    let app = subscriber("jobs", &inbox).await;
    let kept = nats.resources("pubsub", &[("consumerInactiveThreshold", "0")]);
    let mut sub = sidecar("worker", &etcd, &kept, Some(&app)).await;
    let publisher = sidecar("boss", &etcd, &kept, None).await;
    let client = publisher.client();
    wait_until_subscribed(&client, "jobs", &inbox).await;
    let stream = jetstream_of(&nats).await.get_stream(STREAM).await.unwrap();
    let consumer_name = "tandem__worker__jobs";
    let unbounded = stream.consumer_info(consumer_name).await.unwrap();
    assert_eq!(unbounded.config.inactive_threshold, Duration::ZERO, "0: no threshold");

    sub.kill9().await;
    let threshold = Duration::from_secs(3);
    let res = nats.resources("pubsub", &[("consumerInactiveThreshold", "3s")]);
    let mut sub = sidecar("worker", &etcd, &res, Some(&app)).await;
    eventually(Duration::from_secs(20), "the consumer updated with the threshold", || {
        let stream = stream.clone();
        async move { stream.consumer_info(consumer_name).await.unwrap().config.inactive_threshold == threshold }
    })
    .await;
    let first = stream.consumer_info(consumer_name).await.unwrap();
    assert_eq!(first.created, unbounded.created, "updated in place, not re-created");

    // Time passing is what is tested here: twice the threshold with a live subscriber leaves
    // its consumer in place (the same one, not a re-creation), still delivering.
    tokio::time::sleep(threshold * 2).await;
    client.publish("pubsub", "jobs", b"after the threshold".to_vec(), "text/plain").await.unwrap();
    eventually(Duration::from_secs(20), "the event after the threshold", || async { inbox.has("after the threshold") })
        .await;
    let later = stream.consumer_info(consumer_name).await.unwrap();
    assert_eq!(later.created, first.created, "the live consumer was never removed");

    // Nobody pulls any more: NATS removes the consumer.
    sub.kill9().await;
    eventually(Duration::from_secs(30), "the consumer removed by NATS", || {
        let stream = stream.clone();
        async move {
            match stream.consumer_info(consumer_name).await {
                Ok(_) => false,
                Err(e) if e.to_string().contains("consumer not found") => true,
                Err(e) => panic!("asking NATS for consumer '{consumer_name}': {e}"),
            }
        }
    })
    .await;
}
