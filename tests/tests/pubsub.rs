//! `pubsub.embedded` through real sidecars: the cases every pub/sub component passes
//! (`tandem_tests::pubsub_cases`), and the official Dapr SDK publishing.

use std::time::Duration;

use tandem_sdk::{AppServer, SubscriptionOptions};
use tandem_tests::pubsub::{Inbox, wait_until_subscribed};
use tandem_tests::pubsub_cases::{self as cases, Broker};
use tandem_tests::{Etcd, RunningSidecar, Sidecar, TestApp, eventually, free_port};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_travel_from_publisher_to_subscriber_as_cloudevents() {
    cases::events_travel_from_publisher_to_subscriber_as_cloudevents(&Broker::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_of_a_subscriber_compete_for_events() {
    cases::replicas_of_a_subscriber_compete_for_events(&Broker::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_redelivers_drop_drops_and_exhausted_events_go_to_the_dead_letter_topic() {
    cases::retry_redelivers_drop_drops_and_exhausted_events_go_to_the_dead_letter_topic(&Broker::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_always_failing_subscriber_ends_in_the_dead_letter_topic_without_blocking_others() {
    cases::an_always_failing_subscriber_ends_in_the_dead_letter_topic_without_blocking_others(&Broker::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_event_holds_back_no_other() {
    cases::a_slow_event_holds_back_no_other(&Broker::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_subscriber_holds_back_only_its_own_events() {
    cases::a_stuck_subscriber_holds_back_only_its_own_events(&Broker::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backlog_refuses_publishes_until_the_subscriber_catches_up() {
    cases::a_full_backlog_refuses_publishes_until_the_subscriber_catches_up(&Broker::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_for_a_subscriber_that_is_down_and_survive_the_publishers_kill_9() {
    cases::events_wait_for_a_subscriber_that_is_down_and_survive_the_publishers_kill_9(&Broker::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_publishes_are_refused_with_the_reason() {
    cases::bad_publishes_are_refused_with_the_reason(&Broker::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_payload_events_reach_the_app_without_a_cloudevent_envelope() {
    cases::raw_payload_events_reach_the_app_without_a_cloudevent_envelope(&Broker::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_that_asks_for_order_gets_events_in_publish_order() {
    cases::a_subscription_that_asks_for_order_gets_events_in_publish_order(&Broker::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdks_event_stream_retries_drops_and_dead_letters() {
    cases::the_sdks_event_stream_retries_drops_and_dead_letters(&Broker::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apps_listed_subscriptions_leave_its_streams_alone() {
    cases::an_apps_listed_subscriptions_leave_its_streams_alone(&Broker::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_streams_events_wait_for_the_next_stream_not_for_the_app() {
    cases::a_closed_streams_events_wait_for_the_next_stream_not_for_the_app(&Broker::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_subscription_receives_events_and_answers_on_the_stream() {
    cases::a_streaming_subscription_receives_events_and_answers_on_the_stream(&Broker::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_dapr_sdk_publishes() {
    let etcd = Etcd::start().await;
    let res = Broker::Embedded.resources(&[]);
    let publisher = Sidecar::new("p").etcd(&etcd).resources(res.path()).spawn().await;
    // Publishing needs the routing table (the topic's subscribers) loaded from etcd.
    publisher.wait_ready().await;
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

/// Stops `app` and, once its sidecar noticed, serves `server` on the same port; returns when
/// the sidecar has recorded the new app's list.
async fn restart_app(sidecar: &RunningSidecar, app: TestApp, server: AppServer, port: u16) -> TestApp {
    let count = |text: &str| sidecar.log().matches(text).count();
    let (unhealthy, registered) = (count("app is not healthy"), count("app subscriptions registered"));
    app.stop().await;
    eventually(Duration::from_secs(20), "the sidecar noticed the app is down", || async {
        count("app is not healthy") > unhealthy
    })
    .await;
    let app = TestApp::start_on(server, port).await;
    eventually(Duration::from_secs(20), "the app's list recorded again", || async {
        count("app subscriptions registered") > registered
    })
    .await;
    app
}

/// A topic the app lists with a route and also reads from a stream is one subscription: while
/// no stream is open `OnTopicEvent` gets its events on the listed route, and it outlasts an app
/// that comes back without the topic on its list, as a stream's subscription does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_both_listed_and_streamed_keeps_its_route_and_outlasts_the_list() {
    let etcd = Etcd::start().await;
    let res = Broker::Embedded.resources(&[]);
    let app_port = free_port();
    let listed = Inbox::default();
    let lister = || {
        let routed = SubscriptionOptions { route: "/both".into(), ..Default::default() };
        AppServer::new().subscribe_with("pubsub", "both", routed, listed.accept())
    };
    let app = TestApp::start_on(lister(), app_port).await;
    let sub = Sidecar::new("both-ways").etcd(&etcd).resources(res.path()).app_port(app_port).spawn().await;
    let publisher = cases::sidecar("both-boss", &etcd, &res, None).await;
    let client = publisher.client();
    wait_until_subscribed(&client, "both", &listed).await;

    // A stream opens on the listed topic, takes its events, and closes.
    let streamed = Inbox::default();
    let reader = cases::stream_into(&sub, "both", &streamed).await;
    client.publish("pubsub", "both", b"to-stream".to_vec(), "text/plain").await.unwrap();
    eventually(Duration::from_secs(20), "the stream takes the topic's events", || async { streamed.has("to-stream") })
        .await;
    reader.abort();
    sub.wait_for_log("streaming subscription closed").await;
    client.publish("pubsub", "both", b"to-app".to_vec(), "text/plain").await.unwrap();
    eventually(Duration::from_secs(20), "the app takes them once the stream closed", || async { listed.has("to-app") })
        .await;
    let event = listed.events().into_iter().find(|e| e.data == b"to-app").unwrap();
    assert_eq!(event.path, "/both", "the listed route survives the stream");

    // The app's list is recorded again (a restart), then it comes back without the topic: the
    // subscription stays for the stream.
    let app = restart_app(&sub, app, lister(), app_port).await;
    let _app = restart_app(&sub, app, AppServer::new(), app_port).await;
    client.publish("pubsub", "both", b"to-next-stream".to_vec(), "text/plain").await.unwrap();
    let next = Inbox::default();
    let _reader = cases::stream_into(&sub, "both", &next).await;
    eventually(Duration::from_secs(20), "the event on the next stream", || async { next.has("to-next-stream") }).await;
    assert!(!listed.has("to-next-stream"));
}
