//! `/metrics` on the admin port: scraped and parsed, counters checked against the calls made.

use std::time::Duration;

use tandem_sdk::{AppServer, Code, EventOutcome, TopicEvent};
use tandem_tests::pubsub::{Inbox, wait_until_subscribed};
use tandem_tests::sidecar::sample;
use tandem_tests::{Etcd, InvokeMesh, Sidecar, TestApp, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_calls_made() {
    let mesh = InvokeMesh::start(2).await;
    let client = &mesh.client;
    let before = mesh.caller.scrape().await;

    for _ in 0..5 {
        client.invoke("svc-b", "echo", b"x".to_vec()).await.unwrap();
    }
    let err = client.invoke("nobody", "echo", Vec::new()).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    client.save_state("statestore", "k", b"v".to_vec()).await.unwrap();
    client.get_state("statestore", "k").await.unwrap();
    client.publish("pubsub", "nobody-listens", b"e".to_vec(), "text/plain").await.unwrap();

    let after = mesh.caller.scrape().await;
    let delta = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(delta(r#"tandem_api_requests_total{method="InvokeService",code="OK"}"#), 5.0, "{after}");
    assert_eq!(delta(r#"tandem_api_requests_total{method="InvokeService",code="NotFound"}"#), 1.0);
    assert_eq!(delta(r#"tandem_invocations_total{target_app="svc-b",code="OK"}"#), 5.0);
    assert_eq!(delta(r#"tandem_invocations_total{target_app="nobody",code="NotFound"}"#), 1.0);
    assert_eq!(delta(r#"tandem_api_request_duration_seconds_count{method="InvokeService",code="OK"}"#), 5.0);
    assert_eq!(delta(r#"tandem_state_operations_total{store="statestore",operation="apply",outcome="ok"}"#), 1.0);
    assert_eq!(delta(r#"tandem_state_operations_total{store="statestore",operation="get",outcome="ok"}"#), 1.0);
    assert_eq!(delta(r#"tandem_pubsub_events_total{pubsub="pubsub",topic="nobody-listens",outcome="published"}"#), 1.0);
    assert_eq!(sample(&after, r#"tandem_live_instances{app_id="svc-b"}"#), 2.0);
    assert!(sample(&after, "process_resident_memory_bytes") > 1_000_000.0, "{after}");
    assert!(after.contains("process_cpu_seconds_total"), "{after}");
}

/// A delivery its subscriber has not answered yet shows in `tandem_pubsub_in_flight` of the
/// sidecar delivering it (the publisher's, with pubsub.embedded), and leaves it once answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_in_flight_counts_deliveries_not_yet_answered() {
    let etcd = Etcd::start().await;
    let inbox = Inbox::default();
    let (release, released) = tokio::sync::watch::channel(false);
    let recorder = inbox.clone();
    let app = TestApp::start(AppServer::new().subscribe("pubsub", "slow", move |event: TopicEvent| {
        let held = event.data == b"hold";
        recorder.push(event);
        let mut released = released.clone();
        async move {
            if held {
                let _ = released.wait_for(|released| *released).await;
            }
            EventOutcome::Success
        }
    }))
    .await;
    let _subscriber = Sidecar::new("slow-sub").etcd(&etcd).app_port(app.port()).spawn().await;
    let publisher = Sidecar::new("slow-pub").etcd(&etcd).spawn().await;
    let client = publisher.client();
    wait_until_subscribed(&client, "slow", &inbox).await;

    let series = r#"tandem_pubsub_in_flight{pubsub="pubsub",topic="slow"}"#;
    client.publish("pubsub", "slow", b"hold".to_vec(), "text/plain").await.unwrap();
    eventually(Duration::from_secs(20), "the held event counted in flight", || async {
        inbox.has("hold") && sample(&publisher.scrape().await, series) == 1.0
    })
    .await;
    release.send(true).unwrap();
    eventually(Duration::from_secs(20), "nothing in flight once the subscriber answered", || async {
        sample(&publisher.scrape().await, series) == 0.0 && publisher.scrape().await.contains(series)
    })
    .await;
}
