//! Waiting until a topic has a subscriber, before publishing to it.
//!
//! Why: a pub/sub topic without subscribers takes an event and keeps nothing (as in Dapr), and
//! a subscriber's sidecar records its subscriptions only once the app is up and healthy. The
//! services start in any order, so a publisher could otherwise lose the first batches. The
//! publisher sends a [`Probe`] on the topic until the subscriber acknowledges it by invoking
//! the publisher's [`methods::PROBE_ACK`]; the acknowledgement is written to the publisher's
//! state (`probe-ack/NONCE`), so it counts whichever replica of the publisher receives it.

use std::time::{Duration, Instant};

use tandem_sdk::{Reply, SidecarClient, Status};

use crate::json;
use crate::messages::{JSON, PUBSUB, Probe, STATE_STORE, methods};

#[derive(serde::Serialize, serde::Deserialize)]
struct Ack {
    nonce: String,
}

fn ack_key(nonce: &str) -> String {
    format!("probe-ack/{nonce}")
}

/// Publishes probes (`encode` turns one into the topic's message) every `interval` until one
/// is acknowledged. Logs while it waits.
pub async fn wait_for_subscriber(
    sidecar: &SidecarClient,
    topic: &str,
    reply_to: &str,
    interval: Duration,
    encode: impl Fn(Probe) -> Vec<u8>,
) {
    let nonce = format!("{reply_to}-{}-{}", std::process::id(), unique());
    let probe = Probe { nonce: nonce.clone(), reply_to: reply_to.to_string() };
    let start = Instant::now();
    let mut logged = Instant::now() - Duration::from_secs(60);
    loop {
        if let Err(status) = sidecar.publish(PUBSUB, topic, encode(probe.clone()), JSON).await {
            tracing::debug!(topic, error = %status.message(), "probe not published yet");
        }
        let deadline = Instant::now() + interval;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = sidecar.get_state(STATE_STORE, &ack_key(&nonce)).await {
                tracing::info!(topic, waited = ?start.elapsed(), "topic has a subscriber");
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if logged.elapsed() >= Duration::from_secs(5) {
            tracing::info!(topic, waited = ?start.elapsed(), "waiting for a subscriber of the topic");
            logged = Instant::now();
        }
    }
}

/// The subscriber's side: acknowledges `probe` to its sender.
pub async fn acknowledge(sidecar: &SidecarClient, probe: &Probe) -> Result<(), Status> {
    let ack = json::encode(&Ack { nonce: probe.nonce.clone() });
    sidecar
        .invoke_with(&probe.reply_to, methods::PROBE_ACK, ack, tandem_sdk::CallOptions::default().content_type(JSON))
        .await?;
    Ok(())
}

/// The publisher's `probe_ack` handler: records the acknowledgement in its state.
pub async fn record_ack(sidecar: &SidecarClient, data: &[u8]) -> Result<Reply, Status> {
    let ack: Ack = json::request(data, "the probe acknowledgement")?;
    sidecar
        .save_state_with(STATE_STORE, &ack_key(&ack.nonce), b"1".to_vec(), None, Some(Duration::from_secs(3600)))
        .await?;
    json::reply(&serde_json::json!({}))
}

fn unique() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}
