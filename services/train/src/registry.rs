//! The model registry in train's state, which every replica shares (state.etcd): `model/vN`
//! (one [`ModelEntry`] per model), `model/latest` (a copy of the newest), `model/sequence` (the
//! last N handed out) and `run/RUN` (the version claimed by training run RUN).
//!
//! Every replica of a run ends with the same parameters and tries to register them; the first
//! to create `run/RUN` (a first-write-wins insert) names the run's one version, so a run
//! registers exactly one model whichever replicas finish or die. A replica that finds the
//! claim but not the entry (the claimer died in between) stores the entry itself: the same
//! weights, under the claimed version.

use tandem_pipeline::json;
use tandem_pipeline::messages::{ModelEntry, STATE_STORE};
use tandem_sdk::{Code, ConditionalWrite, SidecarClient, Status, WriteCondition};

pub const LATEST: &str = "model/latest";
const SEQUENCE: &str = "model/sequence";

/// Attempts at a compare-and-swap before giving up (each loses only to another writer).
const SWAP_ATTEMPTS: usize = 50;

pub fn entry_key(version: &str) -> String {
    format!("model/{version}")
}

fn run_key(run: &str) -> String {
    format!("run/{run}")
}

/// The version claimed by training run `run`, if any replica has registered it.
pub async fn claimed(sidecar: &SidecarClient, run: &str) -> Result<Option<String>, Status> {
    Ok(sidecar.get_state(STATE_STORE, &run_key(run)).await?.map(|e| String::from_utf8_lossy(&e.value).into_owned()))
}

/// Registers `entry` (its `model_version` and `sequence` are set here) as the one model of
/// training run `run`. Returns the registered entry and whether this call claimed the version.
///
/// The next sequence number and the run's claim are written in one transaction, so a run
/// that loses the race for the claim reserves no number: versions have no gaps.
pub async fn register_once(
    sidecar: &SidecarClient,
    run: &str,
    mut entry: ModelEntry,
) -> Result<(ModelEntry, bool), Status> {
    for _ in 0..SWAP_ATTEMPTS {
        if let Some(version) = claimed(sidecar, run).await? {
            if let Ok(stored) = get(sidecar, Some(&version)).await {
                return Ok((stored, false));
            }
            entry.sequence = version.trim_start_matches('v').parse().map_err(|_| {
                Status::internal(format!("run {run} claimed '{version}', which is not a registry version"))
            })?;
            entry.model_version = version;
            store(sidecar, &entry).await?;
            return Ok((entry, false));
        }
        let current = sidecar.get_state(STATE_STORE, SEQUENCE).await?;
        let last = current.as_ref().map_or(0, |e| String::from_utf8_lossy(&e.value).trim().parse::<u64>().unwrap_or(0));
        let (sequence, version) = (last + 1, format!("v{}", last + 1));
        let writes = vec![
            ConditionalWrite {
                key: SEQUENCE.into(),
                value: sequence.to_string().into_bytes(),
                condition: current.map_or(WriteCondition::Absent, |e| WriteCondition::Etag(e.etag)),
            },
            ConditionalWrite {
                key: run_key(run),
                value: version.clone().into_bytes(),
                condition: WriteCondition::Absent,
            },
        ];
        if sidecar.write_state_atomically(STATE_STORE, writes).await? {
            entry.sequence = sequence;
            entry.model_version = version;
            store(sidecar, &entry).await?;
            return Ok((entry, true));
        }
        // Another run took the number or another replica claimed this run: look again.
    }
    Err(Status::aborted(format!("could not register the model of run {run}: the registry kept changing")))
}

/// Stores `entry` under its version, and as the latest unless a newer one is there.
pub async fn store(sidecar: &SidecarClient, entry: &ModelEntry) -> Result<(), Status> {
    let data = json::encode(entry);
    sidecar.save_state(STATE_STORE, &entry_key(&entry.model_version), data.clone()).await?;
    let newer = match get(sidecar, None).await {
        Ok(latest) => latest.sequence > entry.sequence,
        Err(status) if status.code() == Code::NotFound => false,
        Err(status) => return Err(status),
    };
    if newer { Ok(()) } else { sidecar.save_state(STATE_STORE, LATEST, data).await }
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
