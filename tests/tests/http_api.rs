//! Dapr's HTTP API on tandemd's `--http-port`, as curl (or any Dapr SDK) uses it, against real
//! sidecars and etcd: each route's answers, status codes and error bodies, bad input on every
//! route (nothing stored or lost), and what both front ends share (an HTTP write is a gRPC read).

use std::time::Duration;

use serde_json::{Value, json};
use tandem_sdk::{AppServer, Reply, Status};
use tandem_tests::http::{HttpResponse, request};
use tandem_tests::pubsub::{Inbox, subscriber, wait_until_subscribed};
use tandem_tests::{Etcd, RunningSidecar, Sidecar, TestApp, eventually};

async fn call(
    sidecar: &RunningSidecar,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    request(sidecar.http_addr(), method, path, headers, body).await.unwrap()
}

/// `{"errorCode", "message"}` with `status`; returns the message.
fn dapr_error(response: &HttpResponse, status: u16, error_code: &str) -> String {
    assert_eq!(response.status, status, "{}", response.text());
    assert_eq!(response.header("content-type"), Some("application/json"));
    let body = response.json();
    assert_eq!(body["errorCode"], error_code, "{body}");
    body["message"].as_str().expect("a message").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metadata_and_shutdown_answer_as_in_dapr() {
    let etcd = Etcd::start().await;
    let mut sidecar = Sidecar::new("meta").etcd(&etcd).spawn().await;
    sidecar.wait_ready().await;
    assert_eq!(call(&sidecar, "GET", "/v1.0/healthz", &[], b"").await.status, 204);
    assert_eq!(call(&sidecar, "GET", "/v1.0/healthz/outbound", &[], b"").await.status, 204);
    // HTTP/2 without TLS (prior knowledge), as Dapr's HTTP server also takes.
    let stream = tokio::net::TcpStream::connect(sidecar.http_addr()).await.unwrap();
    let (mut h2, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let uri = format!("http://{}/v1.0/metadata", sidecar.http_addr());
    let request = http::Request::get(uri).body(String::new()).unwrap();
    let answer = h2.send_request(request).await.unwrap();
    assert_eq!((answer.version(), answer.status().as_u16()), (http::Version::HTTP_2, 200));

    let put = call(&sidecar, "PUT", "/v1.0/metadata/team", &[], b"research").await;
    assert_eq!(put.status, 204, "{}", put.text());
    let metadata = call(&sidecar, "GET", "/v1.0/metadata", &[], b"").await;
    assert_eq!(metadata.status, 200);
    let body = metadata.json();
    assert_eq!(body["id"], "meta");
    assert!(body["runtimeVersion"].as_str().unwrap().starts_with("tandem-"));
    assert_eq!(body["extended"]["team"], "research");
    let components: Vec<&str> =
        body["components"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert!(components.contains(&"statestore") && components.contains(&"pubsub"), "{body}");
    // The other front end shows the same, and sets keys the same way.
    let grpc = sidecar.client().metadata().await.unwrap();
    assert_eq!(grpc.extended_metadata.get("team").map(String::as_str), Some("research"));
    sidecar.client().set_metadata("region", "north").await.unwrap();
    assert_eq!(call(&sidecar, "GET", "/v1.0/metadata", &[], b"").await.json()["extended"]["region"], "north");

    // Unknown routes and verbs fall to invocation, which needs an app id.
    let unknown = call(&sidecar, "GET", "/v1.0/nothing-here", &[], b"").await;
    let message = dapr_error(&unknown, 404, "ERR_DIRECT_INVOKE");
    assert_eq!(message, "failed getting app id either from the URL path or the header dapr-app-id");
    dapr_error(&call(&sidecar, "PATCH", "/v1.0/metadata", &[], b"").await, 404, "ERR_DIRECT_INVOKE");

    let shutdown = call(&sidecar, "POST", "/v1.0/shutdown", &[], b"").await;
    assert_eq!(shutdown.status, 204);
    let status = tokio::time::timeout(Duration::from_secs(20), sidecar.wait_for_exit()).await.expect("it exits");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_routes_save_read_and_guard_values_as_dapr_does() {
    let etcd = Etcd::start().await;
    let sidecar = Sidecar::new("stateful").etcd(&etcd).arg("--max-body-size").arg("2Ki").spawn().await;
    let save = |body: Value| {
        let sidecar = &sidecar;
        async move {
            call(
                sidecar,
                "POST",
                "/v1.0/state/statestore",
                &[("content-type", "application/json")],
                body.to_string().as_bytes(),
            )
            .await
        }
    };

    // Values are stored as their JSON; a read answers them as stored, with the ETag.
    let saved =
        save(json!([{"key": "ship", "value": "DeathStar"}, {"key": "order", "value": {"id": 7, "items": ["a"]}}]))
            .await;
    assert_eq!(saved.status, 204, "{}", saved.text());
    let ship = call(&sidecar, "GET", "/v1.0/state/statestore/ship", &[], b"").await;
    assert_eq!((ship.status, ship.text().as_str()), (200, r#""DeathStar""#));
    assert_eq!(ship.header("content-type"), Some("application/json"));
    let etag = ship.header("etag").expect("an ETag header").to_string();
    let order = call(&sidecar, "GET", "/v1.0/state/statestore/order", &[], b"").await;
    assert_eq!(order.json(), json!({"id": 7, "items": ["a"]}));
    // The gRPC API reads what HTTP wrote.
    let through_grpc = sidecar.client().get_state("statestore", "ship").await.unwrap().unwrap();
    assert_eq!(
        (through_grpc.value.as_slice(), through_grpc.etag.as_str()),
        (br#""DeathStar""#.as_slice(), etag.as_str())
    );
    assert_eq!(call(&sidecar, "GET", "/v1.0/state/statestore/missing", &[], b"").await.status, 204);

    // ETags: a stale one is 409 and changes nothing; the current one writes.
    let stale = save(json!([{"key": "ship", "value": "Falcon", "etag": "999999"}])).await;
    assert!(dapr_error(&stale, 409, "ERR_STATE_SAVE").contains("possible etag mismatch"));
    assert_eq!(call(&sidecar, "GET", "/v1.0/state/statestore/ship", &[], b"").await.text(), r#""DeathStar""#);
    let fresh = save(json!([{"key": "ship", "value": "Falcon", "etag": etag}])).await;
    assert_eq!(fresh.status, 204, "{}", fresh.text());
    let first_write = save(json!([{"key": "ship", "value": "X", "options": {"concurrency": "first-write"}}])).await;
    dapr_error(&first_write, 409, "ERR_STATE_SAVE");
    let delete_stale = call(&sidecar, "DELETE", "/v1.0/state/statestore/ship", &[("if-match", "999999")], b"").await;
    assert!(dapr_error(&delete_stale, 409, "ERR_STATE_DELETE").starts_with("failed deleting state with key ship"));
    assert_eq!(call(&sidecar, "GET", "/v1.0/state/statestore/ship", &[], b"").await.text(), r#""Falcon""#);
    assert_eq!(call(&sidecar, "DELETE", "/v1.0/state/statestore/ship", &[], b"").await.status, 204);
    assert_eq!(call(&sidecar, "GET", "/v1.0/state/statestore/ship", &[], b"").await.status, 204);

    // TTL from the query's metadata; the read names the expiry.
    let ttl = call(
        &sidecar,
        "POST",
        "/v1.0/state/statestore?metadata.ttlInSeconds=60",
        &[],
        json!([{"key": "brief", "value": 1}]).to_string().as_bytes(),
    )
    .await;
    assert_eq!(ttl.status, 204, "{}", ttl.text());
    let brief = call(&sidecar, "GET", "/v1.0/state/statestore/brief", &[], b"").await;
    assert!(brief.header("metadata.ttlexpiretime").is_some_and(|t| t.ends_with('Z')), "{:?}", brief.headers);

    // Bulk get and transactions.
    let bulk = call(&sidecar, "POST", "/v1.0/state/statestore/bulk", &[], br#"{"keys":["order","missing"]}"#).await;
    assert_eq!(bulk.status, 200, "{}", bulk.text());
    let items = bulk.json();
    assert_eq!(items[0]["key"], "order");
    assert_eq!(items[0]["data"], json!({"id": 7, "items": ["a"]}));
    assert!(items[0]["etag"].as_str().is_some_and(|e| !e.is_empty()));
    assert_eq!(items[1], json!({"key": "missing"}));
    let transaction = json!({"operations": [
        {"operation": "upsert", "request": {"key": "t1", "value": "one"}},
        {"operation": "delete", "request": {"key": "order"}}
    ]});
    let done =
        call(&sidecar, "POST", "/v1.0/state/statestore/transaction", &[], transaction.to_string().as_bytes()).await;
    assert_eq!(done.status, 204, "{}", done.text());
    assert_eq!(call(&sidecar, "GET", "/v1.0/state/statestore/t1", &[], b"").await.text(), r#""one""#);
    assert_eq!(call(&sidecar, "GET", "/v1.0/state/statestore/order", &[], b"").await.status, 204);
    let stale_transaction = json!({"operations": [
        {"operation": "upsert", "request": {"key": "t2", "value": "two"}},
        {"operation": "upsert", "request": {"key": "t1", "value": "changed", "etag": "424242"}}
    ]});
    let refused =
        call(&sidecar, "POST", "/v1.0/state/statestore/transaction", &[], stale_transaction.to_string().as_bytes())
            .await;
    dapr_error(&refused, 500, "ERR_STATE_TRANSACTION");
    assert_eq!(
        call(&sidecar, "GET", "/v1.0/state/statestore/t2", &[], b"").await.status,
        204,
        "nothing of it was written"
    );

    // Bad input: a clear status and code, nothing stored.
    let unknown = call(&sidecar, "GET", "/v1.0/state/nope/k", &[], b"").await;
    assert!(dapr_error(&unknown, 400, "ERR_STATE_STORE_NOT_FOUND").starts_with("state store nope is not found"));
    let details = &unknown.json()["details"][0];
    assert_eq!(
        (details["reason"].as_str(), details["domain"].as_str()),
        (Some("DAPR_STATE_NOT_FOUND"), Some("dapr.io"))
    );
    assert_eq!(details["metadata"]["appID"], "stateful");
    // The gRPC API sends the same as Google's richer error model.
    use tonic_types::StatusExt;
    let err = sidecar.client().get_state("nope", "k").await.unwrap_err();
    let info = err.get_details_error_info().expect("an ErrorInfo detail");
    assert_eq!((info.reason.as_str(), info.domain.as_str()), ("DAPR_STATE_NOT_FOUND", "dapr.io"));
    let err = sidecar.client().save_state("statestore", "a||b", b"v".to_vec()).await.unwrap_err();
    assert_eq!(err.get_details_bad_request().expect("a BadRequest detail").field_violations[0].field, "a||b");
    assert_eq!(err.get_details_resource_info().expect("a ResourceInfo detail").resource_name, "statestore");
    dapr_error(&save(json!({"key": "not-an-array"})).await, 400, "ERR_MALFORMED_REQUEST");
    let broken = call(&sidecar, "POST", "/v1.0/state/statestore", &[], b"[{\"key\": ").await;
    dapr_error(&broken, 400, "ERR_MALFORMED_REQUEST");
    let no_key = save(json!([{"value": 1}])).await;
    assert!(dapr_error(&no_key, 400, "ERR_MALFORMED_REQUEST").contains("\"key\" is a required field"));
    let bad_key = save(json!([{"key": "a||b", "value": 1}])).await;
    assert!(dapr_error(&bad_key, 400, "ERR_MALFORMED_REQUEST").contains("can't contain '||'"));
    let bad_option = save(json!([{"key": "k", "value": 1, "options": {"concurrency": "sometimes"}}])).await;
    dapr_error(&bad_option, 400, "ERR_MALFORMED_REQUEST");
    let big = json!([{"key": "big", "value": "x".repeat(4096)}]);
    let too_big = save(big).await;
    assert_eq!(too_big.status, 413, "{}", too_big.text());
    let bad_ttl = call(
        &sidecar,
        "POST",
        "/v1.0/state/statestore?metadata.ttlInSeconds=soon",
        &[],
        json!([{"key": "k", "value": 1}]).to_string().as_bytes(),
    )
    .await;
    dapr_error(&bad_ttl, 400, "ERR_MALFORMED_REQUEST");
    let bad_operation = call(
        &sidecar,
        "POST",
        "/v1.0/state/statestore/transaction",
        &[],
        br#"{"operations":[{"operation":"merge","request":{"key":"k"}}]}"#,
    )
    .await;
    dapr_error(&bad_operation, 400, "ERR_NOT_SUPPORTED_STATE_OPERATION");
    for key in ["not-an-array", "big", "k", "a||b"] {
        assert_eq!(
            call(&sidecar, "GET", &format!("/v1.0/state/statestore/{key}"), &[], b"").await.status,
            if key == "a||b" { 400 } else { 204 },
            "{key}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_routes_deliver_events_and_refuse_bad_ones() {
    let etcd = Etcd::start().await;
    let inbox = Inbox::default();
    let app = subscriber("orders", &inbox).await;
    let _subscriber = Sidecar::new("shop").etcd(&etcd).app_port(app.port()).spawn().await;
    let publisher = Sidecar::new("checkout").etcd(&etcd).arg("--max-body-size").arg("1Ki").spawn().await;
    wait_until_subscribed(&publisher.client(), "orders", &inbox).await;

    let one = call(
        &publisher,
        "POST",
        "/v1.0/publish/pubsub/orders",
        &[("content-type", "application/json")],
        br#"{"order":1}"#,
    )
    .await;
    assert_eq!(one.status, 204, "{}", one.text());
    let text = call(&publisher, "POST", "/v1.0/publish/pubsub/orders", &[], b"plain words").await;
    assert_eq!(text.status, 204, "{}", text.text());
    eventually(Duration::from_secs(20), "both events", || async {
        inbox.has(r#"{"order":1}"#) && inbox.has("plain words")
    })
    .await;
    let events = inbox.events();
    let json_event = events.iter().find(|e| e.data == br#"{"order":1}"#).unwrap();
    assert_eq!(json_event.data_content_type, "application/json");
    assert_eq!(json_event.source, "checkout");
    let text_event = events.iter().find(|e| e.data == b"plain words").unwrap();
    assert_eq!(text_event.data_content_type, "text/plain", "Dapr's default without a Content-Type");

    let bulk = json!([
        {"entryId": "1", "event": {"n": 1}, "contentType": "application/json"},
        {"entryId": "2", "event": "two", "contentType": "text/plain"}
    ]);
    let published =
        call(&publisher, "POST", "/v1.0-alpha1/publish/bulk/pubsub/orders", &[], bulk.to_string().as_bytes()).await;
    assert_eq!(published.status, 204, "{}", published.text());
    eventually(Duration::from_secs(20), "the bulk events", || async { inbox.has(r#"{"n":1}"#) && inbox.has("two") })
        .await;

    // Bad input.
    let unknown = call(&publisher, "POST", "/v1.0/publish/nope/orders", &[], b"x").await;
    assert!(dapr_error(&unknown, 404, "ERR_PUBSUB_NOT_FOUND").starts_with("pubsub nope is not found"));
    let raw = call(&publisher, "POST", "/v1.0/publish/pubsub/orders?metadata.rawPayload=maybe", &[], b"x").await;
    dapr_error(&raw, 400, "ERR_PUBSUB_REQUEST_METADATA");
    let big = call(&publisher, "POST", "/v1.0/publish/pubsub/orders", &[], &vec![b'x'; 4096]).await;
    assert_eq!(big.status, 413, "{}", big.text());
    let not_array = call(&publisher, "POST", "/v1.0/publish/bulk/pubsub/orders", &[], b"{\"entryId\":1}").await;
    dapr_error(&not_array, 400, "ERR_PUBSUB_EVENTS_SER");
    let duplicated = json!([{"entryId": "d", "event": 1, "contentType": "application/json"}, {"entryId": "d", "event": 2, "contentType": "application/json"}]);
    let duplicated =
        call(&publisher, "POST", "/v1.0/publish/bulk/pubsub/orders", &[], duplicated.to_string().as_bytes()).await;
    dapr_error(&duplicated, 400, "ERR_PUBSUB_EVENTS_SER");
    let mismatch = json!([{"entryId": "m", "event": {"a": 1}, "contentType": "text/plain"}]);
    let mismatch =
        call(&publisher, "POST", "/v1.0/publish/bulk/pubsub/orders", &[], mismatch.to_string().as_bytes()).await;
    dapr_error(&mismatch, 400, "ERR_PUBSUB_EVENTS_SER");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(inbox.count("x"), 0, "no refused event was delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invocation_over_http_reaches_the_app_with_verb_query_headers_and_body() {
    let etcd = Etcd::start().await;
    let app = TestApp::start(
        AppServer::new()
            .handler("orders/7", |call| async move {
                let seen = json!({
                    "verb": call.http_verb,
                    "query": call.query_string,
                    "content_type": call.content_type,
                    "caller": call.caller_app_id,
                    "header": call.metadata.get("x-team").map(|v| v.to_str().unwrap().to_string()),
                    "body": String::from_utf8_lossy(&call.data),
                });
                Ok(Reply {
                    data: seen.to_string().into_bytes(),
                    content_type: "application/json".into(),
                    metadata: vec![("x-answered-by".into(), "orders".into())],
                })
            })
            .handler("missing", |_| async { Err(Status::not_found("no such order")) }),
    )
    .await;
    let _callee = Sidecar::new("orders").etcd(&etcd).app_port(app.port()).spawn().await;
    let caller = Sidecar::new("frontend").etcd(&etcd).spawn().await;
    let client = caller.client();
    eventually(Duration::from_secs(20), "the caller to route to orders", || async {
        client.invoke("orders", "orders/7", Vec::new()).await.is_ok()
    })
    .await;

    let headers = [("content-type", "text/plain"), ("x-team", "blue")];
    let answer = call(&caller, "PUT", "/v1.0/invoke/orders/method/orders/7?expand=items&n=2", &headers, b"hello").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert_eq!(answer.header("x-answered-by"), Some("orders"));
    assert_eq!(
        answer.json(),
        json!({"verb": "PUT", "query": "expand=items&n=2", "content_type": "text/plain", "caller": "frontend", "header": "blue", "body": "hello"})
    );

    // The same call by a dapr-app-id header on the method's own path.
    let by_header =
        call(&caller, "PUT", "/orders/7?expand=items&n=2", &[("dapr-app-id", "orders"), ("x-team", "blue")], b"hello")
            .await;
    assert_eq!(by_header.status, 200, "{}", by_header.text());
    assert_eq!(by_header.json()["verb"], "PUT");
    let with_namespace = call(&caller, "GET", "/v1.0/invoke/orders.default/method/orders/7", &[], b"").await;
    assert_eq!(with_namespace.status, 200, "{}", with_namespace.text());

    // The app's own error: Dapr's HTTP status for its code, the status as JSON.
    let missing = call(&caller, "GET", "/v1.0/invoke/orders/method/missing", &[], b"").await;
    assert_eq!(missing.status, 404, "{}", missing.text());
    assert_eq!(missing.json(), json!({"code": 5, "message": "no such order"}));
    // Failures of the mesh: Dapr's ERR_DIRECT_INVOKE.
    let unknown = call(&caller, "POST", "/v1.0/invoke/nobody/method/x", &[], b"").await;
    assert!(
        dapr_error(&unknown, 500, "ERR_DIRECT_INVOKE")
            .starts_with("failed to invoke, id: nobody, err: app-id 'nobody' is not known")
    );
    let other_namespace = call(&caller, "GET", "/v1.0/invoke/orders.elsewhere/method/x", &[], b"").await;
    dapr_error(&other_namespace, 400, "ERR_DIRECT_INVOKE");
    let no_method = call(&caller, "GET", "/v1.0/invoke/orders/nomethod", &[], b"").await;
    dapr_error(&no_method, 404, "ERR_DIRECT_INVOKE");
    let unhandled = call(&caller, "GET", "/v1.0/invoke/orders/method/no-such-method", &[], b"").await;
    assert_eq!(unhandled.status, 501, "the app has no such method: {}", unhandled.text());
    assert!(unhandled.json()["message"].as_str().unwrap().contains("'no-such-method'"), "{}", unhandled.text());
    // A method that would reach another path of the app than it names is refused.
    for traversal in ["/v1.0/invoke/orders/method/..%2F..%2Fadmin", "/v1.0/invoke/orders/method/orders/../../admin"] {
        let refused = call(&caller, "GET", traversal, &[], b"").await;
        assert!(dapr_error(&refused, 400, "ERR_DIRECT_INVOKE").contains("'..' path segment"), "{traversal}");
    }
    let refused = call(&caller, "GET", "/a/%2e%2e/admin", &[("dapr-app-id", "orders")], b"").await;
    dapr_error(&refused, 400, "ERR_DIRECT_INVOKE");
}
