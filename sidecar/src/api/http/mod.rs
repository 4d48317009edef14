//! The HTTP front end: Dapr's HTTP API (`/v1.0/...`) on `--http-port`. Each route translates
//! its request into a call of the shared building blocks ([`super::universal`]), and the answer
//! or the [`ApiError`] back into Dapr's HTTP answer (`{"errorCode", "message"}` bodies), so
//! apps written for Dapr's HTTP API and its SDKs talk to tandemd unchanged.
//!
//! - [`state`]: `/v1.0/state/...` (get, save, delete, bulk get, transactions).
//! - [`publish`]: `/v1.0/publish/...` and bulk publish.
//! - [`invoke`]: `/v1.0/invoke/{app-id}/method/{method}`, and any other path with a
//!   `dapr-app-id` header (as in Dapr, the fallback of every unknown route and method).
//! - Here: `/v1.0/metadata` (GET, and PUT of a key), `/v1.0/shutdown`, the health paths (shared
//!   with the admin port), and what the routes share: bodies, query metadata, error answers.

pub mod invoke;
pub mod publish;
pub mod state;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post, put};
use serde_json::{Map, Value, json};

use super::error::ApiError;
use super::token::ApiToken;
use super::universal::{RUNTIME_VERSION, Universal};

/// What every route handler holds.
#[derive(Clone)]
pub struct HttpApi {
    pub universal: Arc<Universal>,
    /// The largest request body accepted (`--max-body-size`).
    pub max_body: usize,
}

/// Dapr's HTTP API; `health` serves `/v1.0/healthz` and `/v1.0/healthz/outbound`, open even
/// when `token` guards every other path.
pub fn router(universal: Arc<Universal>, max_body: usize, token: Option<ApiToken>, health: Router) -> Router {
    let api = Router::new()
        .route("/v1.0/metadata", get(get_metadata))
        .route("/v1.0/metadata/{key}", put(put_metadata))
        .route("/v1.0/shutdown", post(shutdown))
        .route("/v1.0/state/{store}", post(state::save).put(state::save))
        .route("/v1.0/state/{store}/bulk", post(state::bulk_get).put(state::bulk_get))
        .route("/v1.0/state/{store}/transaction", post(state::transaction).put(state::transaction))
        .route("/v1.0/state/{store}/{key}", get(state::get).delete(state::delete))
        .route("/v1.0/publish/bulk/{pubsub}/{*topic}", post(publish::bulk).put(publish::bulk))
        .route("/v1.0-alpha1/publish/bulk/{pubsub}/{*topic}", post(publish::bulk).put(publish::bulk))
        .route("/v1.0/publish/{pubsub}/{*topic}", post(publish::one).put(publish::one))
        .route("/v1.0/invoke/{*rest}", any(invoke::by_path))
        .fallback(invoke::by_header)
        .method_not_allowed_fallback(invoke::by_header)
        .with_state(HttpApi { universal, max_body });
    let api = match token {
        Some(token) => api.layer(axum::middleware::from_fn_with_state(token, super::token::require_for_http)),
        None => api,
    };
    api.merge(health)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(self.http, self.http_body())
    }
}

/// `body` as `application/json` with `status`.
pub fn json_response(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// 204 No Content, Dapr's answer to a call that returns nothing.
pub fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

/// The whole body, refused with 413 naming the limit when over `--max-body-size`.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            tonic::Code::ResourceExhausted,
            StatusCode::PAYLOAD_TOO_LARGE,
            "ERR_MALFORMED_REQUEST",
            format!("the request body is over the limit of {limit} bytes (--max-body-size)"),
        )
    })
}

/// A JSON body, or 400 `ERR_MALFORMED_REQUEST` naming what was wrong with it.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::malformed(format!("failed deserializing HTTP body ({what}): {e}")))
}

/// The query string's parameters, percent-decoded, first value of each name.
pub fn query_params(query: Option<&str>) -> HashMap<String, String> {
    let mut params = HashMap::new();
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        params.entry(key.into_owned()).or_insert_with(|| value.into_owned());
    }
    params
}

/// Dapr's request metadata: every query parameter named `metadata.KEY`, as `KEY`.
pub fn query_metadata(params: &HashMap<String, String>) -> HashMap<String, String> {
    params.iter().filter_map(|(key, value)| Some((key.strip_prefix("metadata.")?.to_string(), value.clone()))).collect()
}

/// `GET /v1.0/metadata`: what GetMetadata answers, in Dapr's JSON.
async fn get_metadata(State(api): State<HttpApi>) -> Response {
    let metadata = api.universal.metadata();
    let components: Vec<Value> = metadata
        .registered_components
        .iter()
        .map(|c| json!({"name": c.name, "type": c.r#type, "version": c.version, "capabilities": c.capabilities}))
        .collect();
    let mut extended: Map<String, Value> =
        metadata.extended_metadata.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
    extended.insert("daprRuntimeVersion".into(), Value::String(RUNTIME_VERSION.into()));
    let connection = metadata.app_connection_properties.unwrap_or_default();
    let mut body = json!({
        "id": metadata.id,
        "runtimeVersion": metadata.runtime_version,
        "components": components,
        "extended": extended,
        "appConnectionProperties": {
            "port": connection.port,
            "protocol": connection.protocol,
            "channelAddress": connection.channel_address,
        },
        "actorRuntime": {"runtimeStatus": "DISABLED", "hostReady": false},
    });
    if connection.port == 0 {
        // An app that only calls out: no app port to name.
        body["appConnectionProperties"] = json!({});
    }
    json_response(StatusCode::OK, body.to_string())
}

/// `PUT /v1.0/metadata/{key}`: the body becomes `extended[key]`.
async fn put_metadata(State(api): State<HttpApi>, Path(key): Path<String>, body: Body) -> Result<Response, ApiError> {
    let value = read_body(body, api.max_body).await?;
    let value = String::from_utf8(value.to_vec())
        .map_err(|_| ApiError::malformed(format!("the value of metadata key '{key}' is not UTF-8 text")))?;
    api.universal.set_metadata(key, value);
    Ok(no_content())
}

/// `POST /v1.0/shutdown`: a graceful shutdown, as the gRPC Shutdown call starts.
async fn shutdown(State(api): State<HttpApi>) -> Response {
    api.universal.shutdown();
    no_content()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_metadata_is_the_metadata_prefix_stripped_and_decoded() {
        let params = query_params(Some(
            "metadata.ttlInSeconds=5&consistency=strong&metadata.a%20b=c%2Fd&metadata.x=1&metadata.x=2",
        ));
        let metadata = query_metadata(&params);
        assert_eq!(metadata.len(), 3);
        assert_eq!(metadata["ttlInSeconds"], "5");
        assert_eq!(metadata["a b"], "c/d");
        assert_eq!(metadata["x"], "1", "the first value of a repeated name");
        assert_eq!(params["consistency"], "strong");
        assert!(query_params(None).is_empty());
    }
}
