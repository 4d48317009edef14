//! Data-parallel training with real train replicas, their sidecars and etcd (train's state in
//! etcd, shared): N replicas train the parameters one replica trains, a kill -9 of a replica
//! mid-run is absorbed, a late joiner enters at a step boundary with the group's state, and
//! bad configurations get clear answers. Each run trains the digits set on its own
//! (`--dataset digits`), so no ingest or preprocess is needed.

use std::time::{Duration, Instant};

use tandem_model::{Dataset, Standardizer, TrainingConfig, parse_device};
use tandem_sdk::Code;
use tandem_tests::Etcd;
use tandem_tests::service::Service;
use tandem_tests::training::{StepLine, TrainGroup, relative_difference};

const EPOCHS: usize = 6;
const RUN_TIMEOUT: Duration = Duration::from_secs(400);

fn args(min: usize, max: usize) -> Vec<String> {
    [
        "--dataset",
        "digits",
        "--epochs",
        &EPOCHS.to_string(),
        "--min-replicas",
        &min.to_string(),
        "--max-replicas",
        &max.to_string(),
        "--last-call-ms",
        "300",
        "--step-log-parameters",
        "20",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

async fn start(etcd: &Etcd, count: usize, min: usize, max: usize) -> TrainGroup {
    let args = args(min, max);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    TrainGroup::start(etcd, count, &args).await
}

/// The test accuracy one process reaches with the library alone (the one-replica reference).
fn reference_accuracy() -> f32 {
    let device = parse_device("cpu").unwrap();
    let config = TrainingConfig { epochs: EPOCHS, ..TrainingConfig::default() };
    let split = Dataset::digits().split(0.2, config.seed).unwrap();
    let scaler = Standardizer::fit(&split.train, &device);
    let (train, test) =
        (scaler.transform(&split.train, &device).unwrap(), scaler.transform(&split.test, &device).unwrap());
    let model = tandem_model::train(&train, &config, &device, |_| {}).unwrap();
    model.evaluate(&test).unwrap().accuracy
}

/// Every replica that logged a step logged the same parameters hash for it.
fn assert_replicas_agree(group: &TrainGroup, replicas: usize) {
    let logs: Vec<Vec<StepLine>> = (0..replicas).map(|i| group.step_log(i)).collect();
    let mut compared = 0;
    for line in &logs[0] {
        for other in &logs[1..] {
            if let Some(same) = other.iter().find(|l| l.step == line.step) {
                assert_eq!(same.parameters_hash, line.parameters_hash, "step {}: replicas differ", line.step);
                compared += 1;
            }
        }
    }
    assert!(compared > 0, "no step in common to compare");
}

/// Exactly one model version in the registry, and it is `version`.
async fn assert_one_model(group: &TrainGroup, version: &str) {
    assert_eq!(version, "v1");
    assert_eq!(group.model(None).await.unwrap().model_version, "v1");
    let err = group.model(Some("v2")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_and_three_replicas_train_the_parameters_of_one_replica() {
    // One replica first, alone on the machine.
    let etcd_1 = Etcd::start().await;
    let one = start(&etcd_1, 1, 1, 1).await;
    let v = one.wait_for_model(0, RUN_TIMEOUT).await;
    assert_one_model(&one, &v).await;
    let single = one.step_log(0);
    let single_accuracy = one.status(0).await.unwrap().test_accuracy.unwrap();

    let (etcd_2, etcd_3) = (Etcd::start().await, Etcd::start().await);
    let (two, three) = tokio::join!(start(&etcd_2, 2, 2, 2), start(&etcd_3, 3, 3, 3));
    for (group, n) in [(&two, 2usize), (&three, 3)] {
        let version = group.wait_for_model(0, RUN_TIMEOUT).await;
        for replica in 1..n {
            assert_eq!(group.wait_for_model(replica, RUN_TIMEOUT).await, version);
        }
        assert_one_model(group, &version).await;
        assert_replicas_agree(group, n);
        let log = group.step_log(0);
        assert_eq!(log.len(), single.len(), "N = {n}: every step logged once");
        assert!(log.iter().all(|line| line.world_size == n as u32 && line.round == 1), "N = {n}: one round of {n}");
        for (ours, reference) in log.iter().zip(&single).take(20) {
            let difference = relative_difference(
                ours.parameters.as_ref().expect("parameters logged"),
                reference.parameters.as_ref().expect("parameters logged"),
            );
            assert!(difference <= 1e-5, "N = {n}, step {}: relative difference {difference}", ours.step);
        }
        let accuracy = group.status(0).await.unwrap().test_accuracy.unwrap();
        assert!((accuracy - single_accuracy).abs() <= 0.005, "N = {n}: accuracy {accuracy} vs {single_accuracy}");
        let progress = group.status(0).await.unwrap().group.expect("the group's progress");
        assert_eq!(
            (progress.world_size, progress.step, progress.total_steps),
            (n as u32, log.len() as u64, log.len() as u64)
        );
        assert_eq!(progress.members.len(), n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_run_is_absorbed_and_the_run_completes() {
    let etcd = Etcd::start().await;
    let mut group = start(&etcd, 3, 3, 0).await;
    group
        .wait_for(0, RUN_TIMEOUT, "training in a round of 3 past step 40", |s| {
            s.group.as_ref().is_some_and(|g| g.world_size == 3 && g.step >= 40)
        })
        .await;
    let killed_at = group.status(0).await.unwrap().group.unwrap().step;
    let kill_time = Instant::now();
    group.kill(2).await;
    group
        .wait_for(0, Duration::from_secs(60), "a round of the 2 survivors that steps on", |s| {
            s.group.as_ref().is_some_and(|g| g.world_size == 2 && g.step > killed_at + 1)
        })
        .await;
    let recovered = kill_time.elapsed();
    // The sidecars' lease TTL is 2 s here.
    assert!(recovered < Duration::from_secs(20), "the survivors stepped on {recovered:?} after the kill");
    let version = group.wait_for_model(0, RUN_TIMEOUT).await;
    assert_eq!(group.wait_for_model(1, RUN_TIMEOUT).await, version);
    assert_one_model(&group, &version).await;
    let batch = TrainingConfig::default().batch_size;
    let total = (EPOCHS * Dataset::digits().split(0.2, 42).unwrap().train.len().div_ceil(batch)) as u64;
    for survivor in 0..2 {
        // No restart and no reload: the steps go on one by one, in a new round. A survivor
        // that had not finished the step in flight when the ring broke takes the state of one
        // that had (one step it did not compute itself, at the round change), nothing more.
        let log = group.step_log(survivor);
        assert_eq!((log[0].step, log.last().unwrap().step), (1, total), "replica {survivor}");
        for pair in log.windows(2) {
            let (before, after) = (&pair[0], &pair[1]);
            let next = after.step == before.step + 1;
            let took_the_group_state = after.step == before.step + 2 && after.round > before.round;
            assert!(next || took_the_group_state, "replica {survivor}: step {} then {}", before.step, after.step);
        }
        assert!(log.iter().any(|line| line.world_size == 2 && line.round >= 2), "replica {survivor}: no round of 2");
    }
    assert_replicas_agree(&group, 2);
    let accuracy = group.status(0).await.unwrap().test_accuracy.unwrap();
    let reference = reference_accuracy();
    assert!((accuracy - reference).abs() <= 0.005, "accuracy {accuracy}, uninterrupted {reference}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_enters_at_a_step_boundary_with_the_groups_state() {
    let etcd = Etcd::start().await;
    let mut group = start(&etcd, 2, 2, 0).await;
    group.wait_for(0, RUN_TIMEOUT, "training past step 30", |s| s.group.as_ref().is_some_and(|g| g.step >= 30)).await;
    let joiner = group.add_replica(&etcd).await;
    group
        .wait_for(joiner, Duration::from_secs(120), "a round of 3", |s| {
            s.group.as_ref().is_some_and(|g| g.world_size == 3 && g.step > 0)
        })
        .await;
    let version = group.wait_for_model(0, RUN_TIMEOUT).await;
    for replica in [1, joiner] {
        assert_eq!(group.wait_for_model(replica, RUN_TIMEOUT).await, version);
    }
    assert_one_model(&group, &version).await;
    let log = group.step_log(joiner);
    let first = log.first().expect("the joiner trained").step;
    assert!(first > 30, "the joiner started at step {first}, not from the group's state");
    assert!(log.iter().all(|line| line.world_size == 3), "the joiner trained only in rounds of 3");
    let reference = group.step_log(0);
    for line in &log {
        let same = reference.iter().find(|l| l.step == line.step).expect("the same step on replica 0");
        assert_eq!(same.parameters_hash, line.parameters_hash, "step {}", line.step);
    }
    assert_eq!(log.last().unwrap().step, reference.last().unwrap().step);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_group_settings_are_refused_and_a_dead_sidecar_stops_only_its_replica() {
    // min above max: the replica does not start, and says why.
    let output = Service::new("tandem-train")
        .args(["--app-port", "1", "--min-replicas", "3", "--max-replicas", "2"])
        .run_to_exit(Duration::from_secs(30))
        .await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--min-replicas 3 is more than --max-replicas 2"), "{stderr}");

    // Fewer than min: the replica waits and says so.
    let etcd = Etcd::start().await;
    let mut group = start(&etcd, 1, 2, 0).await;
    group
        .wait_for(0, Duration::from_secs(60), "waiting below min", |s| {
            s.group.as_ref().and_then(|g| g.waiting.as_deref()) == Some("1 of min 2 members waiting")
        })
        .await;
    // Another model configuration is refused, naming the difference.
    let other = group.add_replica_with(&etcd, &["--hidden", "64"]).await;
    group
        .wait_for(other, Duration::from_secs(60), "a refusal naming the architecture", |s| {
            s.group.as_ref().and_then(|g| g.waiting.as_deref()).is_some_and(|w| {
                w.contains("refused to join group 'train'")
                    && w.contains("architecture: the group has '64-128-10', this member '64-64-10'")
            })
        })
        .await;
    assert_eq!(group.status(0).await.unwrap().group.unwrap().round, 0, "no round formed with it");

    // A matching replica completes the group; then one replica's sidecar dies mid-run.
    let second = group.add_replica(&etcd).await;
    group.wait_for(0, RUN_TIMEOUT, "training past step 20", |s| s.group.as_ref().is_some_and(|g| g.step >= 20)).await;
    group.replicas[second].sidecar.kill9().await;
    group
        .wait_for(second, Duration::from_secs(60), "a clear error after losing its sidecar", |s| {
            s.group.as_ref().and_then(|g| g.waiting.as_deref()).is_some_and(|w| w.starts_with("training failed: "))
        })
        .await;
    // Below min 2 now: the survivor waits rather than train alone, and the run registers nothing.
    group
        .wait_for(0, Duration::from_secs(60), "waiting for a second member", |s| {
            s.group.as_ref().and_then(|g| g.waiting.as_deref()).is_some_and(|w| w.contains("of min 2 members waiting"))
        })
        .await;
    let err = group.model(None).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "no model registered by a broken run: {err:?}");
}
