//! Registers this instance in etcd under a lease and keeps the lease alive. When etcd is
//! lost the registration is retried with backoff and comes back by itself; on shutdown the
//! lease is revoked first, so peers stop routing here at once instead of after the TTL.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, PutOptions, Txn, TxnOp};
use tokio_util::sync::CancellationToken;

use super::keys;
use super::{Backoff, InstanceRecord};
use crate::readiness::Readiness;

pub struct Registrar {
    client: Client,
    namespace: String,
    record: InstanceRecord,
    ttl_seconds: i64,
    readiness: Arc<Readiness>,
}

impl Registrar {
    pub fn new(
        client: Client,
        namespace: String,
        record: InstanceRecord,
        ttl_seconds: i64,
        readiness: Arc<Readiness>,
    ) -> Self {
        Registrar { client, namespace, record, ttl_seconds, readiness }
    }

    /// Keeps the instance registered until `stop` is cancelled, then revokes its lease.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut backoff = Backoff::new();
        loop {
            let registered = tokio::select! {
                _ = stop.cancelled() => return,
                result = self.register() => result,
            };
            match registered {
                Ok(lease_id) => {
                    backoff.reset();
                    self.readiness.set_registered(true);
                    tracing::info!(lease_id, app_id = %self.record.app_id, instance_id = %self.record.instance_id, "registered in etcd");
                    let ended = self.keep_alive(lease_id, &stop).await;
                    self.readiness.set_registered(false);
                    match ended {
                        KeepAlive::Stopped => {
                            self.revoke(lease_id).await;
                            return;
                        }
                        KeepAlive::Lost(reason) => tracing::warn!(reason, "etcd registration lost; registering again"),
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not register in etcd; retrying"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff.step()) => {}
            }
        }
    }

    async fn register(&mut self) -> Result<i64, etcd_client::Error> {
        let lease = self.client.lease_grant(self.ttl_seconds, None).await?;
        let lease_id = lease.id();
        let value = serde_json::to_vec(&self.record).expect("an instance record always serializes");
        // One transaction, so no watcher ever sees the app known but without this instance.
        let app_key = keys::app_key(&self.namespace, &self.record.app_id);
        let instance_key = keys::instance_key(&self.namespace, &self.record.app_id, &self.record.instance_id);
        let txn = Txn::new().and_then([
            TxnOp::put(app_key, "{}", None),
            TxnOp::put(instance_key, value, Some(PutOptions::new().with_lease(lease_id))),
        ]);
        self.client.txn(txn).await?;
        Ok(lease_id)
    }

    async fn keep_alive(&mut self, lease_id: i64, stop: &CancellationToken) -> KeepAlive {
        match keep_lease_alive(&mut self.client, lease_id, self.ttl_seconds, stop).await {
            Ok(()) => KeepAlive::Stopped,
            Err(reason) => KeepAlive::Lost(reason),
        }
    }

    async fn revoke(&mut self, lease_id: i64) {
        match tokio::time::timeout(Duration::from_secs(2), self.client.lease_revoke(lease_id)).await {
            Ok(Ok(_)) => tracing::info!(lease_id, "lease revoked; instance removed from discovery"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not revoke lease; peers drop this instance when it expires")
            }
            Err(_) => tracing::warn!("revoking the lease timed out; peers drop this instance when it expires"),
        }
    }
}

/// Keeps lease `lease_id` (of `ttl_seconds`) alive until `stop` is cancelled (`Ok`), or until a
/// refresh fails (`Err`, why: the lease may be gone). Three refreshes per TTL: one lost refresh
/// never lets the lease lapse.
pub(crate) async fn keep_lease_alive(
    client: &mut Client,
    lease_id: i64,
    ttl_seconds: i64,
    stop: &CancellationToken,
) -> Result<(), String> {
    let (mut keeper, mut responses) =
        client.lease_keep_alive(lease_id).await.map_err(|e| format!("opening keep-alive: {e}"))?;
    let period = Duration::from_millis((ttl_seconds as u64 * 1000 / 3).max(300));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(period) => {}
        }
        let refreshed = tokio::time::timeout(period, async {
            keeper.keep_alive().await?;
            responses.message().await
        })
        .await;
        match refreshed {
            Ok(Ok(Some(response))) if response.ttl() > 0 => {}
            Ok(Ok(Some(_))) => return Err("lease expired".into()),
            Ok(Ok(None)) => return Err("keep-alive stream ended".into()),
            Ok(Err(e)) => return Err(format!("keep-alive: {e}")),
            Err(_) => return Err("keep-alive timed out".into()),
        }
    }
}

enum KeepAlive {
    Stopped,
    Lost(String),
}
