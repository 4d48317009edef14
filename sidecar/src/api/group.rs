//! `tandem.group.v1.TrainingGroup`: the app-facing half of training groups (see
//! [`crate::group`]), served on the app-facing port beside Dapr's API.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use tandem_proto::group::training_group_server::TrainingGroup;
use tandem_proto::group::{
    AllReduceRequest, AllReduceResponse, BroadcastRequest, BroadcastResponse, JoinRequest, JoinResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::group::{Groups, session};
use crate::metrics::Metrics;

/// The messages a Join stream sends the app (rounds and waiting notices).
pub type JoinStream = Pin<Box<dyn Stream<Item = Result<JoinResponse, Status>> + Send>>;

pub struct TrainingGroupApi {
    groups: Arc<Groups>,
    metrics: Arc<Metrics>,
}

impl TrainingGroupApi {
    pub fn new(groups: Arc<Groups>, metrics: Arc<Metrics>) -> Self {
        TrainingGroupApi { groups, metrics }
    }

    async fn join(&self, mut incoming: Streaming<JoinRequest>) -> Result<JoinStream, Status> {
        let first = incoming
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the Join stream closed before its first message (the options)"))?;
        // A round or a notice at a time: the member's session waits for the app to read them.
        let (out, responses) = mpsc::channel(4);
        tokio::spawn(session::run(self.groups.clone(), first, incoming, out));
        Ok(Box::pin(ReceiverStream::new(responses)))
    }
}

#[tonic::async_trait]
impl TrainingGroup for TrainingGroupApi {
    type JoinStream = JoinStream;

    async fn join(&self, request: Request<Streaming<JoinRequest>>) -> Result<Response<JoinStream>, Status> {
        self.metrics.observe_api("Join", self.join(request.into_inner())).await.map(Response::new)
    }

    async fn all_reduce(&self, request: Request<AllReduceRequest>) -> Result<Response<AllReduceResponse>, Status> {
        let request = request.into_inner();
        let call = async {
            let (data, round_ends) =
                self.groups.all_reduce(&request.group, request.round, request.step, &request.data).await?;
            Ok::<_, Status>(AllReduceResponse { data, round_ends })
        };
        self.metrics.observe_api("AllReduce", call).await.map(Response::new)
    }

    async fn broadcast(&self, request: Request<BroadcastRequest>) -> Result<Response<BroadcastResponse>, Status> {
        let request = request.into_inner();
        let call = async {
            let data = self.groups.broadcast(&request.group, request.round, request.root_rank, request.data).await?;
            Ok::<_, Status>(BroadcastResponse { data })
        };
        self.metrics.observe_api("Broadcast", call).await.map(Response::new)
    }
}
