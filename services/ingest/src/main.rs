//! `tandem-ingest`: reads the dataset once (a bad file ends it here, exit code 1, naming the
//! file, column and row), then serves `status` and publishes the batches through its sidecar.

use std::process::ExitCode;

use tandem_ingest::{Ingest, Options};
use tandem_pipeline::service;

#[global_allocator]
static ALLOCATOR: service::Allocator = service::Allocator;

fn main() -> ExitCode {
    service::run_main("tandem-ingest", run)
}

async fn run(options: Options) -> anyhow::Result<()> {
    let dataset = options.dataset.clone();
    let prepared = tokio::task::spawn_blocking(move || tandem_ingest::prepare(&dataset)).await??;
    tracing::info!(
        dataset_version = %prepared.manifest.dataset_version,
        train = prepared.manifest.counts.train_samples,
        test = prepared.manifest.counts.test_samples,
        "dataset read, split and versioned; the scaler is fitted"
    );
    let sidecar = service::sidecar_client(&options.service.sidecar)?;
    let listener = service::bind(&options.service).await?;
    let ingest = Ingest::new(prepared, sidecar.clone());
    let mut server = tokio::spawn(service::serve_until_signal(ingest.app_server(), listener));
    service::wait_for_sidecar(&sidecar, &options.service.sidecar, options.service.sidecar_wait()).await?;
    let publisher = tokio::spawn(async move { ingest.publish().await });
    tokio::select! {
        served = &mut server => served?,
        published = publisher => {
            published??;
            // Everything is published: keep answering `status` until stopped.
            server.await?;
        }
    }
    Ok(())
}
