//! A sidecar whose data dir fills up (a small tmpfs of its own, filled by another writer):
//! state writes and publishes are refused with RESOURCE_EXHAUSTED naming the directory, reads
//! go on, /readyz says why; after a kill -9 it starts again on the full disk (its reserve
//! released) and serves what it had acknowledged; once space is freed it writes again.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tandem_sdk::Code;
use tandem_tests::pubsub::{Inbox, subscriber, wait_until_subscribed};
use tandem_tests::{Etcd, RunningSidecar, Sidecar, eventually, http};

/// A tmpfs mounted for the test, unmounted when dropped.
struct SmallDisk {
    mount: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(megabytes: u32) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let mount = dir.path().join("disk");
        std::fs::create_dir(&mount).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(&mount)
            .status()
            .expect("running mount");
        assert!(status.success(), "mounting a tmpfs at {} (the test runs as root)", mount.display());
        SmallDisk { mount, _dir: dir }
    }

    /// Writes a file until the file system refuses more.
    fn fill(&self) -> PathBuf {
        let path = self.mount.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![7u8; 64 * 1024];
        loop {
            match file.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        // A last partial chunk may fit.
        let _ = file.write_all(&chunk[..4096]);
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

async fn start(etcd: &Etcd, data_dir: &Path) -> RunningSidecar {
    let sidecar = start_unready(etcd, data_dir).await;
    sidecar.wait_ready().await;
    sidecar
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_data_dir_refuses_writes_by_name_serves_reads_and_restarts() {
    let etcd = Etcd::start().await;
    let disk = SmallDisk::mount(48);
    let data_dir = disk.mount.join("ledger");
    let mut ledger = start(&etcd, &data_dir).await;
    assert_eq!(std::fs::metadata(data_dir.join(".tandem-reserve")).unwrap().len(), 4 << 20, "the reserve is kept");

    // A subscriber elsewhere, so that publishes are kept in ledger's outbox.
    let inbox = Inbox::default();
    let app = subscriber("entries", &inbox).await;
    let reader = Sidecar::new("reader").etcd(&etcd).app_port(app.port()).spawn().await;
    reader.wait_ready().await;
    let client = ledger.client();
    wait_until_subscribed(&client, "entries", &inbox).await;
    client.save_state("statestore", "balance", b"100".to_vec()).await.expect("saving with room to spare");
    client.publish("pubsub", "entries", b"{\"n\":1}".to_vec(), "application/json").await.expect("publishing");

    // Someone else fills the disk.
    let filler = disk.fill();
    let err = client.save_state("statestore", "balance", b"200".to_vec()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let shown = data_dir.display().to_string();
    assert!(err.message().contains(&format!("the data dir {shown} is full")), "{}", err.message());
    let err = client.publish("pubsub", "entries", b"{\"n\":2}".to_vec(), "application/json").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains(&shown), "{}", err.message());
    // Reads go on, and what was acknowledged is there.
    let balance = client.get_state("statestore", "balance").await.unwrap().expect("the balance");
    assert_eq!(balance.value, b"100");
    let (code, body) = ledger.get("/readyz").await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("is full"), "{body}");
    // The HTTP API says the same with 507 Insufficient Storage.
    let body = br#"[{"key":"balance","value":"300"}]"#;
    let headers = [("content-type", "application/json")];
    let answer = http::request(ledger.http_addr(), "POST", "/v1.0/state/statestore", &headers, body).await.unwrap();
    assert_eq!(answer.status, 507, "{}", answer.text());
    assert_eq!(answer.json()["errorCode"], "ERR_STATE_SAVE");

    // kill -9, and start again on the full disk: the reserve is released so the stores open.
    ledger.kill9().await;
    drop(ledger);
    let ledger = start_unready(&etcd, &data_dir).await;
    assert!(!data_dir.join(".tandem-reserve").exists(), "the reserve was released");
    let client = ledger.client();
    let balance = client.get_state("statestore", "balance").await.unwrap().expect("the balance after restart");
    assert_eq!(balance.value, b"100");
    let err = client.save_state("statestore", "balance", b"200".to_vec()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    eventually(Duration::from_secs(20), "the event published before the disk filled", || {
        let inbox = inbox.clone();
        async move { inbox.has("{\"n\":1}") }
    })
    .await;

    // Space is freed: writes are accepted again, and the reserve is back.
    std::fs::remove_file(filler).unwrap();
    ledger.wait_ready().await;
    client.save_state("statestore", "balance", b"200".to_vec()).await.expect("saving once space is back");
    assert_eq!(client.get_state("statestore", "balance").await.unwrap().unwrap().value, b"200");
    eventually(Duration::from_secs(10), "the reserve written again", || {
        let reserve = data_dir.join(".tandem-reserve");
        async move { reserve.metadata().is_ok_and(|m| m.len() == 4 << 20) }
    })
    .await;
}

/// Starts the sidecar without waiting for /readyz (not ready while the disk is full).
async fn start_unready(etcd: &Etcd, data_dir: &Path) -> RunningSidecar {
    Sidecar::new("ledger")
        .etcd(etcd)
        .data_dir(data_dir)
        .arg("--min-free-disk")
        .arg("8Mi")
        .arg("--disk-reserve")
        .arg("4Mi")
        .spawn()
        .await
}
