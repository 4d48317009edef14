//! Apps written for Dapr, unchanged, against tandemd: the official Python SDK (`dapr` 1.19 from
//! PyPI) with its defaults. `DaprClient()` waits on the HTTP API's `/v1.0/healthz/outbound`,
//! `invoke_method` goes over the HTTP API, state, publish and metadata over the gRPC API. The
//! sidecar requires an API token (`DAPR_API_TOKEN`), which the SDK sends from its environment.

use std::time::Duration;

use serde_json::{Value, json};
use tandem_sdk::{AppServer, Reply, Status};
use tandem_tests::pubsub::{Inbox, subscriber, wait_until_subscribed};
use tandem_tests::{Etcd, Sidecar, TestApp, eventually, python};

/// The py-client sidecar's API token: the script's calls must all carry it.
const API_TOKEN: &str = "py-sdk-token-5d1e";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_with_its_defaults_invokes_saves_publishes_and_reads_metadata() {
    let python = tokio::task::spawn_blocking(python::python).await.unwrap();
    let etcd = Etcd::start().await;
    let app = TestApp::start(
        AppServer::new()
            .handler("greet", |call| async move {
                let seen = json!({
                    "verb": call.http_verb,
                    "query": call.query_string,
                    "content_type": call.content_type,
                    "body": String::from_utf8_lossy(&call.data),
                });
                Ok(Reply {
                    data: seen.to_string().into_bytes(),
                    content_type: "application/json".into(),
                    metadata: vec![],
                })
            })
            .handler("missing", |_| async { Err(Status::not_found("no such thing")) }),
    )
    .await;
    let _orders = Sidecar::new("orders").etcd(&etcd).app_port(app.port()).spawn().await;
    let inbox = Inbox::default();
    let shop = subscriber("orders", &inbox).await;
    let _shop = Sidecar::new("shop").etcd(&etcd).app_port(shop.port()).spawn().await;
    let client = Sidecar::new("py-client").etcd(&etcd).env("DAPR_API_TOKEN", API_TOKEN).spawn().await;
    client.wait_ready().await;
    wait_until_subscribed(&client.client(), "orders", &inbox).await;
    let rust_client = client.client();
    eventually(Duration::from_secs(20), "routing to orders", || async {
        rust_client.invoke("orders", "greet", Vec::new()).await.is_ok()
    })
    .await;

    let output = tokio::process::Command::new(&python)
        .arg(python::scripts_dir().join("sdk_defaults.py"))
        .env("DAPR_HTTP_PORT", client.http_addr().port().to_string())
        .env("DAPR_GRPC_PORT", client.grpc_addr().port().to_string())
        .env("DAPR_HEALTH_TIMEOUT", "20")
        .env("DAPR_API_TOKEN", API_TOKEN)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), output).await.expect("the script ends").unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let seen: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));

    let invoked: Value = serde_json::from_str(seen["invoke"]["text"].as_str().unwrap()).unwrap();
    assert_eq!(
        invoked,
        json!({"verb": "POST", "query": "lang=en", "content_type": "application/json", "body": "{\"name\": \"py\"}"})
    );
    assert_eq!(seen["invoke"]["status"], 200);
    assert_eq!(seen["invoke"]["content_type"], "application/json");
    let default: Value = serde_json::from_str(seen["invoke_default"].as_str().unwrap()).unwrap();
    assert_eq!(default["verb"], "GET");
    assert_eq!(seen["invoke_error"], json!({"status": 404, "message": "no such thing"}));
    assert_eq!(seen["unknown_app"], "ERR_DIRECT_INVOKE");
    assert_eq!(seen["state"]["data"], "py-value");
    assert!(seen["state"]["etag"].as_str().is_some_and(|etag| !etag.is_empty()), "{seen}");
    assert_eq!(
        seen["state_error"],
        json!({"code": "INVALID_ARGUMENT", "error_code": "DAPR_STATE_NOT_FOUND", "domain": "dapr.io", "resource": "no-such-store"}),
        "the SDK reads Dapr's rich error details"
    );
    assert_eq!(seen["metadata"]["id"], "py-client");
    let components = seen["metadata"]["components"].as_array().unwrap();
    assert!(components.contains(&json!("statestore")) && components.contains(&json!("pubsub")), "{seen}");
    eventually(Duration::from_secs(20), "the event published from Python", || async {
        inbox.has(r#"{"from": "python"}"#)
    })
    .await;
    // What Python saved over gRPC, the HTTP API reads (the SDK sends strings as UTF-8 bytes),
    // with the token and only with it.
    let path = "/v1.0/state/statestore/py-key";
    let read = tandem_tests::http::request(client.http_addr(), "GET", path, &[("dapr-api-token", API_TOKEN)], b"")
        .await
        .unwrap();
    assert_eq!((read.status, read.text().as_str()), (200, "py-value"));
    let refused = tandem_tests::http::request(client.http_addr(), "GET", path, &[], b"").await.unwrap();
    assert_eq!(refused.status, 401, "{}", refused.text());
}
