//! State tests' helpers: component files in a temp dir, and a thin client of the sidecar's
//! state API (the raw Dapr protos, so tests see exactly what a Dapr SDK would send).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;

use tandem_proto::common::state_options::StateConcurrency;
use tandem_proto::common::{Etag, StateItem, StateOptions};
use tandem_proto::runtime::dapr_client::DaprClient;
use tandem_proto::runtime::{
    BulkStateItem, DeleteBulkStateRequest, DeleteStateRequest, ExecuteStateTransactionRequest, GetBulkStateRequest,
    GetStateRequest, GetStateResponse, SaveStateRequest, TransactionalStateOperation,
};
use tempfile::TempDir;
use tonic::Status;
use tonic::transport::Channel;

/// A Dapr component file's text.
pub fn component_yaml(name: &str, kind: &str, metadata: &[(&str, &str)]) -> String {
    let mut text = format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: {name}\nspec:\n  type: {kind}\n  version: v1\n"
    );
    if !metadata.is_empty() {
        text.push_str("  metadata:\n");
        for (key, value) in metadata {
            text.push_str(&format!("  - name: {key}\n    value: \"{value}\"\n"));
        }
    }
    text
}

/// A `--resources-path` directory holding one file per component.
pub struct ResourcesDir {
    dir: TempDir,
}

/// A component to declare: (name, type, metadata as (name, value) pairs).
pub type ComponentDecl<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);

impl ResourcesDir {
    pub fn new(components: &[ComponentDecl<'_>]) -> ResourcesDir {
        let dir = tempfile::Builder::new().prefix("tandem-resources-").tempdir().expect("temp dir");
        for (name, kind, metadata) in components {
            std::fs::write(dir.path().join(format!("{name}.yaml")), component_yaml(name, kind, metadata))
                .expect("writing a component file");
        }
        ResourcesDir { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A write's options: ETag, concurrency and metadata (e.g. ttlInSeconds).
#[derive(Debug, Clone, Default)]
pub struct Write {
    pub etag: Option<String>,
    pub first_write: bool,
    pub metadata: Vec<(String, String)>,
}

impl Write {
    pub fn etag(etag: &str) -> Write {
        Write { etag: Some(etag.to_string()), ..Default::default() }
    }

    pub fn first_write() -> Write {
        Write { first_write: true, ..Default::default() }
    }

    pub fn ttl(seconds: &str) -> Write {
        Write { metadata: vec![("ttlInSeconds".into(), seconds.into())], ..Default::default() }
    }

    pub fn item(&self, key: &str, value: &[u8]) -> StateItem {
        StateItem {
            key: key.to_string(),
            value: value.to_vec(),
            etag: self.etag.clone().map(|value| Etag { value }),
            metadata: self.metadata.iter().cloned().collect(),
            options: self.first_write.then_some(StateOptions {
                concurrency: StateConcurrency::ConcurrencyFirstWrite as i32,
                consistency: 0,
            }),
        }
    }
}

/// The state API of one sidecar, for one store.
#[derive(Clone)]
pub struct StateClient {
    client: DaprClient<Channel>,
    pub store: String,
}

impl StateClient {
    pub async fn connect(sidecar: SocketAddr, store: &str) -> StateClient {
        let client = DaprClient::connect(format!("http://{sidecar}")).await.expect("connecting to the sidecar");
        StateClient { client: client.max_decoding_message_size(usize::MAX), store: store.to_string() }
    }

    /// The same sidecar, another store.
    pub fn with_store(&self, store: &str) -> StateClient {
        StateClient { client: self.client.clone(), store: store.to_string() }
    }

    pub async fn get(&self, key: &str) -> Result<GetStateResponse, Status> {
        let request = GetStateRequest { store_name: self.store.clone(), key: key.into(), ..Default::default() };
        Ok(self.client.clone().get_state(request).await?.into_inner())
    }

    /// The value, `None` when absent.
    pub async fn value(&self, key: &str) -> Option<Vec<u8>> {
        let found = self.get(key).await.expect("GetState");
        (!found.etag.is_empty()).then_some(found.data)
    }

    pub async fn etag(&self, key: &str) -> String {
        self.get(key).await.expect("GetState").etag
    }

    pub async fn save(&self, key: &str, value: &[u8]) -> Result<(), Status> {
        self.save_with(key, value, Write::default()).await
    }

    pub async fn save_with(&self, key: &str, value: &[u8], write: Write) -> Result<(), Status> {
        self.save_items(vec![write.item(key, value)]).await
    }

    pub async fn save_items(&self, states: Vec<StateItem>) -> Result<(), Status> {
        let request = SaveStateRequest { store_name: self.store.clone(), states };
        self.client.clone().save_state(request).await?;
        Ok(())
    }

    pub async fn delete(&self, key: &str, etag: Option<&str>) -> Result<(), Status> {
        let request = DeleteStateRequest {
            store_name: self.store.clone(),
            key: key.into(),
            etag: etag.map(|value| Etag { value: value.into() }),
            ..Default::default()
        };
        self.client.clone().delete_state(request).await?;
        Ok(())
    }

    pub async fn delete_bulk(&self, items: Vec<StateItem>) -> Result<(), Status> {
        let request = DeleteBulkStateRequest { store_name: self.store.clone(), states: items };
        self.client.clone().delete_bulk_state(request).await?;
        Ok(())
    }

    pub async fn get_bulk(&self, keys: &[&str]) -> Result<HashMap<String, BulkStateItem>, Status> {
        let request = GetBulkStateRequest {
            store_name: self.store.clone(),
            keys: keys.iter().map(|k| k.to_string()).collect(),
            ..Default::default()
        };
        let items = self.client.clone().get_bulk_state(request).await?.into_inner().items;
        Ok(items.into_iter().map(|item| (item.key.clone(), item)).collect())
    }

    /// `operations`: ("upsert" | "delete" | anything, item).
    pub async fn transact(&self, operations: Vec<(&str, StateItem)>) -> Result<(), Status> {
        let request = ExecuteStateTransactionRequest {
            store_name: self.store.clone(),
            operations: operations
                .into_iter()
                .map(|(kind, item)| TransactionalStateOperation { operation_type: kind.into(), request: Some(item) })
                .collect(),
            metadata: HashMap::new(),
        };
        self.client.clone().execute_state_transaction(request).await?;
        Ok(())
    }
}
