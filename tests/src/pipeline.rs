//! The AI pipeline, really started: etcd, each of `tandem-ingest`, `tandem-preprocess` and
//! `tandem-train` (any number of replicas of each) and `tandem-serve` beside its own tandemd (with the
//! repository's `components/<app>/` as its resources), and a `client` sidecar without an app
//! through which the test calls the services, so every call crosses the mesh.

use std::path::PathBuf;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tandem_pipeline::messages::{JSON, PredictResponse, ServeStatus, app_ids, methods};
use tandem_sdk::{CallOptions, SidecarClient, Status};

use crate::service::{RunningService, Service};
use crate::training::app_status;
use crate::{Etcd, RunningSidecar, Sidecar, eventually, free_port};

/// The repository's `components/<app>` directory.
pub fn components_dir(app: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("components").join(app)
}

/// What to start.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub preprocess_replicas: usize,
    /// Train replicas, one training group.
    pub train_replicas: usize,
    /// Serve replicas.
    pub serve_replicas: usize,
    pub ingest_args: Vec<String>,
    pub train_args: Vec<String>,
    pub serve_args: Vec<String>,
    /// Start ingest (false: only the other stages, e.g. to start it later with other flags).
    pub start_ingest: bool,
    /// Start train.
    pub start_train: bool,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            preprocess_replicas: 2,
            train_replicas: 1,
            serve_replicas: 1,
            ingest_args: Vec::new(),
            train_args: Vec::new(),
            serve_args: Vec::new(),
            start_ingest: true,
            start_train: true,
        }
    }
}

/// A service beside its sidecar.
pub struct Stage {
    pub app_id: String,
    pub app_port: u16,
    // Field order: the service stops before its sidecar.
    pub service: Option<RunningService>,
    pub sidecar: RunningSidecar,
}

impl Stage {
    /// Starts the sidecar of `app_id` (with `components/<app_id>/`) and, unless `args` is
    /// `None`, the service binary `tandem-<app_id>` with `args` after the common flags.
    pub async fn start(etcd: &Etcd, app_id: &str, args: Option<&[String]>) -> Stage {
        let app_port = free_port();
        let sidecar =
            Sidecar::new(app_id).etcd(etcd).app_port(app_port).resources(&components_dir(app_id)).spawn().await;
        let mut stage = Stage { app_id: app_id.into(), app_port, service: None, sidecar };
        if let Some(args) = args {
            stage.start_service(args).await;
        }
        stage
    }

    /// Starts (or restarts) the service beside this stage's sidecar.
    pub async fn start_service(&mut self, args: &[String]) {
        self.start_service_with_env(args, &[]).await;
    }

    /// Starts (or restarts) the service with environment variables of its own.
    pub async fn start_service_with_env(&mut self, args: &[String], env: &[(String, String)]) {
        let mut service = Service::new(&format!("tandem-{}", self.app_id))
            .args(["--app-port".to_string(), self.app_port.to_string()])
            .args(["--sidecar".to_string(), format!("http://{}", self.sidecar.grpc_addr())])
            .args(args.iter().cloned());
        for (key, value) in env {
            service = service.env(key, value);
        }
        self.service = Some(service.spawn().await);
    }

    pub fn service(&self) -> &RunningService {
        self.service.as_ref().expect("the stage's service is running")
    }

    /// Stops the service (SIGTERM) and waits for its exit.
    pub async fn stop_service(&mut self) {
        if let Some(mut service) = self.service.take() {
            service.terminate().await;
        }
    }
}

/// The whole pipeline.
pub struct Pipeline {
    pub ingest: Stage,
    pub preprocess: Vec<Stage>,
    pub train: Vec<Stage>,
    pub serve: Vec<Stage>,
    pub client_sidecar: RunningSidecar,
    /// A client of `client_sidecar`: every call through it crosses the mesh.
    pub client: SidecarClient,
    pub etcd: Etcd,
}

impl Pipeline {
    /// Starts everything, downstream first (the services do not need an order; this only
    /// makes the logs easier to read).
    pub async fn start(options: PipelineOptions) -> Pipeline {
        let etcd = Etcd::start().await;
        let mut serve = Vec::new();
        for _ in 0..options.serve_replicas {
            serve.push(Stage::start(&etcd, app_ids::SERVE, Some(&options.serve_args)).await);
        }
        let mut train = Vec::new();
        for _ in 0..options.train_replicas {
            train.push(
                Stage::start(&etcd, app_ids::TRAIN, options.start_train.then_some(&options.train_args[..])).await,
            );
        }
        let mut preprocess = Vec::new();
        for _ in 0..options.preprocess_replicas {
            preprocess.push(Stage::start(&etcd, app_ids::PREPROCESS, Some(&[])).await);
        }
        let ingest =
            Stage::start(&etcd, app_ids::INGEST, options.start_ingest.then_some(&options.ingest_args[..])).await;
        let client_sidecar = Sidecar::new("client").etcd(&etcd).spawn().await;
        let client = client_sidecar.client();
        Pipeline { ingest, preprocess, train, serve, client_sidecar, client, etcd }
    }

    /// Invokes `method` of `app_id` with a JSON body, through the client sidecar.
    pub async fn call<T: DeserializeOwned>(&self, app_id: &str, method: &str, body: &str) -> Result<T, Status> {
        let options = CallOptions::default().content_type(JSON).timeout(Duration::from_secs(60));
        let reply = self.client.invoke_with(app_id, method, body.as_bytes().to_vec(), options).await?;
        serde_json::from_slice(&reply.data)
            .map_err(|e| Status::internal(format!("{app_id} {method} answered unexpected JSON: {e}")))
    }

    /// `status` of `app_id`.
    pub async fn status<T: DeserializeOwned>(&self, app_id: &str) -> Result<T, Status> {
        self.call(app_id, methods::STATUS, "{}").await
    }

    /// serve `predict` with `body`.
    pub async fn predict(&self, body: &str) -> Result<PredictResponse, Status> {
        self.call(app_ids::SERVE, methods::PREDICT, body).await
    }

    /// Waits until every serve replica has the same model, other than `not`, loaded; returns
    /// its version.
    pub async fn wait_for_model(&self, not: Option<&str>, timeout: Duration) -> String {
        let version = std::sync::Mutex::new(None);
        let what = format!("every serve replica to load a model (other than {not:?})");
        eventually(timeout, &what, || {
            let found = &version;
            async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let mut versions = std::collections::BTreeSet::new();
                for replica in &self.serve {
                    match app_status::<ServeStatus>(replica.app_port).await {
                        Ok(ServeStatus { model_version: Some(v), .. }) if Some(v.as_str()) != not => versions.insert(v),
                        _ => return false,
                    };
                }
                if versions.len() != 1 {
                    return false;
                }
                *found.lock().unwrap() = versions.pop_first();
                true
            }
        })
        .await;
        version.into_inner().unwrap().expect("set when the wait ended")
    }
}
