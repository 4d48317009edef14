//! The delivery loop of one `pubsub.embedded` component: takes the due deliveries from the
//! component's [`schedule`](super::schedule), hands them to the subscriber through a
//! [`Deliver`], and settles each outcome in the outbox (done, retry later, or dead-letter/drop
//! after the last attempt) and in the schedule.
//!
//! Deliveries of one subscription that are due together go out together, up to [`MAX_BATCH`]
//! events in one call to the subscriber's sidecar (which hands each to the app on its own, all
//! at once). Under load they come due in groups (a group commit makes many publishes durable
//! at once), so one call carries many events; a lone event travels alone, as soon as it is
//! durable. Each event keeps its own attempt, span and outcome.
//!
//! The subscriber's sidecar sends each event's answer as soon as the app gives it
//! (`StreamDeliverEvents`), and each is settled in the outbox as it comes. The batch's places
//! in the window come back together, so that the next call is a full batch again (smaller ones
//! cost more CPU per event under load), unless the call takes longer than [`STALLED`]: then
//! each comes back with its answer, so that one slow event holds back only itself.
//!
//! A subscription that is gone from etcd has its deliveries released as they come due, with
//! every other one it has queued: nobody would take them, and they would fill the backlog.
//!
//! The schedule keeps a subscription that asks for order (`tandem.ordered`) to one delivery at
//! a time, its oldest unsettled event of the topic: events reach it in publish order (per
//! publisher), one at a time.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tandem_proto::runtime::TopicEventRequest;
use tandem_proto::runtime::topic_event_response::TopicEventResponseStatus;
use tokio::sync::mpsc;
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

/// An event for a subscriber, with the span context of its delivery attempt (the parent of
/// the subscriber side's span).
pub struct EventToDeliver {
    pub event: TopicEventRequest,
    pub parent: opentelemetry::trace::SpanContext,
}

/// One event's outcome: its place in the events handed over, and the app's answer or why there
/// was none.
pub type Answered = (usize, Result<TopicEventResponseStatus, DeliveryError>);

/// Hands events to live instances of a subscriber app.
#[tonic::async_trait]
pub trait Deliver: Send + Sync + 'static {
    /// Each event to one live instance of `app_id`. Sends each event's outcome on `answered` as
    /// soon as it is known, exactly once per event, and returns once every event has one.
    async fn deliver(
        &self,
        app_id: &str,
        events: Vec<EventToDeliver>,
        timeout: Duration,
        answered: mpsc::UnboundedSender<Answered>,
    );
}

enum Settled {
    Done,
    Dropped,
    Retrying { attempts: u32, next_attempt_unix_ms: u64 },
    Exhausted { dead_letter_topic: String },
}

/// Runs the delivery loop of `pubsub` until `stop`. The deliveries due at once for one
/// subscription go out together, up to [`MAX_BATCH`] per call.
pub async fn run(pubsub: Arc<EmbeddedPubSub>, deliverer: Arc<dyn Deliver>, stop: CancellationToken) {
    loop {
        let now = now_ms();
        let (due, next) = pubsub.schedule.take_due(now);
        for (key, seqs) in by_subscription(due) {
            for batch in seqs.chunks(MAX_BATCH) {
                let (pubsub, deliverer, key, batch) = (pubsub.clone(), deliverer.clone(), key.clone(), batch.to_vec());
                tokio::spawn(async move { deliver_batch(&pubsub, deliverer.as_ref(), &key, batch).await });
            }
        }
        let wait = next.map_or(IDLE_WAIT, |at| Duration::from_millis(at.saturating_sub(now_ms())).min(IDLE_WAIT));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = pubsub.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Deliveries at most in one call to a subscriber's sidecar.
pub const MAX_BATCH: usize = 64;

/// How long a delivery call may take before the places of its answered events are given back
/// one by one instead of with the whole batch's (see the module docs).
pub const STALLED: Duration = Duration::from_millis(50);

/// Groups due deliveries (which come grouped by subscription) by subscription.
fn by_subscription(due: Vec<(SubscriptionKey, u64)>) -> Vec<(SubscriptionKey, Vec<u64>)> {
    let mut grouped: Vec<(SubscriptionKey, Vec<u64>)> = Vec::new();
    for (key, seq) in due {
        match grouped.last_mut() {
            Some((last, seqs)) if *last == key => seqs.push(seq),
            _ => grouped.push((key, vec![seq])),
        }
    }
    grouped
}

/// Reads scheduled deliveries of one subscription from the outbox, attempts them in one go,
/// and settles each as its answer comes (in the outbox, then in the schedule), so that a slow
/// event holds only its own place in the window.
async fn deliver_batch(pubsub: &EmbeddedPubSub, deliverer: &dyn Deliver, key: &SubscriptionKey, seqs: Vec<u64>) {
    let finish = |seq: u64, outcome: Outcome| {
        pubsub.schedule.finish(key, seq, outcome, now_ms());
        pubsub.wake.notify_one();
    };
    if is_unsubscribed(pubsub, key) {
        release(pubsub, key, &seqs).await;
        seqs.into_iter().for_each(|seq| finish(seq, Outcome::Finished));
        return;
    }
    // Each attempt's sequence number, event id, span and in-flight gauge; its event goes to
    // the deliverer.
    let mut attempts = Vec::with_capacity(seqs.len());
    let mut events = Vec::with_capacity(seqs.len());
    for seq in seqs {
        match pubsub.outbox.pending(seq, &key.app_id) {
            // The route is the subscriber's, so it is set per delivery, not stored in the event.
            Ok(Some((event, pending))) => {
                let event = TopicEventRequest { path: pending.path, ..event };
                // A span per attempt, child of the publish call (its context travels in the event).
                let span = crate::telemetry::delivery_span(&pubsub.name, &event, &key.app_id);
                let parent = crate::telemetry::context::of_span(&span);
                let in_flight = pubsub.metrics.pubsub_delivery_in_flight(&pubsub.name, &key.topic);
                attempts.push((seq, event.id.clone(), span, Some(in_flight)));
                events.push(EventToDeliver { event, parent });
            }
            // Settled already: nothing left to do.
            Ok(None) => finish(seq, Outcome::Finished),
            Err(e) => {
                tracing::error!(pubsub = %pubsub.name, topic = %key.topic, app_id = %key.app_id, seq, error = %e, "cannot read a pending delivery; it will be retried");
                finish(seq, Outcome::RetryAt(now_ms() + pubsub.policy.initial_retry_delay.as_millis() as u64));
            }
        }
    }
    if attempts.is_empty() {
        return;
    }
    pubsub.metrics.pubsub_delivery_batch(&pubsub.name, attempts.len());
    let (answered, mut answers) = mpsc::unbounded_channel();
    let delivering = deliverer.deliver(&key.app_id, events, pubsub.policy.timeout, answered);
    let settling = async {
        // Each event is settled in the outbox as its answer comes. Its place in the window is
        // given back with the whole batch's, so that the next delivery is a full batch again,
        // unless the batch takes longer than STALLED: then at once, so that a slow event holds
        // back no other for long.
        let mut held = Vec::new();
        let stalled = tokio::time::sleep(STALLED);
        tokio::pin!(stalled);
        let mut is_stalled = false;
        loop {
            tokio::select! {
                answer = answers.recv() => {
                    let Some((index, answer)) = answer else { break };
                    let Some((seq, id, span, in_flight)) = attempts.get_mut(index) else { continue };
                    // A second answer for an event would be a deliverer's bug: the first stands.
                    if in_flight.take().is_none() {
                        continue;
                    }
                    let outcome = settle(pubsub, *seq, key, id, answer).instrument(span.clone()).await;
                    if is_stalled {
                        finish(*seq, outcome);
                    } else {
                        held.push((*seq, outcome));
                    }
                }
                _ = &mut stalled, if !is_stalled => {
                    is_stalled = true;
                    held.drain(..).for_each(|(seq, outcome)| finish(seq, outcome));
                }
            }
        }
        held.into_iter().for_each(|(seq, outcome)| finish(seq, outcome));
    };
    tokio::join!(delivering, settling);
    // A deliverer that left an event without an answer would leave its place taken for good.
    for (seq, _, _, in_flight) in &attempts {
        if in_flight.is_some() {
            tracing::error!(pubsub = %pubsub.name, topic = %key.topic, app_id = %key.app_id, seq, "a delivery got no outcome; it will be retried");
            finish(*seq, Outcome::RetryAt(now_ms() + pubsub.policy.initial_retry_delay.as_millis() as u64));
        }
    }
}

/// Whether `key`'s subscription is gone from etcd (its record deleted: `tandem unsubscribe`, or
/// its app no longer lists the topic). A table not loaded yet knows nothing, so it never says so.
fn is_unsubscribed(pubsub: &EmbeddedPubSub, key: &SubscriptionKey) -> bool {
    let routing = pubsub.routing.current();
    routing.synced && !routing.subscribers(&pubsub.name, &key.topic).iter().any(|s| s.app_id == key.app_id)
}

/// Releases the deliveries of a subscription that is gone: `seqs` (taken for this attempt) and
/// every other one the schedule holds for it that is not in flight. Nobody would take them,
/// and kept they would fill the backlog until publishing is refused for everyone.
async fn release(pubsub: &EmbeddedPubSub, key: &SubscriptionKey, seqs: &[u64]) {
    let queued = pubsub.schedule.take_queued(key);
    let (topic, app_id) = (key.topic.as_str(), key.app_id.as_str());
    let mut released = 0usize;
    for (n, &seq) in seqs.iter().chain(&queued).enumerate() {
        let removed = pubsub.outbox.modify(seq, |deliveries| {
            let before = deliveries.len();
            deliveries.retain(|d| d.app_id != app_id);
            before != deliveries.len()
        });
        match removed {
            Ok(Some(true)) => {
                released += 1;
                pubsub.metrics.pubsub_event(&pubsub.name, topic, "unsubscribed");
            }
            Ok(_) => {}
            // Left as it is: its delivery is released when the sidecar next reads the outbox.
            Err(e) => {
                tracing::error!(pubsub = %pubsub.name, topic, app_id, seq, error = %e, "cannot release a delivery")
            }
        }
        // A large backlog is released without holding the runtime thread for long.
        if n % 1024 == 1023 {
            tokio::task::yield_now().await;
        }
    }
    if released > 0 {
        tracing::warn!(pubsub = %pubsub.name, topic, app_id, released, "the subscription is gone from etcd; released the events kept for it");
    }
}

/// Records one delivery attempt's outcome in the outbox (within the attempt's span).
async fn settle(
    pubsub: &EmbeddedPubSub,
    seq: u64,
    key: &SubscriptionKey,
    id: &str,
    outcome: Result<TopicEventResponseStatus, DeliveryError>,
) -> Outcome {
    let policy = &pubsub.policy;
    if !matches!(outcome, Ok(TopicEventResponseStatus::Success)) {
        crate::telemetry::record_error(&tracing::Span::current());
    }
    let (topic, app_id) = (key.topic.as_str(), key.app_id.as_str());
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
    // A retry may be the last attempt, and the event is gone from the outbox once settled: it
    // is read first (from memory while fresh) for the dead-letter topic. Not on the happy path.
    let event = match answer {
        TopicEventResponseStatus::Retry => pubsub.outbox.pending(seq, app_id).ok().flatten().map(|(event, _)| event),
        _ => None,
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
            match event {
                Some(event) => dead_letter(pubsub, event, app_id, &dead_letter_topic, &reason(&outcome)).await,
                None => {
                    pubsub.metrics.pubsub_event(&pubsub.name, topic, "dropped");
                    tracing::error!(pubsub = %pubsub.name, topic, id, app_id, "event dropped after its last delivery attempt: it could not be read back to dead-letter it");
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_deliveries_group_by_subscription_in_order() {
        let (a, b) = (SubscriptionKey::new("a", "t"), SubscriptionKey::new("b", "t"));
        let due = vec![(a.clone(), 1), (a.clone(), 3), (b.clone(), 2), (b.clone(), 4)];
        assert_eq!(by_subscription(due), [(a, vec![1, 3]), (b, vec![2, 4])]);
        assert!(by_subscription(Vec::new()).is_empty());
    }
}
