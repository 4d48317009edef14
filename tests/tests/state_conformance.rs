//! The state conformance suite, run against every store type through tandemd's gRPC API.
//! Its cases follow Dapr's state conformance suite (components-contrib
//! `tests/conformance/state`): values of every kind, deletes, bulk operations, transactions,
//! ETags, first-write, TTLs; plus the bad input tandemd must refuse.

use std::time::Duration;

use tandem_sdk::Code;
use tandem_tests::state::{ResourcesDir, StateClient, Write};
use tandem_tests::{Etcd, RunningSidecar, Sidecar, eventually};

/// One tandemd whose store `store` has the type under test (and its etcd).
struct Fixture {
    state: StateClient,
    _sidecar: RunningSidecar,
    _resources: ResourcesDir,
    _etcd: Etcd,
}

impl Fixture {
    async fn start(kind: &str) -> Fixture {
        Self::start_with(kind, &[]).await
    }

    async fn start_with(kind: &str, args: &[&str]) -> Fixture {
        let etcd = Etcd::start().await;
        let resources = ResourcesDir::new(&[("store", kind, &[])]);
        let mut sidecar = Sidecar::new("svc-state").etcd(&etcd).resources(resources.path());
        for arg in args {
            sidecar = sidecar.arg(*arg);
        }
        let sidecar = sidecar.spawn().await;
        let state = StateClient::connect(sidecar.grpc_addr(), "store").await;
        Fixture { state, _sidecar: sidecar, _resources: resources, _etcd: etcd }
    }
}

async fn values_of_every_kind_round_trip(kind: &str) {
    let f = Fixture::start(kind).await;
    let s = &f.state;
    let cases: [(&str, &[u8]); 4] = [
        ("bytes", &[0, 1, 2, 254, 255]),
        ("json", br#"{"model":"mlp","layers":[64,32,10],"ok":true}"#),
        ("text", "résumé ⏱️".as_bytes()),
        ("empty", b""),
    ];
    for (key, value) in cases {
        s.save(key, value).await.unwrap();
        let got = s.get(key).await.unwrap();
        assert_eq!(got.data, value, "{key}");
        assert!(!got.etag.is_empty(), "{key} has an ETag");
    }
    // A missing key is no error: empty data, empty ETag.
    let missing = s.get("never-written").await.unwrap();
    assert!(missing.data.is_empty() && missing.etag.is_empty());
    // Last write wins without an ETag.
    s.save("json", b"2").await.unwrap();
    assert_eq!(s.value("json").await.unwrap(), b"2");
}

async fn deletes_also_of_missing_keys(kind: &str) {
    let f = Fixture::start(kind).await;
    let s = &f.state;
    s.save("k", b"v").await.unwrap();
    s.delete("k", None).await.unwrap();
    assert_eq!(s.value("k").await, None);
    s.delete("k", None).await.unwrap();
    s.delete("never-written", None).await.unwrap();
}

async fn bulk_set_get_and_delete(kind: &str) {
    let f = Fixture::start(kind).await;
    let s = &f.state;
    let w = Write::default();
    s.save_items(vec![w.item("a", b"1"), w.item("b", b"2"), w.item("c", b"3")]).await.unwrap();
    let got = s.get_bulk(&["a", "b", "c", "missing"]).await.unwrap();
    assert_eq!(got.len(), 4);
    assert_eq!(got["a"].data, b"1");
    assert_eq!(got["c"].data, b"3");
    assert!(!got["b"].etag.is_empty());
    assert!(got["missing"].data.is_empty() && got["missing"].etag.is_empty() && got["missing"].error.is_empty());

    s.delete_bulk(vec![w.item("a", b""), w.item("b", b"")]).await.unwrap();
    let got = s.get_bulk(&["a", "b", "c"]).await.unwrap();
    assert!(got["a"].etag.is_empty() && got["b"].etag.is_empty());
    assert_eq!(got["c"].data, b"3");

    // A bad key in a bulk get is answered for that key alone.
    let got = s.get_bulk(&["c", "bad||key"]).await.unwrap();
    assert_eq!(got["c"].data, b"3");
    assert!(got["bad||key"].error.contains("'||'"), "{:?}", got["bad||key"]);
}

async fn transactions_apply_in_order(kind: &str) {
    let f = Fixture::start(kind).await;
    let s = &f.state;
    let w = Write::default();
    s.save("gone", b"x").await.unwrap();
    s.transact(vec![
        ("upsert", w.item("a", b"1")),
        ("upsert", w.item("b", b"2")),
        ("delete", w.item("a", b"")),
        ("upsert", w.item("c", b"3")),
        ("upsert", w.item("b", b"4")),
        ("delete", w.item("gone", b"")),
        // Upsert and delete of one key, then upsert again: the last one counts.
        ("upsert", w.item("d", b"first")),
        ("delete", w.item("d", b"")),
        ("upsert", w.item("d", b"last")),
    ])
    .await
    .unwrap();
    assert_eq!(s.value("a").await, None);
    assert_eq!(s.value("b").await.unwrap(), b"4");
    assert_eq!(s.value("c").await.unwrap(), b"3");
    assert_eq!(s.value("gone").await, None);
    assert_eq!(s.value("d").await.unwrap(), b"last");
}

async fn a_transaction_is_all_or_nothing(kind: &str) {
    let f = Fixture::start(kind).await;
    let s = &f.state;
    s.save("guarded", b"v1").await.unwrap();
    let stale = s.etag("guarded").await;
    s.save("guarded", b"v2").await.unwrap();
    let w = Write::default();
    let err = s
        .transact(vec![("upsert", w.item("new", b"n")), ("upsert", Write::etag(&stale).item("guarded", b"v3"))])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(err.message().contains("guarded"), "{err:?}");
    assert_eq!(s.value("new").await, None, "nothing of a failed transaction is written");
    assert_eq!(s.value("guarded").await.unwrap(), b"v2");

    let err = s.transact(vec![("merge", w.item("x", b"1"))]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("'merge'"), "{err:?}");
}

async fn etags_guard_writes_and_deletes(kind: &str) {
    let f = Fixture::start(kind).await;
    let s = &f.state;
    s.save("k", b"v1").await.unwrap();
    let first = s.etag("k").await;
    s.save_with("k", b"v2", Write::etag(&first)).await.unwrap();
    let second = s.etag("k").await;
    assert_ne!(first, second, "every write changes the ETag");

    // A stale ETag is rejected and nothing is written.
    let err = s.save_with("k", b"v3", Write::etag(&first)).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert_eq!(s.value("k").await.unwrap(), b"v2");
    let err = s.save_with("k", b"v3", Write::etag("not-an-etag")).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");

    // Delete with a wrong ETag fails; with the right one it succeeds.
    let err = s.delete("k", Some(&first)).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert_eq!(s.value("k").await.unwrap(), b"v2");
    s.delete("k", Some(&second)).await.unwrap();
    assert_eq!(s.value("k").await, None);

    // An ETag for a key that does not exist cannot match.
    let err = s.save_with("k", b"v4", Write::etag(&second)).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
}

async fn a_bulk_save_with_one_stale_etag_writes_nothing(kind: &str) {
    let f = Fixture::start(kind).await;
    let s = &f.state;
    s.save("k1", b"old1").await.unwrap();
    s.save("k2", b"old2").await.unwrap();
    let good = s.etag("k1").await;
    let stale = s.etag("k2").await;
    s.save("k2", b"newer2").await.unwrap();
    let err = s
        .save_items(vec![Write::etag(&good).item("k1", b"new1"), Write::etag(&stale).item("k2", b"new2")])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(err.message().contains("k2"), "the error names the key: {err:?}");
    assert_eq!(s.value("k1").await.unwrap(), b"old1");
    assert_eq!(s.value("k2").await.unwrap(), b"newer2");
}

async fn first_write_with_and_without_etag(kind: &str) {
    let f = Fixture::start(kind).await;
    let s = &f.state;
    // Without an ETag (or with an empty one): only the first write of a key succeeds.
    for (key, write) in
        [("fw-none", Write::first_write()), ("fw-empty", Write { etag: Some(String::new()), ..Write::first_write() })]
    {
        s.save_with(key, b"first", write.clone()).await.unwrap();
        let err = s.save_with(key, b"second", write).await.unwrap_err();
        assert_eq!(err.code(), Code::Aborted, "{key}: {err:?}");
        assert_eq!(s.value(key).await.unwrap(), b"first");
    }
    // With an ETag: the write must carry the current one.
    s.save("fw-etag", b"v1").await.unwrap();
    let etag = s.etag("fw-etag").await;
    let with_etag = Write { etag: Some(etag.clone()), ..Write::first_write() };
    s.save_with("fw-etag", b"v2", with_etag.clone()).await.unwrap();
    assert_ne!(s.etag("fw-etag").await, etag);
    let err = s.save_with("fw-etag", b"v3", with_etag).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert_eq!(s.value("fw-etag").await.unwrap(), b"v2");
}

async fn ttls_expire_keys_and_minus_one_keeps_them(kind: &str) {
    let f = Fixture::start(kind).await;
    let s = &f.state;
    let err = s.save_with("ttl", b"v", Write::ttl("foo")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("ttlInSeconds"), "{err:?}");
    assert_eq!(s.value("ttl").await, None, "a refused write writes nothing");

    s.save_with("ttl", b"v", Write::ttl("1")).await.unwrap();
    let got = s.get("ttl").await.unwrap();
    assert_eq!(got.data, b"v");
    assert!(got.metadata.contains_key("ttlExpireTime"), "{:?}", got.metadata);
    eventually(Duration::from_secs(10), "the key to expire", || async { s.value("ttl").await.is_none() }).await;

    // -1 removes a TTL: the key stays, with no expiry time.
    s.save_with("keep", b"v", Write::ttl("1")).await.unwrap();
    s.save_with("keep", b"v", Write::ttl("-1")).await.unwrap();
    let got = s.get("keep").await.unwrap();
    assert!(!got.metadata.contains_key("ttlExpireTime"), "{:?}", got.metadata);
    // Outlive the old TTL (bounded: 1.5 s past it), then the key must still be there.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(s.value("keep").await.unwrap(), b"v");
}

async fn bad_input_is_refused_with_the_reason(kind: &str) {
    let f = Fixture::start_with(kind, &["--max-body-size", "1Ki"]).await;
    let s = &f.state;

    let err = s.with_store("nope").get("k").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("state store nope is not found") && err.message().contains("'store'"), "{err:?}");

    let err = s.save("", b"v").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("empty"), "{err:?}");

    let err = s.save("a||b", b"v").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("'||'"), "{err:?}");
    let err = s.get("a||b").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let err = s.save("big", &vec![7u8; 2048]).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("2048") && err.message().contains("--max-body-size"), "{err:?}");
    assert_eq!(s.value("big").await, None);
    s.save("small", &vec![7u8; 1024]).await.unwrap();
}

macro_rules! conformance {
    ($store:ident, $kind:literal) => {
        mod $store {
            macro_rules! case {
                ($name:ident) => {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        super::$name($kind).await;
                    }
                };
            }
            case!(values_of_every_kind_round_trip);
            case!(deletes_also_of_missing_keys);
            case!(bulk_set_get_and_delete);
            case!(transactions_apply_in_order);
            case!(a_transaction_is_all_or_nothing);
            case!(etags_guard_writes_and_deletes);
            case!(a_bulk_save_with_one_stale_etag_writes_nothing);
            case!(first_write_with_and_without_etag);
            case!(ttls_expire_keys_and_minus_one_keeps_them);
            case!(bad_input_is_refused_with_the_reason);
        }
    };
}

conformance!(sled, "state.sled");
conformance!(etcd, "state.etcd");
