//! The outbox's files: an append-only log cut into numbered segment files.
//!
//! Every entry is framed as `[body length: u32 LE][CRC-32 of body: u32 LE][body]`, and a body
//! is `[kind: u8][seq: u64 LE][protobuf payload]`:
//! - [`Kind::Record`]: an event and its pending deliveries (`OutboxRecord`), written when it is
//!   published and again when compaction copies it forward. The latest one of a sequence
//!   number wins.
//! - [`Kind::Deliveries`]: the deliveries still pending for a record after an attempt
//!   (`OutboxRecord` without its event); none left means the record is settled.
//! - [`Kind::SegmentStart`]: the first entry of every segment, carrying the next sequence
//!   number, so numbering survives even when every older segment is gone.
//!
//! Reading a segment stops at the first entry that is cut short or fails its checksum: at the
//! end of the newest segment that is a write a crash interrupted, and the file is cut back to
//! the last whole entry.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use prost::Message;

/// Bytes before a body: its length and its checksum.
pub const FRAME_HEADER: usize = 8;
/// Bytes of a body before its payload: kind and sequence number.
const BODY_HEADER: usize = 9;
/// No entry is larger; a length beyond it is damage, not an entry.
const MAX_BODY: u32 = 1 << 30;
const SUFFIX: &str = ".log";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Record = 1,
    Deliveries = 2,
    SegmentStart = 3,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Kind> {
        match byte {
            1 => Some(Kind::Record),
            2 => Some(Kind::Deliveries),
            3 => Some(Kind::SegmentStart),
            _ => None,
        }
    }
}

/// Appends the framed entry to `out`, encoding `payload` in place.
pub fn frame(kind: Kind, seq: u64, payload: &impl Message, out: &mut Vec<u8>) {
    let start = out.len();
    let body_len = BODY_HEADER + payload.encoded_len();
    out.reserve(FRAME_HEADER + body_len);
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.push(kind as u8);
    out.extend_from_slice(&seq.to_le_bytes());
    payload.encode_raw(out);
    let crc = crc32fast::hash(&out[start + FRAME_HEADER..]);
    out[start + 4..start + FRAME_HEADER].copy_from_slice(&crc.to_le_bytes());
}

/// One entry read back from a segment.
#[derive(Debug)]
pub struct Entry<'a> {
    pub kind: Kind,
    pub seq: u64,
    /// Where its frame starts in the segment, and the frame's length.
    pub offset: u64,
    pub frame_len: u32,
    pub payload: &'a [u8],
}

/// Parses the frame at the start of `bytes`; `None` if it is cut short or damaged.
fn parse(bytes: &[u8], offset: u64) -> Option<Entry<'_>> {
    let header: [u8; FRAME_HEADER] = bytes.get(..FRAME_HEADER)?.try_into().ok()?;
    let body_len = u32::from_le_bytes(header[..4].try_into().ok()?);
    if !(BODY_HEADER as u32..=MAX_BODY).contains(&body_len) {
        return None;
    }
    let body = bytes.get(FRAME_HEADER..FRAME_HEADER + body_len as usize)?;
    if crc32fast::hash(body) != u32::from_le_bytes(header[4..].try_into().ok()?) {
        return None;
    }
    Some(Entry {
        kind: Kind::from_byte(body[0])?,
        seq: u64::from_le_bytes(body[1..BODY_HEADER].try_into().ok()?),
        offset,
        frame_len: (FRAME_HEADER + body_len as usize) as u32,
        payload: &body[BODY_HEADER..],
    })
}

/// The entries of a whole segment, in order, and the length of its intact prefix (shorter
/// than `bytes` when the rest is cut short or damaged).
pub fn entries(bytes: &[u8]) -> (Vec<Entry<'_>>, u64) {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let Some(entry) = parse(&bytes[at..], at as u64) else { break };
        at += entry.frame_len as usize;
        out.push(entry);
    }
    (out, at as u64)
}

/// Reads the frame at `offset` of `file` and returns its payload, checked.
pub fn read_payload(file: &File, offset: u64, frame_len: u32) -> io::Result<Vec<u8>> {
    let mut bytes = vec![0; frame_len as usize];
    file.read_exact_at(&mut bytes, offset)?;
    let payload_len = payload(&bytes, offset, frame_len)?.len();
    bytes.drain(..bytes.len() - payload_len);
    Ok(bytes)
}

/// The payload of the frame of `frame_len` bytes at the start of `bytes` (from `offset` of its
/// segment, for the error), checked.
pub fn payload(bytes: &[u8], offset: u64, frame_len: u32) -> io::Result<&[u8]> {
    parse(bytes, offset)
        .filter(|e| e.frame_len == frame_len)
        .map(|e| e.payload)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("no whole entry at offset {offset}")))
}

/// The file of segment `id` in `dir`.
pub fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}{SUFFIX}"))
}

/// The segment ids in `dir`, oldest first.
pub fn segment_ids(dir: &Path) -> io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        if let Some(id) = name.to_str().and_then(|n| n.strip_suffix(SUFFIX)).and_then(|n| n.parse::<u64>().ok()) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Reads segment `id` whole.
pub fn read_segment(dir: &Path, id: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(segment_path(dir, id))?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Opens segment `id` for reading and writing, creating it when `create`.
pub fn open_segment(dir: &Path, id: u64, create: bool) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).create_new(create).open(segment_path(dir, id))
}

/// Makes the directory's entries (created or removed files) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_proto::internal::{OutboxRecord, PendingDelivery};

    fn record(app: &str) -> OutboxRecord {
        OutboxRecord {
            event: None,
            deliveries: vec![PendingDelivery { app_id: app.into(), attempts: 2, ..Default::default() }],
        }
    }

    #[test]
    fn entries_read_back_as_written() {
        let mut bytes = Vec::new();
        frame(Kind::SegmentStart, 7, &(), &mut bytes);
        frame(Kind::Record, 7, &record("a"), &mut bytes);
        frame(Kind::Deliveries, 7, &OutboxRecord::default(), &mut bytes);
        let (entries, intact) = entries(&bytes);
        assert_eq!(intact, bytes.len() as u64);
        let kinds: Vec<(Kind, u64)> = entries.iter().map(|e| (e.kind, e.seq)).collect();
        assert_eq!(kinds, [(Kind::SegmentStart, 7), (Kind::Record, 7), (Kind::Deliveries, 7)]);
        assert_eq!(OutboxRecord::decode(entries[1].payload).unwrap(), record("a"));
        assert!(entries[2].payload.is_empty());
    }

    #[test]
    fn reading_stops_at_a_torn_or_damaged_entry() {
        let mut bytes = Vec::new();
        frame(Kind::Record, 1, &record("a"), &mut bytes);
        let first = bytes.len() as u64;
        frame(Kind::Record, 2, &record("b"), &mut bytes);
        let whole = bytes.clone();

        bytes.truncate(bytes.len() - 3);
        let (read, intact) = entries(&bytes);
        assert_eq!((read.len(), intact), (1, first), "a torn last entry is left out");

        let mut damaged = whole.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 0xff;
        let (read, intact) = entries(&damaged);
        assert_eq!((read.len(), intact), (1, first), "a damaged entry fails its checksum");

        let mut huge = whole;
        huge[first as usize..first as usize + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(entries(&huge).0.len(), 1, "an impossible length is damage");
    }

    #[test]
    fn one_payload_reads_back_from_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let file = open_segment(dir.path(), 3, true).unwrap();
        let mut bytes = Vec::new();
        frame(Kind::SegmentStart, 1, &(), &mut bytes);
        let offset = bytes.len() as u64;
        frame(Kind::Record, 1, &record("z"), &mut bytes);
        file.write_all_at(&bytes, 0).unwrap();
        let frame_len = (bytes.len() as u64 - offset) as u32;
        let payload = read_payload(&file, offset, frame_len).unwrap();
        assert_eq!(OutboxRecord::decode(payload.as_slice()).unwrap(), record("z"));
        assert!(read_payload(&file, 0, frame_len).is_err(), "a wrong offset is noticed");
        assert_eq!(segment_ids(dir.path()).unwrap(), [3]);
        assert!(open_segment(dir.path(), 3, true).is_err(), "a segment is never created twice");
    }
}
