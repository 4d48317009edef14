//! Loopback ports that `tandem up` hands to processes it starts, held until those bind them.
//!
//! A port found free and then released can be taken before its process binds it: by the
//! tandemd started first beside that process binding its own ports to 0 (stop 24's CI saw
//! preprocess-2's admin port equal its app port), or by any outgoing connection. A
//! [`PortReservation`] keeps the port bound (never listening) with `SO_REUSEADDR`: Linux then
//! never picks it for a port-0 bind or an outgoing connection, while the process it is meant
//! for binds it anyway, as std's, tokio's and Go's listeners set `SO_REUSEADDR` too.

use std::net::{Ipv4Addr, SocketAddr};

use crate::error::CliError;

/// A loopback port bound to nobody but held back from the kernel's port choice.
#[derive(Debug)]
pub struct PortReservation {
    /// Held only to be closed on drop.
    _socket: tokio::net::TcpSocket,
    port: u16,
}

impl PortReservation {
    /// Reserves a free loopback port.
    pub fn new() -> Result<Self, CliError> {
        let fail = |e: std::io::Error| CliError::failed(format!("cannot reserve a free loopback port: {e}"));
        let socket = tokio::net::TcpSocket::new_v4().map_err(fail)?;
        socket.set_reuseaddr(true).map_err(fail)?;
        socket.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).map_err(fail)?;
        let port = socket.local_addr().map_err(fail)?.port();
        Ok(Self { _socket: socket, port })
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserved_port_is_never_handed_to_a_port_0_bind_but_its_owner_can_listen_on_it() {
        let reservation = PortReservation::new().unwrap();
        // Many port-0 binds while the reservation stands: none of them gets its port.
        let others: Vec<PortReservation> = (0..2000).map(|_| PortReservation::new().unwrap()).collect();
        assert!(others.iter().all(|other| other.port() != reservation.port()));
        // The process it is meant for binds and listens (std's listener sets SO_REUSEADDR).
        let listener = std::net::TcpListener::bind(("127.0.0.1", reservation.port())).unwrap();
        let _client = std::net::TcpStream::connect(("127.0.0.1", reservation.port())).unwrap();
        listener.accept().unwrap();
    }
}
