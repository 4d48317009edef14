//! JSON in and out of invocations and events.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tandem_sdk::{Reply, Status};

use crate::messages::JSON;

/// `value` as a JSON reply.
pub fn reply<T: Serialize>(value: &T) -> Result<Reply, Status> {
    let data = serde_json::to_vec(value).map_err(|e| Status::internal(format!("encoding the answer: {e}")))?;
    Ok(Reply { data, content_type: JSON.into(), metadata: Vec::new() })
}

/// Parses a request body; malformed JSON is INVALID_ARGUMENT naming what was wrong. An empty
/// body reads as `{}`.
pub fn request<T: DeserializeOwned>(data: &[u8], what: &str) -> Result<T, Status> {
    let data: &[u8] = if data.iter().all(u8::is_ascii_whitespace) { b"{}" } else { data };
    serde_json::from_slice(data).map_err(|e| Status::invalid_argument(format!("{what} is not valid JSON: {e}")))
}

/// Encodes an event payload.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("pipeline messages always encode")
}

/// Decodes a stored value or an event; the error names `what`.
pub fn decode<T: DeserializeOwned>(data: &[u8], what: &str) -> Result<T, String> {
    serde_json::from_slice(data).map_err(|e| format!("{what} is not the expected JSON: {e}"))
}
