//! A gRPC client connection: one HTTP/2 connection to `host:port` over hyper, on a
//! [`Coalescing`](crate::Coalescing) socket ([`dial`](crate::dial)), made on first use and made
//! again once it has closed.
//!
//! Used instead of tonic's `Channel`, whose buffer puts one more task hand-off on every call;
//! on the invocation path a sidecar is a client twice per call, so that hand-off is paid twice.
//! It has no timeout of its own: callers bound their calls. With mutual TLS
//! ([`GrpcConnection::with_tls`]) each new connection makes a handshake with the material in
//! use at that moment, and the peer must prove to be the app it is meant to be.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tonic::ConnectError;
use tonic::body::Body;

use crate::tls::{MeshTls, SpiffeId};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Cheap to clone: clones share the connection. Serves as the transport of tonic's generated
/// clients (`XClient::with_origin(connection.clone(), connection.origin())`).
#[derive(Clone)]
pub struct GrpcConnection {
    inner: Arc<Inner>,
}

struct Inner {
    address: String,
    origin: Uri,
    /// With mutual TLS: this side's material and the identity the peer must prove.
    tls: Option<(Arc<MeshTls>, SpiffeId)>,
    /// The open connection, if any, and the TLS material generation it was made with;
    /// checked on every call without waiting.
    current: Mutex<Option<(SendRequest<Body>, u64)>>,
    /// Held while connecting, so concurrent calls make one connection, not one each.
    connecting: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for GrpcConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcConnection").field("address", &self.inner.address).finish()
    }
}

impl GrpcConnection {
    /// A connection to `address` (`host:port`); nothing is dialled until the first call.
    pub fn new(address: &str) -> Result<Self, String> {
        Self::build(address, None)
    }

    /// A connection with mutual TLS to the sidecar at `address`, which must present an SVID
    /// for `peer`.
    pub fn with_tls(address: &str, tls: Arc<MeshTls>, peer: SpiffeId) -> Result<Self, String> {
        Self::build(address, Some((tls, peer)))
    }

    fn build(address: &str, tls: Option<(Arc<MeshTls>, SpiffeId)>) -> Result<Self, String> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let origin: Uri =
            format!("{scheme}://{address}").parse().map_err(|e| format!("'{address}' is not a valid address: {e}"))?;
        if origin.port().is_none() || origin.path() != "/" {
            return Err(format!("'{address}' is not a valid address: want host:port"));
        }
        Ok(GrpcConnection {
            inner: Arc::new(Inner {
                address: address.to_string(),
                origin,
                tls,
                current: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
            }),
        })
    }

    pub fn address(&self) -> &str {
        &self.inner.address
    }

    /// `http://host:port` (`https` with TLS), for the generated clients' `with_origin`.
    pub fn origin(&self) -> Uri {
        self.inner.origin.clone()
    }

    fn generation(&self) -> u64 {
        self.inner.tls.as_ref().map_or(0, |(tls, _)| tls.generation())
    }

    /// The open connection, unless it closed or was made with TLS material replaced since.
    fn open(&self) -> Option<SendRequest<Body>> {
        let current = self.inner.current.lock().unwrap_or_else(|p| p.into_inner());
        let generation = self.generation();
        current
            .as_ref()
            .filter(|(sender, made)| !sender.is_closed() && *made == generation)
            .map(|(sender, _)| sender.clone())
    }

    async fn sender(&self) -> Result<SendRequest<Body>, BoxError> {
        if let Some(sender) = self.open() {
            return Ok(sender);
        }
        let _connecting = self.inner.connecting.lock().await;
        if let Some(sender) = self.open() {
            return Ok(sender);
        }
        let generation = self.generation();
        let sender = match &self.inner.tls {
            None => connect(&self.inner.address).await?,
            Some((tls, peer)) => connect_tls(&self.inner.address, tls, peer).await?,
        };
        *self.inner.current.lock().unwrap_or_else(|p| p.into_inner()) = Some((sender.clone(), generation));
        Ok(sender)
    }
}

/// Dials `address` and opens HTTP/2 on it. Every failure here happens before a request was
/// written, so it is reported as tonic's [`ConnectError`] (see [`super::channels::never_sent`]).
async fn connect(address: &str) -> Result<SendRequest<Body>, BoxError> {
    let stream = crate::dial(address, CONNECT_TIMEOUT).await.map_err(|e| ConnectError(Box::new(e)))?;
    open_http2(address, stream).await
}

/// [`connect`] with a TLS handshake in between; a peer that is not `peer` (or not trusted) is
/// a failure to connect, like a refused connection.
async fn connect_tls(address: &str, tls: &MeshTls, peer: &SpiffeId) -> Result<SendRequest<Body>, BoxError> {
    let stream = crate::dial(address, CONNECT_TIMEOUT).await.map_err(|e| ConnectError(Box::new(e)))?;
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host.trim_start_matches('[').trim_end_matches(']'));
    let stream = tls.connect(stream, host, peer).await.map_err(|e| {
        ConnectError(Box::new(std::io::Error::new(e.kind(), format!("mutual TLS with {peer} at {address}: {e}"))))
    })?;
    open_http2(address, stream).await
}

async fn open_http2<S>(address: &str, stream: S) -> Result<SendRequest<Body>, BoxError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let (sender, connection) = builder.handshake(TokioIo::new(stream)).await.map_err(|e| ConnectError(Box::new(e)))?;
    let address = address.to_string();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(%address, error = %e, "connection closed with an error");
        }
    });
    Ok(sender)
}

impl tower::Service<http::Request<Body>> for GrpcConnection {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let connection = self.clone();
        Box::pin(async move {
            let mut sender = connection.sender().await?;
            Ok(sender.send_request(request).await?)
        })
    }
}
