//! The delivery loop of one `pubsub.embedded` component: scans the outbox for due
//! deliveries, hands each to the subscriber through a [`Deliver`], and settles the outcome in
//! the outbox (done, retry later, or dead-letter/drop after the last attempt).
//!
//! The outbox is scanned oldest first, so for a subscription that asks for order
//! (`tandem.ordered`) only its oldest unsettled event of a topic is ever in flight: events
//! reach it in publish order (per publisher), one at a time.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tandem_proto::runtime::TopicEventRequest;
use tandem_proto::runtime::topic_event_response::TopicEventResponseStatus;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::EmbeddedPubSub;

/// Outbox records read per scan step, so a long backlog is never all in memory.
const SCAN_CHUNK: usize = 256;
/// The longest the loop sleeps when nothing is due sooner.
const IDLE_SCAN: Duration = Duration::from_secs(1);

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
    Retrying(u32),
    Waiting,
    Exhausted { dead_letter_topic: String },
}

/// Runs the delivery loop of `pubsub` until `stop`.
pub async fn run(pubsub: Arc<EmbeddedPubSub>, deliverer: Arc<dyn Deliver>, stop: CancellationToken) {
    let in_flight: Arc<Mutex<HashSet<(u64, String)>>> = Arc::default();
    let permits = Arc::new(Semaphore::new(pubsub.policy.max_in_flight.max(1)));
    loop {
        let now = now_ms();
        let mut next_due = now + IDLE_SCAN.as_millis() as u64;
        let mut after = None;
        // Ordered subscriptions whose oldest pending event this scan has met: their later
        // events wait until that one is settled, whatever state it is in.
        let mut ordered_heads: HashSet<(String, String)> = HashSet::new();
        loop {
            // Off the runtime thread: a sled read can wait on sled's process-wide lock.
            let outbox = pubsub.outbox.clone();
            let Ok(chunk) = tokio::task::spawn_blocking(move || outbox.records_after(after, SCAN_CHUNK)).await else {
                break;
            };
            let Some((last, _)) = chunk.last() else { break };
            after = Some(*last);
            for (seq, record) in chunk {
                let Some(event) = record.event else { continue };
                for pending in record.deliveries {
                    if pending.ordered && !ordered_heads.insert((pending.app_id.clone(), event.topic.clone())) {
                        continue;
                    }
                    if pending.next_attempt_unix_ms > now {
                        next_due = next_due.min(pending.next_attempt_unix_ms);
                        continue;
                    }
                    let key = (seq, pending.app_id.clone());
                    if !in_flight.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone()) {
                        continue;
                    }
                    // Waits while the in-flight limit is reached: backpressure on the scan itself.
                    let permit = tokio::select! {
                        _ = stop.cancelled() => return,
                        permit = permits.clone().acquire_owned() => match permit { Ok(p) => p, Err(_) => return },
                    };
                    let (pubsub, deliverer, in_flight) = (pubsub.clone(), deliverer.clone(), in_flight.clone());
                    // The route is the subscriber's, so it is set per delivery, not stored in the event.
                    let event = TopicEventRequest { path: pending.path.clone(), ..event.clone() };
                    tokio::spawn(async move {
                        // The scan read a snapshot; an attempt that ended since then may have
                        // settled or rescheduled this delivery. Attempts settle the record before
                        // they leave `in_flight`, so this read sees their outcome.
                        if pubsub.outbox.is_due(seq, &key.1, now_ms()) {
                            attempt(&pubsub, deliverer.as_ref(), seq, &key.1, event).await;
                        }
                        in_flight.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
                        drop(permit);
                        pubsub.wake.notify_one();
                    });
                }
            }
        }
        let wait = Duration::from_millis(next_due.saturating_sub(now_ms()));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = pubsub.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// One delivery attempt and its outcome, settled in the outbox.
async fn attempt(pubsub: &EmbeddedPubSub, deliverer: &dyn Deliver, seq: u64, app_id: &str, event: TopicEventRequest) {
    let policy = &pubsub.policy;
    // A span per attempt, child of the publish call (its context travels in the event).
    let span = crate::telemetry::delivery_span(&pubsub.name, &event, app_id);
    let in_flight = pubsub.metrics.pubsub_delivery_in_flight(&pubsub.name, &event.topic);
    let outcome = deliverer.deliver(app_id, event.clone(), policy.timeout).instrument(span.clone()).await;
    drop(in_flight);
    if !matches!(outcome, Ok(TopicEventResponseStatus::Success)) {
        crate::telemetry::record_error(&span);
    }
    let settled = pubsub.outbox.modify(seq, |record| {
        let index = record.deliveries.iter().position(|d| d.app_id == app_id)?;
        Some(match &outcome {
            Ok(TopicEventResponseStatus::Success) => {
                record.deliveries.remove(index);
                Settled::Done
            }
            Ok(TopicEventResponseStatus::Drop) => {
                record.deliveries.remove(index);
                Settled::Dropped
            }
            Err(DeliveryError::SubscriberAway(_)) => {
                let pending = &mut record.deliveries[index];
                // Back off as if this were another attempt, without counting it.
                pending.next_attempt_unix_ms = now_ms() + policy.backoff(pending.attempts + 1).as_millis() as u64;
                Settled::Waiting
            }
            Ok(TopicEventResponseStatus::Retry) | Err(DeliveryError::Failed(_)) => {
                let pending = &mut record.deliveries[index];
                pending.attempts += 1;
                if pending.attempts >= policy.max_attempts {
                    let dead_letter_topic = pending.dead_letter_topic.clone();
                    record.deliveries.remove(index);
                    Settled::Exhausted { dead_letter_topic }
                } else {
                    pending.next_attempt_unix_ms = now_ms() + policy.backoff(pending.attempts).as_millis() as u64;
                    Settled::Retrying(pending.attempts)
                }
            }
        })
    });
    let (topic, id) = (event.topic.as_str(), event.id.as_str());
    match settled {
        Ok(Some(Some(Settled::Done))) => {
            pubsub.metrics.pubsub_event(&pubsub.name, topic, "delivered");
        }
        Ok(Some(Some(Settled::Dropped))) => {
            pubsub.metrics.pubsub_event(&pubsub.name, topic, "dropped");
            tracing::warn!(pubsub = %pubsub.name, topic, id, app_id, "the subscriber dropped the event");
        }
        Ok(Some(Some(Settled::Retrying(attempts)))) => {
            pubsub.metrics.pubsub_event(&pubsub.name, topic, "retried");
            let reason = reason(&outcome);
            tracing::debug!(pubsub = %pubsub.name, topic, id, app_id, attempts, reason, "delivery will be retried");
        }
        Ok(Some(Some(Settled::Waiting))) => {
            tracing::debug!(pubsub = %pubsub.name, topic, id, app_id, reason = reason(&outcome), "the subscriber is away; the event waits");
        }
        Ok(Some(Some(Settled::Exhausted { dead_letter_topic }))) => {
            dead_letter(pubsub, event, app_id, &dead_letter_topic, &reason(&outcome)).await;
        }
        // The delivery was settled already (a redelivery after a restart raced it).
        Ok(None) | Ok(Some(None)) => {}
        Err(e) => {
            tracing::error!(pubsub = %pubsub.name, topic, id, app_id, error = %e, "cannot record a delivery outcome; it will be retried")
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
