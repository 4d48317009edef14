//! Pieces that peers handed to this sidecar, kept until its member's operation takes them. A
//! piece may arrive before the operation starts here (a peer that is faster, or that learnt
//! of the round first), so arrival and taking are decoupled.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Where a piece belongs: group, round, operation in the round, hop in the operation, sender's rank.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PieceKey {
    pub group: String,
    pub round: u64,
    pub operation: u64,
    pub hop: u32,
    pub from_rank: u32,
}

/// Why [`Mailbox::take`] gave up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotTaken {
    /// The round ended (its token was cancelled) before the piece came.
    RoundEnded,
    /// The piece did not come in time.
    TimedOut,
}

#[derive(Debug)]
pub struct Mailbox<Piece> {
    pieces: Mutex<HashMap<PieceKey, Piece>>,
    arrived: Notify,
}

impl<Piece> Default for Mailbox<Piece> {
    fn default() -> Self {
        Mailbox { pieces: Mutex::new(HashMap::new()), arrived: Notify::new() }
    }
}

impl<Piece> Mailbox<Piece> {
    /// Keeps `piece` and wakes whoever waits for it.
    pub fn deposit(&self, key: PieceKey, piece: Piece) {
        self.lock().insert(key, piece);
        self.arrived.notify_waiters();
    }

    /// The piece at `key` once it has arrived; gives up when `round` is cancelled or after `timeout`.
    pub async fn take(&self, key: &PieceKey, round: &CancellationToken, timeout: Duration) -> Result<Piece, NotTaken> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before looking, so an arrival between the look and the wait still wakes us.
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(piece) = self.lock().remove(key) {
                return Ok(piece);
            }
            tokio::select! {
                _ = &mut arrived => {}
                _ = round.cancelled() => {
                    // A piece that came before the round ended still completes the operation.
                    return self.lock().remove(key).ok_or(NotTaken::RoundEnded);
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return self.lock().remove(key).ok_or(NotTaken::TimedOut);
                }
            }
        }
    }

    /// Drops the pieces of `group`'s rounds before `round` (operations that can no longer run).
    pub fn purge_before(&self, group: &str, round: u64) {
        self.lock().retain(|key, _| key.group != group || key.round >= round);
    }

    /// Drops every piece of `group` (its member left).
    pub fn purge_group(&self, group: &str) {
        self.lock().retain(|key, _| key.group != group);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PieceKey, Piece>> {
        self.pieces.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use prost::bytes::Bytes;

    use super::*;
    use crate::group::ring::Piece;

    fn key(round: u64, hop: u32) -> PieceKey {
        PieceKey { group: "g".into(), round, operation: 0, hop, from_rank: 1 }
    }

    fn piece(text: &'static str) -> Piece {
        Piece { data: Bytes::from_static(text.as_bytes()), round_ends: false }
    }

    #[tokio::test]
    async fn a_piece_is_taken_whether_it_came_before_or_after_the_wait() {
        let mailbox = Arc::new(Mailbox::<Piece>::default());
        let round = CancellationToken::new();
        mailbox.deposit(key(1, 0), piece("early"));
        assert_eq!(mailbox.take(&key(1, 0), &round, Duration::from_secs(5)).await.unwrap(), piece("early"));

        let waiting = {
            let (mailbox, round) = (mailbox.clone(), round.clone());
            tokio::spawn(async move { mailbox.take(&key(1, 1), &round, Duration::from_secs(5)).await })
        };
        tokio::task::yield_now().await;
        mailbox.deposit(key(1, 2), piece("other hop"));
        mailbox.deposit(key(1, 1), piece("late"));
        assert_eq!(waiting.await.unwrap().unwrap(), piece("late"));
        assert_eq!(mailbox.len(), 1, "the other hop's piece stays");
    }

    #[tokio::test]
    async fn a_wait_ends_with_the_round_or_the_timeout() {
        let mailbox = Mailbox::<Piece>::default();
        let round = CancellationToken::new();
        assert_eq!(mailbox.take(&key(1, 0), &round, Duration::from_millis(20)).await, Err(NotTaken::TimedOut));
        round.cancel();
        assert_eq!(mailbox.take(&key(1, 0), &round, Duration::from_secs(60)).await, Err(NotTaken::RoundEnded));
        // What arrived before the end still counts.
        mailbox.deposit(key(1, 0), piece("in time"));
        assert_eq!(mailbox.take(&key(1, 0), &round, Duration::from_secs(60)).await.unwrap(), piece("in time"));
    }

    #[test]
    fn old_rounds_and_left_groups_are_purged() {
        let mailbox = Mailbox::<Piece>::default();
        mailbox.deposit(key(1, 0), piece("old"));
        mailbox.deposit(key(2, 0), piece("current"));
        mailbox.deposit(PieceKey { group: "h".into(), ..key(1, 0) }, piece("other group"));
        mailbox.purge_before("g", 2);
        assert_eq!(mailbox.len(), 2);
        mailbox.purge_group("g");
        assert_eq!(mailbox.len(), 1);
    }
}
