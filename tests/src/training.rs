//! Train replicas, really started: each `tandem-train` beside its own tandemd (with the
//! repository's `components/train/`, whose state store is shared through etcd), all in one
//! training group. Each replica's status is read straight from its app port (the mesh would
//! pick any replica), and its step log (`--step-log`) from its own file.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use tandem_pipeline::messages::{JSON, ModelEntry, TrainPhase, TrainStatus, app_ids, methods};
use tandem_proto::common::InvokeRequest;
use tandem_proto::prost_types::Any;
use tandem_proto::runtime::app_callback_client::AppCallbackClient;
use tandem_sdk::{CallOptions, SidecarClient, Status};
use tempfile::TempDir;

use crate::pipeline::Stage;
use crate::{Etcd, RunningSidecar, Sidecar, eventually};

/// One line of a replica's step log.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct StepLine {
    pub step: u64,
    pub round: u64,
    pub rank: u32,
    pub world_size: u32,
    pub loss: f32,
    pub parameters_hash: String,
    #[serde(default)]
    pub parameters: Option<Vec<f32>>,
}

/// A group of train replicas on one etcd, with a client sidecar for calls through the mesh.
pub struct TrainGroup {
    pub replicas: Vec<Stage>,
    pub args: Vec<String>,
    /// Environment variables of every replica's service (e.g. `RAYON_NUM_THREADS`).
    pub env: Vec<(String, String)>,
    logs: TempDir,
    started: usize,
    pub client_sidecar: RunningSidecar,
    pub client: SidecarClient,
}

impl TrainGroup {
    /// Starts `count` replicas with `args` (each also gets its own `--step-log`).
    pub async fn start(etcd: &Etcd, count: usize, args: &[&str]) -> TrainGroup {
        Self::start_with_env(etcd, count, args, &[]).await
    }

    /// As [`TrainGroup::start`], every replica's service with `env` set.
    pub async fn start_with_env(etcd: &Etcd, count: usize, args: &[&str], env: &[(&str, &str)]) -> TrainGroup {
        let client_sidecar = Sidecar::new("client").etcd(etcd).spawn().await;
        let client = client_sidecar.client();
        let mut group = TrainGroup {
            replicas: Vec::new(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            logs: tempfile::tempdir().expect("a temp dir for step logs"),
            started: 0,
            client_sidecar,
            client,
        };
        for _ in 0..count {
            group.add_replica(etcd).await;
        }
        group
    }

    /// Starts one more replica (a late joiner when the group already trains); returns its index.
    pub async fn add_replica(&mut self, etcd: &Etcd) -> usize {
        self.add_replica_with(etcd, &[]).await
    }

    /// Starts one more replica with `extra` flags after the group's.
    pub async fn add_replica_with(&mut self, etcd: &Etcd, extra: &[&str]) -> usize {
        let index = self.started;
        self.started += 1;
        let mut args = self.args.clone();
        args.extend(extra.iter().map(|a| a.to_string()));
        args.push("--step-log".into());
        args.push(self.step_log_path(index).display().to_string());
        let mut stage = Stage::start(etcd, app_ids::TRAIN, None).await;
        stage.start_service_with_env(&args, &self.env).await;
        self.replicas.push(stage);
        self.replicas.len() - 1
    }

    fn step_log_path(&self, index: usize) -> PathBuf {
        self.logs.path().join(format!("replica-{index}.jsonl"))
    }

    /// The step log of the replica started `index`-th (kept after the replica is gone).
    pub fn step_log(&self, index: usize) -> Vec<StepLine> {
        let text = std::fs::read_to_string(self.step_log_path(index)).unwrap_or_default();
        text.lines().map(|line| serde_json::from_str(line).expect("a step log line")).collect()
    }

    /// The status of replica `index`, straight from its app.
    pub async fn status(&self, index: usize) -> Result<TrainStatus, Status> {
        replica_status(self.replicas[index].app_port).await
    }

    /// Waits until replica `index` reports `condition` (its latest status is given when the wait fails).
    pub async fn wait_for(
        &self,
        index: usize,
        timeout: Duration,
        what: &str,
        condition: impl Fn(&TrainStatus) -> bool,
    ) {
        let last = std::sync::Mutex::new(None);
        let described = format!("replica {index}: {what}");
        eventually(timeout, &described, || async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let status = self.status(index).await.ok();
            let met = status.as_ref().is_some_and(&condition);
            *last.lock().unwrap() = status;
            met
        })
        .await;
    }

    /// Waits until replica `index` has a model; returns the version.
    pub async fn wait_for_model(&self, index: usize, timeout: Duration) -> String {
        self.wait_for(index, timeout, "a registered model", |s| {
            s.phase == TrainPhase::Ready && s.model_version.is_some()
        })
        .await;
        self.status(index).await.unwrap().model_version.unwrap()
    }

    /// `get_model` through the mesh (`None`: the latest).
    pub async fn model(&self, version: Option<&str>) -> Result<ModelEntry, Status> {
        let body = match version {
            Some(version) => format!(r#"{{"version":"{version}"}}"#),
            None => "{}".to_string(),
        };
        let options = CallOptions::default().content_type(JSON).timeout(Duration::from_secs(30));
        let reply = self.client.invoke_with(app_ids::TRAIN, methods::GET_MODEL, body.into_bytes(), options).await?;
        serde_json::from_slice(&reply.data)
            .map_err(|e| Status::internal(format!("get_model answered unexpected JSON: {e}")))
    }

    /// kill -9 of replica `index`'s service and its sidecar.
    pub async fn kill(&mut self, index: usize) {
        if let Some(service) = self.replicas[index].service.as_mut() {
            service.kill9().await;
        }
        self.replicas[index].sidecar.kill9().await;
    }
}

/// `status` of the train replica serving on `app_port`, asked directly.
pub async fn replica_status(app_port: u16) -> Result<TrainStatus, Status> {
    app_status(app_port).await
}

/// `status` of the service replica serving on `app_port`, asked directly (the mesh picks a
/// replica by itself).
pub async fn app_status<T: serde::de::DeserializeOwned>(app_port: u16) -> Result<T, Status> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{app_port}"))
        .map_err(|e| Status::internal(e.to_string()))?;
    let mut client = AppCallbackClient::new(endpoint.connect_lazy());
    let mut request = tonic::Request::new(InvokeRequest {
        method: methods::STATUS.into(),
        data: Some(Any { type_url: String::new(), value: b"{}".to_vec() }),
        content_type: JSON.into(),
        http_extension: None,
    });
    request.set_timeout(Duration::from_secs(5));
    let reply = client.on_invoke(request).await?.into_inner();
    let data = reply.data.map(|any| any.value).unwrap_or_default();
    serde_json::from_slice(&data).map_err(|e| Status::internal(format!("status answered unexpected JSON: {e}")))
}

/// The largest element difference of two parameter buffers over the largest magnitude of `b`.
pub fn relative_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "parameter buffers of different lengths");
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}
