//! API tokens, as Dapr has them. With `DAPR_API_TOKEN` set, every call of the app-facing API
//! must carry that token in its `dapr-api-token` header (gRPC metadata or HTTP header), or is
//! refused before it reaches a building block: UNAUTHENTICATED on the gRPC API, 401 on the HTTP
//! API, with a message that says whether the token was missing or wrong (never the token).
//! The health paths stay open (probes carry no token). Tokens are compared through their
//! SHA-256 digests in constant time, so neither their contents nor their length leak through
//! timing. `APP_API_TOKEN` is the other direction: the app channel sends it on every call into
//! the app (see `app_channel`).
//!
//! [`ApiTokenLayer`] guards the gRPC API; [`require_for_http`] the HTTP API. The token and the
//! gRPC layer live in `tandem_transport::token`, shared with the SDK's app server, which
//! checks `APP_API_TOKEN` the same way.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
pub use tandem_transport::token::{ApiToken, ApiTokenLayer, HEADER};

/// axum middleware of the HTTP API: 401 with Dapr's error body to a request without the token.
pub async fn require_for_http(State(token): State<ApiToken>, request: Request, next: Next) -> Response {
    match token.check(request.headers()) {
        Ok(()) => next.run(request).await,
        Err(reason) => {
            tracing::warn!(path = %request.uri().path(), %reason, "refused a call of the HTTP API");
            let body = serde_json::json!({ "errorCode": "ERR_UNAUTHORIZED", "message": reason });
            super::http::json_response(http::StatusCode::UNAUTHORIZED, body.to_string())
        }
    }
}
