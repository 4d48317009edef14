//! Dapr's API tokens (`dapr-api-token`): the token a server requires, compared through SHA-256
//! digests in constant time so that neither its contents nor its length leak through timing,
//! and [`ApiTokenLayer`], which answers UNAUTHENTICATED to a gRPC call without it. tandemd
//! guards its app-facing API with it (`DAPR_API_TOKEN`); the SDK's app server guards the app
//! with it (`APP_API_TOKEN`, which the sidecar sends on every call into its app).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};

/// The header (gRPC metadata key) that carries a token, both ways (Dapr's name).
pub const HEADER: &str = "dapr-api-token";

/// The token a server requires.
#[derive(Clone)]
pub struct ApiToken {
    digest: Arc<[u8; 32]>,
    /// Who requires it, in refusals ("this sidecar", "this app").
    server: &'static str,
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(..)")
    }
}

impl ApiToken {
    /// The token `server` ("this sidecar", "this app") requires.
    pub fn new(token: &str, server: &'static str) -> Self {
        ApiToken { digest: Arc::new(Sha256::digest(token.as_bytes()).into()), server }
    }

    /// Whether `headers` carry the token; else why not.
    pub fn check(&self, headers: &http::HeaderMap) -> Result<(), String> {
        let Some(given) = headers.get(HEADER) else {
            return Err(format!("the API token is missing: {} requires one (header 'dapr-api-token')", self.server));
        };
        let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        // Every byte is compared, whatever differs first.
        let difference = given.iter().zip(self.digest.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if std::hint::black_box(difference) == 0 {
            Ok(())
        } else {
            Err(format!("the API token (header 'dapr-api-token') does not match {}'s", self.server))
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
            tracing::warn!(path = %request.uri().path(), %reason, "refused a gRPC call without the API token");
            let refusal = tonic::Status::unauthenticated(reason).into_http();
            return Box::pin(async move { Ok(refusal) });
        }
        Box::pin(self.inner.call(request))
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
        let token = ApiToken::new("s3cret", "this sidecar");
        assert!(token.check(&headers(Some("s3cret"))).is_ok());
        assert!(token.check(&headers(None)).unwrap_err().contains("missing"));
        for wrong in ["s3cre", "s3cret ", "S3cret", "", "s3cret-and-more"] {
            assert!(token.check(&headers(Some(wrong))).unwrap_err().contains("does not match"), "{wrong:?}");
        }
        assert!(!format!("{token:?}").contains("s3cret"));
    }
}
