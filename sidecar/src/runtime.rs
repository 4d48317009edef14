//! Builds a sidecar from its [`Config`], runs it, and shuts it down in order: stop being
//! ready, revoke the etcd lease (peers stop routing here), drain in-flight calls, exit.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tandem_proto::group::training_group_server::TrainingGroupServer;
use tandem_proto::internal::group_peer_server::GroupPeerServer;
use tandem_proto::internal::mesh_server::MeshServer;
use tandem_proto::runtime::dapr_server::DaprServer;
use tandem_transport::tls::{MeshTls, SpiffeId, TlsError};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use crate::api::group::TrainingGroupApi;
use crate::api::outbox::Outbox;
use crate::api::pubsub::PubSubApi;
use crate::api::state::StateApi;
use crate::api::token::{ApiToken, ApiTokenLayer};
use crate::api::universal::{RUNTIME_VERSION, SidecarInfo};
use crate::api::{DaprApi, Universal};
use crate::app_channel::{AppChannel, AppProtocol, GrpcApp, HttpApp};
use crate::config::Config;
use crate::configuration::Configuration;
use crate::discovery::{self, Backoff, EtcdTls, InstanceRecord, Registrar, RoutingTable, RoutingWatcher};
use crate::disk::DiskSpace;
use crate::group::peer::GroupPeerService;
use crate::group::{GroupSettings, Groups};
use crate::invoke::balance::{Balancer, Ejection};
use crate::invoke::channels::PeerChannels;
use crate::invoke::{Invoker, MeshInbound};
use crate::metrics::Metrics;
use crate::pubsub::local::LocalApp;
use crate::pubsub::registry::PubSubContext;
use crate::pubsub::streams::StreamSubscriptions;
use crate::pubsub::subscriptions::SubscriptionRegistrar;
use crate::pubsub::{DeliveryTargets, PubSubs};
use crate::readiness::Readiness;
use crate::state::registry::{self, StoreContext};
use crate::telemetry::TraceLayer;
use crate::{admin, components};
use tower::Layer;

/// The addresses the sidecar actually bound (ports of 0 resolved): the gRPC API, the HTTP API,
/// the internal (sidecar-to-sidecar) API and the admin server.
#[derive(Debug, Clone, Copy)]
pub struct BoundAddresses {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub internal: SocketAddr,
    pub admin: SocketAddr,
}

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot bind the {what} port on {address}: {source}")]
    Bind { what: &'static str, address: SocketAddr, source: std::io::Error },
    #[error("cannot create the data dir {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error("components: {0}")]
    Components(String),
    #[error("mutual TLS: {0}")]
    Tls(#[from] TlsError),
}

async fn bind(what: &'static str, address: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(address).await.map_err(|source| StartError::Bind { what, address, source })
}

/// How often the data dir's free space is checked besides the checks of each write.
const DISK_CHECK_EVERY: Duration = Duration::from_secs(1);

/// How often the TLS files are read again, for a rotation to take effect.
const TLS_RELOAD_EVERY: Duration = Duration::from_secs(1);

/// Runs the sidecar until `shutdown` resolves or the Shutdown RPC is called.
/// `on_bound` hears the bound addresses once every listener is up.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
    on_bound: impl FnOnce(BoundAddresses),
) -> Result<(), StartError> {
    config.validate().map_err(StartError::Config)?;
    let file = match &config.config {
        Some(path) => Configuration::load(path).map_err(StartError::Config)?,
        None => Configuration::default(),
    };
    let access = file.access_control.map(Arc::new);
    // The Configuration's trust domain, when it names one, is this sidecar's; its
    // `mtls.enabled` turns mutual TLS on as the flag does.
    let trust_domain = file.trust_domain.unwrap_or(config.trust_domain.clone());
    crate::config::validate_name("trust domain", &trust_domain).map_err(StartError::Config)?;
    let mut config = config;
    config.enable_mtls |= file.mtls_enabled;
    let etcd_tls = config.etcd_tls().map_err(StartError::Config)?;
    // Before anything is opened or bound: a sidecar that cannot prove who it is must not start.
    let tls = match config.tls_sources().map_err(StartError::Config)? {
        Some(sources) => {
            let own_id = SpiffeId::new(&trust_domain, &config.namespace, &config.app_id);
            Some(MeshTls::load(sources, own_id)?)
        }
        None => None,
    };
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|source| StartError::DataDir { path: config.data_dir.display().to_string(), source })?;

    let specs = match &config.resources_path {
        Some(dir) => components::load_dir(dir).map_err(StartError::Components)?,
        None => Vec::new(),
    };
    let declared = match &config.resources_path {
        Some(dir) => crate::pubsub::declared::load_dir(dir, &config.app_id).map_err(StartError::Components)?,
        None => Vec::new(),
    };
    // Before the stores open: on a full disk, the reserve is released so that they can.
    let disk = Arc::new(DiskSpace::new(&config.data_dir, config.min_free_disk as u64, config.disk_reserve as u64));
    {
        let disk = disk.clone();
        tokio::task::spawn_blocking(move || disk.prepare()).await.map_err(|e| StartError::Config(e.to_string()))?;
    }
    disk.spawn_monitor(DISK_CHECK_EVERY);
    let store_context = StoreContext {
        app_id: &config.app_id,
        namespace: &config.namespace,
        data_dir: &config.data_dir,
        etcd_endpoints: &config.etcd_endpoints,
        etcd_tls: etcd_tls.as_ref(),
        disk: &disk,
    };
    let stores = registry::build_all(&specs, &store_context).await.map_err(StartError::Components)?;
    let metrics = Arc::new(Metrics::new());

    let grpc_listener = bind("gRPC API", config.grpc_addr()).await?;
    let http_listener = bind("HTTP API", config.http_addr()).await?;
    let internal_listener = bind("internal", config.internal_addr()).await?;
    let admin_listener = bind("admin", config.admin_addr()).await?;
    let local = |l: &TcpListener| l.local_addr().expect("a bound listener has an address");
    let bound = BoundAddresses {
        grpc: local(&grpc_listener),
        http: local(&http_listener),
        internal: local(&internal_listener),
        admin: local(&admin_listener),
    };
    let internal_address = match &config.advertise_address {
        Some(host) => format!("{host}:{}", bound.internal.port()),
        None if bound.internal.ip().is_unspecified() => {
            return Err(StartError::Config(format!(
                "--listen-address {} is not an address peers can dial; set --advertise-address",
                config.listen_address
            )));
        }
        None => bound.internal.to_string(),
    };
    // Recorded in discovery so tools can find the sidecar of an app (all listeners share one
    // address, so the advertised host serves the API too).
    let api_address = match &config.advertise_address {
        Some(host) => format!("{host}:{}", bound.grpc.port()),
        None => bound.grpc.to_string(),
    };

    let instance_id = uuid::Uuid::new_v4().simple().to_string();
    let readiness = Arc::new(Readiness::new(config.app_port.is_some()).with_disk(disk.clone()));
    let routing = RoutingTable::new();
    let pubsub_context = PubSubContext {
        app_id: &config.app_id,
        namespace: &config.namespace,
        data_dir: &config.data_dir,
        routing: &routing,
        metrics: &metrics,
        disk: &disk,
    };
    let pubsubs = crate::pubsub::registry::build_all(&specs, &pubsub_context).await.map_err(StartError::Components)?;
    let streams = Arc::new(StreamSubscriptions::default());
    let pubsub_api =
        Arc::new(PubSubApi::new(config.app_id.clone(), pubsubs.clone(), config.max_body_size, streams.clone()));
    let mut outboxes = BTreeMap::new();
    let mut relays = Vec::new();
    for store in stores.values().filter(|store| store.outbox.is_some()) {
        let (outbox, relay) =
            Outbox::new(store.clone(), &config.app_id, &instance_id, pubsub_api.clone(), metrics.clone())
                .map_err(StartError::Components)?;
        outboxes.insert(store.name.clone(), outbox);
        relays.push(relay);
    }
    let state = Arc::new(StateApi::new(config.app_id.clone(), stores, outboxes, config.max_body_size, metrics.clone()));
    let peers = PeerChannels::new(tls.clone());
    let app_token = config.app_api_token.clone().filter(|token| !token.is_empty());
    let app = match config.app_port {
        Some(port) => Some(match config.app_protocol {
            AppProtocol::Grpc => AppChannel::Grpc(
                GrpcApp::new(&config.app_host, port, app_token.as_deref()).map_err(StartError::Config)?,
            ),
            AppProtocol::Http => AppChannel::Http(Box::new(
                HttpApp::new(
                    &config.app_host,
                    port,
                    config.enable_app_health_check.then(|| config.app_health_check_path.clone()),
                    app_token.as_deref(),
                )
                .map_err(StartError::Config)?,
            )),
        }),
        None => None,
    };
    let info = SidecarInfo {
        app_id: config.app_id.clone(),
        namespace: config.namespace.clone(),
        instance_id: instance_id.clone(),
        internal_address: internal_address.clone(),
        app_host: config.app_host.clone(),
        app_port: config.app_port,
        app_protocol: config.app_protocol.as_str(),
    };
    let groups = Arc::new(Groups::new(
        config.namespace.clone(),
        config.app_id.clone(),
        instance_id.clone(),
        internal_address.clone(),
        GroupSettings {
            lease_ttl: config.lease_ttl,
            operation_timeout: config.group_timeout,
            default_last_call: config.group_last_call,
        },
        peers.clone(),
        metrics.clone(),
    ));
    let record = InstanceRecord {
        app_id: config.app_id.clone(),
        instance_id: instance_id.clone(),
        internal_address,
        has_app: app.is_some(),
        runtime_version: RUNTIME_VERSION.to_string(),
        api_address: Some(api_address),
    };

    // Tokens, in the order they are cancelled on shutdown.
    let api_shutdown = CancellationToken::new();
    let registration_stop = CancellationToken::new();
    let serving_stop = CancellationToken::new();
    let background_stop = CancellationToken::new();

    let ejection = Ejection { base: config.ejection_base_time, max: config.ejection_max_time };
    let balancer = Balancer::new(config.lb_policy, ejection, config.concurrency_limit, metrics.invoke_ejections());
    let invoker = Arc::new(Invoker::new(
        config.app_id.clone(),
        config.namespace.clone(),
        routing.clone(),
        peers.clone(),
        balancer,
    ));
    // Room for several values of --max-body-size plus keys and metadata in one request;
    // each value is checked against the limit itself, with a clearer message.
    let request_limit = config.max_body_size.saturating_mul(4);
    let universal =
        Arc::new(Universal::new(info, invoker.clone(), state, pubsub_api, metrics.clone(), api_shutdown.clone()));
    let dapr = DaprServer::new(DaprApi::new(universal.clone()))
        .max_decoding_message_size(request_limit)
        .max_encoding_message_size(usize::MAX);
    let mesh = MeshServer::new(MeshInbound::new(config.app_id.clone(), app.clone(), streams.clone(), access.clone()))
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    // Gradient buffers and trainer states are as large as the model (and three times that).
    let group_api = TrainingGroupServer::new(TrainingGroupApi::new(groups.clone(), metrics.clone()))
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    let group_peer = GroupPeerServer::new(GroupPeerService::new(groups.clone()))
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);

    let drain = config.drain_timeout;
    let api_token =
        config.api_token.as_deref().filter(|token| !token.is_empty()).map(|token| ApiToken::new(token, "this sidecar"));
    let api_token_layer = ApiTokenLayer::new(api_token.clone());
    let stopped = |token: &CancellationToken| {
        let token = token.clone();
        async move { token.cancelled().await }
    };
    let servers: Vec<JoinHandle<()>> = vec![
        tokio::spawn(tandem_transport::serve_grpc(
            grpc_listener,
            TraceLayer.layer(api_token_layer.layer(Routes::new(dapr).add_service(group_api))),
            stopped(&serving_stop),
            drain,
        )),
        match &tls {
            None => tokio::spawn(tandem_transport::serve_grpc(
                internal_listener,
                TraceLayer.layer(Routes::new(mesh).add_service(group_peer)),
                stopped(&serving_stop),
                drain,
            )),
            Some(tls) => tokio::spawn(tandem_transport::serve_grpc_tls(
                internal_listener,
                TraceLayer.layer(Routes::new(mesh).add_service(group_peer)),
                tls.clone(),
                stopped(&serving_stop),
                drain,
            )),
        },
        tokio::spawn(admin::serve(
            http_listener,
            crate::api::http::router(
                universal.clone(),
                config.max_body_size,
                api_token,
                admin::dapr_health(readiness.clone(), routing.clone()),
            ),
            stopped(&serving_stop),
        )),
        tokio::spawn(admin::serve(
            admin_listener,
            admin::router(readiness.clone(), routing.clone(), metrics.clone(), pubsubs.clone()),
            stopped(&serving_stop),
        )),
    ];

    tracing::info!(
        app_id = %config.app_id,
        instance_id = %instance_id,
        grpc = %bound.grpc,
        http = %bound.http,
        internal = %bound.internal,
        admin = %bound.admin,
        mtls = %tls.as_ref().map_or("off".to_string(), |tls| tls.own_id().to_string()),
        "tandemd listening"
    );
    on_bound(bound);

    if let Some(tls) = tls.clone() {
        let stop = background_stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tls.watch(TLS_RELOAD_EVERY) => {}
                _ = stop.cancelled() => {}
            }
        });
    }

    if let Some(app) = app.clone() {
        tokio::spawn(app.probe_health(readiness.clone(), config.app_health_probe_interval, background_stop.clone()));
    }
    tokio::spawn(peers.prune_on_routing_changes(routing.clone()));
    let targets = DeliveryTargets {
        remote: invoker.clone(),
        local: Arc::new(LocalApp {
            app_id: config.app_id.clone(),
            app: app.clone(),
            streams: streams.clone(),
            readiness: readiness.clone(),
        }),
    };
    for pubsub in pubsubs.values() {
        pubsub.clone().start(targets.clone(), background_stop.clone());
    }
    for relay in relays {
        tokio::spawn(relay.run(background_stop.clone()));
    }
    let discovery = tokio::spawn(
        Discovery {
            config: config.clone(),
            etcd_tls,
            record,
            routing,
            readiness: readiness.clone(),
            app: app.clone(),
            pubsubs: pubsubs.clone(),
            streams,
            groups,
            declared,
        }
        .run(registration_stop.clone(), background_stop.clone()),
    );

    tokio::select! {
        _ = shutdown => tracing::info!("shutdown signal received"),
        _ = api_shutdown.cancelled() => {}
    }

    // 1. Not ready any more; 2. leave discovery so peers stop routing here.
    readiness.set_shutting_down();
    registration_stop.cancel();
    if tokio::time::timeout(Duration::from_secs(5), discovery).await.is_err() {
        tracing::warn!("leaving discovery took too long; peers drop this instance when its lease expires");
    }
    // 3. Drain: each server stops accepting and waits for its in-flight calls.
    serving_stop.cancel();
    for server in servers {
        let _ = server.await;
    }
    background_stop.cancel();
    tracing::info!("tandemd stopped");
    Ok(())
}

/// What the sidecar needs from etcd once it can reach it.
struct Discovery {
    config: Config,
    etcd_tls: Option<EtcdTls>,
    record: InstanceRecord,
    routing: RoutingTable,
    readiness: Arc<Readiness>,
    app: Option<AppChannel>,
    pubsubs: PubSubs,
    streams: Arc<StreamSubscriptions>,
    groups: Arc<Groups>,
    /// The `Subscription` files of `--resources-path` that apply to this app.
    declared: Vec<tandem_proto::runtime::TopicSubscription>,
}

impl Discovery {
    /// Connects to etcd (retrying with backoff while it is unreachable), then keeps the
    /// routing table, this instance's registration and the app's subscriptions until stopped.
    /// Returns once the lease is revoked.
    async fn run(self, registration_stop: CancellationToken, background_stop: CancellationToken) {
        let Discovery { config, etcd_tls, record, routing, readiness, app, pubsubs, streams, groups, declared } = self;
        let mut backoff = Backoff::new();
        let client = loop {
            let attempt = tokio::select! {
                _ = registration_stop.cancelled() => return,
                attempt = discovery::etcd_client(&config.etcd_endpoints, etcd_tls.as_ref()) => attempt,
            };
            match attempt {
                Ok(client) => break client,
                Err(e) => tracing::warn!(error = %e, endpoints = ?config.etcd_endpoints, "cannot reach etcd; retrying"),
            }
            tokio::select! {
                _ = registration_stop.cancelled() => return,
                _ = tokio::time::sleep(backoff.step()) => {}
            }
        };
        streams.set_registry(client.clone(), config.namespace.clone(), config.app_id.clone());
        groups.set_etcd(client.clone());
        let watcher = RoutingWatcher::new(client.clone(), config.namespace.clone(), routing);
        tokio::spawn(watcher.run(background_stop.clone()));
        if let Some(app) = app {
            let subscriptions = SubscriptionRegistrar {
                client: client.clone(),
                namespace: config.namespace.clone(),
                app_id: config.app_id.clone(),
                app,
                pubsubs,
                readiness: readiness.clone(),
                streams: streams.clone(),
                declared,
            };
            tokio::spawn(subscriptions.run(background_stop));
        }
        Registrar::new(client, config.namespace, record, config.lease_ttl, readiness).run(registration_stop).await;
    }
}
