//! The sidecar-to-sidecar half of a collective operation: `tandem.internal.v1.GroupPeer`
//! (a peer hands this sidecar a piece for its member) and [`MeshLink`], the [`Link`] that sends
//! pieces to the other members' sidecars and takes theirs from the [`super::mailbox::Mailbox`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tandem_proto::internal::group_peer_client::GroupPeerClient;
use tandem_proto::internal::group_peer_server::GroupPeer;
use tandem_proto::internal::{GroupChunk, GroupChunkAck};
use tonic::{Request, Response, Status};

use super::mailbox::{NotTaken, PieceKey};
use super::ring::{Link, Piece};
use super::{GroupError, Groups, Operation};

/// A piece as kept in the mailbox, with what the receiver checks against its own operation.
#[derive(Debug)]
pub struct Delivered {
    piece: Piece,
    step: u64,
    total_values: u64,
}

/// Serves `GroupPeer` on the internal port.
#[derive(Clone)]
pub struct GroupPeerService {
    groups: Arc<Groups>,
}

impl GroupPeerService {
    pub fn new(groups: Arc<Groups>) -> Self {
        GroupPeerService { groups }
    }
}

#[tonic::async_trait]
impl GroupPeer for GroupPeerService {
    async fn deliver(&self, request: Request<GroupChunk>) -> Result<Response<GroupChunkAck>, Status> {
        let chunk = request.into_inner();
        let key = PieceKey {
            group: chunk.group,
            round: chunk.round,
            operation: chunk.operation,
            hop: chunk.hop,
            from_rank: chunk.from_rank,
        };
        let delivered = Delivered {
            piece: Piece { data: chunk.data, round_ends: chunk.round_ends },
            step: chunk.step,
            total_values: chunk.total_values,
        };
        self.groups.deposit(key, delivered, &chunk.to_member)?;
        Ok(Response::new(GroupChunkAck {}))
    }
}

/// The members of one operation, reached through their sidecars.
pub struct MeshLink<'a> {
    groups: &'a Groups,
    group: &'a str,
    operation: &'a Operation,
    step: u64,
    total_values: u64,
    bytes_sent: AtomicU64,
}

impl<'a> MeshLink<'a> {
    pub(super) fn new(
        groups: &'a Groups,
        group: &'a str,
        operation: &'a Operation,
        step: u64,
        total_values: u64,
    ) -> Self {
        MeshLink { groups, group, operation, step, total_values, bytes_sent: AtomicU64::new(0) }
    }

    /// Bytes of data this member has sent in the operation.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }

    fn ended(&self, reason: String) -> GroupError {
        GroupError::RoundEnded { group: self.group.into(), round: self.operation.round.round, reason }
    }

    /// Why the round ended, as the member recorded it.
    fn end_reason(&self) -> String {
        self.groups
            .member(self.group)
            .ok()
            .and_then(|member| member.lock().ended.clone())
            .unwrap_or_else(|| "this member left the group".into())
    }
}

impl Link for MeshLink<'_> {
    async fn send(&self, to: usize, hop: u32, piece: Piece) -> Result<(), GroupError> {
        let slot = &self.operation.round.members[to];
        let unreachable = |reason: String| {
            self.ended(format!(
                "rank {to} (member {} at {}) could not be reached: {reason}",
                slot.member_id, slot.address
            ))
        };
        let connection = self.groups.peers.get(&slot.address, &slot.app_id).map_err(unreachable)?;
        let mut client = GroupPeerClient::with_origin(connection.clone(), connection.origin())
            .max_encoding_message_size(usize::MAX)
            .max_decoding_message_size(usize::MAX);
        let size = piece.data.len() as u64;
        let chunk = GroupChunk {
            group: self.group.to_string(),
            round: self.operation.round.round,
            operation: self.operation.number,
            hop,
            from_rank: self.operation.rank,
            to_member: slot.member_id.clone(),
            total_values: self.total_values,
            round_ends: piece.round_ends,
            data: piece.data,
            step: self.step,
        };
        let timeout = self.groups.settings.operation_timeout;
        tokio::select! {
            answer = tokio::time::timeout(timeout, client.deliver(chunk)) => match answer {
                Ok(Ok(_)) => {
                    self.bytes_sent.fetch_add(size, Ordering::Relaxed);
                    Ok(())
                }
                Ok(Err(status)) => Err(unreachable(status.message().to_string())),
                Err(_) => Err(GroupError::TimedOut {
                    group: self.group.into(),
                    round: self.operation.round.round,
                    what: format!("rank {to}'s answer to the piece of hop {hop}"),
                    after: timeout,
                }),
            },
            _ = self.operation.cancel.cancelled() => Err(self.ended(self.end_reason())),
        }
    }

    async fn receive(&self, from: usize, hop: u32) -> Result<Piece, GroupError> {
        let key = PieceKey {
            group: self.group.to_string(),
            round: self.operation.round.round,
            operation: self.operation.number,
            hop,
            from_rank: from as u32,
        };
        let timeout = self.groups.settings.operation_timeout;
        let delivered = match self.groups.mailbox.take(&key, &self.operation.cancel, timeout).await {
            Ok(delivered) => delivered,
            Err(NotTaken::RoundEnded) => return Err(self.ended(self.end_reason())),
            Err(NotTaken::TimedOut) => {
                return Err(GroupError::TimedOut {
                    group: self.group.into(),
                    round: self.operation.round.round,
                    what: format!("the piece of hop {hop} from rank {from}"),
                    after: timeout,
                });
            }
        };
        if delivered.step != self.step {
            return Err(self.ended(format!(
                "rank {from} reduces step {}, this member step {}: the members are out of step",
                delivered.step, self.step
            )));
        }
        if delivered.total_values != self.total_values {
            return Err(GroupError::InvalidArgument(format!(
                "rank {from} reduces {} values, this member {}: the members' buffers differ",
                delivered.total_values, self.total_values
            )));
        }
        Ok(delivered.piece)
    }
}
