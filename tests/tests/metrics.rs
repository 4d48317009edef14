//! `/metrics` on the admin port: scraped and parsed, counters checked against the calls made.

use tandem_sdk::Code;
use tandem_tests::{InvokeMesh, RunningSidecar};

/// The value of the sample `series` (name with labels, exactly as exposed), 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map(|value| value.trim().parse().expect("a numeric sample"))
        .unwrap_or(0.0)
}

async fn scrape(sidecar: &RunningSidecar) -> String {
    let (code, body) = sidecar.get("/metrics").await.unwrap();
    assert_eq!(code, 200);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_calls_made() {
    let mesh = InvokeMesh::start(2).await;
    let client = &mesh.client;
    let before = scrape(&mesh.caller).await;

    for _ in 0..5 {
        client.invoke("svc-b", "echo", b"x".to_vec()).await.unwrap();
    }
    let err = client.invoke("nobody", "echo", Vec::new()).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    client.save_state("statestore", "k", b"v".to_vec()).await.unwrap();
    client.get_state("statestore", "k").await.unwrap();
    client.publish("pubsub", "nobody-listens", b"e".to_vec(), "text/plain").await.unwrap();

    let after = scrape(&mesh.caller).await;
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
