//! One member's life in a group, driven by its app's `Join` stream: check the options and the
//! fingerprint, write the member record under a lease of its own, then follow the group in etcd.
//! While the member asks for a round, every sidecar with a waiting member applies the
//! [`Rendezvous`] rules to the same view and tries to write the round they give (only one
//! compare-and-swap wins); the member's sidecar answers the app with the round once it lists
//! the member, or with `Waiting` notices meanwhile. While the member is in a round, its sidecar
//! ends the round the moment the view says it cannot go on, and tells the next all-reduce when
//! members wait to join. The stream's end (or the app's death) leaves the group: the lease is
//! revoked and the record goes at once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use tandem_proto::group::join_response::Kind;
use tandem_proto::group::{JoinRequest, JoinResponse, Round, RoundMember, Waiting};
use tokio::sync::mpsc;
use tonic::Status;

use super::etcd::{GroupWatch, MemberLease, group_prefix};
use super::rendezvous::{Decision, MemberRecord, Rendezvous, RoundRecord};
use super::{GroupError, Groups, Member};
use crate::config::validate_name;
use crate::discovery::Backoff;

/// The options of the first message of a Join stream, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinOptions {
    pub group: String,
    pub min_members: u32,
    pub max_members: u32,
    pub fingerprint: BTreeMap<String, String>,
    pub last_call: Duration,
}

impl JoinOptions {
    pub fn from_request(request: &JoinRequest, default_last_call: Duration) -> Result<JoinOptions, GroupError> {
        validate_name("group", &request.group).map_err(GroupError::InvalidArgument)?;
        let min_members = request.min_members.max(1);
        if request.max_members != 0 && request.max_members < min_members {
            return Err(GroupError::InvalidArgument(format!(
                "group '{}': min_members {min_members} is more than max_members {}",
                request.group, request.max_members
            )));
        }
        let last_call = if request.last_call_ms == 0 {
            default_last_call
        } else {
            Duration::from_millis(request.last_call_ms.into())
        };
        Ok(JoinOptions {
            group: request.group.clone(),
            min_members,
            max_members: request.max_members,
            fingerprint: request.fingerprint.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            last_call,
        })
    }
}

type Responses = mpsc::Sender<Result<JoinResponse, Status>>;

/// Runs one member until its app closes the stream; a failure is the stream's last message.
pub async fn run(
    groups: Arc<Groups>,
    first: JoinRequest,
    incoming: impl Stream<Item = Result<JoinRequest, Status>> + Unpin + Send,
    out: Responses,
) {
    let group = first.group.clone();
    let options = match JoinOptions::from_request(&first, groups.settings.default_last_call) {
        Ok(options) => options,
        Err(error) => {
            let _ = out.send(Err(error.into())).await;
            return;
        }
    };
    let member = match groups.add_member(&options.group) {
        Ok(member) => member,
        Err(error) => {
            let _ = out.send(Err(error.into())).await;
            return;
        }
    };
    let outcome = drive(&groups, &member, options, first, incoming, &out).await;
    groups.remove_member(&group, &member);
    match outcome {
        Ok(()) => tracing::info!(group, member = %member.id, "left the group"),
        Err(error) => {
            tracing::warn!(group, member = %member.id, %error, "a group member's session ended");
            let _ = out.send(Err(error.into())).await;
        }
    }
}

async fn drive(
    groups: &Groups,
    member: &Member,
    options: JoinOptions,
    first: JoinRequest,
    mut incoming: impl Stream<Item = Result<JoinRequest, Status>> + Unpin + Send,
    out: &Responses,
) -> Result<(), GroupError> {
    let group = options.group.clone();
    let etcd_error = |reason: String| GroupError::Etcd { group: group.clone(), reason };
    let client = groups.etcd(&group).await?;
    let prefix = group_prefix(&groups.namespace, &group);
    let mut watch = GroupWatch::open(client.clone(), prefix.clone()).await.map_err(etcd_error)?;
    let mut record = MemberRecord {
        member_id: member.id.clone(),
        address: groups.internal_address.clone(),
        app_id: groups.app_id.clone(),
        step: first.step,
        state_hash: first.state_hash,
        fingerprint: options.fingerprint,
        min_members: options.min_members,
        max_members: options.max_members,
        last_call_ms: options.last_call.as_millis() as u64,
        after_round: 0,
    };
    if let Some(differences) = watch.view.refusal(&record) {
        return Err(GroupError::Refused { group, differences });
    }
    let lease = MemberLease::grant(&client, groups.settings.lease_ttl).await.map_err(etcd_error)?;
    watch.put_member(&record, lease.id).await.map_err(etcd_error)?;
    tracing::info!(group, member = %member.id, step = record.step, "joined the group; waiting for a round");

    let mut rendezvous = Rendezvous::default();
    let mut wants_round = true;
    let mut last_notice: Option<Waiting> = None;
    let mut backoff = Backoff::new();
    loop {
        let mut recheck: Option<Instant> = None;
        if wants_round {
            let view = &watch.view;
            let mine = view
                .round
                .as_ref()
                .filter(|round| round.round > record.after_round)
                .and_then(|round| round.rank_of(&record.member_id).map(|rank| (round.clone(), rank)));
            if let Some((round, rank)) = mine {
                groups.mailbox.purge_before(&group, round.round);
                let response = round_response(&group, &round, rank);
                member.start_round(Arc::new(round.clone()), rank);
                groups.metrics.group_round(&group, round.members.len());
                tracing::info!(group, round = round.round, rank, world = round.members.len(), "in a new round");
                if out.send(Ok(response)).await.is_err() {
                    return Ok(());
                }
                wants_round = false;
                last_notice = None;
            } else {
                if let Some(differences) = view.refusal(&record) {
                    return Err(GroupError::Refused { group, differences });
                }
                let notice = match rendezvous.decide(view, Instant::now()) {
                    Decision::Form(round) => {
                        match watch.swap_round(&round, watch.view.round_revision).await {
                            Ok(true) => tracing::info!(
                                group,
                                round = round.round,
                                world = round.members.len(),
                                "formed a round"
                            ),
                            Ok(false) => tracing::debug!(group, "another sidecar wrote the round first"),
                            Err(error) => {
                                tracing::warn!(group, %error, "could not write the round; trying again");
                                recheck = Some(Instant::now() + backoff.step());
                            }
                        }
                        None
                    }
                    Decision::Wait { reason, waiting, min_members, recheck_in } => {
                        recheck = recheck_in.map(|wait| Instant::now() + wait);
                        Some(Waiting { reason, members_waiting: waiting as u32, min_members })
                    }
                    Decision::Running { joiners } => Some(Waiting {
                        reason: match &view.round {
                            Some(round)
                                if record.max_members != 0 && round.members.len() >= record.max_members as usize =>
                            {
                                format!(
                                    "round {} runs with the most members allowed ({}); this member waits for a place",
                                    round.round, record.max_members
                                )
                            }
                            round => format!(
                                "round {} runs; this member joins at its next step boundary",
                                round.as_ref().map_or(0, |round| round.round)
                            ),
                        },
                        members_waiting: joiners as u32,
                        min_members: record.min_members,
                    }),
                };
                if let Some(notice) = notice
                    && last_notice.as_ref() != Some(&notice)
                {
                    tracing::info!(group, reason = %notice.reason, "waiting for a round");
                    last_notice = Some(notice.clone());
                    if out.send(Ok(JoinResponse { kind: Some(Kind::Waiting(notice)) })).await.is_err() {
                        return Ok(());
                    }
                }
            }
        } else if let Some(current) = member.round_number() {
            let view = &watch.view;
            let ended = match &view.round {
                Some(round) if round.round != current => Some(format!("round {} replaced it", round.round)),
                None => Some("its record left etcd".to_string()),
                Some(_) => view.why_round_ended(),
            };
            match ended {
                Some(reason) => member.end_round(&reason),
                None => {
                    // A joiner ends the round only if the next one can take it: a round at
                    // max_members would re-form without it at every step.
                    let room = record.max_members == 0
                        || view.round.as_ref().is_some_and(|round| round.members.len() < record.max_members as usize);
                    let joiner = view
                        .members
                        .values()
                        .any(|m| !view.in_round(&m.record.member_id) && view.refusal(&m.record).is_none());
                    member.set_joiners_waiting(room && joiner);
                }
            }
        }

        let recheck_sleep = async {
            match recheck {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = watch.changed() => {
                if let Err(error) = changed {
                    tracing::warn!(group, %error, "the group's watch broke; listing it again");
                    watch = reopen(&client, &prefix, &mut backoff, &lease).await.map_err(etcd_error)?;
                } else {
                    backoff.reset();
                }
            }
            message = incoming.next() => match message {
                Some(Ok(request)) => {
                    if let Some(current) = member.round_number() {
                        record.after_round = record.after_round.max(current);
                        member.end_round("a member asked for a new round");
                    }
                    record.step = request.step;
                    record.state_hash = request.state_hash;
                    watch.put_member(&record, lease.id).await.map_err(etcd_error)?;
                    wants_round = true;
                }
                Some(Err(_)) | None => return Ok(()),
            },
            _ = recheck_sleep => {}
            _ = lease.lost.cancelled() => {
                return Err(etcd_error("this member's lease in etcd could not be renewed, so it may have left the group; join again".into()));
            }
            _ = out.closed() => return Ok(()),
        }
    }
}

/// Opens the group's watch again after it broke, backing off while etcd does not answer;
/// gives up when the member's lease is lost meanwhile.
async fn reopen(
    client: &etcd_client::Client,
    prefix: &str,
    backoff: &mut Backoff,
    lease: &MemberLease,
) -> Result<GroupWatch, String> {
    loop {
        tokio::select! {
            _ = lease.lost.cancelled() => return Err("lost the member's lease while etcd was unreachable".into()),
            _ = tokio::time::sleep(backoff.step()) => {}
        }
        match GroupWatch::open(client.clone(), prefix.to_string()).await {
            Ok(watch) => return Ok(watch),
            Err(error) => tracing::warn!(%error, "cannot list the group yet"),
        }
    }
}

fn round_response(group: &str, round: &RoundRecord, rank: u32) -> JoinResponse {
    let source = &round.members[round.source_rank as usize];
    JoinResponse {
        kind: Some(Kind::Round(Round {
            group: group.to_string(),
            round: round.round,
            rank,
            world_size: round.members.len() as u32,
            members: round
                .members
                .iter()
                .enumerate()
                .map(|(rank, slot)| RoundMember {
                    rank: rank as u32,
                    member_id: slot.member_id.clone(),
                    step: slot.step,
                    state_hash: slot.state_hash.clone(),
                })
                .collect(),
            source_rank: round.source_rank,
            start_step: source.step,
            sync_state: round.needs_sync(),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_options_are_checked() {
        let default = Duration::from_millis(1500);
        let request = JoinRequest { group: "train-1".into(), min_members: 0, ..Default::default() };
        let options = JoinOptions::from_request(&request, default).unwrap();
        assert_eq!((options.min_members, options.max_members, options.last_call), (1, 0, default));
        let request = JoinRequest { group: "train".into(), min_members: 3, max_members: 2, ..Default::default() };
        let err = JoinOptions::from_request(&request, default).unwrap_err();
        assert_eq!(err.to_string(), "group 'train': min_members 3 is more than max_members 2");
        let request = JoinRequest { group: "a/b".into(), ..Default::default() };
        let err = JoinOptions::from_request(&request, default).unwrap_err();
        assert_eq!(err.to_string(), "group 'a/b' contains '/'; use letters, digits, '.', '_' or '-'");
        let request = JoinRequest { group: "g".into(), last_call_ms: 20, ..Default::default() };
        assert_eq!(JoinOptions::from_request(&request, default).unwrap().last_call, Duration::from_millis(20));
    }
}
