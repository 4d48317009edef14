//! The delivery schedule of one `pubsub.embedded` component: its pending deliveries in
//! memory, queued per subscription (subscriber app-id and topic), each ready, waiting for a
//! retry, or in flight.
//!
//! It mirrors the outbox: built from it when the sidecar starts, then kept up to date by
//! publishes (which add) and settled attempts (which remove or reschedule). So the delivery
//! loop never scans the outbox, and finding the next deliveries costs the same whatever the
//! backlog. Memory is one small entry per pending delivery, bounded with the outbox by
//! `maxBacklog`; the events themselves stay on disk.
//!
//! Each subscription has at most `maxInFlight` deliveries in flight, so a slow subscriber
//! holds back its own events only. One that asks for order has exactly one: its oldest
//! pending event, and nothing else until that one is settled.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

/// A subscription, as deliveries are queued: the subscriber's app-id and the topic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SubscriptionKey {
    pub app_id: String,
    pub topic: String,
}

impl SubscriptionKey {
    pub fn new(app_id: &str, topic: &str) -> Self {
        SubscriptionKey { app_id: app_id.to_string(), topic: topic.to_string() }
    }
}

/// The pending deliveries of one subscription, by outbox sequence number.
#[derive(Debug, Default)]
struct Queue {
    /// Due now, oldest first.
    ready: BTreeSet<u64>,
    /// Waiting for their next attempt: (due, unix ms; seq).
    delayed: BTreeSet<(u64, u64)>,
    in_flight: BTreeSet<u64>,
    /// Deliveries that asked for order; while there is one, the queue delivers one at a time.
    ordered: BTreeSet<u64>,
    /// No attempts before this time (unix ms): the subscriber was away.
    paused_until: u64,
    /// Consecutive attempts that found the subscriber away, for the pause's backoff.
    away_streak: u32,
}

impl Queue {
    fn is_empty(&self) -> bool {
        self.ready.is_empty() && self.delayed.is_empty() && self.in_flight.is_empty()
    }

    /// Moves the deliveries due at `now` from `delayed` to `ready`.
    fn promote(&mut self, now: u64) {
        while let Some(&(due, seq)) = self.delayed.first() {
            if due > now {
                break;
            }
            self.delayed.pop_first();
            self.ready.insert(seq);
        }
    }

    /// The deliveries to start now, at most `slots` of them, marked in flight.
    fn take(&mut self, now: u64, max_in_flight: usize) -> Vec<u64> {
        if self.paused_until > now {
            return Vec::new();
        }
        self.promote(now);
        if !self.ordered.is_empty() {
            // Only the oldest pending delivery, and only once nothing else is in flight.
            if !self.in_flight.is_empty() {
                return Vec::new();
            }
            let oldest_delayed = self.delayed.iter().map(|(_, seq)| *seq).min();
            return match self.ready.first() {
                Some(&seq) if oldest_delayed.is_none_or(|delayed| seq < delayed) => {
                    self.ready.pop_first();
                    self.in_flight.insert(seq);
                    vec![seq]
                }
                _ => Vec::new(),
            };
        }
        let slots = max_in_flight.saturating_sub(self.in_flight.len());
        let mut taken = Vec::with_capacity(slots.min(self.ready.len()));
        while taken.len() < slots {
            let Some(seq) = self.ready.pop_first() else { break };
            self.in_flight.insert(seq);
            taken.push(seq);
        }
        taken
    }

    /// When this queue next has something to start at `now` or later, if it waits for a time.
    fn next_due(&self, now: u64) -> Option<u64> {
        let delayed = self.delayed.first().map(|(due, _)| *due);
        if self.paused_until > now {
            if !self.ready.is_empty() {
                return Some(self.paused_until);
            }
            return delayed.map(|due| due.max(self.paused_until));
        }
        delayed
    }
}

/// What became of an attempt, as the schedule needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing more to deliver (delivered, dropped, dead-lettered, or gone).
    Finished,
    /// Try again at this time (unix ms).
    RetryAt(u64),
    /// No instance of the subscriber could be reached: the delivery stays ready and the whole
    /// subscription pauses, instead of every one of its events probing the absent subscriber.
    SubscriberAway,
}

pub struct Schedule {
    queues: Mutex<BTreeMap<SubscriptionKey, Queue>>,
    max_in_flight: usize,
    /// The longest pause of a subscription whose subscriber is away.
    max_away_pause: Duration,
    initial_away_pause: Duration,
}

impl Schedule {
    pub fn new(max_in_flight: usize, initial_away_pause: Duration, max_away_pause: Duration) -> Self {
        Schedule {
            queues: Mutex::default(),
            max_in_flight: max_in_flight.max(1),
            max_away_pause: max_away_pause.max(initial_away_pause),
            initial_away_pause,
        }
    }

    fn queues(&self) -> std::sync::MutexGuard<'_, BTreeMap<SubscriptionKey, Queue>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a pending delivery, due at `due` (unix ms). Each delivery is added once: when its
    /// event is published, or when the outbox is read at start (before any publish).
    pub fn add(&self, key: &SubscriptionKey, seq: u64, due: u64, ordered: bool) {
        let mut queues = self.queues();
        let queue = match queues.get_mut(key) {
            Some(queue) => queue,
            None => queues.entry(key.clone()).or_default(),
        };
        queue.delayed.insert((due, seq));
        if ordered {
            queue.ordered.insert(seq);
        }
    }

    /// The deliveries to start at `now`, each marked in flight, and when the next one that
    /// waits for a time is due (`None`: nothing waits for a time).
    pub fn take_due(&self, now: u64) -> (Vec<(SubscriptionKey, u64)>, Option<u64>) {
        let mut queues = self.queues();
        let mut due = Vec::new();
        let mut next = None::<u64>;
        for (key, queue) in queues.iter_mut() {
            due.extend(queue.take(now, self.max_in_flight).into_iter().map(|seq| (key.clone(), seq)));
            if let Some(at) = queue.next_due(now) {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        (due, next)
    }

    /// Settles an in-flight delivery.
    pub fn finish(&self, key: &SubscriptionKey, seq: u64, outcome: Outcome, now: u64) {
        let mut queues = self.queues();
        let Some(queue) = queues.get_mut(key) else { return };
        if !queue.in_flight.remove(&seq) {
            return;
        }
        match outcome {
            Outcome::Finished => {
                queue.ordered.remove(&seq);
                queue.away_streak = 0;
            }
            Outcome::RetryAt(due) => {
                queue.delayed.insert((due, seq));
                queue.away_streak = 0;
            }
            Outcome::SubscriberAway => {
                queue.ready.insert(seq);
                queue.away_streak = queue.away_streak.saturating_add(1);
                let factor = 2u32.saturating_pow(queue.away_streak - 1);
                let pause = self.initial_away_pause.saturating_mul(factor).min(self.max_away_pause);
                queue.paused_until = queue.paused_until.max(now + pause.as_millis() as u64);
            }
        }
        if !matches!(outcome, Outcome::SubscriberAway) && queue.paused_until <= now {
            queue.paused_until = 0;
        }
        if queue.is_empty() {
            queues.remove(key);
        }
    }

    /// Takes every delivery of `key` that is not in flight out of the schedule (ready, waiting
    /// for a retry, or paused), for a subscription that is gone: they are released, not
    /// attempted. Those in flight stay until their attempts finish.
    pub fn take_queued(&self, key: &SubscriptionKey) -> Vec<u64> {
        let mut queues = self.queues();
        let Some(queue) = queues.get_mut(key) else { return Vec::new() };
        let mut taken: Vec<u64> = std::mem::take(&mut queue.ready).into_iter().collect();
        taken.extend(std::mem::take(&mut queue.delayed).into_iter().map(|(_, seq)| seq));
        for seq in &taken {
            queue.ordered.remove(seq);
        }
        if queue.is_empty() {
            queues.remove(key);
        }
        taken
    }

    /// Pending deliveries (ready, waiting or in flight), over all subscriptions.
    pub fn len(&self) -> usize {
        self.queues().values().map(|q| q.ready.len() + q.delayed.len() + q.in_flight.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Deliveries in flight to one subscription.
    pub fn in_flight(&self, key: &SubscriptionKey) -> usize {
        self.queues().get(key).map_or(0, |q| q.in_flight.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(app: &str, topic: &str) -> SubscriptionKey {
        SubscriptionKey::new(app, topic)
    }

    fn schedule(max_in_flight: usize) -> Schedule {
        Schedule::new(max_in_flight, Duration::from_millis(100), Duration::from_secs(1))
    }

    fn seqs(due: &[(SubscriptionKey, u64)], of: &SubscriptionKey) -> Vec<u64> {
        due.iter().filter(|(k, _)| k == of).map(|(_, s)| *s).collect()
    }

    #[test]
    fn each_subscription_has_its_own_in_flight_limit() {
        let s = schedule(2);
        let (slow, fast) = (key("slow", "t"), key("fast", "t"));
        for seq in 1..=5 {
            s.add(&slow, seq, 0, false);
            s.add(&fast, seq, 0, false);
        }
        let (due, _) = s.take_due(10);
        assert_eq!(seqs(&due, &slow), [1, 2]);
        assert_eq!(seqs(&due, &fast), [1, 2]);
        // The slow subscriber answers nothing; the fast one goes on as its deliveries end.
        s.finish(&fast, 1, Outcome::Finished, 10);
        s.finish(&fast, 2, Outcome::Finished, 10);
        let (due, _) = s.take_due(10);
        assert_eq!(seqs(&due, &slow), Vec::<u64>::new());
        assert_eq!(seqs(&due, &fast), [3, 4]);
        assert_eq!(s.in_flight(&slow), 2);
        assert_eq!(s.len(), 5 + 3, "slow: all five pending; fast: three left");
    }

    #[test]
    fn retries_wait_for_their_time() {
        let s = schedule(8);
        let k = key("a", "t");
        s.add(&k, 1, 0, false);
        s.add(&k, 2, 0, false);
        let (due, next) = s.take_due(100);
        assert_eq!(seqs(&due, &k), [1, 2]);
        assert_eq!(next, None);
        s.finish(&k, 1, Outcome::RetryAt(500), 100);
        s.finish(&k, 2, Outcome::Finished, 100);
        let (due, next) = s.take_due(200);
        assert!(due.is_empty());
        assert_eq!(next, Some(500));
        let (due, _) = s.take_due(500);
        assert_eq!(seqs(&due, &k), [1]);
        s.finish(&k, 1, Outcome::Finished, 500);
        assert!(s.is_empty());
    }

    #[test]
    fn an_ordered_subscription_has_only_its_oldest_event_in_flight() {
        let s = schedule(8);
        let k = key("a", "t");
        for seq in [3, 1, 2] {
            s.add(&k, seq, 0, true);
        }
        let (due, _) = s.take_due(10);
        assert_eq!(seqs(&due, &k), [1]);
        assert!(s.take_due(10).0.is_empty(), "nothing else while 1 is in flight");
        // 1 is retried later: 2 must not overtake it.
        s.finish(&k, 1, Outcome::RetryAt(50), 10);
        let (due, next) = s.take_due(20);
        assert!(due.is_empty());
        assert_eq!(next, Some(50));
        assert_eq!(seqs(&s.take_due(50).0, &k), [1]);
        s.finish(&k, 1, Outcome::Finished, 50);
        assert_eq!(seqs(&s.take_due(50).0, &k), [2]);
    }

    #[test]
    fn an_away_subscriber_pauses_its_subscription_with_backoff() {
        let s = schedule(8);
        let (away, other) = (key("away", "t"), key("other", "t"));
        s.add(&away, 1, 0, false);
        s.add(&away, 2, 0, false);
        s.add(&other, 1, 0, false);
        let (due, _) = s.take_due(1_000);
        assert_eq!(due.len(), 3);
        s.finish(&away, 1, Outcome::SubscriberAway, 1_000);
        s.finish(&away, 2, Outcome::SubscriberAway, 1_000);
        // Paused: 100 ms after the first away answer, 200 ms after the second.
        let (due, next) = s.take_due(1_150);
        assert!(due.is_empty());
        assert_eq!(next, Some(1_200));
        let (due, _) = s.take_due(1_200);
        assert_eq!(seqs(&due, &away), [1, 2], "both tried again, in order");
        // The pause is capped at max_away_pause.
        for _ in 0..10 {
            s.finish(&away, 1, Outcome::SubscriberAway, 2_000);
            s.take_due(100_000);
        }
        s.finish(&away, 1, Outcome::SubscriberAway, 2_000);
        assert_eq!(s.take_due(2_000).1, Some(3_000));
        assert_eq!(s.in_flight(&other), 1, "the other subscription is not held back");
    }

    #[test]
    fn a_gone_subscriptions_queued_deliveries_are_taken_and_its_in_flight_ones_stay() {
        let s = schedule(2);
        let (gone, other) = (key("gone", "t"), key("other", "t"));
        for seq in 1..=4 {
            s.add(&gone, seq, 0, false);
        }
        s.add(&gone, 5, 10_000, false);
        s.add(&other, 6, 0, false);
        let (due, _) = s.take_due(1);
        assert_eq!(seqs(&due, &gone), [1, 2]);
        let mut queued = s.take_queued(&gone);
        queued.sort();
        assert_eq!(queued, [3, 4, 5], "ready and waiting ones, not those in flight");
        assert_eq!(s.in_flight(&gone), 2);
        assert!(s.take_queued(&gone).is_empty());
        s.finish(&gone, 1, Outcome::Finished, 2);
        s.finish(&gone, 2, Outcome::Finished, 2);
        assert_eq!(s.len(), 1, "only the other subscription's delivery is left");
        assert!(s.take_queued(&key("never", "t")).is_empty());
    }

    #[test]
    fn finishing_an_unknown_delivery_changes_nothing() {
        let s = schedule(1);
        let k = key("a", "t");
        s.add(&k, 1, 0, false);
        s.finish(&k, 1, Outcome::Finished, 0);
        s.finish(&key("b", "t"), 7, Outcome::RetryAt(5), 0);
        assert_eq!(s.len(), 1, "1 was not in flight, so it is still pending");
        assert_eq!(s.take_due(0).0.len(), 1);
    }
}
