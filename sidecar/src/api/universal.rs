//! The building blocks' logic that both front ends share (Dapr's `pkg/api/universal`): the
//! gRPC API ([`super::grpc`]) and the HTTP API ([`super::http`]) only translate their protocol
//! to these calls and the answers back. State and pub/sub live in [`super::state`] and
//! [`super::pubsub`]; this holds them together with invocation, metadata and shutdown.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tandem_proto::runtime::{AppConnectionProperties, GetMetadataResponse};
use tokio_util::sync::CancellationToken;

use super::pubsub::PubSubApi;
use super::state::StateApi;
use crate::invoke::Invoker;
use crate::metrics::Metrics;

pub const RUNTIME_VERSION: &str = concat!("tandem-", env!("CARGO_PKG_VERSION"));

/// What GetMetadata reports about this sidecar.
#[derive(Debug, Clone)]
pub struct SidecarInfo {
    pub app_id: String,
    pub namespace: String,
    pub instance_id: String,
    pub internal_address: String,
    pub app_host: String,
    pub app_port: Option<u16>,
    /// `http` or `grpc`.
    pub app_protocol: &'static str,
}

/// The app-facing API's building blocks, shared by both front ends.
pub struct Universal {
    pub info: SidecarInfo,
    pub invoker: Arc<Invoker>,
    pub state: Arc<StateApi>,
    pub pubsub: Arc<PubSubApi>,
    pub metrics: Arc<Metrics>,
    /// Cancelled by a shutdown request; the runtime then drains and exits.
    shutdown: CancellationToken,
    /// What apps set with SetMetadata / `PUT /v1.0/metadata/{key}`, shown in GetMetadata.
    custom_metadata: Mutex<BTreeMap<String, String>>,
}

impl Universal {
    pub fn new(
        info: SidecarInfo,
        invoker: Arc<Invoker>,
        state: Arc<StateApi>,
        pubsub: Arc<PubSubApi>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Self {
        Universal { info, invoker, state, pubsub, metrics, shutdown, custom_metadata: Mutex::new(BTreeMap::new()) }
    }

    /// What GetMetadata answers.
    pub fn metadata(&self) -> GetMetadataResponse {
        let info = &self.info;
        let mut extended_metadata: HashMap<String, String> =
            self.custom_metadata.lock().unwrap_or_else(|p| p.into_inner()).clone().into_iter().collect();
        extended_metadata.extend([
            ("tandem.namespace".to_string(), info.namespace.clone()),
            ("tandem.instance-id".to_string(), info.instance_id.clone()),
            ("tandem.internal-address".to_string(), info.internal_address.clone()),
        ]);
        GetMetadataResponse {
            id: info.app_id.clone(),
            runtime_version: RUNTIME_VERSION.to_string(),
            extended_metadata,
            registered_components: [self.state.registered_components(), self.pubsub.registered_components()].concat(),
            app_connection_properties: Some(AppConnectionProperties {
                port: info.app_port.map(i32::from).unwrap_or(0),
                protocol: info.app_protocol.into(),
                channel_address: info.app_host.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// SetMetadata: a key the app sets is shown in GetMetadata's extended metadata (an empty
    /// key is ignored, as in Dapr).
    pub fn set_metadata(&self, key: String, value: String) {
        if !key.is_empty() {
            self.custom_metadata.lock().unwrap_or_else(|p| p.into_inner()).insert(key, value);
        }
    }

    /// The Shutdown call: the runtime stops being ready, leaves discovery, drains and exits.
    pub fn shutdown(&self) {
        tracing::info!("shutdown requested through the API");
        self.shutdown.cancel();
    }
}
