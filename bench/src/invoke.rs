//! The invocation scenario: app B's `echo` called directly over gRPC, and the same call
//! through two sidecars (caller -> tandemd A -> tandemd B -> app B), once through tandemd A's
//! gRPC API and once through its Dapr HTTP API (`POST /v1.0/invoke/bench-b/method/echo`).
//!
//! Everything runs on this machine as real processes, started with the integration-test
//! harness: etcd, tandemd for B (fronting app B), tandemd for the caller A (no app). App B
//! and the load generator share this process's tokio runtime, for both routes alike.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tandem_proto::common::InvokeRequest;
use tandem_proto::prost_types::Any;
use tandem_proto::runtime::app_callback_client::AppCallbackClient;
use tandem_sdk::{AppServer, Reply, SidecarClient, Status};
use tandem_tests::{Etcd, RunningSidecar, Sidecar, TestApp};
use tonic::transport::{Channel, Endpoint};

use crate::load::{self, Call, RouteFigures, Settings};
use crate::procfs::Memory;

/// App-id of the called app and its sidecar.
pub const CALLEE: &str = "bench-b";
/// App-id of the calling side's sidecar.
pub const CALLER: &str = "bench-a";
const METHOD: &str = "echo";
/// How long a freshly started mesh gets to route its first call.
const REACH_TIMEOUT: Duration = Duration::from_secs(30);

/// Measures the mesh routes of two meshes side by side (`load::measure`, the routes taken in
/// turn), watching the bench process (`bench_process` says what it serves) and each mesh's two
/// sidecars; the figures of each, with its own mesh's processes.
pub async fn measure_side_by_side(
    (first_name, first): (&str, &Mesh),
    (second_name, second): (&str, &Mesh),
    bench_process: &str,
    settings: &Settings,
) -> Result<(RouteFigures, RouteFigures)> {
    let [(_, first_a), (_, first_b)] = first.sidecar_pids()?;
    let [(_, second_a), (_, second_b)] = second.sidecar_pids()?;
    let watched = vec![
        (format!("bench process ({bench_process})"), std::process::id()),
        (format!("tandemd {CALLER}"), first_a),
        (format!("tandemd {CALLEE}"), first_b),
        (format!("tandemd {CALLER}"), second_a),
        (format!("tandemd {CALLEE}"), second_b),
    ];
    eprintln!(
        "measuring {first_name} and {second_name} in {} rounds: {} sequential calls, then {} in flight for {:?}, per route ...",
        settings.rounds, settings.calls, settings.in_flight, settings.duration
    );
    let figures: Vec<RouteFigures> = load::measure(&[&first.mesh_route(), &second.mesh_route()], settings, &watched)
        .await?
        .into_iter()
        .zip([first_name, second_name])
        .map(|(measured, route)| measured.into_figures().with_context(|| format!("the {route} route")))
        .collect::<Result<_>>()?;
    let [first_figures, second_figures]: [_; 2] = figures.try_into().expect("one set of figures per route");
    Ok((first_figures.only_processes(&[0, 1, 2]), second_figures.only_processes(&[0, 3, 4])))
}

/// The running processes; all stopped when dropped (fields drop in this order).
pub struct Mesh {
    caller: RunningSidecar,
    callee: RunningSidecar,
    app: TestApp,
    _etcd: Etcd,
}

impl Mesh {
    /// Starts etcd, app B, tandemd for B and for A, and waits until a call from A reaches B.
    pub async fn start() -> Result<Mesh> {
        Self::start_with_env(&[]).await
    }

    /// Like [`Mesh::start`], with environment variables `env` set for both sidecars.
    pub async fn start_with_env(env: &[(&str, &str)]) -> Result<Mesh> {
        Self::start_configured(|_, mut sidecar| {
            for (key, value) in env {
                sidecar = sidecar.env(key, value);
            }
            sidecar
        })
        .await
    }

    /// Like [`Mesh::start`], each sidecar as `configure(its app-id, builder)` makes it.
    pub async fn start_configured(configure: impl Fn(&str, Sidecar) -> Sidecar) -> Result<Mesh> {
        let etcd = Etcd::start().await;
        let app =
            TestApp::start(AppServer::new().handler(METHOD, |call| async move { Ok(Reply::bytes(call.data)) })).await;
        let callee = configure(CALLEE, Sidecar::new(CALLEE)).etcd(&etcd).app_port(app.port()).spawn().await;
        let caller = configure(CALLER, Sidecar::new(CALLER)).etcd(&etcd).spawn().await;
        callee.wait_ready().await;
        caller.wait_ready().await;
        let mesh = Mesh { caller, callee, app, _etcd: etcd };
        mesh.wait_until_routed().await?;
        Ok(mesh)
    }

    /// Polls a call through the mesh until it succeeds (A learns of B from etcd's watch).
    async fn wait_until_routed(&self) -> Result<()> {
        let route = self.mesh_route();
        let payload = vec![0u8; 16];
        let started = Instant::now();
        loop {
            let last_error = match route.call(&payload).await {
                Ok(()) => return Ok(()),
                Err(status) => status,
            };
            if started.elapsed() > REACH_TIMEOUT {
                bail!(
                    "a call from {CALLER} did not reach {CALLEE} within {REACH_TIMEOUT:?}; last error: {:?}: {}\n\
                     log of tandemd {CALLER}:\n{}\nlog of tandemd {CALLEE}:\n{}",
                    last_error.code(),
                    last_error.message(),
                    self.caller.log_tail(),
                    self.callee.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// App B's callback API, called directly over one HTTP/2 connection (TCP_NODELAY on).
    pub async fn direct_route(&self) -> Result<Route> {
        let address = format!("http://{}", self.app.address);
        let channel = Endpoint::from_shared(address.clone())?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .with_context(|| format!("connecting to app {CALLEE} at {address}"))?;
        Ok(Route::Direct(AppCallbackClient::new(channel)))
    }

    /// The SDK's `invoke` against tandemd A, which forwards to tandemd B, which calls app B.
    pub fn mesh_route(&self) -> Route {
        Route::Mesh(self.caller.client())
    }

    /// The same call through tandemd A's Dapr HTTP API: keep-alive HTTP/1.1 connections, one
    /// per call in flight (as an HTTP SDK's connection pool does), TCP_NODELAY on.
    pub fn http_route(&self) -> Route {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        let uri = format!("http://{}/v1.0/invoke/{CALLEE}/method/{METHOD}", self.caller.http_addr());
        Route::Http { client, uri: uri.parse().expect("a valid URI") }
    }

    /// The sidecars' pids, caller first.
    pub fn sidecar_pids(&self) -> Result<[(&'static str, u32); 2]> {
        let pid =
            |sidecar: &RunningSidecar| sidecar.pid().with_context(|| format!("tandemd {} has exited", sidecar.app_id));
        Ok([(CALLER, pid(&self.caller)?), (CALLEE, pid(&self.callee)?)])
    }

    /// `/metrics` of both sidecars, caller first.
    pub async fn sidecar_metrics(&self) -> Result<[String; 2]> {
        let scrape = |sidecar: &RunningSidecar| {
            let admin = sidecar.admin_addr();
            async move {
                match tandem_tests::http::get(admin, "/metrics").await {
                    Ok((200, text)) => Ok(text),
                    other => bail!("GET /metrics of {admin}: {other:?}"),
                }
            }
        };
        Ok([scrape(&self.caller).await?, scrape(&self.callee).await?])
    }

    /// Resident memory of both sidecars now, caller first.
    pub fn sidecar_memory(&self) -> Result<[(&'static str, Memory); 2]> {
        let [(a, a_pid), (b, b_pid)] = self.sidecar_pids()?;
        Ok([(a, Memory::of(a_pid)?), (b, Memory::of(b_pid)?)])
    }
}

/// One way of calling app B's `echo`; cheap to clone (clones share one connection).
#[derive(Debug, Clone)]
pub enum Route {
    Direct(AppCallbackClient<Channel>),
    Mesh(SidecarClient),
    Http { client: Client<HttpConnector, Full<Bytes>>, uri: hyper::Uri },
}

impl Call for Route {
    /// One call; also checks that the whole payload came back.
    async fn call(&self, payload: &[u8]) -> Result<(), Status> {
        let returned = match self {
            Route::Direct(client) => {
                let request = InvokeRequest {
                    method: METHOD.into(),
                    data: Some(Any { type_url: String::new(), value: payload.to_vec() }),
                    content_type: "application/octet-stream".into(),
                    http_extension: None,
                };
                let response = client.clone().on_invoke(request).await?.into_inner();
                response.data.map(|any| any.value.len()).unwrap_or(0)
            }
            Route::Mesh(client) => client.invoke(CALLEE, METHOD, payload).await?.data.len(),
            Route::Http { client, uri } => http_call(client, uri, payload).await?,
        };
        if returned != payload.len() {
            return Err(Status::data_loss(format!("echo returned {returned} bytes for {} sent", payload.len())));
        }
        Ok(())
    }
}

/// One POST through the HTTP API; the length of the body that came back.
async fn http_call(
    client: &Client<HttpConnector, Full<Bytes>>,
    uri: &hyper::Uri,
    payload: &[u8],
) -> Result<usize, Status> {
    let request = hyper::Request::post(uri.clone())
        .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
        .body(Full::new(Bytes::copy_from_slice(payload)))
        .map_err(|e| Status::internal(format!("building the request: {e}")))?;
    let response = client.request(request).await.map_err(|e| Status::unavailable(format!("POST {uri}: {e}")))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| Status::unavailable(format!("reading the answer to POST {uri}: {e}")))?
        .to_bytes();
    if !status.is_success() {
        return Err(Status::unknown(format!("POST {uri}: {status}: {}", String::from_utf8_lossy(&body))));
    }
    Ok(body.len())
}
