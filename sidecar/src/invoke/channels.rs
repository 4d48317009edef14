//! The pool of connections to peer sidecars (one HTTP/2 connection per address), and how to
//! tell a call that never left this process from one that may have reached the other side.

use std::collections::HashMap;
use std::error::Error as _;
use std::sync::{Arc, Mutex};
use tonic::Status;

use crate::discovery::RoutingTable;
use tandem_transport::GrpcConnection;
use tandem_transport::tls::{MeshTls, SpiffeId};

/// True when the call provably never reached the peer: the connection could not be made, or
/// the request was still queued when its connection closed. Such a call may go elsewhere.
pub fn never_sent(status: &Status) -> bool {
    let mut source = status.source();
    while let Some(err) = source {
        if err.downcast_ref::<tonic::ConnectError>().is_some() {
            return true;
        }
        if let Some(hyper_err) = err.downcast_ref::<hyper::Error>()
            && hyper_err.is_canceled()
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// One connection per peer sidecar, shared by every call to it. Connections to peers that left
/// the routing table are dropped, which closes them. With mutual TLS a connection is for one
/// app at one address: the peer must prove to be that app.
#[derive(Debug, Clone, Default)]
pub struct PeerChannels {
    /// By (address, app-id).
    channels: Arc<Mutex<HashMap<(String, String), GrpcConnection>>>,
    tls: Option<Arc<MeshTls>>,
}

impl PeerChannels {
    pub fn new(tls: Option<Arc<MeshTls>>) -> PeerChannels {
        PeerChannels { channels: Arc::default(), tls }
    }

    /// The connection to the sidecar of `app_id` (in this sidecar's namespace) at `address`.
    pub fn get(&self, address: &str, app_id: &str) -> Result<GrpcConnection, String> {
        let key = (address.to_string(), app_id.to_string());
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(channel) = channels.get(&key) {
            return Ok(channel.clone());
        }
        let channel = match &self.tls {
            None => GrpcConnection::new(address)?,
            Some(tls) => {
                let own = tls.own_id();
                GrpcConnection::with_tls(
                    address,
                    tls.clone(),
                    SpiffeId::new(&own.trust_domain, &own.namespace, app_id),
                )?
            }
        };
        channels.insert(key, channel.clone());
        Ok(channel)
    }

    pub fn len(&self) -> usize {
        self.channels.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps only the channels whose address is still routed to; runs until the table is dropped.
    pub async fn prune_on_routing_changes(self, table: RoutingTable) {
        let mut changes = table.subscribe();
        while changes.changed().await.is_ok() {
            let snapshot = changes.borrow_and_update().clone();
            let live: std::collections::HashSet<&str> = snapshot.addresses().collect();
            self.channels
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|(address, _), _| live.contains(address.as_str()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_proto::internal::InternalInvokeRequest;
    use tandem_proto::internal::mesh_client::MeshClient;

    #[tokio::test]
    async fn a_refused_connection_counts_as_never_sent() {
        // Bind then drop: the port is closed, so connecting is refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let connection = GrpcConnection::new(&format!("127.0.0.1:{port}")).unwrap();
        let origin = connection.origin();
        let status =
            MeshClient::with_origin(connection, origin).invoke(InternalInvokeRequest::default()).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(never_sent(&status), "{status:?}");
    }

    #[test]
    fn statuses_from_the_other_side_may_have_been_delivered() {
        assert!(!never_sent(&Status::unavailable("app said so")));
        assert!(!never_sent(&Status::internal("boom")));
    }

    #[tokio::test]
    async fn one_channel_per_address_and_app() {
        let pool = PeerChannels::default();
        pool.get("127.0.0.1:1", "a").unwrap();
        pool.get("127.0.0.1:1", "a").unwrap();
        pool.get("127.0.0.1:2", "a").unwrap();
        pool.get("127.0.0.1:2", "b").unwrap();
        assert_eq!(pool.len(), 3);
        assert!(pool.get("not an address", "a").unwrap_err().contains("not a valid address"));
    }
}
