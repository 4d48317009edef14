//! The socket layer under every HTTP/2 connection Tandem makes or serves, in tandemd and in the
//! SDK's client and app server alike.
//!
//! - [`Coalescing`]: a socket that, on a busy connection, sends what h2 writes over a turn of
//!   its connection task with one system call, where h2 alone makes one per message over 256
//!   bytes.
//! - [`GrpcConnection`]: a gRPC client transport on one such HTTP/2 connection, without the
//!   task hand-off of tonic's `Channel`.
//! - [`dial`]: a connection to `host:port` on such a socket.
//! - [`incoming`]: accepted connections for tonic's server, each such a socket.

mod coalesce;
mod connection;

use std::io;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

pub use coalesce::Coalescing;
pub use connection::GrpcConnection;

impl Connected for Coalescing<TcpStream> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.get_ref().connect_info()
    }
}

/// Dials `host:port` with TCP_NODELAY on, giving up after `timeout`.
pub async fn dial(address: &str, timeout: Duration) -> io::Result<Coalescing<TcpStream>> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(address)).await.map_err(|_| {
        io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {address} timed out after {timeout:?}"))
    })??;
    stream.set_nodelay(true)?;
    Ok(Coalescing::new(stream))
}

/// The connections `listener` accepts, TCP_NODELAY on, for tonic's `serve_with_incoming*`.
pub fn incoming(listener: TcpListener) -> impl Stream<Item = io::Result<Coalescing<TcpStream>>> {
    TcpIncoming::from(listener).with_nodelay(Some(true)).map(|accepted| accepted.map(Coalescing::new))
}
