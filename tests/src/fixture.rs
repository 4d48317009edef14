//! The usual cast of an invocation test, started in one call: etcd, the callee app-id `svc-b`
//! served by [`TestApp::named`] apps `b-1`..`b-n`, each behind its own sidecar, and a caller
//! sidecar `svc-a` that already routes to all of them.

use tandem_sdk::SidecarClient;

use crate::{Etcd, RunningSidecar, Sidecar, TestApp, wait_for_instances};

pub struct InvokeMesh {
    pub etcd: Etcd,
    /// `apps[i]` is `b-{i+1}`, served behind `callees[i]`.
    pub apps: Vec<TestApp>,
    pub callees: Vec<RunningSidecar>,
    pub caller: RunningSidecar,
    /// A client of the caller's sidecar.
    pub client: SidecarClient,
}

impl InvokeMesh {
    pub async fn start(instances: usize) -> InvokeMesh {
        Self::start_with(instances, |sidecar| sidecar).await
    }

    /// Like [`InvokeMesh::start`], with `configure` applied to each callee sidecar.
    pub async fn start_with(instances: usize, configure: impl Fn(Sidecar) -> Sidecar) -> InvokeMesh {
        let etcd = Etcd::start().await;
        let names: Vec<String> = (1..=instances).map(|i| format!("b-{i}")).collect();
        let mut apps = Vec::new();
        let mut callees = Vec::new();
        for name in &names {
            let app = TestApp::named(name).await;
            callees.push(configure(Sidecar::new("svc-b").etcd(&etcd).app_port(app.port())).spawn().await);
            apps.push(app);
        }
        let caller = Sidecar::new("svc-a").etcd(&etcd).spawn().await;
        let client = caller.client();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        wait_for_instances(&client, "svc-b", &names).await;
        InvokeMesh { etcd, apps, callees, caller, client }
    }
}
