//! The model registry in train's state: `model/vN` (one [`ModelEntry`] per model),
//! `model/latest` (a copy of the newest) and `model/sequence` (the last N handed out).

use tandem_pipeline::json;
use tandem_pipeline::messages::{ModelEntry, STATE_STORE};
use tandem_sdk::{SidecarClient, Status};

pub const LATEST: &str = "model/latest";
const SEQUENCE: &str = "model/sequence";

pub fn entry_key(version: &str) -> String {
    format!("model/{version}")
}

/// The next sequence number and its version name (`v1`, `v2`, ...), reserved in state.
pub async fn next_version(sidecar: &SidecarClient) -> Result<(u64, String), Status> {
    let last = match sidecar.get_state(STATE_STORE, SEQUENCE).await? {
        Some(entry) => String::from_utf8_lossy(&entry.value).trim().parse::<u64>().unwrap_or(0),
        None => 0,
    };
    let next = last + 1;
    sidecar.save_state(STATE_STORE, SEQUENCE, next.to_string().into_bytes()).await?;
    Ok((next, format!("v{next}")))
}

/// Stores `entry` under its version and as the latest.
pub async fn store(sidecar: &SidecarClient, entry: &ModelEntry) -> Result<(), Status> {
    let data = json::encode(entry);
    sidecar.save_state(STATE_STORE, &entry_key(&entry.model_version), data.clone()).await?;
    sidecar.save_state(STATE_STORE, LATEST, data).await
}

/// The entry of `version` (the latest when `None`); NOT_FOUND naming what is missing.
pub async fn get(sidecar: &SidecarClient, version: Option<&str>) -> Result<ModelEntry, Status> {
    let key = version.map(entry_key).unwrap_or_else(|| LATEST.to_string());
    match sidecar.get_state(STATE_STORE, &key).await? {
        Some(stored) => json::decode(&stored.value, "the stored model entry").map_err(Status::internal),
        None => Err(match version {
            Some(version) => Status::not_found(format!("no model version '{version}' in the registry")),
            None => Status::not_found("no model trained yet"),
        }),
    }
}
