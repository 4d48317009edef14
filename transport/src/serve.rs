//! Serving gRPC on a bound listener: HTTP/2 over hyper with TCP_NODELAY on every accepted
//! socket, whose writes go out together while the connection is busy ([`Coalescing`]), and a
//! graceful drain on shutdown.
//!
//! tonic's own `Server` is not used:
//! - It wraps every service in a `grpc-timeout` layer that answers an expired deadline with
//!   CANCELLED before the handler can answer DEADLINE_EXCEEDED; here the handlers own the
//!   caller's deadline (tandemd's `deadline` module).
//! - That layer also arms a timer for every call that has a deadline, and the router under
//!   it costs more per call: for the SDK's app server this was a fifth of the app's CPU
//!   under the pub/sub benchmark's load (BENCHMARKS.md).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tonic::body::Body;

use crate::Coalescing;
use crate::tls::{MeshTls, PeerIdentity};

/// What a gRPC server serves: tonic's `Routes` (with layers around it), cloned per connection.
pub trait GrpcRoutes:
    tower::Service<
        http::Request<hyper::body::Incoming>,
        Response = http::Response<Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S> GrpcRoutes for S
where
    S: tower::Service<http::Request<hyper::body::Incoming>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
}

/// Serves `routes` on `listener` until `shutdown` resolves, then stops accepting and waits up
/// to `drain` for in-flight calls to finish.
pub async fn serve_grpc<S: GrpcRoutes>(
    listener: TcpListener,
    routes: S,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    serve(listener, routes, None, shutdown, drain).await
}

/// [`serve_grpc`] with mutual TLS: a connection whose handshake fails (plaintext, an unknown
/// CA, an expired certificate, no SPIFFE id of this trust domain) is closed before any request
/// is read, and logged with the reason; every request served carries the caller's
/// [`PeerIdentity`] in its extensions.
pub async fn serve_grpc_tls<S: GrpcRoutes>(
    listener: TcpListener,
    routes: S,
    tls: Arc<MeshTls>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    serve(listener, routes, Some(tls), shutdown, drain).await
}

async fn serve<S: GrpcRoutes>(
    listener: TcpListener,
    routes: S,
    tls: Option<Arc<MeshTls>>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    let local = listener.local_addr().ok();
    tokio::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let stream = Coalescing::new(stream);
        let watcher = graceful.watcher();
        let Some(tls) = &tls else {
            let connection = http2.serve_connection(TokioIo::new(stream), TowerToHyperService::new(routes.clone()));
            tokio::spawn(async move {
                if let Err(e) = watcher.watch(connection).await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            });
            continue;
        };
        // The handshake runs on the connection's own task, so a slow or silent client holds
        // up no other.
        let (tls, http2, routes) = (tls.clone(), http2.clone(), routes.clone());
        tokio::spawn(async move {
            let (stream, peer) = match tls.accept(stream).await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "refused a connection: mutual TLS failed");
                    return;
                }
            };
            let routes = WithPeer { inner: routes, peer: PeerIdentity(Arc::new(peer)) };
            let connection = http2.serve_connection(TokioIo::new(stream), TowerToHyperService::new(routes));
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::debug!(address = ?local, connections = graceful.count(), "draining gRPC connections");
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!(address = ?local, "drain timed out; closing the remaining connections");
    }
}

/// Puts the connection's verified peer into each request's extensions.
#[derive(Clone)]
struct WithPeer<S> {
    inner: S,
    peer: PeerIdentity,
}

impl<S, B> tower::Service<http::Request<B>> for WithPeer<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        request.extensions_mut().insert(self.peer.clone());
        self.inner.call(request)
    }
}
