//! Training groups (`tandem.group.v1`, Tandem's own API beside Dapr's): replicas of a
//! data-parallel job join a group through their sidecars, get a round (rank, world size, the
//! member whose state to start from), and sum their gradient buffers with
//! [`GroupMember::all_reduce`]. When a round ends (a member left or joined), operations fail with
//! ABORTED and the replica asks for the next round with [`GroupMember::next_round`].

use std::collections::BTreeMap;
use std::time::Duration;

use prost::bytes::Bytes;
use tandem_proto::group::join_response::Kind;
use tandem_proto::group::training_group_client::TrainingGroupClient;
use tandem_proto::group::{AllReduceRequest, BroadcastRequest, JoinRequest, JoinResponse};
pub use tandem_proto::group::{Round, RoundMember, Waiting};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Status, Streaming};

use crate::SidecarClient;
use crate::client::Channel;

/// How a replica joins a group.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupOptions {
    /// The group's name (letters, digits, '.', '_', '-').
    pub group: String,
    /// A round forms once this many members wait (and the last call has passed); 0 means 1.
    pub min_members: u32,
    /// A round forms at once with this many; 0: no limit.
    pub max_members: u32,
    /// What must be equal on every member (model configuration, dataset version, ...).
    pub fingerprint: BTreeMap<String, String>,
    /// How long a round waits for more members once the minimum wait; `None`: the sidecar's default.
    pub last_call: Option<Duration>,
}

/// The sum of an all-reduce.
#[derive(Debug, Clone, PartialEq)]
pub struct AllReduced {
    /// The element-wise sum over every member.
    pub values: Vec<f32>,
    /// A member waits to join: every member ends the round after this step and asks for a new one.
    pub round_ends: bool,
}

/// This replica's membership in a group; dropping it leaves the group.
pub struct GroupMember {
    group: String,
    client: TrainingGroupClient<Channel>,
    requests: mpsc::UnboundedSender<JoinRequest>,
    responses: Streaming<JoinResponse>,
}

impl SidecarClient {
    /// Joins `options.group` as a member that has completed `step` steps, with a state hashing to
    /// `state_hash`; the first round is then awaited with [`GroupMember::round`]. Options the
    /// sidecar refuses (min above max, a fingerprint unlike the group's) fail the first
    /// [`GroupMember::round`] call.
    pub async fn join_group(&self, options: &GroupOptions, step: u64, state_hash: &str) -> Result<GroupMember, Status> {
        let (requests, outgoing) = mpsc::unbounded_channel();
        let first = JoinRequest {
            group: options.group.clone(),
            min_members: options.min_members,
            max_members: options.max_members,
            fingerprint: options.fingerprint.clone().into_iter().collect(),
            last_call_ms: options.last_call.map_or(0, |d| d.as_millis().clamp(1, u32::MAX as u128) as u32),
            step,
            state_hash: state_hash.to_string(),
        };
        // The receiver is alive: it is moved into the call below.
        let _ = requests.send(first);
        let mut client = self.group.clone();
        let responses = client.join(UnboundedReceiverStream::new(outgoing)).await?.into_inner();
        Ok(GroupMember { group: options.group.clone(), client, requests, responses })
    }
}

impl GroupMember {
    /// The group's name.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// Waits for the round asked for last; `on_wait` hears why none has formed yet, each time
    /// the reason changes.
    pub async fn round(&mut self, mut on_wait: impl FnMut(&Waiting)) -> Result<Round, Status> {
        loop {
            match self.responses.message().await? {
                Some(JoinResponse { kind: Some(Kind::Round(round)) }) => return Ok(round),
                Some(JoinResponse { kind: Some(Kind::Waiting(waiting)) }) => on_wait(&waiting),
                Some(JoinResponse { kind: None }) => {}
                None => {
                    return Err(Status::unavailable(format!(
                        "the sidecar closed the Join stream of group '{}'",
                        self.group
                    )));
                }
            }
        }
    }

    /// Ends the current round for this member (if it is in one) and asks for the next one, as
    /// a member that has completed `step` steps with a state hashing to `state_hash`.
    pub async fn next_round(
        &mut self,
        step: u64,
        state_hash: &str,
        on_wait: impl FnMut(&Waiting),
    ) -> Result<Round, Status> {
        let request = JoinRequest { step, state_hash: state_hash.to_string(), ..Default::default() };
        self.requests
            .send(request)
            .map_err(|_| Status::unavailable(format!("the Join stream of group '{}' is closed", self.group)))?;
        self.round(on_wait).await
    }

    /// Sums `values` element-wise over the members of `round` at `step`.
    pub async fn all_reduce(&self, round: &Round, step: u64, values: &[f32]) -> Result<AllReduced, Status> {
        if round.world_size == 1 {
            // The sum of one member is its own buffer: ask the sidecar only whether the round
            // ends (a replica waits to join), without shipping the buffer there and back.
            let request = AllReduceRequest { group: self.group.clone(), round: round.round, step, data: Bytes::new() };
            let response = self.client.clone().all_reduce(request).await?.into_inner();
            return Ok(AllReduced { values: values.to_vec(), round_ends: response.round_ends });
        }
        let mut data = vec![0u8; values.len() * 4];
        for (chunk, value) in data.chunks_exact_mut(4).zip(values) {
            chunk.copy_from_slice(&value.to_le_bytes());
        }
        let request = AllReduceRequest { group: self.group.clone(), round: round.round, step, data: Bytes::from(data) };
        let response = self.client.clone().all_reduce(request).await?.into_inner();
        if response.data.len() != values.len() * 4 {
            return Err(Status::internal(format!(
                "the sidecar answered {} bytes for {} values",
                response.data.len(),
                values.len()
            )));
        }
        let values =
            response.data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
        Ok(AllReduced { values, round_ends: response.round_ends })
    }

    /// Hands the bytes of `round`'s source member to every member: the source passes its
    /// state, the others anything (they get the source's).
    pub async fn broadcast_from_source(&self, round: &Round, data: Vec<u8>) -> Result<Vec<u8>, Status> {
        let request = BroadcastRequest {
            group: self.group.clone(),
            round: round.round,
            root_rank: round.source_rank,
            data: if round.rank == round.source_rank { Bytes::from(data) } else { Bytes::new() },
        };
        Ok(self.client.clone().broadcast(request).await?.into_inner().data.to_vec())
    }
}
