//! `tandem-train`: serves the feature-batch subscription, `get_model` and `status` beside its
//! sidecar; resumes a training interrupted by a restart.

use std::process::ExitCode;

use tandem_pipeline::service;
use tandem_train::{Options, Train};

#[global_allocator]
static ALLOCATOR: service::Allocator = service::Allocator;

fn main() -> ExitCode {
    service::run_main("tandem-train", run)
}

async fn run(options: Options) -> anyhow::Result<()> {
    let device = tandem_model::parse_device(&options.device)?;
    let config = options.training_config();
    let sidecar = service::sidecar_client(&options.service.sidecar)?;
    let listener = service::bind(&options.service).await?;
    let train = Train::new(sidecar.clone(), config, device);
    let server = tokio::spawn(service::serve_until_signal(train.app_server(), listener));
    service::wait_for_sidecar(&sidecar, &options.service.sidecar, options.service.sidecar_wait()).await?;
    train.resume().await?;
    server.await?;
    Ok(())
}
