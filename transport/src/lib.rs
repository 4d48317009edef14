//! The socket layer under every HTTP/2 connection Tandem makes or serves, in tandemd and in the
//! SDK's client and app server alike.
//!
//! - [`Coalescing`]: a socket that, on a busy connection, sends what h2 writes over a turn of
//!   its connection task with one system call, where h2 alone makes one per message over 256
//!   bytes.
//! - [`GrpcConnection`]: a gRPC client transport on one such HTTP/2 connection, without the
//!   task hand-off of tonic's `Channel`.
//! - [`dial`]: a connection to `host:port` on such a socket.
//! - [`serve_grpc`]: a gRPC server on such sockets, with a graceful drain; [`serve_grpc_tls`]
//!   the same with mutual TLS, each request carrying the caller's verified [`PeerIdentity`].
//! - [`tls`]: mutual TLS between sidecars with SPIFFE identities ([`MeshTls`]).

mod coalesce;
mod connection;
mod serve;
pub mod tls;
pub mod token;

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;

pub use coalesce::Coalescing;
pub use connection::GrpcConnection;
pub use serve::{GrpcRoutes, serve_grpc, serve_grpc_tls};
pub use tls::{IdPath, MeshTls, PeerIdentity, SpiffeId};

/// Dials `host:port` with TCP_NODELAY on, giving up after `timeout`.
pub async fn dial(address: &str, timeout: Duration) -> io::Result<Coalescing<TcpStream>> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(address)).await.map_err(|_| {
        io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {address} timed out after {timeout:?}"))
    })??;
    stream.set_nodelay(true)?;
    Ok(Coalescing::new(stream))
}
