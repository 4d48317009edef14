//! Discovery through etcd: each instance registers under a lease ([`registration`]), every
//! sidecar watches its namespace and keeps a [`RoutingTable`] ([`watcher`]).
//!
//! Key layout (see [`keys`]): `/tandem/v1/{namespace}/apps/{app_id}` marks an app as known
//! (no lease: it outlives its instances, so "no live instance" differs from "unknown app"),
//! `/tandem/v1/{namespace}/instances/{app_id}/{instance_id}` holds an [`InstanceRecord`] under
//! the instance's lease, and `/tandem/v1/{namespace}/subscriptions/{pubsub}/{topic}/{app_id}` a
//! [`Subscriber`] (no lease: events are kept for subscribers whose instances are all down).

pub mod keys;
pub mod registration;
pub mod routing;
pub mod watcher;

use std::time::Duration;

pub use registration::Registrar;
pub use routing::{Instance, RoutingSnapshot, RoutingTable, Subscriber};
pub use watcher::RoutingWatcher;

use serde::{Deserialize, Serialize};

/// What an instance publishes about itself in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub app_id: String,
    pub instance_id: String,
    /// host:port of the sidecar's internal (sidecar-to-sidecar) API.
    pub internal_address: String,
    /// Whether the instance has an app that can be invoked.
    pub has_app: bool,
    pub runtime_version: String,
    /// host:port of the sidecar's app-facing Dapr gRPC API, so tools (the `tandem` CLI) can
    /// reach the sidecar of a given app, e.g. to read that app's state. Absent in records of
    /// sidecars that predate it; both old and new sidecars read both kinds of record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_address: Option<String>,
}

/// TLS to etcd (`https://` endpoints): the CA that signed etcd's server certificate, and a
/// client certificate and key for etcd's `--client-cert-auth`. Read once, at start.
#[derive(Debug, Clone, Default)]
pub struct EtcdTls {
    ca_pem: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl EtcdTls {
    /// The files given (`None` when none is): a certificate needs its key and the reverse;
    /// errors name the file.
    pub fn read(
        ca: Option<&std::path::Path>,
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
    ) -> Result<Option<EtcdTls>, String> {
        let read = |path: &std::path::Path| {
            let pem = std::fs::read(path).map_err(|e| format!("{}: cannot be read: {e}", path.display()))?;
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN") {
                return Err(format!("{}: holds no PEM block", path.display()));
            }
            Ok(pem)
        };
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            (None, None) => None,
            (Some(_), None) => return Err("--etcd-cert-file needs --etcd-key-file".into()),
            (None, Some(_)) => return Err("--etcd-key-file needs --etcd-cert-file".into()),
        };
        let ca_pem = ca.map(read).transpose()?;
        if ca_pem.is_none() && identity.is_none() {
            return Ok(None);
        }
        Ok(Some(EtcdTls { ca_pem, identity }))
    }

    fn options(&self) -> etcd_client::TlsOptions {
        let mut options = etcd_client::TlsOptions::new();
        if let Some(ca) = &self.ca_pem {
            options = options.ca_certificate(etcd_client::Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &self.identity {
            options = options.identity(etcd_client::Identity::from_pem(cert, key));
        }
        options
    }
}

/// Connects a lazily-connecting etcd client (over TLS with `tls`); calls fail (and are
/// retried by the callers) while etcd is unreachable.
pub async fn etcd_client(
    endpoints: &[String],
    tls: Option<&EtcdTls>,
) -> Result<etcd_client::Client, etcd_client::Error> {
    let mut options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(3))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
    if let Some(tls) = tls {
        options = options.with_tls(tls.options());
    }
    etcd_client::Client::connect(endpoints, Some(options)).await
}

/// The next response of an etcd watch, or why the watch is broken: it ended, etcd cancelled it,
/// or it went silent. A silent watch on a dead connection would hide changes forever, so after
/// 15 s without a message it asks for progress and treats a missing answer as a broken stream.
pub(crate) async fn next_watch_response(
    stream: &mut etcd_client::WatchStream,
) -> Result<etcd_client::WatchResponse, String> {
    let message = match tokio::time::timeout(Duration::from_secs(15), stream.message()).await {
        Ok(message) => message,
        Err(_) => {
            stream.request_progress().await.map_err(|e| format!("watch progress request: {e}"))?;
            tokio::time::timeout(Duration::from_secs(5), stream.message())
                .await
                .map_err(|_| "watch stream stopped answering".to_string())?
        }
    };
    let response = match message {
        Ok(Some(response)) => response,
        Ok(None) => return Err("watch stream ended".into()),
        Err(e) => return Err(format!("watch stream: {e}")),
    };
    if response.canceled() {
        return Err(format!("watch cancelled by etcd: {}", response.cancel_reason()));
    }
    Ok(response)
}

/// Exponential backoff between etcd retries: 100 ms doubling up to 3 s.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(3);

    pub fn new() -> Self {
        Backoff { next: Self::FIRST }
    }

    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    /// The delay to wait now; doubles the next one.
    pub fn step(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_records_without_an_api_address_still_parse() {
        let old = r#"{"app_id":"a","instance_id":"i","internal_address":"127.0.0.1:2","has_app":true,"runtime_version":"tandem-0.1.0"}"#;
        let record: InstanceRecord = serde_json::from_str(old).unwrap();
        assert_eq!(record.api_address, None);
        assert_eq!(record.internal_address, "127.0.0.1:2");
    }

    #[test]
    fn instance_records_carry_the_api_address_and_old_readers_ignore_it() {
        let record = InstanceRecord {
            app_id: "a".into(),
            instance_id: "i".into(),
            internal_address: "127.0.0.1:2".into(),
            has_app: false,
            runtime_version: "tandem-0.1.0".into(),
            api_address: Some("127.0.0.1:1".into()),
        };
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(json["api_address"], "127.0.0.1:1");
        assert_eq!(serde_json::from_value::<InstanceRecord>(json.clone()).unwrap(), record);

        /// The record as sidecars before `api_address` declared it (serde ignores unknown fields).
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct OldRecord {
            app_id: String,
            instance_id: String,
            internal_address: String,
            has_app: bool,
            runtime_version: String,
        }
        let old: OldRecord = serde_json::from_value(json).unwrap();
        assert_eq!(old.internal_address, "127.0.0.1:2");
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut b = Backoff::new();
        assert_eq!(b.step(), Duration::from_millis(100));
        assert_eq!(b.step(), Duration::from_millis(200));
        for _ in 0..10 {
            b.step();
        }
        assert_eq!(b.step(), Backoff::MAX);
        b.reset();
        assert_eq!(b.step(), Duration::from_millis(100));
    }
}
