//! Traces: an OTLP collector in this process receives the spans of sidecars and apps, and a
//! chain of invocations and pub/sub hops is one trace with the right parent links; a malformed
//! `traceparent` starts a new trace and is counted; an unreachable collector changes nothing
//! for the calls and its dropped spans are counted.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use opentelemetry::trace::{Span as _, Tracer as _, TracerProvider as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tandem_sdk::{AppServer, BulkEntry, CallOptions, EventOutcome, Reply, SidecarClient, Status, TraceContext};
use tandem_tests::otlp::{self, Collector, by_name};
use tandem_tests::pubsub::{Inbox, wait_until_subscribed};
use tandem_tests::{Etcd, Sidecar, TestApp, eventually};

const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const PRODUCER: i32 = 4;

/// A sidecar exporting its spans to `collector` soon after they end.
fn traced(app_id: &str, etcd: &Etcd, collector_endpoint: &str) -> Sidecar {
    Sidecar::new(app_id)
        .etcd(etcd)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector_endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
}

/// App C: consumes `topic` into `inbox`, continuing each event's trace in a `c.consume` span.
async fn consuming_app(topic: &str, tracer_provider: &SdkTracerProvider, inbox: &Inbox) -> TestApp {
    let (inbox, tracer) = (inbox.clone(), tracer_provider.tracer("app-c"));
    TestApp::start(AppServer::new().subscribe("pubsub", topic, move |event| {
        let parent = event.trace.as_ref().map(TraceContext::to_context).unwrap_or_default();
        tracer.start_with_context("c.consume", &parent).end();
        inbox.push(event);
        async { EventOutcome::Success }
    }))
    .await
}

/// Calls `client` until app-id `target` answers `method` (its sidecar is routed to).
async fn wait_until_routed(client: &SidecarClient, target: &str, method: &str) {
    eventually(Duration::from_secs(30), &format!("app-id '{target}' routable"), || {
        let client = client.clone();
        let (target, method) = (target.to_string(), method.to_string());
        async move { client.invoke(&target, &method, b"ping".to_vec()).await.is_ok() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_invocation_and_pub_sub_is_one_trace() {
    let collector = Collector::start().await;
    let endpoint = collector.endpoint();
    let etcd = Etcd::start().await;

    // App C consumes topic `chain`, continuing the event's trace in its own span.
    let c_tracer = otlp::app_tracer_provider("app-c", &endpoint);
    let inbox = Inbox::default();
    let c_app = consuming_app("chain", &c_tracer, &inbox).await;
    let c_sidecar = traced("trace-c", &etcd, &endpoint).app_port(c_app.port()).spawn().await;

    // App B serves `work`: a span of its own, then a publish that continues it.
    let b_tracer = otlp::app_tracer_provider("app-b", &endpoint);
    let b_client: Arc<OnceLock<SidecarClient>> = Arc::default();
    let b_app = {
        let (client, tracer) = (b_client.clone(), b_tracer.tracer("app-b"));
        TestApp::start(AppServer::new().handler("ping", |_| async { Ok(Reply::text("pong")) }).handler(
            "work",
            move |call| {
                let parent = call.trace.as_ref().map(TraceContext::to_context).unwrap_or_default();
                let span = tracer.start_with_context("b.work", &parent);
                let mine = TraceContext::from_span_context(span.span_context().clone());
                let client = client.get().expect("B's sidecar client is set before calls arrive").clone();
                async move {
                    let mut span = span;
                    let options = CallOptions::default().trace_context(mine);
                    let published = client.publish_with("pubsub", "chain", call.data, "text/plain", options).await;
                    span.end();
                    published.map(|_| Reply::text("published"))
                }
            },
        ))
        .await
    };
    // Trace level: the line each call ends with, which carries the call's trace id.
    let b_sidecar = traced("trace-b", &etcd, &endpoint)
        .app_port(b_app.port())
        .arg("--log-level")
        .arg("info,tandem_sidecar=trace")
        .spawn()
        .await;
    assert!(b_client.set(b_sidecar.client()).is_ok(), "B's client is set once");
    let a_sidecar = traced("trace-a", &etcd, &endpoint).spawn().await;
    let a_client = a_sidecar.client();
    for sidecar in [&a_sidecar, &b_sidecar, &c_sidecar] {
        sidecar.wait_ready().await;
    }
    wait_until_routed(&a_client, "trace-b", "ping").await;
    wait_until_subscribed(&b_sidecar.client(), "chain", &inbox).await;

    // App A: its own root span, and the call that continues it.
    let a_tracer = otlp::app_tracer_provider("app-a", &endpoint);
    let mut root = a_tracer.tracer("app-a").start("a.request");
    let trace = TraceContext::from_span_context(root.span_context().clone()).expect("a sampled root span");
    let reply = a_client
        .invoke_with(
            "trace-b",
            "work",
            b"the-chain".to_vec(),
            CallOptions::default().trace_context(Some(trace.clone())),
        )
        .await
        .unwrap();
    assert_eq!(reply.data, b"published");
    root.end();
    eventually(Duration::from_secs(20), "the chained event at app C", || {
        let has = inbox.has("the-chain");
        async move { has }
    })
    .await;
    for provider in [&a_tracer, &b_tracer, &c_tracer] {
        otlp::flush(provider).await;
    }

    let spans = collector.wait_for_trace(&trace.trace_id(), 9).await;
    let named = by_name(&spans);
    let span = |name: &str| *named.get(name).unwrap_or_else(|| panic!("no span '{name}' in trace: {spans:#?}"));
    let check = |name: &str, service: &str, kind: i32, parent: &str| {
        let s = span(name);
        assert_eq!(s.service, service, "service of {name}");
        assert_eq!(s.kind, kind, "kind of {name}");
        assert_eq!(s.parent_span_id, span(parent).span_id, "parent of {name}: {spans:#?}");
    };
    assert_eq!(span("a.request").parent_span_id, "", "app A's span starts the trace");
    check("dapr.proto.runtime.v1.Dapr/InvokeService", "trace-a", SERVER, "a.request");
    check("invoke trace-b/work", "trace-a", CLIENT, "dapr.proto.runtime.v1.Dapr/InvokeService");
    check("tandem.internal.v1.Mesh/Invoke", "trace-b", SERVER, "invoke trace-b/work");
    check("b.work", "app-b", 1, "tandem.internal.v1.Mesh/Invoke");
    check("dapr.proto.runtime.v1.Dapr/PublishEvent", "trace-b", SERVER, "b.work");
    // The delivery's parent is the publish call: its context travelled in the CloudEvent.
    check("deliver chain to trace-c", "trace-b", PRODUCER, "dapr.proto.runtime.v1.Dapr/PublishEvent");
    check("tandem.internal.v1.Mesh/DeliverEvent", "trace-c", SERVER, "deliver chain to trace-c");
    check("c.consume", "app-c", 1, "tandem.internal.v1.Mesh/DeliverEvent");
    assert_eq!(spans.len(), 9, "one span per hop: {spans:#?}");

    // The log lines of a call carry its trace id.
    b_sidecar.wait_for_log(&format!("trace_id={}", trace.trace_id())).await;
}

/// Sidecars that export nothing still carry the trace: app B gets the caller's trace with the
/// sidecars' own span as its parent, so does app C through pub/sub, and B's sidecar logs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_that_export_nothing_still_carry_the_trace() {
    let etcd = Etcd::start().await;
    let inbox = Inbox::default();
    let c_app = TestApp::start(AppServer::new().subscribe("pubsub", "quiet", {
        let inbox = inbox.clone();
        move |event| {
            inbox.push(event);
            async { EventOutcome::Success }
        }
    }))
    .await;
    let c_sidecar = Sidecar::new("quiet-c").etcd(&etcd).app_port(c_app.port()).spawn().await;

    // App B records the trace context each call brings, then publishes within it.
    let seen: Arc<Mutex<Vec<Option<TraceContext>>>> = Arc::default();
    let b_client: Arc<OnceLock<SidecarClient>> = Arc::default();
    let b_app = {
        let (seen, client) = (seen.clone(), b_client.clone());
        TestApp::start(AppServer::new().handler("ping", |_| async { Ok(Reply::text("pong")) }).handler(
            "work",
            move |call| {
                seen.lock().unwrap().push(call.trace.clone());
                let client = client.get().expect("B's sidecar client is set before calls arrive").clone();
                async move {
                    let options = CallOptions::default().trace_context(call.trace);
                    client.publish_with("pubsub", "quiet", call.data, "text/plain", options).await?;
                    Ok(Reply::text("published"))
                }
            },
        ))
        .await
    };
    let b_sidecar = Sidecar::new("quiet-b")
        .etcd(&etcd)
        .app_port(b_app.port())
        .arg("--log-level")
        .arg("info,tandem_sidecar=trace")
        .spawn()
        .await;
    assert!(b_client.set(b_sidecar.client()).is_ok(), "B's client is set once");
    let a_sidecar = Sidecar::new("quiet-a").etcd(&etcd).spawn().await;
    let a_client = a_sidecar.client();
    for sidecar in [&a_sidecar, &b_sidecar, &c_sidecar] {
        sidecar.wait_ready().await;
    }
    wait_until_routed(&a_client, "quiet-b", "ping").await;
    wait_until_subscribed(&b_sidecar.client(), "quiet", &inbox).await;
    seen.lock().unwrap().clear();

    let caller = TraceContext::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", None).unwrap();
    let options = CallOptions::default().trace_context(Some(caller.clone()));
    let reply = a_client.invoke_with("quiet-b", "work", b"quiet-chain".to_vec(), options).await.unwrap();
    assert_eq!(reply.data, b"published");

    let at_b = seen.lock().unwrap().clone();
    let at_b = at_b.first().cloned().flatten().expect("app B got a traceparent");
    assert_eq!(at_b.trace_id(), caller.trace_id(), "app B continues the caller's trace");
    assert_ne!(at_b.span_id(), caller.span_id(), "the sidecars' hop is B's parent, not the caller");
    assert!(at_b.is_sampled(), "the caller's sampling decision travels on");
    eventually(Duration::from_secs(20), "the event at app C", || {
        let has = inbox.has("quiet-chain");
        async move { has }
    })
    .await;
    let at_c = inbox.events().into_iter().find(|e| e.data == b"quiet-chain").and_then(|e| e.trace);
    let at_c = at_c.expect("app C got the event's trace context");
    assert_eq!(at_c.trace_id(), caller.trace_id(), "the event continues the trace");
    assert_ne!(at_c.span_id(), at_b.span_id(), "C's parent is a sidecar span, not B's");
    b_sidecar.wait_for_log(&format!("trace_id={}", caller.trace_id())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_delivered_in_one_call_each_keep_their_own_spans() {
    const EVENTS: usize = 8;
    let collector = Collector::start().await;
    let endpoint = collector.endpoint();
    let etcd = Etcd::start().await;
    let tracer_provider = otlp::app_tracer_provider("app-c", &endpoint);
    let inbox = Inbox::default();
    let app = consuming_app("burst", &tracer_provider, &inbox).await;
    let subscriber = traced("burst-c", &etcd, &endpoint).app_port(app.port()).spawn().await;
    let publisher = traced("burst-p", &etcd, &endpoint).spawn().await;
    subscriber.wait_ready().await;
    publisher.wait_ready().await;
    let client = publisher.client();
    wait_until_subscribed(&client, "burst", &inbox).await;

    // One bulk publish: its events become durable together, so they are due together.
    let (sum, count) = (
        r#"tandem_pubsub_delivery_batch_size_sum{pubsub="pubsub"}"#,
        r#"tandem_pubsub_delivery_batch_size_count{pubsub="pubsub"}"#,
    );
    // Every probe settled (so counted) before the burst.
    let backlog = r#"tandem_pubsub_backlog{pubsub="pubsub"}"#;
    eventually(Duration::from_secs(20), "the probes settled", || {
        let publisher = &publisher;
        async move { publisher.metric(backlog).await == 0.0 }
    })
    .await;
    let before = (publisher.metric(sum).await, publisher.metric(count).await);
    let entries = (0..EVENTS)
        .map(|i| BulkEntry {
            entry_id: i.to_string(),
            data: format!("burst-{i}").into_bytes(),
            content_type: "text/plain".into(),
        })
        .collect();
    assert_eq!(client.bulk_publish("pubsub", "burst", entries).await.unwrap(), []);
    eventually(Duration::from_secs(20), "the burst at the subscriber", || {
        let all = (0..EVENTS).all(|i| inbox.has(&format!("burst-{i}")));
        async move { all }
    })
    .await;
    let after = (publisher.metric(sum).await, publisher.metric(count).await);
    assert_eq!((after.0 - before.0, after.1 - before.1), (EVENTS as f64, 1.0), "all {EVENTS} events in one call");

    // The trace of the bulk publish: each event has its own delivery span, its own span at
    // the subscriber's sidecar (named as for a lone event) and the app's span under that.
    otlp::flush(&tracer_provider).await;
    let first = inbox.events().into_iter().find(|e| e.data == b"burst-0").expect("burst-0 arrived");
    let trace_id = first.trace.expect("the event carries its trace").trace_id();
    let spans = collector.wait_for_trace(&trace_id, 1 + 3 * EVENTS).await;
    let named = |name: &str| spans.iter().filter(|s| s.name == name).collect::<Vec<_>>();
    let delivers = named("deliver burst to burst-c");
    let received = named("tandem.internal.v1.Mesh/DeliverEvent");
    let consumed = named("c.consume");
    assert_eq!((delivers.len(), received.len(), consumed.len()), (EVENTS, EVENTS, EVENTS), "{spans:#?}");
    for batch_call in ["tandem.internal.v1.Mesh/StreamDeliverEvents", "tandem.internal.v1.Mesh/DeliverEvents"] {
        assert!(named(batch_call).is_empty(), "the batch itself ({batch_call}) has no span");
    }
    let mut parents: Vec<&str> = received.iter().map(|s| s.parent_span_id.as_str()).collect();
    parents.sort_unstable();
    parents.dedup();
    assert_eq!(parents.len(), EVENTS, "each received span has a parent of its own");
    for span in &received {
        assert!(delivers.iter().any(|d| d.span_id == span.parent_span_id), "parent of {span:?}");
        assert_eq!((span.service.as_str(), span.kind), ("burst-c", SERVER));
    }
    for span in &consumed {
        assert!(received.iter().any(|r| r.span_id == span.parent_span_id), "parent of {span:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_traceparent_starts_a_new_trace_and_is_counted() {
    let collector = Collector::start().await;
    let endpoint = collector.endpoint();
    let etcd = Etcd::start().await;
    let seen: Arc<Mutex<Vec<Option<TraceContext>>>> = Arc::default();
    let app = {
        let seen = seen.clone();
        TestApp::start(AppServer::new().handler("echo", move |call| {
            seen.lock().unwrap().push(call.trace.clone());
            async move { Ok::<_, Status>(Reply::bytes(call.data)) }
        }))
        .await
    };
    let _callee = traced("mal-b", &etcd, &endpoint).app_port(app.port()).spawn().await;
    let caller = traced("mal-a", &etcd, &endpoint).spawn().await;
    let client = caller.client();
    wait_until_routed(&client, "mal-b", "echo").await;
    let invalid = "tandem_trace_context_invalid_total";
    let before = caller.metric(invalid).await;

    let reply = client
        .invoke_with("mal-b", "echo", b"x".to_vec(), CallOptions::default().header("traceparent", "00-not-a-trace-01"))
        .await
        .expect("a malformed traceparent is never an error to the caller");
    assert_eq!(reply.data, b"x");
    assert_eq!(caller.metric(invalid).await - before, 1.0);

    // The callee got a fresh, valid trace: the caller's sidecar started it.
    let trace = seen.lock().unwrap().last().cloned().flatten().expect("the app got a trace context");
    let spans = collector.wait_for_trace(&trace.trace_id(), 3).await;
    let named = by_name(&spans);
    let api = named["dapr.proto.runtime.v1.Dapr/InvokeService"];
    assert_eq!(api.service, "mal-a");
    assert_eq!(api.parent_span_id, "", "the API span is a root: the malformed parent was ignored");
    assert_eq!(named["tandem.internal.v1.Mesh/Invoke"].span_id, trace.span_id(), "the app's parent is B's span");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_changes_nothing_for_calls_and_drops_are_counted() {
    // Nothing listens here.
    let closed = format!("http://127.0.0.1:{}", tandem_tests::free_port());
    let etcd = Etcd::start().await;
    let app = TestApp::named("b-1").await;
    let down = |app_id: &str| {
        Sidecar::new(app_id)
            .etcd(&etcd)
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &closed)
            .env("OTEL_BSP_SCHEDULE_DELAY", "50")
            .env("OTEL_BSP_MAX_QUEUE_SIZE", "16")
            .env("OTEL_BSP_EXPORT_TIMEOUT", "300")
    };
    let callee = down("down-b").app_port(app.port()).spawn().await;
    let caller = down("down-a").spawn().await;
    let client = caller.client();
    wait_until_routed(&client, "down-b", "echo").await;

    // Every call answers, within a deadline far below what an export attempt may take.
    for i in 0..100 {
        let payload = format!("call-{i}");
        let options = CallOptions::default().timeout(Duration::from_secs(2));
        let reply = client.invoke_with("down-b", "echo", payload.clone().into_bytes(), options).await.unwrap();
        assert_eq!(reply.data, payload.as_bytes());
    }
    for sidecar in [&caller, &callee] {
        let what = format!("dropped spans counted by {}", sidecar.app_id);
        eventually(Duration::from_secs(20), &what, || async {
            sidecar.metric("tandem_trace_spans_dropped_total").await >= 100.0
        })
        .await;
        assert_eq!(sidecar.metric("tandem_trace_spans_exported_total").await, 0.0);
    }
    caller.wait_for_log("cannot export spans").await;
}
