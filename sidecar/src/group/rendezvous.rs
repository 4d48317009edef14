//! When a round of a training group forms, and with whom: a pure function of what etcd holds
//! about the group (its live members and its last round) and of how long the members have
//! been waiting, so that every member's sidecar reaches the same decision and the rules can be
//! tested without etcd.
//!
//! The rules (TorchElastic's rendezvous and torchft's quorum, on etcd):
//! - A member is *in* the current round while the round lists it and it has not asked for a
//!   later one; every other live member *waits* for the next round.
//! - While the current round *runs* (every member it lists is live and in it), nothing forms:
//!   waiting members are late joiners, and the round's members end it at their next step
//!   boundary (the all-reduce tells them all in the same step).
//! - Otherwise a round needs a quorum: at least `min_members` waiting, or a majority of the
//!   previous round's members among those waiting (so the survivors of a round carry on, and a
//!   minority of it cannot go on alone unless `min_members` allows it).
//! - With a quorum, it forms at once with `max_members`, or when every live member waits and
//!   some of them come from the previous round (the survivors of a loss, nobody else to wait
//!   for), or else after the last call: `last_call` after the quorum was first seen.
//! - Ranks: members at the highest step first (rank 0 is the source every member takes its
//!   state from when their states differ), then by the order they joined.
//! - Every member must have the group's fingerprint (model configuration, dataset version,
//!   `min_members`, `max_members`); the group's is the current round's while it has live
//!   members, else the earliest live member's. Others are refused, naming the differences.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What a member keeps in etcd under its session's lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// The member: `{sidecar instance id}-{its Join stream's number on that sidecar}`.
    pub member_id: String,
    /// Its sidecar's internal (sidecar-to-sidecar) address.
    pub address: String,
    /// The app-id of its sidecar (what a peer's certificate must name under mutual TLS).
    #[serde(default)]
    pub app_id: String,
    /// Steps the member has completed.
    pub step: u64,
    /// A hash of its state (equal states, equal hashes).
    pub state_hash: String,
    /// What must be equal on every member.
    pub fingerprint: BTreeMap<String, String>,
    pub min_members: u32,
    /// 0: no limit.
    pub max_members: u32,
    pub last_call_ms: u64,
    /// The member asks for a round numbered above this one (0: it has been in none).
    pub after_round: u64,
}

/// One member of a round, in rank order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundSlot {
    pub member_id: String,
    pub address: String,
    #[serde(default)]
    pub app_id: String,
    pub step: u64,
    pub state_hash: String,
}

/// A round as etcd keeps it (one key per group, replaced by compare-and-swap).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u64,
    /// Every member, in rank order.
    pub members: Vec<RoundSlot>,
    /// The rank whose state the round starts from (a member at the highest step).
    pub source_rank: u32,
    /// The group's fingerprint while this round lasts.
    pub fingerprint: BTreeMap<String, String>,
}

impl RoundRecord {
    /// The rank of `member_id`, when the round lists it.
    pub fn rank_of(&self, member_id: &str) -> Option<u32> {
        self.members.iter().position(|slot| slot.member_id == member_id).map(|rank| rank as u32)
    }

    /// True when some member's step or state differs from the source's.
    pub fn needs_sync(&self) -> bool {
        let source = &self.members[self.source_rank as usize];
        self.members.iter().any(|slot| slot.step != source.step || slot.state_hash != source.state_hash)
    }
}

/// A live member and the etcd revision that created its record (its place in the join order).
#[derive(Debug, Clone, PartialEq)]
pub struct LiveMember {
    pub record: MemberRecord,
    pub joined: i64,
}

/// What etcd holds about one group.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupView {
    /// Live members by member id.
    pub members: BTreeMap<String, LiveMember>,
    pub round: Option<RoundRecord>,
    /// The round key's `mod_revision` (0: no round yet), for the compare-and-swap.
    pub round_revision: i64,
}

impl GroupView {
    /// True when `member_id` is live, listed by the current round and has not asked for a later one.
    pub fn in_round(&self, member_id: &str) -> bool {
        let (Some(round), Some(member)) = (&self.round, self.members.get(member_id)) else { return false };
        round.rank_of(member_id).is_some() && member.record.after_round < round.round
    }

    /// True when the current round runs: every member it lists is live and in it.
    pub fn round_runs(&self) -> bool {
        self.round.as_ref().is_some_and(|round| round.members.iter().all(|slot| self.in_round(&slot.member_id)))
    }

    /// Why the current round cannot go on, when it cannot (for its members to stop at once).
    pub fn why_round_ended(&self) -> Option<String> {
        let round = self.round.as_ref()?;
        round.members.iter().find_map(|slot| match self.members.get(&slot.member_id) {
            None => Some(format!("member {} left the group", slot.member_id)),
            Some(member) if member.record.after_round >= round.round => {
                Some(format!("member {} asked for a new round", slot.member_id))
            }
            Some(_) => None,
        })
    }

    /// The member whose fingerprint and options the group follows: the current round's
    /// members while any is live (one of them), else the earliest live member.
    fn reference(&self) -> Option<(&BTreeMap<String, String>, &MemberRecord)> {
        if let Some(round) = &self.round
            && let Some(member) = round.members.iter().find_map(|slot| self.members.get(&slot.member_id))
        {
            return Some((&round.fingerprint, &member.record));
        }
        self.by_join_order().next().map(|member| (&member.fingerprint, member))
    }

    fn by_join_order(&self) -> impl Iterator<Item = &MemberRecord> {
        let mut members: Vec<&LiveMember> = self.members.values().collect();
        members.sort_by(|a, b| a.joined.cmp(&b.joined).then_with(|| a.record.member_id.cmp(&b.record.member_id)));
        members.into_iter().map(|member| &member.record)
    }

    /// Why `candidate` may not join this group (the differences from the group's fingerprint
    /// and options), or `None` when it may.
    pub fn refusal(&self, candidate: &MemberRecord) -> Option<String> {
        let (fingerprint, reference) = self.reference()?;
        if reference.member_id == candidate.member_id {
            return None;
        }
        let mut differences = Vec::new();
        let keys: std::collections::BTreeSet<&String> =
            fingerprint.keys().chain(candidate.fingerprint.keys()).collect();
        for key in keys {
            let (group, own) = (fingerprint.get(key), candidate.fingerprint.get(key));
            if group != own {
                let show = |value: Option<&String>| value.map_or("(none)".to_string(), |v| format!("'{v}'"));
                differences.push(format!("{key}: the group has {}, this member {}", show(group), show(own)));
            }
        }
        for (name, group, own) in [
            ("min_members", reference.min_members, candidate.min_members),
            ("max_members", reference.max_members, candidate.max_members),
        ] {
            if group != own {
                differences.push(format!("{name}: the group has {group}, this member {own}"));
            }
        }
        (!differences.is_empty()).then(|| differences.join("; "))
    }
}

/// What the members waiting for a round should do now.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The current round runs; `joiners` members wait for its next step boundary.
    Running { joiners: usize },
    /// No round yet: why, and when to look again at the latest (the end of the last call).
    Wait { reason: String, waiting: usize, min_members: u32, recheck_in: Option<Duration> },
    /// This round should be written (by compare-and-swap on the round key).
    Form(RoundRecord),
}

/// The rendezvous of one member's sidecar: the rules above, plus when the waiting members
/// first had a quorum (the start of the last call).
#[derive(Debug, Default)]
pub struct Rendezvous {
    quorum_since: Option<Instant>,
}

impl Rendezvous {
    pub fn decide(&mut self, view: &GroupView, now: Instant) -> Decision {
        if view.round_runs() {
            self.quorum_since = None;
            let joiners = view.members.keys().filter(|id| !view.in_round(id)).count();
            return Decision::Running { joiners };
        }
        let Some((fingerprint, reference)) = view.reference() else {
            self.quorum_since = None;
            return Decision::Wait { reason: "no member yet".into(), waiting: 0, min_members: 1, recheck_in: None };
        };
        let (fingerprint, reference) = (fingerprint.clone(), reference.clone());
        let waiting: Vec<&MemberRecord> =
            view.by_join_order().filter(|m| !view.in_round(&m.member_id) && view.refusal(m).is_none()).collect();
        let min = reference.min_members.max(1);
        let previous = view.round.as_ref();
        let from_previous = previous.map_or(0, |round| {
            round.members.iter().filter(|slot| waiting.iter().any(|m| m.member_id == slot.member_id)).count()
        });
        let majority_of_previous = previous.is_some_and(|round| from_previous * 2 > round.members.len());
        if waiting.len() < min as usize && !majority_of_previous {
            self.quorum_since = None;
            let reason = match previous {
                Some(round) if from_previous > 0 => format!(
                    "{} of min {min} members waiting, {from_previous} of the {} members of round {} (a majority would do)",
                    waiting.len(),
                    round.members.len(),
                    round.round
                ),
                _ => format!("{} of min {min} members waiting", waiting.len()),
            };
            return Decision::Wait { reason, waiting: waiting.len(), min_members: min, recheck_in: None };
        }
        let max = reference.max_members as usize;
        let everyone_waits = waiting.len() == view.members.len();
        let since = *self.quorum_since.get_or_insert(now);
        let last_call = Duration::from_millis(reference.last_call_ms);
        let waited = now.saturating_duration_since(since);
        let form = (max > 0 && waiting.len() >= max) || (everyone_waits && from_previous > 0) || waited >= last_call;
        if !form {
            return Decision::Wait {
                reason: format!(
                    "{} members waiting; last call of {} ms for more",
                    waiting.len(),
                    reference.last_call_ms
                ),
                waiting: waiting.len(),
                min_members: min,
                recheck_in: Some(last_call - waited),
            };
        }
        self.quorum_since = None;
        let mut chosen: Vec<&MemberRecord> = waiting;
        if max > 0 {
            chosen.truncate(max);
        }
        // Highest step first; `sort_by` is stable, so the join order breaks ties.
        chosen.sort_by_key(|member| std::cmp::Reverse(member.step));
        let members = chosen
            .iter()
            .map(|m| RoundSlot {
                member_id: m.member_id.clone(),
                address: m.address.clone(),
                app_id: m.app_id.clone(),
                step: m.step,
                state_hash: m.state_hash.clone(),
            })
            .collect();
        let round = previous.map_or(1, |round| round.round + 1);
        Decision::Form(RoundRecord { round, members, source_rank: 0, fingerprint })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, step: u64, after_round: u64) -> MemberRecord {
        MemberRecord {
            member_id: id.into(),
            address: format!("127.0.0.1:{}", 1000 + id.len()),
            app_id: "train".into(),
            step,
            state_hash: format!("h{step}"),
            fingerprint: BTreeMap::from([("model".to_string(), "64-32-10".to_string())]),
            min_members: 2,
            max_members: 3,
            last_call_ms: 1000,
            after_round,
        }
    }

    fn view(members: &[MemberRecord], round: Option<RoundRecord>) -> GroupView {
        let members = members
            .iter()
            .enumerate()
            .map(|(order, m)| (m.member_id.clone(), LiveMember { record: m.clone(), joined: order as i64 + 10 }))
            .collect();
        GroupView { members, round, round_revision: 5 }
    }

    fn formed(decision: Decision) -> RoundRecord {
        match decision {
            Decision::Form(round) => round,
            other => panic!("expected a round, got {other:?}"),
        }
    }

    /// The round `view` forms once its last call is over.
    fn after_last_call(view: &GroupView) -> RoundRecord {
        let (mut rendezvous, now) = (Rendezvous::default(), Instant::now());
        rendezvous.decide(view, now);
        formed(rendezvous.decide(view, now + Duration::from_secs(60)))
    }

    fn ids(round: &RoundRecord) -> Vec<&str> {
        round.members.iter().map(|slot| slot.member_id.as_str()).collect()
    }

    #[test]
    fn below_min_waits_and_says_so() {
        let now = Instant::now();
        let decision = Rendezvous::default().decide(&view(&[record("a", 0, 0)], None), now);
        assert_eq!(
            decision,
            Decision::Wait {
                reason: "1 of min 2 members waiting".into(),
                waiting: 1,
                min_members: 2,
                recheck_in: None
            }
        );
    }

    #[test]
    fn min_members_form_after_the_last_call_and_max_members_at_once() {
        let now = Instant::now();
        let mut rendezvous = Rendezvous::default();
        let two = view(&[record("a", 0, 0), record("b", 0, 0)], None);
        match rendezvous.decide(&two, now) {
            Decision::Wait { recheck_in: Some(left), waiting: 2, .. } => assert_eq!(left, Duration::from_secs(1)),
            other => panic!("{other:?}"),
        }
        let round = formed(rendezvous.decide(&two, now + Duration::from_millis(1000)));
        assert_eq!((round.round, ids(&round)), (1, vec!["a", "b"]));
        assert!(!round.needs_sync());

        let three = view(&[record("a", 0, 0), record("b", 0, 0), record("c", 0, 0)], None);
        let round = formed(Rendezvous::default().decide(&three, now));
        assert_eq!(ids(&round), vec!["a", "b", "c"]);
        // A fourth beyond max waits for the next round.
        let four = view(&[record("a", 0, 0), record("b", 0, 0), record("c", 0, 0), record("d", 0, 0)], None);
        assert_eq!(ids(&formed(Rendezvous::default().decide(&four, now))), vec!["a", "b", "c"]);
    }

    #[test]
    fn a_running_round_keeps_late_joiners_waiting_for_its_step_boundary() {
        let now = Instant::now();
        let round = formed(
            Rendezvous::default().decide(&view(&[record("a", 0, 0), record("b", 0, 0), record("c", 0, 0)], None), now),
        );
        let with_joiner =
            view(&[record("a", 0, 0), record("b", 0, 0), record("c", 0, 0), record("d", 0, 0)], Some(round));
        assert!(with_joiner.round_runs());
        assert_eq!(Rendezvous::default().decide(&with_joiner, now), Decision::Running { joiners: 1 });
        assert_eq!(with_joiner.why_round_ended(), None);
    }

    #[test]
    fn survivors_of_a_loss_form_the_next_round_at_once_from_the_highest_step() {
        let now = Instant::now();
        let round = formed(
            Rendezvous::default().decide(&view(&[record("a", 0, 0), record("b", 0, 0), record("c", 0, 0)], None), now),
        );
        // c died; b finished step 7 before the ring broke, a did not.
        let after = view(&[record("a", 6, 1), record("b", 7, 1)], Some(round.clone()));
        assert!(!after.round_runs());
        assert_eq!(after.why_round_ended().unwrap(), "member a asked for a new round");
        let next = formed(Rendezvous::default().decide(&after, now));
        assert_eq!((next.round, ids(&next), next.source_rank), (2, vec!["b", "a"], 0));
        assert!(next.needs_sync(), "a takes b's state");
        // Before they asked again, the loss alone ends the round.
        let lost = view(&[record("a", 6, 0), record("b", 7, 0)], Some(round));
        assert_eq!(lost.why_round_ended().unwrap(), "member c left the group");
    }

    #[test]
    fn a_minority_of_the_previous_round_below_min_cannot_go_on() {
        let now = Instant::now();
        let options = |id: &str, after| MemberRecord { min_members: 3, max_members: 0, ..record(id, 4, after) };
        let round = after_last_call(&view(
            &[options("a", 0), options("b", 0), options("c", 0), options("d", 0), options("e", 0)],
            None,
        ));
        assert_eq!(round.members.len(), 5);
        // Two of five: below min 3 and no majority.
        let minority = view(&[options("a", 1), options("b", 1)], Some(round.clone()));
        match Rendezvous::default().decide(&minority, now) {
            Decision::Wait { reason, .. } => {
                assert_eq!(reason, "2 of min 3 members waiting, 2 of the 5 members of round 1 (a majority would do)")
            }
            other => panic!("{other:?}"),
        }
        // Three of five is a majority (and min).
        let majority = view(&[options("a", 1), options("b", 1), options("c", 1)], Some(round.clone()));
        assert_eq!(formed(Rendezvous::default().decide(&majority, now)).members.len(), 3);
        // A majority below min still goes on: two of a round of three.
        let small = after_last_call(&view(&[options("a", 0), options("b", 0), options("c", 0)], None));
        let survivors = view(&[options("a", 1), options("b", 1)], Some(small));
        assert_eq!(formed(Rendezvous::default().decide(&survivors, now)).members.len(), 2);
    }

    #[test]
    fn a_member_with_another_fingerprint_is_refused_and_left_out() {
        let mut other = record("c", 0, 0);
        other.fingerprint.insert("model".into(), "64-64-10".into());
        other.fingerprint.insert("dataset".into(), "abc".into());
        other.max_members = 4;
        let group = view(&[record("a", 0, 0), record("b", 0, 0), other.clone()], None);
        assert_eq!(
            group.refusal(&other).unwrap(),
            "dataset: the group has (none), this member 'abc'; model: the group has '64-32-10', this member '64-64-10'; max_members: the group has 3, this member 4"
        );
        assert_eq!(group.refusal(&record("b", 0, 0)), None);
        assert_eq!(ids(&after_last_call(&group)), vec!["a", "b"]);
    }

    #[test]
    fn a_new_run_after_every_member_left_starts_from_its_own_fingerprint() {
        let now = Instant::now();
        let old = formed(
            Rendezvous::default().decide(&view(&[record("a", 0, 0), record("b", 0, 0), record("c", 0, 0)], None), now),
        );
        let mut fresh = record("x", 0, 0);
        fresh.fingerprint.insert("dataset".into(), "new".into());
        let mut fresh_2 = fresh.clone();
        fresh_2.member_id = "y".into();
        let group = view(&[fresh.clone(), fresh_2], Some(old));
        assert_eq!(group.refusal(&fresh), None);
        // Nobody of round 1 is here: the last call applies as for a first round.
        assert!(matches!(Rendezvous::default().decide(&group, now), Decision::Wait { .. }));
        let round = after_last_call(&group);
        assert_eq!((round.round, round.fingerprint.get("dataset").map(String::as_str)), (2, Some("new")));
    }
}
