//! Pub/sub tests' helpers: an [`Inbox`] that records what a subscriber app received, an app
//! that fills one ([`subscriber`]), and [`wait_until_subscribed`], which waits until a
//! publisher's routing knows a subscription.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_sdk::{AppServer, EventOutcome, SidecarClient, TopicEvent};

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
