//! Pub/sub tests' helpers: an [`Inbox`] that records what a subscriber app received, an app
//! that fills one ([`subscriber`]), one that also keeps each request as the sidecar sent it
//! ([`request_logging_subscriber`]), one that holds events until released
//! ([`holding_subscriber`]), and [`wait_until_subscribed`], which waits until a publisher's
//! routing knows a subscription.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_proto::runtime::app_callback_server::{AppCallback, AppCallbackServer};
use tandem_proto::runtime::topic_event_response::TopicEventResponseStatus;
use tandem_proto::runtime::{ListTopicSubscriptionsResponse, TopicEventRequest, TopicEventResponse, TopicSubscription};
use tandem_sdk::proto::common::{InvokeRequest, InvokeResponse};
use tandem_sdk::{AppServer, EventOutcome, SidecarClient, TopicEvent};
use tonic::{Request, Response, Status};

use crate::{TestApp, eventually};

/// Every event an app received, in arrival order. Clones share the same events.
#[derive(Clone, Default)]
pub struct Inbox {
    events: Arc<Mutex<Vec<TopicEvent>>>,
}

impl Inbox {
    pub fn push(&self, event: TopicEvent) {
        self.events.lock().unwrap().push(event);
    }

    /// A copy of the events so far.
    pub fn events(&self) -> Vec<TopicEvent> {
        self.events.lock().unwrap().clone()
    }

    /// The payloads so far, as (lossy) UTF-8.
    pub fn payloads(&self) -> Vec<String> {
        self.events.lock().unwrap().iter().map(|e| String::from_utf8_lossy(&e.data).into_owned()).collect()
    }

    /// How many events carried `payload`.
    pub fn count(&self, payload: &str) -> usize {
        self.payloads().iter().filter(|p| *p == payload).count()
    }

    pub fn has(&self, payload: &str) -> bool {
        self.count(payload) > 0
    }

    /// An event handler that records each event here and answers SUCCESS.
    pub fn accept(&self) -> impl Fn(TopicEvent) -> std::future::Ready<EventOutcome> + Send + Sync + 'static {
        let inbox = self.clone();
        move |event| {
            inbox.push(event);
            std::future::ready(EventOutcome::Success)
        }
    }
}

/// An app subscribed to `topic` of component `pubsub` that records every event in `inbox` and
/// answers SUCCESS.
pub async fn subscriber(topic: &str, inbox: &Inbox) -> TestApp {
    TestApp::start(AppServer::new().subscribe("pubsub", topic, inbox.accept())).await
}

/// An app subscribed to `topic` of component `pubsub` that records every event it gets in the
/// returned inbox and answers SUCCESS, except that it holds those `hold` picks (by their data)
/// until `true` is sent on the returned sender: a subscriber that keeps its events in flight.
pub async fn holding_subscriber(
    topic: &str,
    hold: fn(&[u8]) -> bool,
) -> (TestApp, Inbox, tokio::sync::watch::Sender<bool>) {
    let inbox = Inbox::default();
    let (release, released) = tokio::sync::watch::channel(false);
    let inbox_c = inbox.clone();
    let app = TestApp::start(AppServer::new().subscribe("pubsub", topic, move |event| {
        let (inbox, mut released) = (inbox_c.clone(), released.clone());
        async move {
            let held = hold(&event.data);
            inbox.push(event);
            if held {
                let _ = released.wait_for(|go| *go).await;
            }
            EventOutcome::Success
        }
    }))
    .await;
    (app, inbox, release)
}

/// Whether an event is not one of [`wait_until_subscribed`]'s probes.
pub fn not_a_probe(data: &[u8]) -> bool {
    !data.starts_with(b"probe-")
}

/// Publishes probes (payloads `probe-N`) to `topic` of component `pubsub` until one reaches
/// `inbox`: the publisher's routing then knows the subscription.
pub async fn wait_until_subscribed(publisher: &SidecarClient, topic: &str, inbox: &Inbox) {
    let mut n = 0;
    eventually(Duration::from_secs(20), &format!("a subscription to '{topic}'"), || {
        n += 1;
        let probe = format!("probe-{n}");
        let publisher = publisher.clone();
        let inbox = inbox.clone();
        let topic = topic.to_string();
        async move {
            // Until the publisher's routing table is loaded it answers UNAVAILABLE: try again.
            if publisher.publish("pubsub", &topic, probe.as_bytes().to_vec(), "text/plain").await.is_err() {
                return false;
            }
            // A delivered probe shows up quickly; give this one a short bounded chance.
            for _ in 0..10 {
                if inbox.payloads().iter().any(|p| p.starts_with("probe-")) {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            false
        }
    })
    .await;
}

/// Every `TopicEventRequest` an app received, exactly as its sidecar sent it (the SDK's
/// [`TopicEvent`] leaves out `spec_version` and the extensions). Clones share the requests.
#[derive(Clone, Default)]
pub struct RequestLog {
    requests: Arc<Mutex<Vec<TopicEventRequest>>>,
}

impl RequestLog {
    /// The first request that carried `data`.
    pub fn find(&self, data: &[u8]) -> Option<TopicEventRequest> {
        self.requests.lock().unwrap().iter().find(|r| r.data == data).cloned()
    }
}

/// An app that serves the callback API itself (not through the SDK), subscribed to `topic` of
/// component `pubsub`: records every event in `inbox` and `log` and answers SUCCESS. Returns
/// its port; it serves until the test's runtime ends.
pub async fn request_logging_subscriber(topic: &str, inbox: &Inbox, log: &RequestLog) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binding a test app");
    let port = listener.local_addr().expect("bound").port();
    let app = RequestLoggingApp { topic: topic.to_string(), inbox: inbox.clone(), log: log.clone() };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AppCallbackServer::new(app))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    port
}

struct RequestLoggingApp {
    topic: String,
    inbox: Inbox,
    log: RequestLog,
}

#[tonic::async_trait]
impl AppCallback for RequestLoggingApp {
    async fn on_invoke(&self, _: Request<InvokeRequest>) -> Result<Response<InvokeResponse>, Status> {
        Err(Status::unimplemented("no methods"))
    }

    async fn list_topic_subscriptions(
        &self,
        _: Request<()>,
    ) -> Result<Response<ListTopicSubscriptionsResponse>, Status> {
        Ok(Response::new(ListTopicSubscriptionsResponse {
            subscriptions: vec![TopicSubscription {
                pubsub_name: "pubsub".into(),
                topic: self.topic.clone(),
                ..Default::default()
            }],
        }))
    }

    async fn on_topic_event(
        &self,
        request: Request<TopicEventRequest>,
    ) -> Result<Response<TopicEventResponse>, Status> {
        let event = request.into_inner();
        self.log.requests.lock().unwrap().push(event.clone());
        self.inbox.push(TopicEvent::from(event));
        Ok(Response::new(TopicEventResponse { status: TopicEventResponseStatus::Success as i32 }))
    }
}
