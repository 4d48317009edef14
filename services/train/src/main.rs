//! `tandem-train`: serves the feature-batch subscription, `get_model` and `status` beside its
//! sidecar; resumes a training interrupted by a restart.

use std::process::ExitCode;

use clap::Parser;
use tandem_pipeline::service;
use tandem_train::{Options, Train};

#[global_allocator]
static ALLOCATOR: service::Allocator = service::Allocator;

#[tokio::main]
async fn main() -> ExitCode {
    let options = Options::parse();
    service::init_logging();
    match run(options).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tandem-train: {error:#}");
            ExitCode::FAILURE
        }
    }
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
    server.await??;
    Ok(())
}
