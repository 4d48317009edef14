//! Load-aware balancing through real sidecars and a real etcd: p2c sends calls to the instance
//! with fewer calls in flight, an instance that fails is ejected and comes back by itself, and
//! an instance that refuses a call as busy (RESOURCE_EXHAUSTED) hands it to another, and the
//! refusals teach the caller a limit beyond which it sheds calls without sending them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tandem_sdk::{AppServer, Code, Reply, SidecarClient, Status};
use tandem_tests::{Etcd, RunningSidecar, Sidecar, TestApp, eventually, http, wait_for_instances};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What a replica does with a `work` call.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Mode {
    /// Answers its name at once.
    Answer,
    /// Holds the call until released, then answers.
    Hold,
    /// Fails it with UNAVAILABLE.
    Unavailable,
    /// Refuses it as busy with RESOURCE_EXHAUSTED.
    Busy,
}

/// One instance of app-id `model`: a test app (its `whoami` always answers its name) behind
/// its own sidecar.
struct Replica {
    mode: Arc<AtomicU8>,
    calls: Arc<AtomicUsize>,
    release: watch::Sender<bool>,
    _app: TestApp,
    _sidecar: RunningSidecar,
}

impl Replica {
    async fn start(etcd: &Etcd, name: &'static str, mode: Mode) -> Replica {
        let mode = Arc::new(AtomicU8::new(mode as u8));
        let calls = Arc::new(AtomicUsize::new(0));
        let (release, released) = watch::channel(false);
        let (m, c) = (mode.clone(), calls.clone());
        let server = AppServer::new().handler("whoami", move |_| async move { Ok(Reply::text(name)) }).handler(
            "work",
            move |_| {
                let (mode, mut released) = (m.load(Ordering::SeqCst), released.clone());
                c.fetch_add(1, Ordering::SeqCst);
                async move {
                    match mode {
                        m if m == Mode::Hold as u8 => {
                            let _ = released.wait_for(|go| *go).await;
                            Ok(Reply::text(name))
                        }
                        m if m == Mode::Unavailable as u8 => Err(Status::unavailable(format!("{name} is sick"))),
                        m if m == Mode::Busy as u8 => Err(Status::resource_exhausted(format!("{name}: queue full"))),
                        _ => Ok(Reply::text(name)),
                    }
                }
            },
        );
        let app = TestApp::start(server).await;
        let sidecar = Sidecar::new("model").etcd(etcd).app_port(app.port()).spawn().await;
        Replica { mode, calls, release, _app: app, _sidecar: sidecar }
    }

    fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// A sidecar without an app, with `args`, once its calls reach both replicas.
async fn calling_sidecar(etcd: &Etcd, name: &str, args: &[&str]) -> RunningSidecar {
    let sidecar = args.iter().fold(Sidecar::new(name).etcd(etcd), |sidecar, arg| sidecar.arg(*arg)).spawn().await;
    wait_for_instances(&sidecar.client(), "model", &["slow", "fast"]).await;
    sidecar
}

/// Sends `n` calls of `work` one after another, each once the one before it was answered or
/// is held by `slow`: the calls held pile up in flight there. Returns the calls, still running.
async fn one_at_a_time(client: &SidecarClient, slow: &Replica, n: usize) -> Vec<JoinHandle<Result<Vec<u8>, Status>>> {
    let mut calls = Vec::new();
    for i in 0..n {
        let held_before = slow.calls();
        let client = client.clone();
        let call = tokio::spawn(async move { client.invoke("model", "work", Vec::new()).await.map(|r| r.data) });
        let started = Instant::now();
        while !call.is_finished() && slow.calls() == held_before {
            assert!(started.elapsed() < Duration::from_secs(10), "call {i} neither answered nor held");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        calls.push(call);
    }
    calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_sends_calls_to_the_instance_with_fewer_in_flight_and_round_robin_does_not() {
    let etcd = Etcd::start().await;
    let slow = Replica::start(&etcd, "slow", Mode::Hold).await;
    let fast = Replica::start(&etcd, "fast", Mode::Answer).await;
    let p2c = calling_sidecar(&etcd, "p2c-client", &[]).await;
    let round_robin = calling_sidecar(&etcd, "rr-client", &["--lb-policy", "round-robin"]).await;

    // p2c (the default): once one call is held by slow, every other call goes to fast.
    let calls = one_at_a_time(&p2c.client(), &slow, 20).await;
    let held = slow.calls();
    assert!(held <= 1, "p2c sent {held} of 20 calls to the instance holding one");
    assert_eq!(fast.calls(), 20 - held);

    // Round robin sends every other call to slow, where they pile up.
    let more = one_at_a_time(&round_robin.client(), &slow, 20).await;
    assert_eq!(slow.calls() - held, 10, "round robin: half of 20 calls to slow");

    slow.release.send(true).unwrap();
    for call in calls.into_iter().chain(more) {
        let answer = tokio::time::timeout(Duration::from_secs(10), call).await.unwrap().unwrap();
        assert!(answer.is_ok(), "{answer:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_fails_is_ejected_for_a_while_and_comes_back_by_itself() {
    let etcd = Etcd::start().await;
    let sick = Replica::start(&etcd, "slow", Mode::Unavailable).await;
    let well = Replica::start(&etcd, "fast", Mode::Answer).await;
    // Round robin, so that the sick instance surely gets every other call unless ejected (p2c
    // might keep to the other one by its latency alone).
    let args = ["--lb-policy", "round-robin", "--ejection-base-time", "1s", "--ejection-max-time", "4s"];
    let caller = calling_sidecar(&etcd, "client", &args).await;
    let client = caller.client();

    // Its first failure ejects it: the calls after it all go to the other instance.
    let mut failed = 0;
    let started = Instant::now();
    for _ in 0..30 {
        match client.invoke("model", "work", Vec::new()).await {
            Ok(reply) => assert_eq!(reply.data, b"fast"),
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(status.message().contains("slow is sick"), "{status:?}");
                failed += 1;
            }
        }
    }
    if started.elapsed() < Duration::from_secs(1) {
        assert_eq!(failed, 1, "within the first ejection only the first failure reaches a caller");
    }
    assert!((1..=3).contains(&failed), "{failed} of 30 calls failed: the sick instance was not ejected");
    assert_eq!(well.calls(), 30 - failed);
    assert!(caller.metric(r#"tandem_invoke_ejections_total{app_id="model"}"#).await >= 1.0);

    // Healthy again: once its ejection is over it takes calls again, with nothing done here.
    sick.set(Mode::Answer);
    let calls_before = sick.calls();
    eventually(Duration::from_secs(15), "the ejected instance to take calls again", || async {
        client.invoke("model", "work", Vec::new()).await.is_ok_and(|r| r.data == b"slow")
    })
    .await;
    assert!(sick.calls() > calls_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_instance_hands_the_call_to_another_and_all_busy_is_resource_exhausted() {
    let etcd = Etcd::start().await;
    let full = Replica::start(&etcd, "slow", Mode::Busy).await;
    let room = Replica::start(&etcd, "fast", Mode::Answer).await;
    // Round robin: the busy instance is surely tried first for every other call.
    let caller = calling_sidecar(&etcd, "client", &["--lb-policy", "round-robin"]).await;
    let client = caller.client();

    for i in 0..20 {
        let reply = client.invoke("model", "work", Vec::new()).await.unwrap_or_else(|e| panic!("call {i}: {e:?}"));
        assert_eq!(reply.data, b"fast");
    }
    assert_eq!(room.calls(), 20);
    assert!(full.calls() >= 10, "the busy instance was tried first for every other call: {}", full.calls());

    // Both busy: the caller hears RESOURCE_EXHAUSTED with the app's reason, at once.
    room.set(Mode::Busy);
    let started = Instant::now();
    let refused = client.invoke("model", "work", Vec::new()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("busy") && refused.message().contains("queue full"), "{refused:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // Through the HTTP API: 503, the mesh's error code and the reason.
    let answer = http::request(caller.http_addr(), "POST", "/v1.0/invoke/model/method/work", &[], b"").await.unwrap();
    assert_eq!(answer.status, 503, "{}", answer.text());
    assert!(answer.text().contains("ERR_DIRECT_INVOKE") && answer.text().contains("queue full"), "{}", answer.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_teach_the_caller_a_limit_beyond_which_it_sheds_without_sending() {
    let etcd = Etcd::start().await;
    let (a, b) = (Replica::start(&etcd, "slow", Mode::Hold).await, Replica::start(&etcd, "fast", Mode::Hold).await);
    let caller = calling_sidecar(&etcd, "client", &[]).await;
    let client = caller.client();
    let total = || a.calls() + b.calls();

    // Six calls held, spread by p2c.
    let mut held = Vec::new();
    for i in 0..6 {
        let before = total();
        let client = client.clone();
        held.push(tokio::spawn(async move { client.invoke("model", "work", Vec::new()).await }));
        eventually(Duration::from_secs(10), &format!("call {i} to be held"), || async { total() > before }).await;
    }
    assert!(a.calls() >= 1 && b.calls() >= 1, "p2c spreads the held calls: {} and {}", a.calls(), b.calls());

    // Both replicas full: a call tries both, is refused by both, and each refusal sets that
    // instance's limit below the calls it then had in flight (90% of them).
    a.set(Mode::Busy);
    b.set(Mode::Busy);
    let refused = client.invoke("model", "work", Vec::new()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(total(), 8, "the call reached both replicas");

    // Past the 1 ms in which a refusal alone makes the caller shed, the limits remain: the
    // next call is shed by the caller's sidecar, and no replica sees it.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let shed = client.invoke("model", "work", Vec::new()).await.unwrap_err();
    assert_eq!(shed.code(), Code::ResourceExhausted, "{shed:?}");
    assert!(shed.message().contains("shed by the caller's sidecar"), "{shed:?}");
    assert!(shed.message().contains("whose refusals set its limit at"), "{shed:?}");
    assert_eq!(total(), 8, "a shed call reaches no replica");

    // The held calls answered, the replicas take calls again: nothing is held, so the limit
    // admits them.
    a.set(Mode::Answer);
    b.set(Mode::Answer);
    a.release.send(true).unwrap();
    b.release.send(true).unwrap();
    for call in held {
        let answer = tokio::time::timeout(Duration::from_secs(10), call).await.unwrap().unwrap();
        assert!(answer.is_ok(), "{answer:?}");
    }
    for i in 0..10 {
        client
            .invoke("model", "work", Vec::new())
            .await
            .unwrap_or_else(|e| panic!("call {i} after the overload: {e:?}"));
    }
}
