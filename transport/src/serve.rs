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
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tonic::body::Body;

use crate::Coalescing;

/// Serves `routes` on `listener` until `shutdown` resolves, then stops accepting and waits up
/// to `drain` for in-flight calls to finish.
pub async fn serve_grpc<S>(listener: TcpListener, routes: S, shutdown: impl Future<Output = ()>, drain: Duration)
where
    S: tower::Service<http::Request<hyper::body::Incoming>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    let local = listener.local_addr().ok();
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
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
        let connection =
            http2.serve_connection(TokioIo::new(Coalescing::new(stream)), TowerToHyperService::new(routes.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
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
