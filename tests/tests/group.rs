//! Training groups through real sidecars and a real etcd, with the test process as every
//! member's app (bytes in, sums out; no model): rounds, the all-reduce, a member killed with
//! kill -9 mid-exchange, a late joiner, and refused joins.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tandem_sdk::{Code, GroupMember, GroupOptions, Round, SidecarClient};
use tandem_tests::pki::{Root, TlsFiles};
use tandem_tests::{Etcd, RunningSidecar, Sidecar, eventually};

fn options(group: &str, min: u32, max: u32) -> GroupOptions {
    GroupOptions {
        group: group.into(),
        min_members: min,
        max_members: max,
        fingerprint: BTreeMap::from([("model".to_string(), "8-4-2".to_string())]),
        last_call: Some(Duration::from_millis(300)),
    }
}

async fn sidecars(etcd: &Etcd, count: usize) -> Vec<RunningSidecar> {
    let mut sidecars = Vec::new();
    for _ in 0..count {
        let sidecar = Sidecar::new("train").etcd(etcd).arg("--group-timeout").arg("20s").spawn().await;
        sidecar.wait_ready().await;
        sidecars.push(sidecar);
    }
    sidecars
}

/// What rank `rank` contributes at `step`: distinct per rank and step, so a wrong sum shows.
fn contribution(rank: u32, step: u64, len: usize) -> Vec<f32> {
    (0..len).map(|i| (i as f32) * 0.5 + rank as f32 * 100.0 + step as f32).collect()
}

/// Joins every member, each from its own task, and returns them with their first round.
async fn join_all(clients: &[SidecarClient], options: &GroupOptions) -> Vec<(GroupMember, Round)> {
    let tasks: Vec<_> = clients
        .iter()
        .map(|client| {
            let (client, options) = (client.clone(), options.clone());
            tokio::spawn(async move {
                let mut member = client.join_group(&options, 0, "fresh").await.unwrap();
                let round = tokio::time::timeout(Duration::from_secs(30), member.round(|_| {})).await.unwrap().unwrap();
                (member, round)
            })
        })
        .collect();
    let mut joined = Vec::new();
    for task in tasks {
        joined.push(task.await.unwrap());
    }
    joined
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_form_one_round_and_each_gets_the_same_sum_every_step() {
    let etcd = Etcd::start().await;
    let sidecars = sidecars(&etcd, 3).await;
    let clients: Vec<SidecarClient> = sidecars.iter().map(RunningSidecar::client).collect();
    let joined = join_all(&clients, &options("sum-3", 3, 3)).await;

    let round = &joined[0].1;
    assert_eq!((round.round, round.world_size, round.members.len()), (1, 3, 3));
    let mut ranks: Vec<u32> = joined.iter().map(|(_, round)| round.rank).collect();
    ranks.sort();
    assert_eq!(ranks, vec![0, 1, 2]);
    assert!(joined.iter().all(|(_, r)| r.round == 1 && r.members == round.members && !r.sync_state));

    let len = 1001;
    let tasks: Vec<_> = joined
        .into_iter()
        .map(|(member, round)| {
            tokio::spawn(async move {
                let mut sums = Vec::new();
                for step in 0..20u64 {
                    let reduced = member.all_reduce(&round, step, &contribution(round.rank, step, len)).await.unwrap();
                    assert!(!reduced.round_ends);
                    sums.push(reduced.values);
                }
                (member, sums)
            })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    for step in 0..20u64 {
        let expected: Vec<f32> = (0..len).map(|i| (0..3).map(|rank| contribution(rank, step, len)[i]).sum()).collect();
        for (_, sums) in &results {
            assert_eq!(sums[step as usize], results[0].1[step as usize], "every member gets the same bytes");
            assert_eq!(sums[step as usize], expected, "step {step}");
        }
    }
    // /metrics: the round, its size, and the exchange (each member sends 2 (N-1)/N of the buffer per step).
    let metrics = sidecars[0].scrape().await;
    assert_eq!(tandem_tests::sidecar::sample(&metrics, r#"tandem_group_rounds_total{group="sum-3"}"#), 1.0);
    assert_eq!(tandem_tests::sidecar::sample(&metrics, r#"tandem_group_members{group="sum-3"}"#), 3.0);
    assert_eq!(
        tandem_tests::sidecar::sample(&metrics, r#"tandem_group_all_reduce_seconds_count{group="sum-3"}"#),
        20.0
    );
    let sent = tandem_tests::sidecar::sample(&metrics, r#"tandem_group_all_reduce_bytes_total{group="sum-3"}"#);
    assert!((sent - 20.0 * 4.0 * 1001.0 * 4.0 / 3.0).abs() <= 20.0 * 8.0, "bytes sent {sent}");
    drop(results);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mutual_tls_members_all_reduce_over_verified_connections() {
    let etcd = Etcd::start().await;
    let root = Root::new("group root");
    let files: Vec<TlsFiles> = (0..2).map(|_| TlsFiles::new(&root.svid("train"), &[&root])).collect();
    let mut sidecars = Vec::new();
    for files in &files {
        let sidecar = files.apply(Sidecar::new("train").etcd(&etcd).arg("--group-timeout").arg("20s")).spawn().await;
        sidecar.wait_ready().await;
        sidecars.push(sidecar);
    }
    let clients: Vec<SidecarClient> = sidecars.iter().map(RunningSidecar::client).collect();
    let joined = join_all(&clients, &options("sum-tls", 2, 2)).await;
    let len = 257;
    let tasks: Vec<_> = joined
        .into_iter()
        .map(|(member, round)| {
            tokio::spawn(async move {
                let mut sums = Vec::new();
                for step in 0..3u64 {
                    sums.push(
                        member.all_reduce(&round, step, &contribution(round.rank, step, len)).await.unwrap().values,
                    );
                }
                (member, sums)
            })
        })
        .collect();
    for task in tasks {
        let (_member, sums) = task.await.unwrap();
        for (step, sum) in sums.iter().enumerate() {
            let expected: Vec<f32> =
                (0..len).map(|i| (0..2).map(|rank| contribution(rank, step as u64, len)[i]).sum()).collect();
            assert_eq!(*sum, expected, "step {step}");
        }
    }
    // The pieces went over mutual TLS: each sidecar's internal port served its peer's.
    for sidecar in &sidecars {
        assert!(sidecar.log().contains("mtls=spiffe://public/ns/default/train"), "{}", sidecar.log_tail());
        assert!(!sidecar.log().contains("refused a connection"), "{}", sidecar.log_tail());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survivors_of_a_kill_9_mid_exchange_form_a_new_round_and_carry_on() {
    let etcd = Etcd::start().await;
    let mut sidecars = sidecars(&etcd, 3).await;
    let clients: Vec<SidecarClient> = sidecars.iter().map(RunningSidecar::client).collect();
    let mut joined = join_all(&clients, &options("kill", 2, 0)).await;
    assert!(joined.iter().all(|(_, round)| round.world_size == 3), "{:?}", joined[0].1);
    // The member on sidecar 2 never calls AllReduce: the others are mid-exchange when its sidecar dies.
    let (victim, _) = joined.pop().unwrap();
    let tasks: Vec<_> = joined
        .into_iter()
        .map(|(mut member, round)| {
            tokio::spawn(async move {
                let started = Instant::now();
                let err = member.all_reduce(&round, 0, &contribution(round.rank, 0, 64)).await.unwrap_err();
                let noticed = started.elapsed();
                let next = member.next_round(0, "fresh", |_| {}).await.unwrap();
                let reduced = member.all_reduce(&next, 0, &contribution(next.rank, 0, 64)).await.unwrap();
                (err, noticed, next, reduced.values)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    sidecars[2].kill9().await;
    let mut results = Vec::new();
    for task in tasks {
        results.push(tokio::time::timeout(Duration::from_secs(30), task).await.expect("no hang").unwrap());
    }
    drop(victim);
    for (err, noticed, next, values) in &results {
        assert_eq!(err.code(), Code::Aborted, "{err:?}");
        assert!(err.message().starts_with("round 1 of group 'kill' ended: "), "{}", err.message());
        // The lease TTL is 2 s: the loss is noticed within it (and a margin for the watch).
        assert!(*noticed < Duration::from_secs(5), "noticed after {noticed:?}");
        assert_eq!((next.round, next.world_size), (2, 2));
        let expected: Vec<f32> = (0..64).map(|i| (0..2).map(|rank| contribution(rank, 0, 64)[i]).sum()).collect();
        assert_eq!(values, &expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_waits_for_a_step_boundary_and_receives_the_state() {
    let etcd = Etcd::start().await;
    let sidecars = sidecars(&etcd, 3).await;
    let clients: Vec<SidecarClient> = sidecars.iter().map(RunningSidecar::client).collect();
    let group = options("late", 2, 0);
    let joined = join_all(&clients[..2], &group).await;
    let running: Vec<_> = joined
        .into_iter()
        .map(|(mut member, mut round)| {
            tokio::spawn(async move {
                let mut step = 0u64;
                loop {
                    let reduced = member.all_reduce(&round, step, &contribution(round.rank, step, 8)).await.unwrap();
                    step += 1;
                    if reduced.round_ends {
                        let state = format!("state at step {step}");
                        round = member.next_round(step, &state, |_| {}).await.unwrap();
                        let received = member.broadcast_from_source(&round, state.into_bytes()).await.unwrap();
                        return (step, round, String::from_utf8(received).unwrap());
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut joiner = clients[2].join_group(&group, 0, "fresh").await.unwrap();
    let mut notices = Vec::new();
    let round = tokio::time::timeout(Duration::from_secs(30), joiner.round(|w| notices.push(w.reason.clone())))
        .await
        .unwrap()
        .unwrap();
    assert!(notices.iter().any(|n| n == "round 1 runs; this member joins at its next step boundary"), "{notices:?}");
    assert_eq!((round.round, round.world_size), (2, 3));
    assert!(round.sync_state, "the joiner's step 0 differs from the group's");
    let source = &round.members[round.source_rank as usize];
    assert!(source.step > 0);
    let state = joiner.broadcast_from_source(&round, Vec::new()).await.unwrap();
    assert_eq!(String::from_utf8(state).unwrap(), format!("state at step {}", source.step));
    for task in running {
        let (step, their_round, received) = task.await.unwrap();
        assert_eq!(step, round.start_step, "both running members stopped at the same step boundary");
        assert_eq!(their_round.round, 2);
        assert_eq!(received, format!("state at step {step}"));
    }
    // The three of them reduce together now.
    assert_eq!(round.members.iter().filter(|m| m.step == source.step).count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_beyond_max_waits_without_ending_the_full_round() {
    let etcd = Etcd::start().await;
    let sidecars = sidecars(&etcd, 3).await;
    let clients: Vec<SidecarClient> = sidecars.iter().map(RunningSidecar::client).collect();
    let group = options("full", 2, 2);
    let joined = join_all(&clients[..2], &group).await;
    let mut joiner = clients[2].join_group(&group, 0, "fresh").await.unwrap();
    let mut notice = None;
    let pending = tokio::time::timeout(Duration::from_secs(1), joiner.round(|w| notice = Some(w.reason.clone()))).await;
    assert!(pending.is_err(), "no round has a place for a third member");
    assert_eq!(
        notice.as_deref(),
        Some("round 1 runs with the most members allowed (2); this member waits for a place")
    );
    let tasks: Vec<_> = joined
        .into_iter()
        .map(|(member, round)| {
            tokio::spawn(async move {
                for step in 0..20u64 {
                    let reduced = member.all_reduce(&round, step, &contribution(round.rank, step, 4)).await.unwrap();
                    assert!(!reduced.round_ends, "step {step}: the full round was ended for a joiner it cannot take");
                }
                member
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_joins_and_calls_get_clear_errors_and_fewer_than_min_wait_and_say_so() {
    let etcd = Etcd::start().await;
    let sidecars = sidecars(&etcd, 2).await;
    let (a, b) = (sidecars[0].client(), sidecars[1].client());

    let mut bad = a.join_group(&options("bad", 3, 2), 0, "").await.unwrap();
    let err = bad.round(|_| {}).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "group 'bad': min_members 3 is more than max_members 2")
    );

    let mut first = a.join_group(&options("g", 2, 0), 0, "").await.unwrap();
    let mut waiting = None;
    let pending = tokio::time::timeout(Duration::from_secs(1), first.round(|w| waiting = Some(w.clone()))).await;
    assert!(pending.is_err(), "one member below min 2 gets no round");
    let waiting = waiting.expect("a Waiting notice");
    assert_eq!(
        (waiting.reason.as_str(), waiting.members_waiting, waiting.min_members),
        ("1 of min 2 members waiting", 1, 2)
    );

    let again = a.join_group(&options("g", 2, 0), 0, "").await.unwrap().round(|_| {}).await.unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");

    let mut other = options("g", 2, 0);
    other.fingerprint.insert("model".into(), "8-16-2".into());
    other.fingerprint.insert("dataset".into(), "v2".into());
    let err = b.join_group(&other, 0, "").await.unwrap().round(|_| {}).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        err.message(),
        "refused to join group 'g': dataset: the group has (none), this member 'v2'; model: the group has '8-4-2', this member '8-16-2'"
    );

    // A member that left is forgotten: its group's calls are refused.
    let probe = GroupProbe(sidecars[1].grpc_addr().to_string());
    let mut member = b.join_group(&options("h", 1, 1), 0, "").await.unwrap();
    let round = member.round(|_| {}).await.unwrap();
    assert_eq!(member.all_reduce(&round, 0, &[2.5]).await.unwrap().values, vec![2.5], "a round of one reduces alone");
    drop(member);
    eventually(Duration::from_secs(5), "the member that left to be forgotten", || async {
        probe.all_reduce("h", &round, Vec::new()).await.is_err_and(|e| e.code() == Code::FailedPrecondition)
    })
    .await;
    let err = probe.all_reduce("h", &round, Vec::new()).await.unwrap_err();
    assert_eq!(err.message(), "this app is not in group 'h': open a Join stream first");

    // Bytes that are not f32 values.
    let mut member = b.join_group(&options("odd", 1, 1), 0, "").await.unwrap();
    let round = member.round(|_| {}).await.unwrap();
    let err = probe.all_reduce("odd", &round, vec![1, 2, 3]).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "data of 3 bytes is not a whole number of little-endian f32 values")
    );
    drop(first);
}

/// Calls of the group API that GroupMember does not make (for a member that left, or with
/// malformed data), on the sidecar at this address.
struct GroupProbe(String);

impl GroupProbe {
    async fn all_reduce(&self, group: &str, round: &Round, data: Vec<u8>) -> Result<(), tandem_sdk::Status> {
        use tandem_proto::group::AllReduceRequest;
        use tandem_proto::group::training_group_client::TrainingGroupClient;
        let connection = tandem_transport::GrpcConnection::new(&self.0).unwrap();
        let mut client = TrainingGroupClient::with_origin(connection.clone(), connection.origin());
        let request = AllReduceRequest { group: group.into(), round: round.round, step: 0, data: data.into() };
        client.all_reduce(request).await.map(|_| ())
    }
}
