use super::*;

fn record(id: &str, apps: &[&str]) -> OutboxRecord {
    OutboxRecord {
        event: Some(TopicEventRequest { id: id.into(), topic: "t".into(), ..Default::default() }),
        deliveries: apps.iter().map(|a| PendingDelivery { app_id: a.to_string(), ..Default::default() }).collect(),
    }
}

/// A record whose event carries `bytes` of data.
fn sized(id: &str, bytes: usize) -> OutboxRecord {
    let mut record = record(id, &["a"]);
    record.event.as_mut().unwrap().data = vec![b'x'; bytes].into();
    record
}

fn ids(outbox: &Outbox) -> Vec<String> {
    outbox.records_after(None, usize::MAX).into_iter().map(|(_, r)| r.event.unwrap().id).collect()
}

fn settle(outbox: &Outbox, seq: u64) {
    outbox.modify(seq, |deliveries| deliveries.clear()).unwrap().unwrap();
}

fn segment_count(path: &Path) -> usize {
    log::segment_ids(path).unwrap().len()
}

/// Small segments and cache, so that tests roll segments over with a few records.
const SMALL: Limits = Limits { segment_bytes: 4096, cache_bytes: 2048 };

#[tokio::test]
async fn records_survive_reopening_and_leave_when_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox");
    let (first, second) = {
        let outbox = Outbox::open(&path, 10).unwrap();
        let first = outbox.push(&record("e1", &["a", "b"])).await.unwrap();
        let second = outbox.push(&record("e2", &["a"])).await.unwrap();
        assert!(first < second);
        (first, second)
    };
    let outbox = Outbox::open(&path, 10).unwrap();
    let records = outbox.records_after(None, 100);
    assert_eq!(records.len(), 2);
    assert_eq!(outbox.records_after(Some(first), 100).len(), 1);
    assert_eq!(outbox.records_after(None, 1).len(), 1);
    assert_eq!(records[0].0, first);
    assert_eq!(records[0].1.event.as_ref().unwrap().id, "e1");

    outbox.modify(first, |d| d.retain(|d| d.app_id != "a")).unwrap().unwrap();
    settle(&outbox, second);
    assert!(outbox.modify(second, |_| ()).unwrap().is_none(), "a finished event is gone");
    let records = outbox.records_after(None, 100);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].1.deliveries.len(), 1);
    assert_eq!(outbox.len(), 1);
    drop(outbox);

    let outbox = Outbox::open(&path, 10).unwrap();
    let records = outbox.records_after(None, 100);
    assert_eq!(records.len(), 1, "settlements survive reopening too");
    assert_eq!(records[0].1.deliveries[0].app_id, "b");
    let third = outbox.push(&record("e3", &["a"])).await.unwrap();
    assert!(third > second, "numbering goes on where it was");
}

#[tokio::test]
async fn changed_attempts_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let seq = {
        let outbox = Outbox::open(dir.path(), 10).unwrap();
        let seq = outbox.push(&record("e1", &["a"])).await.unwrap();
        let attempts = outbox
            .modify(seq, |d| {
                d[0].attempts = 3;
                d[0].attempts
            })
            .unwrap();
        assert_eq!(attempts, Some(3));
        seq
    };
    let outbox = Outbox::open(dir.path(), 10).unwrap();
    let (event, pending) = outbox.pending(seq, "a").unwrap().unwrap();
    assert_eq!((event.id.as_str(), pending.attempts), ("e1", 3));
}

#[tokio::test]
async fn pending_finds_one_subscribers_delivery_until_it_is_settled() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&dir.path().join("o"), 10).unwrap();
    let seq = outbox.push(&record("e1", &["a", "b"])).await.unwrap();
    let (event, pending) = outbox.pending(seq, "b").unwrap().unwrap();
    assert_eq!((event.id.as_str(), pending.app_id.as_str()), ("e1", "b"));
    assert!(outbox.pending(seq, "c").unwrap().is_none(), "c never subscribed");
    outbox.modify(seq, |d| d.retain(|d| d.app_id != "b")).unwrap();
    assert!(outbox.pending(seq, "b").unwrap().is_none(), "b's delivery is settled");
    assert!(outbox.pending(seq + 100, "a").unwrap().is_none(), "no such record");
}

#[tokio::test]
async fn a_full_backlog_refuses_new_events() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&dir.path().join("o"), 2).unwrap();
    outbox.push(&record("1", &["a"])).await.unwrap();
    outbox.push(&record("2", &["a"])).await.unwrap();
    let err = outbox.push(&record("3", &["a"])).await.unwrap_err();
    assert!(matches!(err, PubSubError::BacklogFull { waiting: 2, max: 2 }), "{err}");
}

#[tokio::test]
async fn push_all_stores_until_the_backlog_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&dir.path().join("o"), 2).unwrap();
    let records = [record("1", &["a"]), record("2", &["a"]), record("3", &["a"])];
    let outcomes = outbox.push_all(&records).await;
    assert!(outcomes[0].is_ok() && outcomes[1].is_ok());
    assert!(matches!(outcomes[2], Err(PubSubError::BacklogFull { waiting: 2, max: 2 })), "{:?}", outcomes[2]);
    assert_eq!(ids(&outbox), ["1", "2"]);
}

#[test]
fn a_foreign_directory_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"mine").unwrap();
    let err = Outbox::open(dir.path(), 10).err().unwrap();
    assert!(err.to_string().contains(&dir.path().display().to_string()), "{err}");
    assert_eq!(std::fs::read(dir.path().join("notes.txt")).unwrap(), b"mine");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "nothing was added");
}

#[test]
fn an_outbox_open_elsewhere_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Outbox::open(dir.path(), 10).unwrap();
    let err = Outbox::open(dir.path(), 10).err().unwrap();
    assert!(err.to_string().contains("in use by another process"), "{err}");
}

#[tokio::test]
async fn a_torn_write_at_the_end_is_cut_back_and_the_log_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    {
        let outbox = Outbox::open(dir.path(), 10).unwrap();
        outbox.push(&record("kept", &["a"])).await.unwrap();
        outbox.push(&record("torn", &["a"])).await.unwrap();
    }
    let last = *log::segment_ids(dir.path()).unwrap().last().unwrap();
    let file = log::open_segment(dir.path(), last, false).unwrap();
    let size = file.metadata().unwrap().len();
    file.set_len(size - 5).unwrap();

    let outbox = Outbox::open(dir.path(), 10).unwrap();
    assert_eq!(ids(&outbox), ["kept"]);
    outbox.push(&record("after", &["a"])).await.unwrap();
    drop(outbox);
    let outbox = Outbox::open(dir.path(), 10).unwrap();
    assert_eq!(ids(&outbox), ["kept", "after"], "writes after the cut read back whole");
}

#[tokio::test]
async fn settled_segments_are_removed_and_a_stuck_record_is_copied_forward() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open_with(dir.path(), 1000, SMALL).unwrap();
    let stuck = outbox.push(&sized("stuck", 200)).await.unwrap();
    let mut seqs = Vec::new();
    for i in 0..60 {
        seqs.push(outbox.push(&sized(&format!("e{i}"), 200)).await.unwrap());
    }
    assert!(segment_count(dir.path()) > 3, "the records span several segments");
    for seq in seqs {
        settle(&outbox, seq);
    }
    // Removals happen with the next sync: one more publish brings it.
    let last = outbox.push(&sized("last", 200)).await.unwrap();
    assert!(segment_count(dir.path()) <= 2, "{} segments left", segment_count(dir.path()));
    assert_eq!(ids(&outbox), ["stuck", "last"]);
    outbox.modify(stuck, |d| d[0].attempts = 7).unwrap();
    drop(outbox);

    let outbox = Outbox::open_with(dir.path(), 1000, SMALL).unwrap();
    assert_eq!(ids(&outbox), ["stuck", "last"], "the copy is what the log holds now");
    assert_eq!(outbox.pending(stuck, "a").unwrap().unwrap().1.attempts, 7);
    settle(&outbox, stuck);
    settle(&outbox, last);
    assert!(outbox.is_empty());
}

#[tokio::test]
async fn events_past_the_cache_are_read_back_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open_with(dir.path(), 1000, SMALL).unwrap();
    let mut stored = Vec::new();
    for i in 0..5 {
        stored.push(outbox.push(&sized(&format!("e{i}"), 900)).await.unwrap());
    }
    assert!(outbox.shared.state().index.values().any(|e| e.event.is_none()), "some events are not cached");
    for (i, seq) in stored.iter().enumerate() {
        let (event, _) = outbox.pending(*seq, "a").unwrap().unwrap();
        assert_eq!((event.id, event.data.len()), (format!("e{i}"), 900));
    }
    for seq in stored {
        settle(&outbox, seq);
    }
    assert_eq!(outbox.shared.state().cached_bytes, 0, "settled events leave the cache");
}

#[tokio::test]
async fn an_outbox_written_by_sled_is_converted_without_losing_events() {
    let dir = tempfile::tempdir().unwrap();
    {
        // No background flusher, so the lock goes with the handle.
        let db = crate::durability::sled_config(dir.path()).flush_every_ms(None).open().unwrap();
        let tree = db.open_tree("tandem_outbox").unwrap();
        let mut waiting = record("old-2", &["a", "b"]);
        waiting.deliveries[1].attempts = 4;
        tree.insert(2u64.to_be_bytes(), record("old-1", &["a"]).encode_to_vec()).unwrap();
        tree.insert(5u64.to_be_bytes(), waiting.encode_to_vec()).unwrap();
        db.flush().unwrap();
    }
    let outbox = open_when_sled_lets_go(dir.path());
    let records = outbox.records_after(None, 10);
    let seqs: Vec<u64> = records.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(seqs, [2, 5]);
    assert_eq!(records[1].1.deliveries[1].attempts, 4);
    assert!(!dir.path().join("conf").exists() && !dir.path().join("db").exists(), "sled's files are gone");
    let next = outbox.push(&record("new", &["a"])).await.unwrap();
    assert!(next > 5, "new events number after the converted ones");
    drop(outbox);
    let outbox = Outbox::open(dir.path(), 10).unwrap();
    assert_eq!(ids(&outbox), ["old-1", "old-2", "new"]);
}

/// sled's I/O threads may hold its file lock for a moment after the last handle is dropped.
fn open_when_sled_lets_go(path: &Path) -> Outbox {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Outbox::open(path, 10) {
            Ok(outbox) => return outbox,
            Err(e) if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("opening the outbox: {e}"),
        }
    }
}

#[tokio::test]
async fn an_entry_still_in_the_write_buffer_reads_back_and_is_written_at_close() {
    let dir = tempfile::tempdir().unwrap();
    let no_cache = Limits { segment_bytes: SEGMENT_BYTES, cache_bytes: 0 };
    let outbox = Outbox::open_with(dir.path(), 10, no_cache).unwrap();
    // Stored without a sync: the entry is in the buffer only, and not cached.
    let seq = outbox.shared.state().insert(dir.path(), &sized("buffered", 300)).unwrap();
    assert!(!outbox.shared.state().buffer.is_empty());
    let (event, pending) = outbox.pending(seq, "a").unwrap().unwrap();
    assert_eq!((event.id.as_str(), event.data.len(), pending.app_id.as_str()), ("buffered", 300, "a"));
    drop(outbox);

    let outbox = Outbox::open_with(dir.path(), 10, no_cache).unwrap();
    assert_eq!(ids(&outbox), ["buffered"], "closing the outbox wrote its buffer");
}

#[tokio::test]
async fn a_settled_delivery_reaches_the_file_without_another_publish() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path(), 10).unwrap();
    let seq = outbox.push(&record("e", &["a"])).await.unwrap();
    assert!(outbox.shared.state().buffer.is_empty(), "a publish is written before it is acknowledged");
    settle(&outbox, seq);

    let segment = *log::segment_ids(dir.path()).unwrap().last().unwrap();
    let written = || {
        let bytes = log::read_segment(dir.path(), segment).unwrap();
        log::entries(&bytes).0.iter().any(|e| e.kind == Kind::Deliveries && e.seq == seq)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !written() {
        assert!(std::time::Instant::now() < deadline, "the settled delivery was never written");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(outbox.shared.state().buffer.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_share_rounds_and_each_is_durable_when_answered() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Arc::new(Outbox::open(dir.path(), 1000).unwrap());
    let publishes = (0..200).map(|i| {
        let outbox = outbox.clone();
        tokio::spawn(async move { outbox.push(&record(&format!("e{i}"), &["a"])).await })
    });
    let seqs: Vec<u64> =
        futures_util::future::join_all(publishes).await.into_iter().map(|r| r.unwrap().unwrap()).collect();
    let unique: std::collections::BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(unique.len(), 200, "every publish has its own sequence number");
    // Every answered publish is in the file already: read it back without the outbox.
    let segment = *log::segment_ids(dir.path()).unwrap().last().unwrap();
    let bytes = log::read_segment(dir.path(), segment).unwrap();
    let written: std::collections::BTreeSet<u64> =
        log::entries(&bytes).0.iter().filter(|e| e.kind == Kind::Record).map(|e| e.seq).collect();
    assert_eq!(written, unique);
}
