//! Failover between instances: calls that provably never reached an app go to another
//! instance; dead instances leave routing when their lease expires; a call pinned to one
//! instance goes there or nowhere.

use std::time::Duration;

use tandem_sdk::{CallOptions, Code};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_pinned_to_an_instance_reaches_only_that_one_and_never_fails_over() {
    let mut mesh = InvokeMesh::start(2).await;
    let second = mesh.callees[1].client().instance_id().await.unwrap();
    assert_ne!(second, mesh.callees[0].client().instance_id().await.unwrap());
    for i in 0..10 {
        let reply = mesh.client.invoke_with("svc-b", "whoami", vec![i], CallOptions::default().instance(&second)).await;
        assert_eq!(reply.unwrap().data, b"b-2", "call {i} pinned to the second instance");
    }

    // An id no instance has: NOT_FOUND naming it, and no other instance took the call.
    let served = mesh.apps[0].calls() + mesh.apps[1].calls();
    let stranger =
        mesh.client.invoke_with("svc-b", "whoami", Vec::new(), CallOptions::default().instance("nobody")).await;
    let status = stranger.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("'nobody'") && status.message().contains("svc-b"), "{}", status.message());
    assert_eq!(mesh.apps[0].calls() + mesh.apps[1].calls(), served);

    // The pinned instance's app is down: the call fails rather than moving to the live one.
    mesh.apps.remove(1).stop().await;
    let served_by_first = mesh.apps[0].calls();
    let pinned = mesh.client.invoke_with("svc-b", "whoami", Vec::new(), CallOptions::default().instance(&second)).await;
    assert!(pinned.is_err(), "a call pinned to an instance whose app is down was answered: {pinned:?}");
    assert_eq!(mesh.apps[0].calls(), served_by_first, "the pinned call failed over");
}
