//! Trains the default MLP on the digits dataset and prints per-epoch progress, the test accuracy
//! and the time taken: `cargo run -p tandem-model --example train_digits [-- DEVICE]`.

use std::time::Instant;

use tandem_model::{Dataset, Standardizer, TrainingConfig, parse_device, train};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = parse_device(&std::env::args().nth(1).unwrap_or_else(|| "cpu".into()))?;
    let config = TrainingConfig::default();
    let split = Dataset::digits().split(0.2, config.seed)?;
    let scaler = Standardizer::fit(&split.train, &device);
    let train_set = scaler.transform(&split.train, &device)?;
    let test_set = scaler.transform(&split.test, &device)?;
    let started = Instant::now();
    let classifier = train(&train_set, &config, &device, |progress| {
        println!(
            "epoch {:>3}/{}  loss {:.4}  train accuracy {:.4}",
            progress.epoch, progress.epochs, progress.loss, progress.train_accuracy
        );
    })?;
    let trained_in = started.elapsed();
    let evaluation = classifier.evaluate(&test_set)?;
    println!(
        "test accuracy {:.4} ({} samples), loss {:.4}; trained {} samples x {} epochs in {:.2?}",
        evaluation.accuracy,
        evaluation.samples,
        evaluation.loss,
        train_set.len(),
        config.epochs,
        trained_in
    );
    Ok(())
}
