//! A model ready to serve: the classifier and its own preprocessing, built from a registry
//! entry, and the slot holding the current one.

use std::sync::{Arc, Mutex, RwLock};

use tandem_model::{Classifier, Device, MlpConfig, Prediction, Standardizer};
use tandem_pipeline::messages::ModelEntry;
use tandem_pipeline::weights;

/// A loaded model version.
pub struct LoadedModel {
    pub version: String,
    pub sequence: u64,
    pub feature_count: usize,
    standardizer: Standardizer,
    /// burn modules are `Send` but not necessarily `Sync`; one forward pass at a time anyway.
    classifier: Mutex<Classifier>,
    device: Device,
}

impl LoadedModel {
    /// Decodes an entry (CPU work: call it off the async runtime).
    pub fn from_entry(entry: &ModelEntry, device: &Device) -> Result<LoadedModel, String> {
        let bytes = weights::decode(&entry.weights)?;
        let config = MlpConfig {
            num_features: entry.feature_count as usize,
            hidden: entry.hidden.iter().map(|h| *h as usize).collect(),
            num_classes: entry.class_count as usize,
        };
        let classifier = Classifier::from_bytes(&config, &bytes, device)
            .map_err(|e| format!("model {} cannot be loaded: {e}", entry.model_version))?;
        if entry.preprocessing.mean.len() != config.num_features || entry.preprocessing.std.len() != config.num_features
        {
            return Err(format!("model {}'s preprocessing does not match its feature count", entry.model_version));
        }
        let standardizer =
            Standardizer { mean: entry.preprocessing.mean.clone(), std: entry.preprocessing.std.clone() };
        Ok(LoadedModel::new(&entry.model_version, entry.sequence, classifier, standardizer, device))
    }

    /// A model from its parts; `standardizer` must have one mean and std per feature.
    pub fn new(
        version: &str,
        sequence: u64,
        classifier: Classifier,
        standardizer: Standardizer,
        device: &Device,
    ) -> LoadedModel {
        LoadedModel {
            version: version.to_string(),
            sequence,
            feature_count: classifier.config().num_features,
            standardizer,
            classifier: Mutex::new(classifier),
            device: device.clone(),
        }
    }

    /// Standardizes and predicts `samples` (each of `feature_count` finite values). CPU work.
    pub fn predict(&self, samples: &[Vec<f32>]) -> Result<Vec<Prediction>, String> {
        let standardized = self.standardizer.transform_rows(samples, &self.device).map_err(|e| e.to_string())?;
        let classifier = self.classifier.lock().unwrap_or_else(|p| p.into_inner());
        classifier.predict(&standardized).map_err(|e| e.to_string())
    }
}

/// The current model; readers take a snapshot (`Arc`) and never wait for a load.
#[derive(Default)]
pub struct ModelSlot {
    current: RwLock<Option<Arc<LoadedModel>>>,
}

impl ModelSlot {
    pub fn current(&self) -> Option<Arc<LoadedModel>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Installs `model` if it is newer than the current one; returns whether it did.
    pub fn swap_if_newer(&self, model: Arc<LoadedModel>) -> bool {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_some_and(|c| c.sequence >= model.sequence) {
            return false;
        }
        *current = Some(model);
        true
    }

    pub fn sequence(&self) -> u64 {
        self.current().map_or(0, |m| m.sequence)
    }
}
