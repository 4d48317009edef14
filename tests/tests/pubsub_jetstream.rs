//! `pubsub.jetstream` through real sidecars and a real `nats-server -js`: the cases every
//! pub/sub component passes (`tandem_tests::pubsub_cases`), the fault test, and what is
//! particular to a broker (unreachable, its payload limit).

use std::time::Duration;

use tandem_sdk::Code;
use tandem_tests::pubsub::{Inbox, subscriber, wait_until_subscribed};
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
async fn a_subscription_that_asks_for_order_gets_events_in_publish_order() {
    cases::a_subscription_that_asks_for_order_gets_events_in_publish_order(&Broker::jetstream().await).await;
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
