//! `tandem-serve`: serves `predict` and `status` beside its sidecar, loading each new model
//! that train announces on `model.ready`.

use std::process::ExitCode;

use tandem_pipeline::service;
use tandem_serve::metrics::ServeMetrics;
use tandem_serve::{Options, Serve};

#[global_allocator]
static ALLOCATOR: service::Allocator = service::Allocator;

fn main() -> ExitCode {
    service::run_main("tandem-serve", run)
}

async fn run(options: Options) -> anyhow::Result<()> {
    let device = tandem_model::parse_device(&options.device)?;
    let sidecar = service::sidecar_client(&options.service.sidecar)?;
    let listener = service::bind(&options.service).await?;
    let metrics = ServeMetrics::new();
    if let Some(port) = options.metrics_port {
        let (listener, address) = ServeMetrics::bind(&options.metrics_host, port).await?;
        tracing::info!(%address, "serving /metrics");
        tokio::spawn(metrics.clone().serve(listener));
    }
    let serve = Serve::new(sidecar.clone(), options.batching(), device, metrics);
    let server = tokio::spawn(service::serve_until_signal(serve.app_server(), listener));
    service::wait_for_sidecar(&sidecar, &options.service.sidecar, options.service.sidecar_wait()).await?;
    tokio::spawn(serve.clone().follow_registry(options.model_poll()));
    server.await?;
    Ok(())
}
