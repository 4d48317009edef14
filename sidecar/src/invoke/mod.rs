//! Service invocation: app -> its sidecar ([`outbound`]) -> peer sidecar ([`inbound`]) -> peer app.
//!
//! - [`balance`]: which instance a call goes to (p2c or round robin), and outlier ejection.
//! - [`channels`]: the pool of connections to peer sidecars; which failures mean "never sent".
//! - [`headers`]: which metadata travels between the apps.

pub mod balance;
pub mod channels;
pub mod headers;
pub mod inbound;
pub mod outbound;

pub use inbound::MeshInbound;
pub use outbound::{Invocation, InvocationReply, Invoker};

use std::time::Instant;

use tonic::{Code, Status};

use crate::error::MeshError;

/// Runs `call` within the caller's deadline (if any). Calls that end after the deadline, by
/// our timer or with the next hop's CANCELLED/DEADLINE_EXCEEDED, answer DEADLINE_EXCEEDED.
///
/// Callers pass a generated client's call boxed: its future is kilobytes, and an async fn
/// holds a future argument twice (once as the argument, once while awaiting it), so every
/// wrapper would double it and every move copy it (BENCHMARKS.md, pub/sub).
pub(crate) async fn within_deadline<T>(
    deadline: Option<Instant>,
    describe: impl Fn() -> (String, String),
    call: impl Future<Output = Result<T, Status>>,
) -> Result<Result<T, Status>, MeshError> {
    let Some(deadline) = deadline else { return Ok(call.await) };
    let started = Instant::now();
    let exceeded = || {
        let (app_id, method) = describe();
        MeshError::DeadlineExceeded { app_id, method, elapsed_ms: started.elapsed().as_millis() }
    };
    match tokio::time::timeout_at(deadline.into(), call).await {
        Err(_) => Err(exceeded()),
        Ok(Err(status))
            if Instant::now() >= deadline && matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded) =>
        {
            Err(exceeded())
        }
        Ok(result) => Ok(result),
    }
}
