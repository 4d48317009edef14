//! Training groups: the collective building block. Replicas of a data-parallel job (the app-id
//! `train` scaled to N) join a group through their sidecars; the sidecars form numbered rounds
//! through etcd (a rank and world size per round) and sum the replicas' buffers sidecar to
//! sidecar over `tandem.internal.v1.GroupPeer`, so that every replica applies the same update.
//!
//! - [`rendezvous`]: when a round forms and with whom (pure rules, tested without etcd).
//! - [`etcd`]: the group's keys, the watch that follows them, a member's lease.
//! - [`session`]: one member's life, from its app's `Join` stream to leaving.
//! - [`ring`]: the ring all-reduce and the broadcast, over any [`ring::Link`].
//! - [`mailbox`]: pieces that arrived from peers, until the operation takes them.
//! - [`peer`]: the sidecar-to-sidecar service and the [`ring::Link`] over it.
//!
//! An operation never waits without bound: it fails with ABORTED as soon as the round ends (a
//! member's record left etcd, or a member asked for a new round), with ABORTED when the next
//! member cannot be reached, and with DEADLINE_EXCEEDED after `--group-timeout`. The app then
//! asks for a new round on its `Join` stream; the survivors' round forms at once.

pub mod etcd;
pub mod mailbox;
pub mod peer;
pub mod rendezvous;
pub mod ring;
pub mod session;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::bytes::Bytes;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use crate::invoke::channels::PeerChannels;
use crate::metrics::Metrics;
use mailbox::{Mailbox, PieceKey};
use rendezvous::RoundRecord;

/// What can go wrong with a group operation; mapped once to a gRPC status.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GroupError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("this app is not in group '{group}': open a Join stream first")]
    NotMember { group: String },
    #[error("this app already has a Join stream open for group '{group}' on this sidecar")]
    AlreadyJoined { group: String },
    #[error("refused to join group '{group}': {differences}")]
    Refused { group: String, differences: String },
    #[error("round {round} of group '{group}' ended: {reason}; ask for a new round")]
    RoundEnded { group: String, round: u64, reason: String },
    #[error("round {round} of group '{group}': {what} did not come within {after:?}")]
    TimedOut { group: String, round: u64, what: String, after: Duration },
    #[error("group '{group}': {reason}")]
    Etcd { group: String, reason: String },
}

impl From<GroupError> for Status {
    fn from(error: GroupError) -> Status {
        let code = match &error {
            GroupError::InvalidArgument(_) => Code::InvalidArgument,
            GroupError::NotMember { .. } | GroupError::Refused { .. } => Code::FailedPrecondition,
            GroupError::AlreadyJoined { .. } => Code::AlreadyExists,
            GroupError::RoundEnded { .. } => Code::Aborted,
            GroupError::TimedOut { .. } => Code::DeadlineExceeded,
            GroupError::Etcd { .. } => Code::Unavailable,
        };
        Status::new(code, error.to_string())
    }
}

/// Settings every group of this sidecar shares.
#[derive(Debug, Clone)]
pub struct GroupSettings {
    /// TTL of a member's lease, in seconds: a dead member leaves the group within about this long.
    pub lease_ttl: i64,
    /// The longest an operation waits for a piece from another member.
    pub operation_timeout: Duration,
    /// How long a round waits for more members once the minimum wait, when the app sets none.
    pub default_last_call: Duration,
}

/// The training groups of this sidecar: one member (at most) per group, each with the round it
/// is in.
pub struct Groups {
    namespace: String,
    /// The app-id of this sidecar, recorded with its members.
    app_id: String,
    instance_id: String,
    internal_address: String,
    settings: GroupSettings,
    peers: PeerChannels,
    mailbox: Mailbox<peer::Delivered>,
    members: Mutex<HashMap<String, Arc<Member>>>,
    /// Numbers the Join streams of this sidecar.
    joins: AtomicU64,
    etcd: watch::Sender<Option<etcd_client::Client>>,
    metrics: Arc<Metrics>,
}

/// This sidecar's member of one group (one Join stream).
pub(crate) struct Member {
    /// `{instance id}-{Join stream number}`: a new Join on the same sidecar is a new member.
    id: String,
    state: Mutex<MemberState>,
}

#[derive(Default)]
struct MemberState {
    round: Option<Arc<RoundRecord>>,
    rank: u32,
    /// Cancelled when the round ends: wakes the operations waiting in it.
    cancel: CancellationToken,
    /// Why the current round ended, once it has.
    ended: Option<String>,
    /// Members wait to join: end the round after the next all-reduce.
    joiners_waiting: bool,
    next_operation: u64,
    last_all_reduce: Option<Instant>,
}

/// A started operation: its round, this member's rank and the operation's number in the round.
#[derive(Debug)]
struct Operation {
    round: Arc<RoundRecord>,
    rank: u32,
    number: u64,
    cancel: CancellationToken,
    joiners_waiting: bool,
}

impl Groups {
    pub fn new(
        namespace: String,
        app_id: String,
        instance_id: String,
        internal_address: String,
        settings: GroupSettings,
        peers: PeerChannels,
        metrics: Arc<Metrics>,
    ) -> Groups {
        Groups {
            namespace,
            app_id,
            instance_id,
            internal_address,
            settings,
            peers,
            mailbox: Mailbox::default(),
            members: Mutex::new(HashMap::new()),
            joins: AtomicU64::new(0),
            etcd: watch::channel(None).0,
            metrics,
        }
    }

    /// Hands over the etcd client once discovery has connected.
    pub fn set_etcd(&self, client: etcd_client::Client) {
        self.etcd.send_replace(Some(client));
    }

    /// The etcd client; waits a little for discovery to connect.
    async fn etcd(&self, group: &str) -> Result<etcd_client::Client, GroupError> {
        let mut receiver = self.etcd.subscribe();
        let waited = tokio::time::timeout(Duration::from_secs(10), receiver.wait_for(Option::is_some)).await;
        match waited {
            Ok(Ok(client)) => Ok(client.clone().expect("waited for Some")),
            _ => Err(GroupError::Etcd { group: group.into(), reason: "this sidecar is not connected to etcd".into() }),
        }
    }

    fn lock_members(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Member>>> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new member of `group` for a Join stream; one per group and sidecar at a time.
    fn add_member(&self, group: &str) -> Result<Arc<Member>, GroupError> {
        let mut members = self.lock_members();
        if members.contains_key(group) {
            return Err(GroupError::AlreadyJoined { group: group.into() });
        }
        let number = self.joins.fetch_add(1, Ordering::Relaxed) + 1;
        let member = Arc::new(Member::new(format!("{}-{number}", self.instance_id)));
        members.insert(group.to_string(), member.clone());
        Ok(member)
    }

    /// `member` leaves `group`: its operations end and its pieces go.
    fn remove_member(&self, group: &str, member: &Arc<Member>) {
        member.end_round("this member left the group");
        let mut members = self.lock_members();
        if members.get(group).is_some_and(|current| Arc::ptr_eq(current, member)) {
            members.remove(group);
            self.mailbox.purge_group(group);
        }
        self.metrics.group_left(group);
    }

    fn member(&self, group: &str) -> Result<Arc<Member>, GroupError> {
        self.lock_members().get(group).cloned().ok_or_else(|| GroupError::NotMember { group: group.into() })
    }

    /// Keeps a piece a peer handed over for this sidecar's member of `key.group`.
    pub fn deposit(&self, key: PieceKey, piece: peer::Delivered, to_member: &str) -> Result<(), GroupError> {
        let member = self.member(&key.group)?;
        if to_member != member.id {
            return Err(GroupError::NotMember { group: format!("{} (as member {to_member}: it left)", key.group) });
        }
        if let Some(current) = member.lock().round.as_ref().map(|round| round.round)
            && key.round < current
        {
            return Err(GroupError::RoundEnded {
                group: key.group.clone(),
                round: key.round,
                reason: format!("this member is in round {current} already"),
            });
        }
        self.mailbox.deposit(key, piece);
        Ok(())
    }

    /// Sums `data` (little-endian f32) over the members of `round`; also says whether every
    /// member ends the round after this step.
    pub async fn all_reduce(
        &self,
        group: &str,
        round: u64,
        step: u64,
        data: &[u8],
    ) -> Result<(Bytes, bool), GroupError> {
        let mut values = ring::decode(data)?;
        let member = self.member(group)?;
        let operation = member.begin(group, round)?;
        let started = Instant::now();
        let link = peer::MeshLink::new(self, group, &operation, step, values.len() as u64);
        let result = ring::all_reduce(
            &link,
            operation.rank as usize,
            operation.round.members.len(),
            &mut values,
            operation.joiners_waiting,
        )
        .await;
        let round_ends = member.finish(group, &operation, result)?;
        let finished = Instant::now();
        let step_time = member.lock().last_all_reduce.replace(finished).map(|previous| finished - previous);
        self.metrics.group_all_reduce(group, finished - started, link.bytes_sent(), step_time);
        Ok((ring::encode(&values), round_ends))
    }

    /// Hands `data` of the member of rank `root` to every member of `round`.
    pub async fn broadcast(&self, group: &str, round: u64, root: u32, data: Bytes) -> Result<Bytes, GroupError> {
        let member = self.member(group)?;
        let operation = member.begin(group, round)?;
        let world = operation.round.members.len();
        if root as usize >= world {
            return Err(GroupError::InvalidArgument(format!(
                "root rank {root} outside round {round} of {world} members"
            )));
        }
        let link = peer::MeshLink::new(self, group, &operation, 0, 0);
        let result = ring::broadcast(&link, operation.rank as usize, world, root as usize, data).await;
        member.finish(group, &operation, result)
    }
}

impl Member {
    fn new(id: String) -> Member {
        Member { id, state: Mutex::new(MemberState::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemberState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enters `round` as rank `rank` (the round's operations start from 0).
    fn start_round(&self, round: Arc<RoundRecord>, rank: u32) {
        let mut state = self.lock();
        state.cancel.cancel();
        *state = MemberState { round: Some(round), rank, ..MemberState::default() };
    }

    /// Ends the current round, if any: operations in it fail with `reason`.
    fn end_round(&self, reason: &str) {
        let mut state = self.lock();
        if state.round.is_some() && state.ended.is_none() {
            state.ended = Some(reason.to_string());
            state.cancel.cancel();
        }
    }

    fn set_joiners_waiting(&self, waiting: bool) {
        self.lock().joiners_waiting = waiting;
    }

    fn round_number(&self) -> Option<u64> {
        self.lock().round.as_ref().map(|round| round.round)
    }

    fn begin(&self, group: &str, round: u64) -> Result<Operation, GroupError> {
        let mut state = self.lock();
        let ended = |reason: String| GroupError::RoundEnded { group: group.into(), round, reason };
        let Some(current) = state.round.clone() else {
            return Err(ended("this member is not in a round (ask for one on the Join stream)".into()));
        };
        if current.round != round {
            return Err(ended(format!("this member is in round {}", current.round)));
        }
        if let Some(reason) = &state.ended {
            return Err(ended(reason.clone()));
        }
        let number = state.next_operation;
        state.next_operation += 1;
        Ok(Operation {
            round: current,
            rank: state.rank,
            number,
            cancel: state.cancel.clone(),
            joiners_waiting: state.joiners_waiting,
        })
    }

    /// The outcome of an operation; a failure ends the round for this member (the ring cannot
    /// complete without it), so its app asks for a new one.
    fn finish<T>(&self, group: &str, operation: &Operation, result: Result<T, GroupError>) -> Result<T, GroupError> {
        match result {
            Ok(value) => Ok(value),
            Err(error) => {
                let reason = match &error {
                    GroupError::RoundEnded { reason, .. } => reason.clone(),
                    other => other.to_string(),
                };
                self.end_round(&reason);
                tracing::warn!(group, round = operation.round.round, operation = operation.number, %error, "a group operation failed");
                Err(error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_statuses_apps_act_on() {
        let ended = GroupError::RoundEnded { group: "g".into(), round: 3, reason: "member x left the group".into() };
        let status = Status::from(ended);
        assert_eq!(status.code(), Code::Aborted);
        assert_eq!(status.message(), "round 3 of group 'g' ended: member x left the group; ask for a new round");
        let refused = GroupError::Refused { group: "g".into(), differences: "model: ...".into() };
        assert_eq!(Status::from(refused).code(), Code::FailedPrecondition);
        assert_eq!(Status::from(GroupError::NotMember { group: "g".into() }).code(), Code::FailedPrecondition);
    }

    #[test]
    fn operations_of_an_ended_round_are_refused_with_the_reason() {
        let member = Member::new("i-1".into());
        assert!(matches!(member.begin("g", 1), Err(GroupError::RoundEnded { .. })));
        let round = Arc::new(RoundRecord {
            round: 4,
            members: vec![rendezvous::RoundSlot {
                member_id: "a".into(),
                address: "127.0.0.1:1".into(),
                app_id: "train".into(),
                step: 0,
                state_hash: String::new(),
            }],
            source_rank: 0,
            fingerprint: Default::default(),
        });
        member.start_round(round, 0);
        let first = member.begin("g", 4).unwrap();
        assert_eq!((first.number, member.begin("g", 4).unwrap().number), (0, 1));
        let err = member.begin("g", 3).unwrap_err();
        assert_eq!(err.to_string(), "round 3 of group 'g' ended: this member is in round 4; ask for a new round");
        member.end_round("member b left the group");
        assert!(first.cancel.is_cancelled(), "operations in flight are woken");
        let err = member.begin("g", 4).unwrap_err();
        assert_eq!(err.to_string(), "round 4 of group 'g' ended: member b left the group; ask for a new round");
    }
}
