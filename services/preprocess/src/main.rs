//! `tandem-preprocess`: serves the raw-batch subscription and `status` beside its sidecar.
//! Any number of replicas may run, each beside its own sidecar, sharing one `state.etcd` store.

use std::process::ExitCode;

use tandem_pipeline::service;
use tandem_preprocess::{Options, Preprocess};

#[global_allocator]
static ALLOCATOR: service::Allocator = service::Allocator;

fn main() -> ExitCode {
    service::run_main("tandem-preprocess", run)
}

async fn run(options: Options) -> anyhow::Result<()> {
    let sidecar = service::sidecar_client(&options.service.sidecar)?;
    let listener = service::bind(&options.service).await?;
    let preprocess = Preprocess::new(sidecar.clone(), tandem_model::parse_device(&options.device)?);
    let server = tokio::spawn(service::serve_until_signal(preprocess.app_server(), listener));
    service::wait_for_sidecar(&sidecar, &options.service.sidecar, options.service.sidecar_wait()).await?;
    tokio::spawn(async move { preprocess.wait_for_train().await });
    server.await?;
    Ok(())
}
