//! The demo end to end: real etcd and tandemd processes (build tandemd first, as
//! scripts/test.sh does).

use std::time::Duration;

use tandem_demo::{Failure, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rounds_make_four_checked_round_trips() {
    let options = Options { rounds: 2, call_timeout: Duration::from_secs(5) };
    let trips = match tandem_demo::run(&options, std::future::pending()).await {
        Ok(trips) => trips,
        Err(Failure::Error(e)) => panic!("the demo failed: {e:#}"),
        Err(Failure::Interrupted(signal)) => panic!("interrupted by {signal}"),
    };
    let calls: Vec<(u32, &str, &str)> = trips.iter().map(|t| (t.round, t.caller, t.callee)).collect();
    assert_eq!(calls, [(1, "ping", "pong"), (1, "pong", "ping"), (2, "ping", "pong"), (2, "pong", "ping")]);
    assert_eq!(trips[0].reply, "pong returns ball 1 to ping");
    assert_eq!(trips[3].reply, "ping returns ball 2 to pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupt_stops_the_demo_and_is_reported() {
    let options = Options { rounds: 100_000, call_timeout: Duration::from_secs(5) };
    let interrupt = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        "SIGINT"
    };
    match tandem_demo::run(&options, interrupt).await {
        Err(Failure::Interrupted("SIGINT")) => {}
        Err(Failure::Error(e)) => panic!("the demo failed: {e:#}"),
        other => panic!("expected an interruption, got {:?}", other.map(|t| t.len())),
    }
}
