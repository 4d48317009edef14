//! At-least-once under faults for `pubsub.embedded`: 10,000 events published while the
//! subscriber app, its sidecar and the publisher's sidecar are each `kill -9`ed and restarted
//! once (the case is `tandem_tests::pubsub_cases`, shared with `pubsub.jetstream`).

use tandem_tests::pubsub_cases::{self as cases, Broker};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_survive_killing_the_app_its_sidecar_and_the_publishers_sidecar() {
    cases::ten_thousand_events_survive_killing_the_app_its_sidecar_and_the_publishers_sidecar(&Broker::Embedded, &[])
        .await;
}
