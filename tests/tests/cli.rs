//! The `tandem` CLI as a real process: `ls`, `invoke`, `publish`, `state get` and `unsubscribe`
//! against a real etcd, tandemd and app; its errors and exit codes; and `tandem up`'s process
//! management (a child that fails to start, a stop by SIGINT, a train replica killed, restarted
//! and given up on), checked by pid; and the real pipeline with two train replicas, one of them
//! killed while it trains.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use tandem_sdk::{AppServer, Code, EventOutcome, Reply};
use tandem_tests::pubsub::{Inbox, subscriber, wait_until_subscribed};
use tandem_tests::pubsub_cases::{Broker, sidecar};
use tandem_tests::{Etcd, RunningSidecar, Sidecar, TestApp, eventually, free_port, workspace_binary};
use tokio::process::Command;

/// `tandem` with a clean environment for its flags (no TANDEM_* from the caller).
fn tandem(args: &[&str]) -> Command {
    let mut command = Command::new(workspace_binary("tandem"));
    command.args(args).stdin(Stdio::null()).kill_on_drop(true);
    for key in ["TANDEM_ETCD_ENDPOINTS", "TANDEM_NAMESPACE", "TANDEM_SIDECAR", "TANDEM_BIN_DIR"] {
        command.env_remove(key);
    }
    command
}

/// Runs `tandem` to its exit (bounded).
async fn run(args: &[&str]) -> Output {
    let output = tandem(args).output();
    tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .unwrap_or_else(|_| panic!("tandem {args:?} did not exit within 60 s"))
        .expect("running tandem")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts the exit code and that stderr contains every one of `needles`.
fn assert_fails(output: &Output, code: i32, needles: &[&str]) {
    let err = stderr(output);
    assert_eq!(output.status.code(), Some(code), "exit code; stderr:\n{err}\nstdout:\n{}", stdout(output));
    for needle in needles {
        assert!(err.contains(needle), "stderr lacks {needle:?}:\n{err}");
    }
}

/// An app `shop` (echo, and a subscription to `orders`) behind a real tandemd, registered in
/// a real etcd.
struct Shop {
    etcd: Etcd,
    sidecar: RunningSidecar,
    inbox: Inbox,
    _app: TestApp,
}

impl Shop {
    async fn start() -> Shop {
        let etcd = Etcd::start().await;
        let inbox = Inbox::default();
        let received = inbox.clone();
        let app = TestApp::start(
            AppServer::new()
                .handler("echo", |call| async move {
                    Ok(Reply { data: call.data, content_type: call.content_type, metadata: vec![] })
                })
                .subscribe("pubsub", "orders", move |event| {
                    let received = received.clone();
                    async move {
                        received.push(event);
                        EventOutcome::Success
                    }
                }),
        )
        .await;
        let sidecar = Sidecar::new("shop").etcd(&etcd).app_port(app.port()).spawn().await;
        sidecar.wait_ready().await;
        wait_until_subscribed(&sidecar.client(), "orders", &inbox).await;
        Shop { etcd, sidecar, inbox, _app: app }
    }

    fn etcd(&self) -> String {
        self.etcd.endpoint()
    }
}

#[tokio::test]
async fn ls_invoke_publish_and_state_get_work_against_a_real_mesh() {
    let shop = Shop::start().await;
    let etcd = shop.etcd();

    // ls: the app, its instance and the sidecar's API address recorded in etcd.
    let listed = run(&["ls", "--etcd", &etcd, "--json"]).await;
    assert!(listed.status.success(), "{}", stderr(&listed));
    let json: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("ls --json prints JSON");
    let apps = json["apps"].as_array().unwrap();
    assert_eq!(apps.len(), 1, "{json}");
    assert_eq!(apps[0]["app_id"], "shop");
    let instance = &apps[0]["instances"][0];
    assert_eq!(instance["api_address"], shop.sidecar.grpc_addr().to_string(), "{json}");
    assert_eq!(instance["internal_address"], shop.sidecar.internal_addr().to_string());
    assert_eq!(json["subscriptions"][0]["topic"], "orders", "{json}");
    let table = run(&["ls", "--etcd", &etcd]).await;
    assert!(table.status.success(), "{}", stderr(&table));
    let text = stdout(&table);
    assert!(text.contains("shop") && text.contains(&shop.sidecar.grpc_addr().to_string()), "{text}");
    assert!(text.contains("pubsub/orders"), "{text}");

    // invoke, through the sidecar found in etcd.
    let echoed = run(&["invoke", "shop", "echo", "--data", r#"{"n": 1}"#, "--etcd", &etcd]).await;
    assert!(echoed.status.success(), "{}", stderr(&echoed));
    assert_eq!(stdout(&echoed), "{\"n\": 1}\n");
    // ... and through a sidecar named on the command line.
    let sidecar_url = format!("http://{}", shop.sidecar.grpc_addr());
    let echoed = run(&["invoke", "shop", "echo", "-d", "[2]", "--sidecar", &sidecar_url]).await;
    assert!(echoed.status.success(), "{}", stderr(&echoed));
    assert_eq!(stdout(&echoed), "[2]\n");

    // publish: the subscriber gets the event.
    let published = run(&["publish", "pubsub", "orders", "--data", r#"{"order": 7}"#, "--etcd", &etcd]).await;
    assert!(published.status.success(), "{}", stderr(&published));
    let inbox = shop.inbox.clone();
    eventually(Duration::from_secs(20), "the published order at the subscriber", || {
        let inbox = inbox.clone();
        async move { inbox.has(r#"{"order": 7}"#) }
    })
    .await;
    let event = shop.inbox.events().into_iter().find(|e| e.data == br#"{"order": 7}"#).unwrap();
    assert_eq!(event.data_content_type, "application/json");

    // state get: what the app saved through its own sidecar.
    shop.sidecar.client().save_state("statestore", "cart", br#"{"items": 3}"#.to_vec()).await.unwrap();
    let read = run(&["state", "get", "shop", "cart", "--etcd", &etcd]).await;
    assert!(read.status.success(), "{}", stderr(&read));
    assert_eq!(stdout(&read), "{\"items\": 3}\n");
    let read = run(&["state", "get", "shop", "cart", "--sidecar", &sidecar_url, "--etag"]).await;
    assert!(read.status.success(), "{}", stderr(&read));
    assert!(stderr(&read).contains("etag: "), "{}", stderr(&read));
}

#[tokio::test]
async fn bad_input_gets_a_clear_message_and_a_nonzero_exit_code() {
    let shop = Shop::start().await;
    let etcd = shop.etcd();

    let unknown = run(&["invoke", "nope", "echo", "--data", "{}", "--etcd", &etcd]).await;
    assert_fails(&unknown, 4, &["unknown app 'nope' in namespace 'default'", "known apps: shop"]);
    // Through a given sidecar, the sidecar itself refuses the app-id.
    let sidecar_url = format!("http://{}", shop.sidecar.grpc_addr());
    let unknown = run(&["invoke", "nope", "echo", "--data", "{}", "--sidecar", &sidecar_url]).await;
    assert_fails(&unknown, 4, &["nope", "NotFound"]);
    let unknown = run(&["state", "get", "nope", "k", "--etcd", &etcd]).await;
    assert_fails(&unknown, 4, &["unknown app 'nope'"]);

    let malformed = run(&["invoke", "shop", "echo", "--data", r#"{"n": }"#, "--etcd", &etcd]).await;
    assert_fails(&malformed, 2, &["--data is not valid JSON", "column"]);
    let malformed = run(&["publish", "pubsub", "orders", "--data", "[1,", "--etcd", &etcd]).await;
    assert_fails(&malformed, 2, &["--data is not valid JSON"]);
    let missing = run(&["publish", "pubsub", "orders", "--etcd", &etcd]).await;
    assert_fails(&missing, 2, &["publish needs the event"]);
    let no_file = run(&["invoke", "shop", "echo", "--data-file", "/nonexistent/payload.json", "--etcd", &etcd]).await;
    assert_fails(&no_file, 2, &["/nonexistent/payload.json"]);
    let bad_url = run(&["invoke", "shop", "echo", "--sidecar", "https://127.0.0.1:1"]).await;
    assert_fails(&bad_url, 2, &["TLS is not supported"]);

    let no_key = run(&["state", "get", "shop", "missing-key", "--etcd", &etcd]).await;
    assert_fails(&no_key, 4, &["no key 'missing-key' in store 'statestore' of app 'shop'"]);
    let no_store = run(&["state", "get", "shop", "k", "--store", "nostore", "--etcd", &etcd]).await;
    assert_fails(&no_store, 2, &["nostore"]);
    // State lives in the app's own sidecar: another app's sidecar is refused.
    let other = Sidecar::new("other").etcd(&shop.etcd).spawn().await;
    let other_url = format!("http://{}", other.grpc_addr());
    let wrong = run(&["state", "get", "shop", "cart", "--sidecar", &other_url]).await;
    assert_fails(&wrong, 2, &["fronts app 'other', not 'shop'"]);

    // unsubscribe: only an existing subscription, and not one of an app that is still running.
    let none = run(&["unsubscribe", "pubsub", "nothing", "shop", "--etcd", &etcd]).await;
    assert_fails(
        &none,
        4,
        &["app 'shop' has no subscription to topic 'nothing' of pub/sub 'pubsub'", "its subscriptions: pubsub/orders"],
    );
    let live = run(&["unsubscribe", "pubsub", "orders", "shop", "--etcd", &etcd]).await;
    assert_fails(&live, 2, &["app 'shop' has 1 live instance(s)", "--force"]);
    let listed = run(&["ls", "--etcd", &etcd]).await;
    assert!(stdout(&listed).contains("pubsub/orders"), "a refused unsubscribe removes nothing: {}", stdout(&listed));

    let nowhere = format!("http://127.0.0.1:{}", free_port());
    for args in [
        vec!["ls", "--etcd", &nowhere],
        vec!["unsubscribe", "pubsub", "orders", "shop", "--etcd", &nowhere],
        vec!["invoke", "shop", "echo", "--etcd", &nowhere],
        vec!["state", "get", "shop", "cart", "--etcd", &nowhere],
        vec!["publish", "pubsub", "orders", "--data", "{}", "--etcd", &nowhere],
    ] {
        let unreachable = run(&args).await;
        assert_fails(&unreachable, 3, &[&format!("cannot reach etcd at {nowhere}")]);
    }
    let no_sidecar = run(&["invoke", "shop", "echo", "--sidecar", &nowhere]).await;
    assert_fails(&no_sidecar, 3, &[&nowhere["http://".len()..]]);
}

/// The subscription of an app that is gone for good stays in etcd, so the publisher keeps its
/// events until the backlog is full and then refuses every publish to the topic, also for the
/// subscribers still there. `tandem unsubscribe` removes it: the publisher releases what it
/// kept for that app (and only that), and takes publishes again.
#[tokio::test]
async fn certs_init_and_issue_write_a_root_and_svids_that_tandemd_runs_with() {
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let certs_arg = certs.to_str().unwrap();
    let init = run(&["certs", "init", "--dir", certs_arg]).await;
    assert_eq!(init.status.code(), Some(0), "{}", stderr(&init));
    assert!(stdout(&init).contains("ca.crt"), "{}", stdout(&init));
    // A second root would orphan every SVID of the first: refused without --force.
    assert_fails(&run(&["certs", "init", "--dir", certs_arg]).await, 2, &["ca.key exists", "--force"]);
    for app_id in ["pinger", "ponger"] {
        let issue = run(&["certs", "issue", "--app-id", app_id, "--dir", certs_arg, "--ttl", "1h"]).await;
        assert_eq!(issue.status.code(), Some(0), "{}", stderr(&issue));
        assert!(stdout(&issue).contains(&format!("spiffe://public/ns/default/{app_id}")), "{}", stdout(&issue));
    }
    let key_mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(certs.join("pinger.key")).unwrap().permissions());
    assert_eq!(key_mode & 0o077, 0, "the key is readable by others");
    assert_fails(&run(&["certs", "issue", "--app-id", "a/b", "--dir", certs_arg]).await, 2, &["--app-id"]);
    let elsewhere = dir.path().join("none");
    assert_fails(
        &run(&["certs", "issue", "--app-id", "x", "--dir", elsewhere.to_str().unwrap()]).await,
        2,
        &["ca.crt", "tandem certs init"],
    );

    // Two sidecars with those files call each other over mTLS.
    let app = TestApp::named("ponger").await;
    let mtls = |app_id: &str, sidecar: Sidecar| {
        let file = |name: String| certs.join(name).to_string_lossy().into_owned();
        sidecar
            .arg("--enable-mtls")
            .arg("--cert-file")
            .arg(file(format!("{app_id}.crt")))
            .arg("--key-file")
            .arg(file(format!("{app_id}.key")))
            .arg("--trust-anchors-file")
            .arg(file("ca.crt".into()))
    };
    let ponger = mtls("ponger", Sidecar::new("ponger").etcd(&etcd).app_port(app.port())).spawn().await;
    let pinger = mtls("pinger", Sidecar::new("pinger").etcd(&etcd)).spawn().await;
    ponger.wait_ready().await;
    pinger.wait_ready().await;
    tandem_tests::wait_for_instances(&pinger.client(), "ponger", &["ponger"]).await;
    assert!(ponger.log().contains("mtls=spiffe://public/ns/default/ponger"), "{}", ponger.log_tail());
}

#[tokio::test]
async fn certs_renew_issues_keeps_and_replaces_svids_and_check_names_a_broken_one() {
    let dir = tempfile::tempdir().unwrap();
    let (root, out) = (dir.path().join("ca"), dir.path().join("svids"));
    let (root, out) = (root.to_str().unwrap(), out.to_str().unwrap());
    let metadata = std::fs::metadata(dir.path()).unwrap();
    let owner = format!(
        "{}:{}",
        std::os::unix::fs::MetadataExt::uid(&metadata),
        std::os::unix::fs::MetadataExt::gid(&metadata)
    );
    let renew = ["certs", "renew", "--app-id", "pinger", "--app-id", "ponger", "--dir", root, "--out", out];
    let renew: Vec<&str> = renew.iter().copied().chain(["--ttl", "1h", "--owner", &owner]).collect();

    let first = run(&renew).await;
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    for app_id in ["pinger", "ponger"] {
        assert!(stdout(&first).contains(&format!("issued spiffe://public/ns/default/{app_id}")), "{}", stdout(&first));
    }
    let again = run(&renew).await;
    assert_eq!(stdout(&again).matches("kept spiffe://").count(), 2, "{}", stdout(&again));
    let check = run(&["certs", "check", "--out", out]).await;
    assert_eq!(check.status.code(), Some(0), "{}", stderr(&check));
    assert!(stdout(&check).contains("spiffe://public/ns/default/ponger, valid for 0h59m"), "{}", stdout(&check));

    // A damaged key: check names it; the next pass issues that SVID again.
    let key = dir.path().join("svids/ponger/tls.key");
    std::fs::write(&key, "not a key").unwrap();
    assert_fails(&run(&["certs", "check", "--out", out]).await, 1, &[key.to_str().unwrap()]);
    let repaired = run(&renew).await;
    assert!(stdout(&repaired).contains("issued spiffe://public/ns/default/ponger"), "{}", stdout(&repaired));
    assert!(stdout(&repaired).contains("kept spiffe://public/ns/default/pinger"), "{}", stdout(&repaired));
    assert_eq!(run(&["certs", "check", "--out", out]).await.status.code(), Some(0));

    let bad_owner: Vec<&str> = renew.iter().copied().take(renew.len() - 1).chain(["tandem"]).collect();
    assert_fails(&run(&bad_owner).await, 2, &["'tandem' is not UID:GID"]);
}

#[tokio::test]
async fn unsubscribe_releases_what_a_publisher_kept_for_an_app_gone_for_good() {
    let etcd = Etcd::start().await;
    let endpoint = etcd.endpoint();
    let res = Broker::Embedded.resources(&[("maxBacklog", "5")]);
    let (gone_inbox, stays_inbox) = (Inbox::default(), Inbox::default());
    let gone_app = subscriber("orders", &gone_inbox).await;
    let mut gone = sidecar("gone", &etcd, &res, Some(&gone_app)).await;
    let stays_app = subscriber("orders", &stays_inbox).await;
    let _stays = sidecar("stays", &etcd, &res, Some(&stays_app)).await;
    let publisher = sidecar("boss", &etcd, &res, None).await;
    let client = publisher.client();
    wait_until_subscribed(&client, "orders", &gone_inbox).await;
    wait_until_subscribed(&client, "orders", &stays_inbox).await;
    let backlog = r#"tandem_pubsub_backlog{pubsub="pubsub"}"#;
    eventually(Duration::from_secs(20), "every probe delivered", || async { publisher.metric(backlog).await == 0.0 })
        .await;

    // 'gone' goes away for good; its subscription stays, and the publisher keeps its events.
    gone.terminate().await;
    drop(gone_app);
    let mut accepted = Vec::new();
    let refusal = loop {
        assert!(accepted.len() <= 15, "{} events accepted and none refused", accepted.len());
        let payload = format!("o-{}", accepted.len());
        match client.publish("pubsub", "orders", payload.clone().into_bytes(), "text/plain").await {
            Ok(()) => accepted.push(payload),
            Err(status) => break status,
        }
    };
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");

    eventually(Duration::from_secs(20), "'gone' without a live instance in etcd", || async {
        let listed = run(&["ls", "--etcd", &endpoint, "--json"]).await;
        let json: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("ls --json prints JSON");
        json["apps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["app_id"] == "gone" && a["instances"] == serde_json::json!([]))
    })
    .await;
    let removed = run(&["unsubscribe", "pubsub", "orders", "gone", "--etcd", &endpoint]).await;
    assert!(removed.status.success(), "{}", stderr(&removed));
    assert!(stderr(&removed).contains("removed app 'gone''s subscription to topic 'orders'"), "{}", stderr(&removed));

    eventually(Duration::from_secs(30), "the publisher released what it kept for 'gone'", || async {
        publisher.metric(backlog).await == 0.0
    })
    .await;
    let released =
        publisher.metric(r#"tandem_pubsub_events_total{pubsub="pubsub",topic="orders",outcome="unsubscribed"}"#);
    assert_eq!(released.await, accepted.len() as f64, "one release per event kept for 'gone'");
    client.publish("pubsub", "orders", b"after".to_vec(), "text/plain").await.expect("publishing works again");
    eventually(Duration::from_secs(20), "every event at the subscriber that stayed", || async {
        stays_inbox.has("after") && accepted.iter().all(|p| stays_inbox.has(p))
    })
    .await;
    assert!(accepted.iter().all(|p| !gone_inbox.has(p)), "'gone' was gone before any of them");
    let listed = run(&["ls", "--etcd", &endpoint, "--json"]).await;
    let json: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(json["subscriptions"][0]["apps"], serde_json::json!(["stays"]), "{json}");

    // --force removes the subscription of an app that is running.
    let forced = run(&["unsubscribe", "pubsub", "orders", "stays", "--force", "--etcd", &endpoint]).await;
    assert!(forced.status.success(), "{}", stderr(&forced));
    let listed = run(&["ls", "--etcd", &endpoint, "--json"]).await;
    let json: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(json["subscriptions"], serde_json::json!([]), "{json}");
}

/// A bin dir for `tandem up`: the real tandemd, and `stand_in_service` under each service's
/// name (it serves `status` on the given app port, nothing else).
fn stand_in_bin_dir(root: &Path) -> PathBuf {
    let dir = root.join("bin");
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(workspace_binary("tandemd"), dir.join("tandemd")).unwrap();
    for service in ["tandem-ingest", "tandem-preprocess", "tandem-train", "tandem-serve"] {
        std::os::unix::fs::symlink(workspace_binary("stand_in_service"), dir.join(service)).unwrap();
    }
    dir
}

/// The `NAME PID` lines `tandem up` writes to RUN_DIR/pids.
fn started_pids(run_dir: &Path) -> BTreeMap<String, u32> {
    std::fs::read_to_string(run_dir.join("pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(name, pid)| (name.to_string(), pid.parse().expect("a pid")))
        .collect()
}

fn is_alive(pid: u32) -> bool {
    // A zombie has exited; only its parent has not collected it yet.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn assert_all_gone(pids: &BTreeMap<String, u32>) {
    let alive: Vec<_> = pids.iter().filter(|(_, pid)| is_alive(**pid)).collect();
    assert!(alive.is_empty(), "still running after tandem up exited: {alive:?}");
}

#[tokio::test]
async fn up_stops_everything_when_a_child_fails_to_start_and_names_it() {
    let root = tempfile::tempdir().unwrap();
    let bin = stand_in_bin_dir(root.path());
    // train's tandemd refuses a malformed component file: a real start-up failure.
    let components = root.path().join("components");
    std::fs::create_dir_all(components.join("train")).unwrap();
    std::fs::write(components.join("train").join("broken.yaml"), "apiVersion: dapr.io/v1alpha1\nkind: [\n").unwrap();
    let run_dir = root.path().join("run");
    let args = [
        "up",
        "--bin-dir",
        bin.to_str().unwrap(),
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--components",
        components.to_str().unwrap(),
        "--etcd-port",
        "0",
    ];
    let failed = run(&args).await;
    assert_fails(&failed, 1, &["tandemd:train", "exited with code 2", "broken.yaml", "the last lines of its log"]);
    let pids = started_pids(&run_dir);
    // etcd, and tandemd + service of ingest, preprocess-1, preprocess-2; then train's tandemd.
    assert_eq!(pids.len(), 8, "{pids:?}");
    assert!(pids.contains_key("etcd") && pids.contains_key("tandemd:train") && !pids.contains_key("train"), "{pids:?}");
    assert_all_gone(&pids);
    assert!(stderr(&failed).contains("stopped 7 of 8 processes"), "{}", stderr(&failed));
    assert!(run_dir.join("train").join("tandemd.log").exists(), "a given run dir keeps the logs");
}

#[tokio::test]
async fn up_refuses_to_start_without_its_binaries_or_etcd() {
    let root = tempfile::tempdir().unwrap();
    let run_dir = root.path().join("run");
    let empty = root.path().join("empty-bin");
    std::fs::create_dir_all(&empty).unwrap();
    let missing = run(&["up", "--bin-dir", empty.to_str().unwrap(), "--run-dir", run_dir.to_str().unwrap()]).await;
    assert_fails(&missing, 1, &["tandemd", "tandem-serve", "cargo build --workspace"]);
    assert!(started_pids(&run_dir).is_empty(), "nothing was started");

    let bin = stand_in_bin_dir(root.path());
    let without_etcd = tandem(&["up", "--bin-dir", bin.to_str().unwrap(), "--run-dir", run_dir.to_str().unwrap()])
        .env("PATH", "/nonexistent")
        .output()
        .await
        .unwrap();
    assert_fails(&without_etcd, 1, &["etcd is not installed", "sudo apt-get install -y etcd-server"]);
}

#[tokio::test]
async fn up_stopped_by_sigint_leaves_no_child_behind() {
    let root = tempfile::tempdir().unwrap();
    let bin = stand_in_bin_dir(root.path());
    let run_dir = root.path().join("run");
    let log = root.path().join("tandem-up.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let mut up =
        tandem(&["up", "--bin-dir", bin.to_str().unwrap(), "--run-dir", run_dir.to_str().unwrap(), "--etcd-port", "0"])
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap();
    let tandem_pid = up.id().unwrap();

    // Running: every sidecar ready, and the stand-ins' status answers show as progress.
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let what = "tandem up to have every sidecar ready and progress from every service";
    let watched = tokio::time::timeout(Duration::from_secs(90), async {
        while !(read_log().contains("all 5 sidecars ready") && read_log().contains("serve: running, status")) {
            assert!(up.try_wait().unwrap().is_none(), "tandem up exited early:\n{}", read_log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(watched.is_ok(), "timed out waiting for {what}; its output:\n{}", read_log());
    let pids = started_pids(&run_dir);
    assert_eq!(pids.len(), 11, "etcd, 5 sidecars and 5 services: {pids:?}");
    assert!(pids.values().all(|pid| is_alive(*pid)), "{pids:?}");

    let sent = std::process::Command::new("kill").args(["-INT", &tandem_pid.to_string()]).status().unwrap();
    assert!(sent.success());
    let status = tokio::time::timeout(Duration::from_secs(60), up.wait())
        .await
        .unwrap_or_else(|_| panic!("tandem up did not exit after SIGINT:\n{}", read_log()))
        .unwrap();
    let output = read_log();
    assert_eq!(status.code(), Some(130), "{output}");
    assert!(output.contains("stopped 11 of 11 processes"), "{output}");
    assert!(output.contains("stopped by SIGINT"), "{output}");
    assert_all_gone(&pids);
}

#[tokio::test]
async fn up_refuses_bad_replica_options_before_starting_anything() {
    let root = tempfile::tempdir().unwrap();
    let run_dir = root.path().join("run");
    let bin = stand_in_bin_dir(root.path());
    let base = ["up", "--bin-dir", bin.to_str().unwrap(), "--run-dir", run_dir.to_str().unwrap()];
    let zero = run(&[&base[..], &["--train-replicas", "0"][..]].concat()).await;
    assert_fails(&zero, 2, &["--train-replicas", "0 is not in 1..=16"]);
    let inverted = run(&[&base[..], &["--min-replicas", "3", "--max-replicas", "2"][..]].concat()).await;
    assert_fails(&inverted, 2, &["--min-replicas 3 is above --max-replicas 2"]);
    assert!(started_pids(&run_dir).is_empty(), "nothing was started");
}

/// Waits (bounded) until `tandem up`'s output holds `needle`; panics with the output if
/// `tandem up` exits first or the time is up.
async fn wait_for_output(up: &mut tokio::process::Child, log: &Path, timeout: Duration, needle: &str) {
    let begun = std::time::Instant::now();
    // The condition itself panics at `timeout`, with the output; eventually's bound is a backstop.
    eventually(timeout + Duration::from_secs(5), &format!("{needle:?} in tandem up's output"), || {
        let exited = up.try_wait().unwrap();
        let output = std::fs::read_to_string(log).unwrap_or_default();
        async move {
            assert!(exited.is_none(), "tandem up exited ({exited:?}) before printing {needle:?}:\n{output}");
            let found = output.contains(needle);
            assert!(found || begun.elapsed() < timeout, "no {needle:?} within {timeout:?} in:\n{output}");
            found
        }
    })
    .await;
}

fn kill_9(pid: u32) {
    let sent = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
    assert!(sent.success(), "kill -9 {pid}");
}

/// A train replica whose service dies is reported and restarted (a new tandemd and service,
/// the pids file follows); one that dies again beyond --max-restarts stops everything.
#[tokio::test]
async fn up_restarts_a_train_replica_that_dies_and_gives_up_after_max_restarts() {
    let root = tempfile::tempdir().unwrap();
    let bin = stand_in_bin_dir(root.path());
    let run_dir = root.path().join("run");
    let log = root.path().join("tandem-up.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let args = [
        "up",
        "--bin-dir",
        bin.to_str().unwrap(),
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--etcd-port",
        "0",
        "--train-replicas",
        "2",
        "--min-replicas",
        "2",
        "--restart-delay",
        "300ms",
        "--max-restarts",
        "1",
    ];
    let mut up = tandem(&args).stdout(log_file.try_clone().unwrap()).stderr(log_file).spawn().unwrap();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for_output(&mut up, &log, Duration::from_secs(90), "all 6 sidecars ready").await;
    wait_for_output(&mut up, &log, Duration::from_secs(30), "train-2: running, status").await;
    let before = started_pids(&run_dir);
    assert_eq!(before.len(), 13, "etcd, 6 sidecars and 6 services: {before:?}");
    assert!(before.contains_key("train-1") && before.contains_key("tandemd:train-2"), "{before:?}");

    // Every train replica got the group flags (the stand-in answers `status` with its args).
    let etcd = read_log()
        .lines()
        .find_map(|line| line.trim().strip_prefix("etcd").map(|rest| rest.trim().to_string()))
        .expect("tandem up prints etcd's URL");
    let status = run(&["invoke", "train", "status", "--etcd", &etcd]).await;
    assert!(status.status.success(), "{}", stderr(&status));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let passed: Vec<&str> = status["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert!(passed.windows(2).any(|pair| pair == ["--min-replicas", "2"]), "{status}");

    // train-2's service dies: reported, its tandemd stopped, both started again.
    kill_9(before["train-2"]);
    let killed = format!("train-2 (pid {}) was killed by signal 9", before["train-2"]);
    wait_for_output(&mut up, &log, Duration::from_secs(30), &killed).await;
    wait_for_output(&mut up, &log, Duration::from_secs(60), "train-2 restarted (restart 1 of 1)").await;
    let output = read_log();
    assert!(output.contains("train-2 is down while the pipeline ran; stopping tandemd:train-2"), "{output}");
    let after = started_pids(&run_dir);
    assert_eq!(after.len(), 13, "the restarted pair replaces the dead one: {after:?}");
    for name in ["train-2", "tandemd:train-2"] {
        assert_ne!(after[name], before[name], "{name} has a new process");
        assert!(is_alive(after[name]) && !is_alive(before[name]), "{name}: {before:?} -> {after:?}");
    }
    for (name, pid) in before.iter().filter(|(name, _)| !name.ends_with("train-2")) {
        assert_eq!(after[name], *pid, "{name} kept running");
        assert!(is_alive(*pid), "{name} kept running");
    }
    wait_for_output(&mut up, &log, Duration::from_secs(30), "(restarts: 1)").await;

    // Its new tandemd dies too: past --max-restarts 1, tandem up stops everything.
    kill_9(after["tandemd:train-2"]);
    let status = tokio::time::timeout(Duration::from_secs(60), up.wait())
        .await
        .unwrap_or_else(|_| panic!("tandem up did not give up:\n{}", read_log()))
        .unwrap();
    let output = read_log();
    assert_eq!(status.code(), Some(1), "{output}");
    let killed = format!("tandemd:train-2 (pid {}) was killed by signal 9", after["tandemd:train-2"]);
    assert!(output.contains(&killed), "{output}");
    assert!(output.contains("train-2 died after being restarted once (--max-restarts 1); giving up"), "{output}");
    assert!(output.contains("stopped 12 of 13 processes"), "{output}");
    assert_all_gone(&after);
}

/// The README's main command, for real: `tandem up` with the pipeline's own binaries (next to
/// `tandem` in target/<profile>/) and its built-in component files, started from a directory
/// that has no `components/`, with a second process burning a core, until serve has the model.
/// No event may run out of delivery attempts on the way.
#[tokio::test]
async fn up_runs_the_pipeline_to_a_serving_model_then_stops_everything() {
    let root = tempfile::tempdir().unwrap();
    let run_dir = root.path().join("run");
    let args = [
        "up",
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--etcd-port",
        "0",
        "--until-serving",
        "--ready-timeout",
        "900s",
    ];
    let mut burner = Command::new("sh").args(["-c", "while :; do :; done"]).kill_on_drop(true).spawn().unwrap();
    // Debug builds train slowly on a busy 2-core machine: bounded, but generously.
    let output = tokio::time::timeout(Duration::from_secs(1000), tandem(&args).current_dir(root.path()).output())
        .await
        .expect("tandem up --until-serving did not exit within 1000 s")
        .expect("running tandem up");
    burner.kill().await.unwrap();
    let (out, err) = (stdout(&output), stderr(&output));
    assert_eq!(output.status.code(), Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(run_dir.join("components/train/statestore.yaml").is_file(), "the built-in components are not used");
    let sidecar_logs: Vec<PathBuf> = std::fs::read_dir(&run_dir)
        .unwrap()
        .map(|entry| entry.unwrap().path().join("tandemd.log"))
        .filter(|log| log.is_file())
        .collect();
    assert_eq!(sidecar_logs.len(), 5, "{sidecar_logs:?}");
    for log in sidecar_logs {
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(!text.contains("after its last delivery attempt"), "{} dropped an event:\n{text}", log.display());
    }

    let accuracy: f64 = out
        .lines()
        .find_map(|line| line.trim().strip_prefix("test accuracy"))
        .and_then(|rest| rest.trim().split('%').next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no test accuracy in:\n{out}"));
    assert!(accuracy >= 97.0, "test accuracy {accuracy}% with the default seed:\n{out}");
    // The example it printed was answered through the mesh: the digit is a 0.
    let answer = out.lines().find_map(|line| line.strip_prefix("answer: ")).expect("an answer line");
    let answer: serde_json::Value = serde_json::from_str(answer).expect("serve answers JSON");
    assert_eq!(answer["predictions"][0]["class"], 0, "{answer}");
    assert!(out.contains("invoke serve predict --data '{\"features\":[0,0,5,13,"), "{out}");
    // Progress came from every service's status.
    for line in ["ingest: published all batches", "train: trained: test accuracy", "serve: serving model"] {
        assert!(err.contains(line), "no {line:?} in:\n{err}");
    }

    let pids = started_pids(&run_dir);
    assert_eq!(pids.len(), 11, "{pids:?}");
    assert!(err.contains("stopped 11 of 11 processes"), "{err}");
    assert_all_gone(&pids);
}

/// Two train replicas train as one group; one replica's service is killed with SIGKILL while
/// it trains: `tandem up` reports it, starts the pair again (the replica joins the group late),
/// and the pipeline still ends with a serving model and its test accuracy. One of two serve
/// replicas loses its sidecar meanwhile and is restarted the same way; both serve the model.
/// All of it with mutual TLS between the sidecars (`--mtls`).
#[tokio::test]
async fn up_with_two_train_replicas_survives_one_killed_while_training() {
    let root = tempfile::tempdir().unwrap();
    let run_dir = root.path().join("run");
    let components = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("components");
    let log = root.path().join("tandem-up.log");
    let out = root.path().join("tandem-up.out");
    let args = [
        "up",
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--components",
        components.to_str().unwrap(),
        "--etcd-port",
        "0",
        "--train-replicas",
        "2",
        "--serve-replicas",
        "2",
        "--epochs",
        "5",
        // Short, so the restart is done well before the survivor finishes the 5 epochs.
        "--restart-delay",
        "200ms",
        // Every hop between sidecars, the training group's all-reduce included, over mTLS.
        "--mtls",
        "--until-serving",
        "--ready-timeout",
        "900s",
    ];
    let mut up = tandem(&args)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();

    // Debug builds train slowly on a busy 2-core machine: bounded, but generously.
    wait_for_output(&mut up, &log, Duration::from_secs(900), "train-2: training").await;
    let before = started_pids(&run_dir);
    assert_eq!(before.len(), 15, "etcd, 7 sidecars and 7 services: {before:?}");
    kill_9(before["train-2"]);
    // Reported and restarted while the pipeline still runs (the survivor is still training).
    let killed = format!("train-2 (pid {}) was killed by signal 9", before["train-2"]);
    wait_for_output(&mut up, &log, Duration::from_secs(60), &killed).await;
    wait_for_output(&mut up, &log, Duration::from_secs(120), "train-2 restarted (restart 1 of 5)").await;
    // A serve replica's sidecar dies too: reported and restarted the same way.
    kill_9(before["tandemd:serve-2"]);
    let killed = format!("tandemd:serve-2 (pid {}) was killed by signal 9", before["tandemd:serve-2"]);
    wait_for_output(&mut up, &log, Duration::from_secs(60), &killed).await;
    wait_for_output(&mut up, &log, Duration::from_secs(120), "serve-2 restarted (restart 1 of 5)").await;

    let status = tokio::time::timeout(Duration::from_secs(1000), up.wait())
        .await
        .unwrap_or_else(|_| panic!("tandem up did not exit within 1000 s:\n{}", read(&log)))
        .unwrap();
    let (out, err) = (read(&out), read(&log));
    assert_eq!(status.code(), Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains("train-2 is down while the pipeline ran; stopping tandemd:train-2"), "{err}");
    assert!(out.contains("the pipeline is serving"), "{out}");
    let accuracy: f64 = out
        .lines()
        .find_map(|line| line.trim().strip_prefix("test accuracy"))
        .and_then(|rest| rest.trim().split('%').next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no test accuracy in:\n{out}"));
    assert!(accuracy >= 80.0, "test accuracy {accuracy}% after 5 epochs:\n{out}");

    let after = started_pids(&run_dir);
    assert_eq!(after.len(), 15, "{after:?}");
    assert_ne!(after["train-2"], before["train-2"], "train-2 runs as a new process");
    assert_ne!(after["serve-2"], before["serve-2"], "serve-2 runs as a new process");
    assert!(err.contains("stopped 15 of 15 processes"), "{err}");
    assert_all_gone(&after);
    assert_all_gone(&before);
    // Each sidecar ran with its app's SVID, and none refused a peer.
    for name in ["ingest", "preprocess-1", "train-1", "train-2", "serve-1", "serve-2"] {
        let sidecar_log = read(&run_dir.join(name).join("tandemd.log"));
        let app_id = name.split('-').next().unwrap();
        assert!(sidecar_log.contains(&format!("mtls=spiffe://public/ns/default/{app_id}")), "{name}:\n{sidecar_log}");
        assert!(!sidecar_log.contains("refused a connection"), "{name}:\n{sidecar_log}");
    }
}
