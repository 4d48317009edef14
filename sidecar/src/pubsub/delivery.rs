//! The delivery loop of one `pubsub.embedded` component: takes the due deliveries from the
//! component's [`schedule`](super::schedule), hands each to the subscriber through a
//! [`Deliver`], and settles the outcome in the outbox (done, retry later, or dead-letter/drop
//! after the last attempt) and in the schedule.
//!
//! The schedule keeps a subscription that asks for order (`tandem.ordered`) to one delivery at
//! a time, its oldest unsettled event of the topic: events reach it in publish order (per
//! publisher), one at a time.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tandem_proto::runtime::TopicEventRequest;
use tandem_proto::runtime::topic_event_response::TopicEventResponseStatus;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::EmbeddedPubSub;
use super::schedule::{Outcome, SubscriptionKey};

/// The longest the loop sleeps when nothing is due sooner.
const IDLE_WAIT: Duration = Duration::from_secs(1);

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Why a delivery got no answer from the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryError {
    /// No instance of the subscriber could be reached: it is away (all instances down or
    /// restarting). The event waits for it without using up its attempts.
    SubscriberAway(String),
    /// The app got the event and failed (an error status, a timeout): an attempt used up.
    Failed(String),
}

/// Hands an event to one live instance of a subscriber app.
#[tonic::async_trait]
pub trait Deliver: Send + Sync + 'static {
    /// The app's answer, or why there was none.
    async fn deliver(
        &self,
        app_id: &str,
        event: TopicEventRequest,
        timeout: Duration,
    ) -> Result<TopicEventResponseStatus, DeliveryError>;
}

enum Settled {
    Done,
    Dropped,
    Retrying { attempts: u32, next_attempt_unix_ms: u64 },
    Exhausted { dead_letter_topic: String },
}

/// Runs the delivery loop of `pubsub` until `stop`.
pub async fn run(pubsub: Arc<EmbeddedPubSub>, deliverer: Arc<dyn Deliver>, stop: CancellationToken) {
    loop {
        let now = now_ms();
        let (due, next) = pubsub.schedule.take_due(now);
        for (key, seq) in due {
            let (pubsub, deliverer) = (pubsub.clone(), deliverer.clone());
            tokio::spawn(async move {
                let outcome = deliver_one(&pubsub, deliverer.as_ref(), &key, seq).await;
                pubsub.schedule.finish(&key, seq, outcome, now_ms());
                pubsub.wake.notify_one();
            });
        }
        let wait = next.map_or(IDLE_WAIT, |at| Duration::from_millis(at.saturating_sub(now_ms())).min(IDLE_WAIT));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = pubsub.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Reads one scheduled delivery from the outbox and attempts it.
async fn deliver_one(pubsub: &EmbeddedPubSub, deliverer: &dyn Deliver, key: &SubscriptionKey, seq: u64) -> Outcome {
    match pubsub.outbox.pending(seq, &key.app_id) {
        // The route is the subscriber's, so it is set per delivery, not stored in the event.
        Ok(Some((event, pending))) => {
            attempt(pubsub, deliverer, seq, &key.app_id, TopicEventRequest { path: pending.path, ..event }).await
        }
        // Settled already: nothing left to do.
        Ok(None) => Outcome::Finished,
        Err(e) => {
            tracing::error!(pubsub = %pubsub.name, topic = %key.topic, app_id = %key.app_id, seq, error = %e, "cannot read a pending delivery; it will be retried");
            Outcome::RetryAt(now_ms() + pubsub.policy.initial_retry_delay.as_millis() as u64)
        }
    }
}

/// One delivery attempt and its outcome, settled in the outbox.
async fn attempt(
    pubsub: &EmbeddedPubSub,
    deliverer: &dyn Deliver,
    seq: u64,
    app_id: &str,
    event: TopicEventRequest,
) -> Outcome {
    let policy = &pubsub.policy;
    // A span per attempt, child of the publish call (its context travels in the event).
    let span = crate::telemetry::delivery_span(&pubsub.name, &event, app_id);
    let in_flight = pubsub.metrics.pubsub_delivery_in_flight(&pubsub.name, &event.topic);
    let outcome = deliverer.deliver(app_id, event.clone(), policy.timeout).instrument(span.clone()).await;
    drop(in_flight);
    if !matches!(outcome, Ok(TopicEventResponseStatus::Success)) {
        crate::telemetry::record_error(&span);
    }
    let (topic, id) = (event.topic.as_str(), event.id.as_str());
    let answer = match &outcome {
        Ok(status) => *status,
        Err(DeliveryError::Failed(_)) => TopicEventResponseStatus::Retry,
        Err(DeliveryError::SubscriberAway(reason)) => {
            // Not an attempt: the outbox record stays as it is, and the schedule pauses the
            // subscription until an instance may be back.
            tracing::debug!(pubsub = %pubsub.name, topic, id, app_id, reason, "the subscriber is away; the event waits");
            return Outcome::SubscriberAway;
        }
    };
    let settled = pubsub.outbox.modify(seq, |deliveries| {
        let index = deliveries.iter().position(|d| d.app_id == app_id)?;
        Some(match answer {
            TopicEventResponseStatus::Success => {
                deliveries.remove(index);
                Settled::Done
            }
            TopicEventResponseStatus::Drop => {
                deliveries.remove(index);
                Settled::Dropped
            }
            TopicEventResponseStatus::Retry => {
                let pending = &mut deliveries[index];
                pending.attempts += 1;
                if pending.attempts >= policy.max_attempts {
                    let dead_letter_topic = pending.dead_letter_topic.clone();
                    deliveries.remove(index);
                    Settled::Exhausted { dead_letter_topic }
                } else {
                    pending.next_attempt_unix_ms = now_ms() + policy.backoff(pending.attempts).as_millis() as u64;
                    Settled::Retrying { attempts: pending.attempts, next_attempt_unix_ms: pending.next_attempt_unix_ms }
                }
            }
        })
    });
    match settled {
        Ok(Some(Some(Settled::Done))) => {
            pubsub.metrics.pubsub_event(&pubsub.name, topic, "delivered");
            Outcome::Finished
        }
        Ok(Some(Some(Settled::Dropped))) => {
            pubsub.metrics.pubsub_event(&pubsub.name, topic, "dropped");
            tracing::warn!(pubsub = %pubsub.name, topic, id, app_id, "the subscriber dropped the event");
            Outcome::Finished
        }
        Ok(Some(Some(Settled::Retrying { attempts, next_attempt_unix_ms }))) => {
            pubsub.metrics.pubsub_event(&pubsub.name, topic, "retried");
            let reason = reason(&outcome);
            tracing::debug!(pubsub = %pubsub.name, topic, id, app_id, attempts, reason, "delivery will be retried");
            Outcome::RetryAt(next_attempt_unix_ms)
        }
        Ok(Some(Some(Settled::Exhausted { dead_letter_topic }))) => {
            dead_letter(pubsub, event, app_id, &dead_letter_topic, &reason(&outcome)).await;
            Outcome::Finished
        }
        // The delivery was settled already.
        Ok(None) | Ok(Some(None)) => Outcome::Finished,
        Err(e) => {
            tracing::error!(pubsub = %pubsub.name, topic, id, app_id, error = %e, "cannot record a delivery outcome; it will be retried");
            Outcome::RetryAt(now_ms() + policy.initial_retry_delay.as_millis() as u64)
        }
    }
}

fn reason(outcome: &Result<TopicEventResponseStatus, DeliveryError>) -> String {
    match outcome {
        Err(DeliveryError::SubscriberAway(why) | DeliveryError::Failed(why)) => why.clone(),
        Ok(_) => "the subscriber asked to retry".into(),
    }
}

async fn dead_letter(pubsub: &EmbeddedPubSub, mut event: TopicEventRequest, app_id: &str, topic: &str, reason: &str) {
    let (original, id, attempts) = (event.topic.clone(), event.id.clone(), pubsub.policy.max_attempts);
    if topic.is_empty() {
        pubsub.metrics.pubsub_event(&pubsub.name, &original, "dropped");
        tracing::error!(pubsub = %pubsub.name, topic = %original, id, app_id, attempts, reason, "event dropped after its last delivery attempt (no dead-letter topic)");
        return;
    }
    event.topic = topic.to_string();
    match pubsub.publish(event).await {
        Ok(subscribers) => {
            pubsub.metrics.pubsub_event(&pubsub.name, &original, "dead_lettered");
            tracing::warn!(pubsub = %pubsub.name, topic = %original, dead_letter_topic = topic, id, app_id, attempts, subscribers, reason, "event dead-lettered");
        }
        Err(e) => {
            pubsub.metrics.pubsub_event(&pubsub.name, &original, "dropped");
            tracing::error!(pubsub = %pubsub.name, topic = %original, dead_letter_topic = topic, id, app_id, error = %e, "event dropped: it could not be dead-lettered");
        }
    }
}
