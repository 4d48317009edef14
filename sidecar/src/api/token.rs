//! API tokens, as Dapr has them. With `DAPR_API_TOKEN` set, every call of the app-facing API
//! must carry that token in its `dapr-api-token` header (gRPC metadata or HTTP header), or is
//! refused before it reaches a building block: UNAUTHENTICATED on the gRPC API, 401 on the HTTP
//! API, with a message that says whether the token was missing or wrong (never the token).
//! The health paths stay open (probes carry no token). Tokens are compared through their
//! SHA-256 digests in constant time, so neither their contents nor their length leak through
//! timing. `APP_API_TOKEN` is the other direction: the app channel sends it on every call into
//! the app (see `app_channel`).
//!
//! [`ApiTokenLayer`] guards the gRPC API; [`require_for_http`] the HTTP API.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};

/// The header (gRPC metadata key) that carries a token, both ways (Dapr's name).
pub const HEADER: &str = "dapr-api-token";

/// The token the app-facing API requires.
#[derive(Clone)]
pub struct ApiToken {
    digest: Arc<[u8; 32]>,
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(..)")
    }
}

impl ApiToken {
    pub fn new(token: &str) -> Self {
        ApiToken { digest: Arc::new(Sha256::digest(token.as_bytes()).into()) }
    }

    /// Whether `headers` carry the token; else why not.
    pub fn check(&self, headers: &http::HeaderMap) -> Result<(), &'static str> {
        let Some(given) = headers.get(HEADER) else {
            return Err("the API token is missing: this sidecar requires one (header 'dapr-api-token')");
        };
        let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        // Every byte is compared, whatever differs first.
        let difference = given.iter().zip(self.digest.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if std::hint::black_box(difference) == 0 {
            Ok(())
        } else {
            Err("the API token (header 'dapr-api-token') does not match this sidecar's")
        }
    }
}

/// Wraps the gRPC API in [`TokenChecked`]; with no token, calls pass unchecked.
#[derive(Debug, Clone)]
pub struct ApiTokenLayer {
    token: Option<ApiToken>,
}

impl ApiTokenLayer {
    pub fn new(token: Option<ApiToken>) -> Self {
        ApiTokenLayer { token }
    }
}

impl<S> tower::Layer<S> for ApiTokenLayer {
    type Service = TokenChecked<S>;

    fn layer(&self, inner: S) -> TokenChecked<S> {
        TokenChecked { inner, token: self.token.clone() }
    }
}

/// A gRPC service that answers UNAUTHENTICATED to a call without the token.
#[derive(Debug, Clone)]
pub struct TokenChecked<S> {
    inner: S,
    token: Option<ApiToken>,
}

impl<S, B> tower::Service<http::Request<B>> for TokenChecked<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(token) = &self.token
            && let Err(reason) = token.check(request.headers())
        {
            tracing::warn!(path = %request.uri().path(), reason, "refused a call of the gRPC API");
            let refusal = tonic::Status::unauthenticated(reason).into_http();
            return Box::pin(async move { Ok(refusal) });
        }
        Box::pin(self.inner.call(request))
    }
}

/// axum middleware of the HTTP API: 401 with Dapr's error body to a request without the token.
pub async fn require_for_http(State(token): State<ApiToken>, request: Request, next: Next) -> Response {
    match token.check(request.headers()) {
        Ok(()) => next.run(request).await,
        Err(reason) => {
            tracing::warn!(path = %request.uri().path(), reason, "refused a call of the HTTP API");
            let body = serde_json::json!({ "errorCode": "ERR_UNAUTHORIZED", "message": reason });
            super::http::json_response(http::StatusCode::UNAUTHORIZED, body.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(token: Option<&str>) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        if let Some(token) = token {
            map.insert(HEADER, token.parse().unwrap());
        }
        map
    }

    #[test]
    fn only_the_exact_token_passes() {
        let token = ApiToken::new("s3cret");
        assert!(token.check(&headers(Some("s3cret"))).is_ok());
        assert!(token.check(&headers(None)).unwrap_err().contains("missing"));
        for wrong in ["s3cre", "s3cret ", "S3cret", "", "s3cret-and-more"] {
            assert!(token.check(&headers(Some(wrong))).unwrap_err().contains("does not match"), "{wrong:?}");
        }
        assert!(!format!("{token:?}").contains("s3cret"));
    }
}
