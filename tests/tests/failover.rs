//! Failover between instances: calls that provably never reached an app go to another
//! instance; dead instances leave routing when their lease expires.

use std::time::Duration;

use tandem_tests::{Etcd, Sidecar, TestApp, eventually, wait_for_instances};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_instance_is_invisible_to_callers_before_and_after_its_lease_expires() {
    let etcd = Etcd::start().await;
    let (b1, b2) = (TestApp::named("b-1").await, TestApp::named("b-2").await);
    // A lease long enough that the first round of calls surely runs before it expires.
    let mut s1 = Sidecar::new("svc-b").etcd(&etcd).app_port(b1.port()).lease_ttl(8).spawn().await;
    let _s2 = Sidecar::new("svc-b").etcd(&etcd).app_port(b2.port()).lease_ttl(8).spawn().await;
    let caller = Sidecar::new("svc-a").etcd(&etcd).spawn().await;
    let client = caller.client();
    wait_for_instances(&client, "svc-b", &["b-1", "b-2"]).await;

    s1.kill9().await;
    // Before the lease expires, the dead instance is still routed to: connection failures
    // must move each call to the live instance.
    let served_by_b2 = b2.calls();
    for i in 0..20 {
        let reply = client.invoke("svc-b", "echo", vec![i]).await;
        assert!(reply.is_ok(), "call {i} after kill -9 failed: {reply:?}");
    }
    assert_eq!(b2.calls() - served_by_b2, 20);
    assert_eq!(etcd.registered_instances("svc-b").await, 2, "the test meant to call before the lease expired");

    // Once the lease expires the instance is gone from etcd, and calls keep working.
    eventually(Duration::from_secs(30), "the killed instance's lease to expire", || async {
        etcd.registered_instances("svc-b").await == 1
    })
    .await;
    for i in 0..20 {
        let reply = client.invoke("svc-b", "whoami", vec![i]).await.unwrap();
        assert_eq!(reply.data, b"b-2");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_app_is_down_hands_calls_to_the_next_instance() {
    let etcd = Etcd::start().await;
    let (b1, b2) = (TestApp::named("b-1").await, TestApp::named("b-2").await);
    let _s1 = Sidecar::new("svc-b").etcd(&etcd).app_port(b1.port()).spawn().await;
    let _s2 = Sidecar::new("svc-b").etcd(&etcd).app_port(b2.port()).spawn().await;
    let caller = Sidecar::new("svc-a").etcd(&etcd).spawn().await;
    let client = caller.client();
    wait_for_instances(&client, "svc-b", &["b-1", "b-2"]).await;

    b1.stop().await;
    for _ in 0..10 {
        let reply = client.invoke("svc-b", "whoami", Vec::new()).await.unwrap();
        assert_eq!(reply.data, b"b-2");
    }
}
