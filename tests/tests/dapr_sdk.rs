//! Wire compatibility with Dapr: the official Rust SDK (`dapr` crate) as the calling client,
//! and an app built on the SDK's own generated AppCallback server as the callee.

use dapr::client::TonicClientWithAuth;
use dapr::dapr::proto::common::v1 as dapr_common;
use dapr::dapr::proto::runtime::v1 as dapr_runtime;
use dapr_runtime::app_callback_server::{AppCallback, AppCallbackServer};
use prost_types::Any;
use tonic::{Request, Response, Status};

use tandem_tests::{Etcd, Sidecar, eventually};

/// A callee written against Dapr's generated code: uppercases the payload of `shout`.
struct DaprApp;

#[tonic::async_trait]
impl AppCallback for DaprApp {
    async fn on_invoke(
        &self,
        request: Request<dapr_common::InvokeRequest>,
    ) -> Result<Response<dapr_common::InvokeResponse>, Status> {
        let caller =
            request.metadata().get("dapr-caller-app-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let message = request.into_inner();
        if message.method != "shout" {
            return Err(Status::unimplemented(format!("no method '{}'", message.method)));
        }
        let text = String::from_utf8(message.data.map(|d| d.value).unwrap_or_default()).unwrap();
        Ok(Response::new(dapr_common::InvokeResponse {
            data: Some(Any {
                type_url: String::new(),
                value: format!("{} (from {caller})", text.to_uppercase()).into_bytes(),
            }),
            content_type: "text/plain".into(),
        }))
    }

    async fn list_topic_subscriptions(
        &self,
        _: Request<()>,
    ) -> Result<Response<dapr_runtime::ListTopicSubscriptionsResponse>, Status> {
        Ok(Response::new(Default::default()))
    }

    async fn on_topic_event(
        &self,
        _: Request<dapr_runtime::TopicEventRequest>,
    ) -> Result<Response<dapr_runtime::TopicEventResponse>, Status> {
        Err(Status::unimplemented("no topics"))
    }

    async fn list_input_bindings(
        &self,
        _: Request<()>,
    ) -> Result<Response<dapr_runtime::ListInputBindingsResponse>, Status> {
        Ok(Response::new(Default::default()))
    }

    async fn on_binding_event(
        &self,
        _: Request<dapr_runtime::BindingEventRequest>,
    ) -> Result<Response<dapr_runtime::BindingEventResponse>, Status> {
        Err(Status::unimplemented("no bindings"))
    }

    async fn on_job_event(
        &self,
        _: Request<dapr_runtime::JobEventRequest>,
    ) -> Result<Response<dapr_runtime::JobEventResponse>, Status> {
        Err(Status::unimplemented("no jobs"))
    }

    async fn on_bulk_topic_event(
        &self,
        _: Request<dapr_runtime::TopicEventBulkRequest>,
    ) -> Result<Response<dapr_runtime::TopicEventBulkResponse>, Status> {
        Err(Status::unimplemented("no topics"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_dapr_rust_sdk_talks_to_tandemd_unchanged() {
    let etcd = Etcd::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_port = listener.local_addr().unwrap().port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AppCallbackServer::new(DaprApp))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let callee = Sidecar::new("dapr-callee").etcd(&etcd).app_port(app_port).spawn().await;
    let caller = Sidecar::new("dapr-caller").etcd(&etcd).spawn().await;
    callee.wait_ready().await;
    caller.wait_ready().await;

    let mut client =
        dapr::Client::<TonicClientWithAuth>::connect_with_address(format!("http://{}", caller.grpc_addr()))
            .await
            .expect("the Dapr SDK connects to tandemd");

    let metadata = client.get_metadata().await.unwrap();
    assert_eq!(metadata.id, "dapr-caller");
    assert!(metadata.runtime_version.starts_with("tandem-"));

    let payload = Some(Any { type_url: String::new(), value: b"hello".to_vec() });
    eventually(std::time::Duration::from_secs(20), "dapr-callee routable", || {
        let mut client = client.clone();
        let payload = payload.clone();
        async move { client.invoke_service("dapr-callee", "shout", payload).await.is_ok() }
    })
    .await;
    let reply = client.invoke_service("dapr-callee", "shout", payload).await.unwrap();
    assert_eq!(reply.data.unwrap().value, b"HELLO (from dapr-caller)");
    assert_eq!(reply.content_type, "text/plain");

    // Errors come back as gRPC statuses the SDK reports.
    let err = client.invoke_service("nobody", "shout", None).await.unwrap_err();
    let text = format!("{err:?}");
    assert!(text.contains("NotFound") && text.contains("nobody"), "{text}");

    // Methods of Dapr's API that Tandem does not implement answer UNIMPLEMENTED.
    let err = client.get_secret("secrets", "k").await.unwrap_err();
    assert!(format!("{err:?}").contains("Unimplemented"), "{err:?}");
}
