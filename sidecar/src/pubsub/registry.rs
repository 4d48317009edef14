//! The one place where a component's type string becomes a pub/sub component.

use std::path::Path;
use std::sync::Arc;

use super::jetstream::JetStreamPubSub;
use super::{DEFAULT_PUBSUB, DeliveryPolicy, EMBEDDED, EmbeddedPubSub, PubSub, PubSubs};
use crate::components::ComponentSpec;
use crate::discovery::RoutingTable;
use crate::disk::DiskSpace;
use crate::metrics::Metrics;

/// The pub/sub types tandemd can build.
pub const KINDS: &[&str] = &[EMBEDDED, super::jetstream::JETSTREAM];

/// What components need from the sidecar's own settings.
#[derive(Clone)]
pub struct PubSubContext<'a> {
    pub app_id: &'a str,
    pub namespace: &'a str,
    pub data_dir: &'a Path,
    pub routing: &'a RoutingTable,
    pub metrics: &'a Arc<Metrics>,
    /// The data dir's free space (pubsub.embedded keeps events there).
    pub disk: &'a Arc<DiskSpace>,
}

/// Builds every pub/sub component in `specs` (other building blocks are skipped); with none,
/// `pubsub` of type `pubsub.embedded`. Errors name the component's file.
pub async fn build_all(specs: &[ComponentSpec], ctx: &PubSubContext<'_>) -> Result<PubSubs, String> {
    let mut built = PubSubs::new();
    for spec in specs.iter().filter(|s| s.block() == "pubsub") {
        let pubsub =
            build(spec, ctx).await.map_err(|e| format!("{}: component '{}': {e}", spec.file.display(), spec.name))?;
        built.insert(spec.name.clone(), pubsub);
    }
    if built.is_empty() {
        let path = ctx.data_dir.join("pubsub").join(DEFAULT_PUBSUB);
        let pubsub = EmbeddedPubSub::open(
            DEFAULT_PUBSUB,
            &path,
            ctx.routing.clone(),
            DeliveryPolicy::default(),
            ctx.metrics.clone(),
        )
        .map_err(|e| e.to_string())?
        .with_disk(ctx.disk.clone());
        built.insert(DEFAULT_PUBSUB.to_string(), Arc::new(pubsub));
    }
    Ok(built)
}

async fn build(spec: &ComponentSpec, ctx: &PubSubContext<'_>) -> Result<Arc<dyn PubSub>, String> {
    let policy = DeliveryPolicy::from_component(spec)?;
    match spec.kind.as_str() {
        EMBEDDED => {
            let path = ctx.data_dir.join("pubsub").join(&spec.name);
            let pubsub = EmbeddedPubSub::open(&spec.name, &path, ctx.routing.clone(), policy, ctx.metrics.clone())
                .map_err(|e| e.to_string())?
                .with_disk(ctx.disk.clone());
            Ok(Arc::new(pubsub))
        }
        super::jetstream::JETSTREAM => Ok(Arc::new(JetStreamPubSub::build(spec, ctx, policy).await?)),
        other => Err(format!("spec.type '{other}' is not a pub/sub tandemd knows (known: {})", KINDS.join(", "))),
    }
}
