//! `tandem-train`: serves the feature-batch subscription, `get_model` and `status` beside its
//! sidecar, and trains every complete dataset with the other replicas of its group (or, with
//! `--dataset`, that dataset on its own).

use std::process::ExitCode;

use anyhow::Context;
use tandem_model::{Dataset, SyntheticSpec};
use tandem_pipeline::service;
use tandem_train::progress::StepLog;
use tandem_train::service::Prepared;
use tandem_train::{Options, Train};

#[global_allocator]
static ALLOCATOR: service::Allocator = service::Allocator;

fn main() -> ExitCode {
    service::run_main("tandem-train", run)
}

async fn run(options: Options) -> anyhow::Result<()> {
    let group = options.group_settings().map_err(anyhow::Error::msg)?;
    let device = tandem_model::parse_device(&options.device)?;
    let config = options.training_config();
    // Load a --dataset before anything starts: a bad one fails at once, naming the problem.
    let prepared = match &options.dataset {
        Some(name) => Some(prepare(name, &options, &device).with_context(|| format!("--dataset {name}"))?),
        None => None,
    };
    let step_log = match &options.step_log {
        Some(path) => Some(
            StepLog::create(path, options.step_log_parameters)
                .with_context(|| format!("--step-log {}", path.display()))?,
        ),
        None => None,
    };
    let sidecar = service::sidecar_client(&options.service.sidecar)?;
    let listener = service::bind(&options.service).await?;
    let train = Train::new(sidecar.clone(), config, device, group, step_log);
    let server = tokio::spawn(service::serve_until_signal(train.app_server(), listener));
    service::wait_for_sidecar(&sidecar, &options.service.sidecar, options.service.sidecar_wait()).await?;
    match prepared {
        Some(prepared) => {
            let trainer = train.clone();
            tokio::spawn(async move {
                match trainer.train_standalone(prepared).await {
                    Ok(Some(entry)) => {
                        tracing::info!(model_version = %entry.model_version, "the run's model is registered")
                    }
                    Ok(None) => tracing::info!("other replicas finished the run"),
                    Err(error) => tracing::error!(%error, "training failed"),
                }
            });
        }
        None => {
            tokio::spawn(async move { train.watch_datasets().await });
        }
    }
    server.await?;
    Ok(())
}

fn prepare(name: &str, options: &Options, device: &tandem_model::Device) -> anyhow::Result<Prepared> {
    let data = if name == "digits" {
        Dataset::digits()
    } else if let Some(spec) = SyntheticSpec::parse(name)? {
        Dataset::synthetic(spec, options.seed)
    } else {
        Dataset::from_csv_file(std::path::Path::new(name), &options.label_column)?
    };
    Prepared::from_dataset(&data, options.test_fraction, options.seed, device).map_err(anyhow::Error::msg)
}
