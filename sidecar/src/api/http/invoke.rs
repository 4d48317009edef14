//! Service invocation over the HTTP API, as Dapr does it:
//!
//! - `{VERB} /v1.0/invoke/{app-id}/method/{method...}?{query}`: the method is everything after
//!   `/method/`, as sent (still percent-encoded); `app-id` may be `app.namespace`.
//! - Any other path with a `dapr-app-id: app-id` header (the fallback of every route and method
//!   the API does not have): the method is the path.
//!
//! The verb, query string, headers (but the per-hop and identity ones, as for gRPC calls),
//! content type and body go to the callee as an `InvokeRequest` with its HTTP extension. The
//! callee's answer comes back as the body with the callee's content type and headers: with an
//! HTTP app's own status, 200 from a gRPC app that answered; a gRPC app's error as the HTTP
//! status Dapr gives its code with `{"code", "message"}`; a failure of the mesh as 500
//! `ERR_DIRECT_INVOKE` (Dapr's).

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use percent_encoding::percent_decode_str;
use serde_json::json;
use tandem_proto::common::http_extension::Verb;
use tandem_proto::common::{HttpExtension, InvokeRequest};
use tandem_proto::prost_types::Any;

use super::{HttpApi, json_response, read_body};
use crate::api::error::{ApiError, http_status_of};
use crate::error::MeshError;
use crate::invoke::{Invocation, headers};

/// The header that names the app to invoke on any path.
pub const DAPR_APP_ID: &str = "dapr-app-id";

fn no_app_id() -> ApiError {
    ApiError::new(
        tonic::Code::NotFound,
        StatusCode::NOT_FOUND,
        "ERR_DIRECT_INVOKE",
        "failed getting app id either from the URL path or the header dapr-app-id",
    )
}

/// `/v1.0/invoke/{app-id}/method/{method...}`, any verb.
pub async fn by_path(State(api): State<HttpApi>, method: Method, uri: Uri, headers: HeaderMap, body: Body) -> Response {
    if headers.contains_key(DAPR_APP_ID) {
        // As in Dapr, the header wins, and the whole path is the method.
        return by_header(State(api), method, uri, headers, body).await;
    }
    let Some((app_id, target_method)) = split_invoke_path(uri.path()) else { return no_app_id().into_response() };
    invoke(&api, app_id, target_method, method, &uri, headers, body).await.unwrap_or_else(IntoResponse::into_response)
}

/// Any path the API does not serve: invoked on the app its `dapr-app-id` header names, else
/// 404 `ERR_DIRECT_INVOKE`.
pub async fn by_header(
    State(api): State<HttpApi>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(app_id) = headers.get(DAPR_APP_ID).and_then(|v| v.to_str().ok()).map(str::to_string) else {
        return no_app_id().into_response();
    };
    let target_method = uri.path().trim_start_matches('/').to_string();
    invoke(&api, app_id, target_method, method, &uri, headers, body).await.unwrap_or_else(IntoResponse::into_response)
}

/// The app-id (percent-decoded) and the method (as sent) of `/v1.0/invoke/{app-id}/method/{method}`.
fn split_invoke_path(path: &str) -> Option<(String, String)> {
    let rest = path.strip_prefix("/v1.0/invoke/")?;
    let (app_id, method) = rest.split_once("/method/")?;
    let app_id = percent_decode_str(app_id).decode_utf8().ok()?.into_owned();
    (!app_id.is_empty()).then_some((app_id, method.to_string()))
}

/// Why `method` may not be called: a `.` or `..` segment, also percent-encoded (`%2e%2e`,
/// `..%2F`), would let a method name reach another path of the app than it names.
fn traversal(method: &str) -> Option<String> {
    let decoded = percent_decode_str(method).decode_utf8_lossy();
    decoded
        .split(['/', '\\'])
        .any(|segment| segment == ".." || segment == ".")
        .then(|| format!("the method '{method}' has a '.' or '..' path segment (percent-encoded or not); refused"))
}

fn verb(method: &Method) -> Verb {
    match *method {
        Method::GET => Verb::Get,
        Method::HEAD => Verb::Head,
        Method::POST => Verb::Post,
        Method::PUT => Verb::Put,
        Method::DELETE => Verb::Delete,
        Method::CONNECT => Verb::Connect,
        Method::OPTIONS => Verb::Options,
        Method::TRACE => Verb::Trace,
        Method::PATCH => Verb::Patch,
        _ => Verb::None,
    }
}

async fn invoke(
    api: &HttpApi,
    app_id: String,
    method: String,
    verb_method: Method,
    uri: &Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let universal = &api.universal;
    // `app.namespace`: Tandem routes within its own namespace.
    let app_id = match app_id.split_once('.') {
        Some((app, namespace)) if namespace == universal.info.namespace => app.to_string(),
        Some((_, namespace)) => {
            return Err(ApiError::invoke(
                &app_id,
                &MeshError::InvalidArgument(format!(
                    "this sidecar routes within its namespace '{}', not '{namespace}'",
                    universal.info.namespace
                )),
            ));
        }
        None => app_id,
    };
    if method.is_empty() {
        return Err(ApiError::invoke(&app_id, &MeshError::InvalidArgument("the method is empty".into())));
    }
    if let Some(problem) = traversal(&method) {
        return Err(ApiError::invoke(&app_id, &MeshError::InvalidArgument(problem)));
    }
    let body = read_body(body, api.max_body).await?;
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let message = InvokeRequest {
        method,
        data: Some(Any { type_url: String::new(), value: body.to_vec() }),
        content_type,
        http_extension: Some(HttpExtension {
            verb: verb(&verb_method) as i32,
            querystring: uri.query().unwrap_or_default().to_string(),
        }),
    };
    let invocation = Invocation {
        target_app_id: app_id.clone(),
        message,
        metadata: headers::outgoing_http(&headers),
        deadline: None,
        instance: headers::target_instance_http(&headers),
    };
    let reply = universal.invoker.invoke(invocation).await;
    universal.metrics.invocation(&app_id, &reply.as_ref().map(|_| ()).map_err(|e| tonic::Status::new(e.code(), "")));
    match reply {
        Ok(reply) => {
            let data = reply.message.data.unwrap_or_default();
            let content_type = if !reply.message.content_type.is_empty() {
                reply.message.content_type.clone()
            } else if !data.type_url.is_empty() {
                "application/x-protobuf".to_string()
            } else {
                String::new()
            };
            // An HTTP app's status passes through; a gRPC app that answered, answered 200.
            let status = reply.http_status.and_then(|s| StatusCode::from_u16(s).ok()).unwrap_or(StatusCode::OK);
            let mut response = (status, data.value).into_response();
            headers::apply_http(&reply.metadata, response.headers_mut());
            if let Ok(value) = HeaderValue::from_str(&content_type)
                && !content_type.is_empty()
            {
                response.headers_mut().insert(header::CONTENT_TYPE, value);
            }
            Ok(response)
        }
        // The app's own error answer: Dapr's HTTP status for its code, and the status as JSON.
        Err(MeshError::Remote(status)) => {
            let body = json!({"code": status.code() as i32, "message": status.message()}).to_string();
            Ok(json_response(http_status_of(status.code()), body))
        }
        Err(error) => Err(ApiError::invoke(&app_id, &error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_invoke_path_names_the_app_and_keeps_the_method_as_sent() {
        assert_eq!(
            split_invoke_path("/v1.0/invoke/orders/method/api/v1/items%2F7"),
            Some(("orders".to_string(), "api/v1/items%2F7".to_string()))
        );
        assert_eq!(split_invoke_path("/v1.0/invoke/my%2Eapp/method/x"), Some(("my.app".to_string(), "x".to_string())));
        assert_eq!(split_invoke_path("/v1.0/invoke/orders/items"), None);
        assert_eq!(split_invoke_path("/v1.0/invoke//method/x"), None);
        assert_eq!(verb(&Method::PATCH), Verb::Patch);
        for bad in ["../admin", "a/../../b", "..%2F..%2Fadmin", "%2e%2e/x", "a/./b", "a%5C..%5Cb"] {
            assert!(traversal(bad).is_some(), "{bad}");
        }
        for good in ["orders/7", "a..b", ".well-known/x", "v1.0/items"] {
            assert!(traversal(good).is_none(), "{good}");
        }
    }
}
