//! What a group keeps in etcd and how a member's sidecar follows it.
//!
//! Layout under `/tandem/v1/{namespace}/groups/{group}/`: `members/{member_id}` holds a
//! [`MemberRecord`] under the member's own lease (it disappears when the member leaves, its app
//! dies or its sidecar stops renewing), and `round` the current [`RoundRecord`], without a
//! lease, replaced only by compare-and-swap on its `mod_revision`, so two sidecars deciding at
//! once cannot both write a round.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions, WatchStream,
};
use tokio_util::sync::CancellationToken;

use super::rendezvous::{GroupView, LiveMember, MemberRecord, RoundRecord};
use crate::discovery::registration::keep_lease_alive;

/// Everything of one group.
pub fn group_prefix(namespace: &str, group: &str) -> String {
    format!("/tandem/v1/{namespace}/groups/{group}/")
}

fn member_key(prefix: &str, member_id: &str) -> String {
    format!("{prefix}members/{member_id}")
}

fn round_key(prefix: &str) -> String {
    format!("{prefix}round")
}

/// A group's view, listed once and then kept up to date from a watch.
pub struct GroupWatch {
    client: Client,
    prefix: String,
    stream: WatchStream,
    pub view: GroupView,
}

impl GroupWatch {
    /// Lists the group and watches it from the listed revision.
    pub async fn open(mut client: Client, prefix: String) -> Result<GroupWatch, String> {
        let listing = client
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| format!("listing {prefix}: {e}"))?;
        let revision = listing.header().map(|h| h.revision()).unwrap_or(0);
        let mut view = GroupView::default();
        for kv in listing.kvs() {
            apply_put(&prefix, &mut view, kv.key(), kv.value(), kv.create_revision(), kv.mod_revision());
        }
        let stream = client
            .watch(prefix.as_str(), Some(WatchOptions::new().with_prefix().with_start_revision(revision + 1)))
            .await
            .map_err(|e| format!("watching {prefix}: {e}"))?;
        Ok(GroupWatch { client, prefix, stream, view })
    }

    /// Waits for the next change and applies it to the view.
    pub async fn changed(&mut self) -> Result<(), String> {
        let response = crate::discovery::next_watch_response(&mut self.stream).await?;
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            match event.event_type() {
                EventType::Put => apply_put(
                    &self.prefix,
                    &mut self.view,
                    kv.key(),
                    kv.value(),
                    kv.create_revision(),
                    kv.mod_revision(),
                ),
                EventType::Delete => apply_delete(&self.prefix, &mut self.view, kv.key()),
            }
        }
        Ok(())
    }

    /// Writes (or rewrites) this member's record under `lease`.
    pub async fn put_member(&mut self, record: &MemberRecord, lease: i64) -> Result<(), String> {
        let value = serde_json::to_vec(record).expect("a member record always serializes");
        self.client
            .put(member_key(&self.prefix, &record.member_id), value, Some(PutOptions::new().with_lease(lease)))
            .await
            .map(|_| ())
            .map_err(|e| format!("writing the member record: {e}"))
    }

    /// Writes `round` if the round key is still at `expected_revision`; false when another
    /// sidecar wrote a round first (the watch will show it).
    pub async fn swap_round(&mut self, round: &RoundRecord, expected_revision: i64) -> Result<bool, String> {
        let key = round_key(&self.prefix);
        let value = serde_json::to_vec(round).expect("a round record always serializes");
        let txn = Txn::new()
            .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, expected_revision)])
            .and_then([TxnOp::put(key.as_str(), value, None)]);
        self.client.txn(txn).await.map(|response| response.succeeded()).map_err(|e| format!("writing round: {e}"))
    }
}

fn apply_put(prefix: &str, view: &mut GroupView, key: &[u8], value: &[u8], created: i64, modified: i64) {
    let Some(rest) = std::str::from_utf8(key).ok().and_then(|k| k.strip_prefix(prefix)) else { return };
    if rest == "round" {
        match serde_json::from_slice::<RoundRecord>(value) {
            Ok(round) if !round.members.is_empty() && (round.source_rank as usize) < round.members.len() => {
                view.round = Some(round);
                view.round_revision = modified;
            }
            _ => {
                tracing::warn!(key = %String::from_utf8_lossy(key), "unreadable round record; treated as none");
                view.round = None;
                view.round_revision = modified;
            }
        }
    } else if let Some(member_id) = rest.strip_prefix("members/") {
        match serde_json::from_slice::<MemberRecord>(value) {
            Ok(record) if record.member_id == member_id => {
                view.members.insert(member_id.to_string(), LiveMember { record, joined: created });
            }
            _ => tracing::warn!(key = %String::from_utf8_lossy(key), "unreadable member record; ignored"),
        }
    }
}

fn apply_delete(prefix: &str, view: &mut GroupView, key: &[u8]) {
    let Some(rest) = std::str::from_utf8(key).ok().and_then(|k| k.strip_prefix(prefix)) else { return };
    if rest == "round" {
        view.round = None;
        view.round_revision = 0;
    } else if let Some(member_id) = rest.strip_prefix("members/") {
        view.members.remove(member_id);
    }
}

/// A member's lease: granted with the sidecar's lease TTL, renewed three times per TTL until
/// dropped (then revoked, which deletes the member record at once). `lost` is cancelled when
/// renewing fails, i.e. when the record may already be gone.
pub struct MemberLease {
    pub id: i64,
    pub lost: CancellationToken,
    stop: CancellationToken,
}

impl MemberLease {
    pub async fn grant(client: &Client, ttl_seconds: i64) -> Result<MemberLease, String> {
        let mut client = client.clone();
        let id = client.lease_grant(ttl_seconds, None).await.map_err(|e| format!("granting a lease: {e}"))?.id();
        let (lost, stop) = (CancellationToken::new(), CancellationToken::new());
        tokio::spawn(renew(client, id, ttl_seconds, lost.clone(), stop.clone()));
        Ok(MemberLease { id, lost, stop })
    }
}

impl Drop for MemberLease {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn renew(mut client: Client, id: i64, ttl_seconds: i64, lost: CancellationToken, stop: CancellationToken) {
    match keep_lease_alive(&mut client, id, ttl_seconds, &stop).await {
        Ok(()) => {
            // Left on purpose: revoke, so the others see it at once rather than after the TTL.
            if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(id)).await {
                tracing::warn!(error = %e, "could not revoke a group member's lease; it expires by itself");
            }
        }
        Err(reason) => {
            tracing::warn!(lease = id, reason, "a group member's lease could not be renewed");
            lost.cancel();
        }
    }
}
