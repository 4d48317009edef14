//! The apps calling each other through the mesh: in every round ping's code calls pong's
//! [`METHOD`] through ping's sidecar, then pong's code calls ping back through pong's sidecar.
//! Every answer is checked, including the caller's app-id that the sidecars attached.

use std::time::{Duration, Instant};

use anyhow::bail;
use tandem_sdk::{CallOptions, Code, Status};

use crate::mesh::{METHOD, Mesh, Peer, expected_reply};
use crate::stats::{Summary, millis};

/// How long to wait for each sidecar's routing table to learn about the other app.
const ROUTABLE_WITHIN: Duration = Duration::from_secs(15);

/// One call and its answer.
#[derive(Debug, Clone)]
pub struct RoundTrip {
    pub round: u32,
    pub caller: &'static str,
    pub callee: &'static str,
    pub payload: String,
    pub reply: String,
    pub latency: Duration,
}

/// Plays `rounds` rounds, printing each round trip and then the summary.
pub async fn play(mesh: &Mesh, rounds: u32, call_timeout: Duration) -> anyhow::Result<Vec<RoundTrip>> {
    let (ping, pong) = (&mesh.ping, &mesh.pong);
    let ping_to_pong = wait_until_routable(ping, pong, call_timeout).await?;
    let pong_to_ping = wait_until_routable(pong, ping, call_timeout).await?;
    say!(
        "ping -> pong routable after {}, pong -> ping after {} (these first calls are not counted)\n",
        millis(ping_to_pong),
        millis(pong_to_ping)
    )?;

    say!("{:>5}  {:<12}  {:<10}  {:<34}  {:>10}", "round", "call", "payload", "reply", "latency")?;
    let mut trips = Vec::with_capacity(rounds as usize * 2);
    for round in 1..=rounds {
        for (caller, callee) in [(ping, pong), (pong, ping)] {
            let trip = call(caller, callee, round, &format!("ball {round}"), call_timeout).await.map_err(|e| {
                anyhow::anyhow!("round {round}: {} -> {} (method '{METHOD}') failed: {e}", caller.name, callee.name)
            })?;
            say!(
                "{:>5}  {:<12}  {:<10}  {:<34}  {:>10}",
                trip.round,
                format!("{} -> {}", trip.caller, trip.callee),
                format!("\"{}\"", trip.payload),
                format!("\"{}\"", trip.reply),
                millis(trip.latency)
            )?;
            trips.push(trip);
        }
    }

    say!()?;
    let summary = |caller: Option<&str>| {
        Summary::of(trips.iter().filter(|t| caller.is_none_or(|c| t.caller == c)).map(|t| t.latency))
            .expect("at least one round was played")
    };
    say!("summary ({rounds} rounds, every call app -> sidecar -> sidecar -> app and back):")?;
    say!("  all:          {}", summary(None))?;
    say!("  ping -> pong: {}", summary(Some(ping.name)))?;
    say!("  pong -> ping: {}", summary(Some(pong.name)))?;
    Ok(trips)
}

/// Why a call failed.
#[derive(Debug)]
enum CallError {
    /// The mesh (a sidecar or the callee app) answered with an error status.
    Status(Status),
    /// The callee answered, but not what it should have.
    WrongAnswer(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Status(status) => write!(f, "{:?}: {}", status.code(), status.message()),
            CallError::WrongAnswer(text) => f.write_str(text),
        }
    }
}

/// `caller`'s code invokes `callee`'s [`METHOD`] through `caller`'s own sidecar and checks the answer.
async fn call(
    caller: &Peer,
    callee: &Peer,
    round: u32,
    payload: &str,
    timeout: Duration,
) -> Result<RoundTrip, CallError> {
    let options = CallOptions::default().timeout(timeout).content_type("text/plain");
    let started = Instant::now();
    let response = caller
        .client()
        .invoke_with(callee.name, METHOD, payload.as_bytes().to_vec(), options)
        .await
        .map_err(CallError::Status)?;
    let latency = started.elapsed();
    let reply = String::from_utf8_lossy(&response.data).into_owned();
    let expected = expected_reply(callee.name, payload, caller.name);
    if reply != expected {
        return Err(CallError::WrongAnswer(format!("{} answered \"{reply}\", expected \"{expected}\"", callee.name)));
    }
    Ok(RoundTrip { round, caller: caller.name, callee: callee.name, payload: payload.into(), reply, latency })
}

/// Calls until `caller`'s sidecar routes to `callee`: right after start-up its routing table
/// may not have heard of `callee` yet (NOT_FOUND) or of its instance (UNAVAILABLE).
/// Returns how long that took.
async fn wait_until_routable(caller: &Peer, callee: &Peer, timeout: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let error = match call(caller, callee, 0, "warm-up", timeout).await {
            Ok(_) => return Ok(started.elapsed()),
            Err(error) => error,
        };
        let not_yet = matches!(&error, CallError::Status(s) if matches!(s.code(), Code::NotFound | Code::Unavailable));
        if !not_yet || started.elapsed() > ROUTABLE_WITHIN {
            bail!("{}'s first call to {} (method '{METHOD}') failed: {error}", caller.name, callee.name);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
