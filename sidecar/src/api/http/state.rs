//! `/v1.0/state/...` as Dapr defines it over the shared state API:
//!
//! - `GET /v1.0/state/{store}/{key}`: 200 with the stored bytes (`application/json`), the
//!   `ETag` header and each response metadata entry as a `metadata.KEY` header; 204 when missing.
//! - `POST|PUT /v1.0/state/{store}`: a JSON array of `{key, value, etag?, metadata?, options?}`;
//!   each `value` is stored as its JSON encoding (Dapr's: the string `"x"` keeps its quotes).
//! - `DELETE /v1.0/state/{store}/{key}`: the ETag from `If-Match`.
//! - `POST|PUT /v1.0/state/{store}/bulk`: `{keys, parallelism?, metadata?}` -> an array of
//!   `{key, data?, etag?, metadata?, error?}` with each value embedded as JSON.
//! - `POST|PUT /v1.0/state/{store}/transaction`: `{operations: [{operation, request}], metadata?}`.
//!
//! Query parameters `metadata.KEY` add request metadata (they win over the body's), `consistency`
//! and `concurrency` the options. Every write answers 204.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;
use tandem_proto::common::state_options::{StateConcurrency, StateConsistency};
use tandem_proto::common::{Etag, StateItem, StateOptions};
use tandem_proto::runtime::{
    DeleteStateRequest, ExecuteStateTransactionRequest, GetBulkStateRequest, GetStateRequest, SaveStateRequest,
    TransactionalStateOperation,
};

use super::{HttpApi, json_response, no_content, parse_json, query_metadata, query_params, read_body};
use crate::api::error::ApiError;

/// One item of a save, or the request of a transaction's operation.
#[derive(Debug, Deserialize)]
struct HttpStateItem {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: Option<Value>,
    #[serde(default)]
    etag: Option<String>,
    #[serde(default)]
    metadata: HashMap<String, String>,
    #[serde(default)]
    options: Option<HttpStateOptions>,
}

#[derive(Debug, Default, Deserialize)]
struct HttpStateOptions {
    #[serde(default)]
    concurrency: Option<String>,
    #[serde(default)]
    consistency: Option<String>,
}

#[derive(Debug, Deserialize)]
struct BulkGetBody {
    #[serde(default)]
    keys: Vec<String>,
    #[serde(default)]
    parallelism: i32,
    #[serde(default)]
    metadata: HashMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct TransactionBody {
    #[serde(default)]
    operations: Vec<TransactionOperation>,
    #[serde(default)]
    metadata: HashMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct TransactionOperation {
    operation: String,
    request: HttpStateItem,
}

fn concurrency(text: Option<&str>) -> Result<i32, ApiError> {
    Ok(match text.map(str::trim) {
        None | Some("") => StateConcurrency::ConcurrencyUnspecified,
        Some("first-write") => StateConcurrency::ConcurrencyFirstWrite,
        Some("last-write") => StateConcurrency::ConcurrencyLastWrite,
        Some(other) => {
            return Err(ApiError::malformed(format!(
                "concurrency '{other}' is not one of 'first-write' and 'last-write'"
            )));
        }
    } as i32)
}

fn consistency(text: Option<&str>) -> Result<i32, ApiError> {
    Ok(match text.map(str::trim) {
        None | Some("") => StateConsistency::ConsistencyUnspecified,
        Some("eventual") => StateConsistency::ConsistencyEventual,
        Some("strong") => StateConsistency::ConsistencyStrong,
        Some(other) => {
            return Err(ApiError::malformed(format!("consistency '{other}' is not one of 'eventual' and 'strong'")));
        }
    } as i32)
}

impl HttpStateItem {
    /// The item as the state API takes it: the value as its JSON encoding, the query's metadata
    /// over the item's own.
    fn into_state_item(self, query: &HashMap<String, String>) -> Result<StateItem, ApiError> {
        let mut metadata = self.metadata;
        metadata.extend(query.iter().map(|(k, v)| (k.clone(), v.clone())));
        let options = match self.options {
            Some(options) => Some(StateOptions {
                concurrency: concurrency(options.concurrency.as_deref())?,
                consistency: consistency(options.consistency.as_deref())?,
            }),
            None => None,
        };
        let value = match self.value {
            Some(value) => serde_json::to_vec(&value).expect("a JSON value always encodes"),
            None => Vec::new(),
        };
        Ok(StateItem { key: self.key, value, etag: self.etag.map(|value| Etag { value }), metadata, options })
    }
}

/// `GET /v1.0/state/{store}/{key}`.
pub async fn get(
    State(api): State<HttpApi>,
    Path((store, key)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = query_params(query.as_deref());
    let request = GetStateRequest {
        store_name: store,
        key,
        consistency: consistency(params.get("consistency").map(String::as_str))?,
        metadata: query_metadata(&params),
    };
    let found = api.universal.state.get_state(request).await?;
    if found.etag.is_empty() && found.data.is_empty() {
        return Ok(no_content());
    }
    let mut response = (StatusCode::OK, found.data).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(etag) = HeaderValue::from_str(&found.etag) {
        headers.insert(header::ETAG, etag);
    }
    for (key, value) in found.metadata {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(format!("metadata.{key}")), HeaderValue::from_str(&value))
        {
            headers.insert(name, value);
        }
    }
    Ok(response)
}

/// `POST|PUT /v1.0/state/{store}`.
pub async fn save(
    State(api): State<HttpApi>,
    Path(store): Path<String>,
    RawQuery(query): RawQuery,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(body, api.max_body).await?;
    let items: Vec<HttpStateItem> = parse_json(&body, "a JSON array of state items {key, value, ...}")?;
    let metadata = query_metadata(&query_params(query.as_deref()));
    let states = items.into_iter().map(|item| item.into_state_item(&metadata)).collect::<Result<Vec<_>, _>>()?;
    api.universal.state.save_state(SaveStateRequest { store_name: store, states }).await?;
    Ok(no_content())
}

/// `DELETE /v1.0/state/{store}/{key}`.
pub async fn delete(
    State(api): State<HttpApi>,
    Path((store, key)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let params = query_params(query.as_deref());
    let etag = match headers.get(header::IF_MATCH) {
        Some(value) => Some(Etag {
            value: value
                .to_str()
                .map_err(|_| ApiError::malformed("the If-Match header is not ASCII text"))?
                .trim_matches('"')
                .to_string(),
        }),
        None => None,
    };
    let options = StateOptions {
        concurrency: concurrency(params.get("concurrency").map(String::as_str))?,
        consistency: consistency(params.get("consistency").map(String::as_str))?,
    };
    let request =
        DeleteStateRequest { store_name: store, key, etag, options: Some(options), metadata: query_metadata(&params) };
    api.universal.state.delete_state(request).await?;
    Ok(no_content())
}

/// `POST|PUT /v1.0/state/{store}/bulk`.
pub async fn bulk_get(
    State(api): State<HttpApi>,
    Path(store): Path<String>,
    RawQuery(query): RawQuery,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(body, api.max_body).await?;
    let request: BulkGetBody = parse_json(&body, "{\"keys\": [...]}")?;
    let mut metadata = request.metadata;
    metadata.extend(query_metadata(&query_params(query.as_deref())));
    let request =
        GetBulkStateRequest { store_name: store, keys: request.keys, parallelism: request.parallelism, metadata };
    let items = api.universal.state.get_bulk_state(request).await?.items;
    let answer: Vec<Value> = items
        .into_iter()
        .map(|item| {
            let mut entry = serde_json::Map::new();
            entry.insert("key".into(), Value::String(item.key));
            if !item.error.is_empty() {
                entry.insert("error".into(), Value::String(item.error));
            } else if !item.etag.is_empty() || !item.data.is_empty() {
                entry.insert("data".into(), embedded(&item.data));
                entry.insert("etag".into(), Value::String(item.etag));
                if !item.metadata.is_empty() {
                    entry.insert("metadata".into(), serde_json::to_value(item.metadata).expect("a string map"));
                }
            }
            Value::Object(entry)
        })
        .collect();
    Ok(json_response(StatusCode::OK, Value::Array(answer).to_string()))
}

/// A stored value inside a JSON answer: as the JSON it is (values saved over HTTP are JSON);
/// bytes saved over gRPC that are not JSON as a string (UTF-8) rather than invalid JSON.
fn embedded(data: &[u8]) -> Value {
    serde_json::from_slice(data).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(data).into_owned()))
}

/// `POST|PUT /v1.0/state/{store}/transaction`.
pub async fn transaction(
    State(api): State<HttpApi>,
    Path(store): Path<String>,
    RawQuery(query): RawQuery,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(body, api.max_body).await?;
    let request: TransactionBody = parse_json(&body, "{\"operations\": [{\"operation\", \"request\"}]}")?;
    let query = query_metadata(&query_params(query.as_deref()));
    let mut metadata = request.metadata;
    metadata.extend(query.iter().map(|(k, v)| (k.clone(), v.clone())));
    let operations = request
        .operations
        .into_iter()
        .map(|operation| {
            Ok(TransactionalStateOperation {
                operation_type: operation.operation,
                request: Some(operation.request.into_state_item(&query)?),
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let request = ExecuteStateTransactionRequest { store_name: store, operations, metadata };
    api.universal.state.execute_state_transaction(request).await?;
    Ok(no_content())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_stored_as_their_json_encoding() {
        let items: Vec<HttpStateItem> = serde_json::from_str(
            r#"[{"key":"a","value":"DeathStar"},{"key":"b","value":{"x":1},"etag":"3","options":{"concurrency":"first-write"}}]"#,
        )
        .unwrap();
        let query = HashMap::from([("ttlInSeconds".to_string(), "5".to_string())]);
        let items: Vec<StateItem> = items.into_iter().map(|i| i.into_state_item(&query).unwrap()).collect();
        assert_eq!(items[0].value, br#""DeathStar""#);
        assert_eq!(items[1].value, br#"{"x":1}"#);
        assert_eq!(items[1].etag.as_ref().unwrap().value, "3");
        assert_eq!(items[1].options.unwrap().concurrency, StateConcurrency::ConcurrencyFirstWrite as i32);
        assert_eq!(items[0].metadata["ttlInSeconds"], "5");
    }

    #[test]
    fn bad_options_name_the_accepted_values() {
        let err = concurrency(Some("sometimes")).unwrap_err();
        assert_eq!(err.message, "concurrency 'sometimes' is not one of 'first-write' and 'last-write'");
        assert_eq!(err.error_code, "ERR_MALFORMED_REQUEST");
        assert!(consistency(Some("strong")).is_ok());
    }

    #[test]
    fn stored_bytes_embed_as_json_or_as_text() {
        assert_eq!(embedded(br#"{"a":1}"#), serde_json::json!({"a": 1}));
        assert_eq!(embedded(b"plain"), Value::String("plain".into()));
    }
}
