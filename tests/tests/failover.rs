//! Failover between instances: calls that provably never reached an app go to another
//! instance; dead instances leave routing when their lease expires.

use std::time::Duration;

use tandem_tests::{InvokeMesh, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_instance_is_invisible_to_callers_before_and_after_its_lease_expires() {
    // A lease long enough that the first round of calls surely runs before it expires.
    let mut mesh = InvokeMesh::start_with(2, |sidecar| sidecar.lease_ttl(8)).await;
    mesh.callees[0].kill9().await;
    let (etcd, client, b2) = (&mesh.etcd, &mesh.client, &mesh.apps[1]);
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
    let mut mesh = InvokeMesh::start(2).await;
    mesh.apps.remove(0).stop().await;
    let client = &mesh.client;
    for _ in 0..10 {
        let reply = client.invoke("svc-b", "whoami", Vec::new()).await.unwrap();
        assert_eq!(reply.data, b"b-2");
    }
}
