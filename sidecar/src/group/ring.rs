//! The collective algorithms, over any [`Link`] between the members of a round: a ring
//! all-reduce (reduce-scatter, then all-gather: each member sends and receives `2 (N - 1) / N`
//! of the buffer, whatever N) and a broadcast from one root.
//!
//! Every member ends with the same bytes: each segment is summed once, along the ring, and that
//! sum is what everyone receives. The `round_ends` flag is OR-ed along the ring; after
//! `2 (N - 1)` hops every member has seen every member's flag, so all of them decide alike to
//! end the round after this step.

use std::future::Future;
use std::ops::Range;

use prost::bytes::{Bytes, BytesMut};

use super::GroupError;

/// One piece of an operation on its way between two members.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// Little-endian `f32` values (all-reduce) or the broadcast bytes.
    pub data: Bytes,
    pub round_ends: bool,
}

/// How a member's pieces reach the others and theirs reach it, in one operation.
pub trait Link {
    /// Hands `piece` of hop `hop` to the member of rank `to`; returns once it is kept there.
    fn send(&self, to: usize, hop: u32, piece: Piece) -> impl Future<Output = Result<(), GroupError>> + Send;
    /// The piece of hop `hop` from the member of rank `from`, once it has arrived.
    fn receive(&self, from: usize, hop: u32) -> impl Future<Output = Result<Piece, GroupError>> + Send;
}

/// Sums `values` element-wise over the `world` members (this one has rank `rank`): on return,
/// `values` holds the sum on every member. Returns the OR of every member's `round_ends`.
pub async fn all_reduce<L: Link + Sync>(
    link: &L,
    rank: usize,
    world: usize,
    values: &mut [f32],
    round_ends: bool,
) -> Result<bool, GroupError> {
    if world <= 1 {
        return Ok(round_ends);
    }
    let (right, left) = ((rank + 1) % world, (rank + world - 1) % world);
    let len = values.len();
    let segment = |index: usize| -> Range<usize> { index * len / world..(index + 1) * len / world };
    let mut ends = round_ends;
    // Reduce-scatter: after world - 1 hops this member holds the whole sum of segment rank + 1.
    for k in 0..world - 1 {
        let (out, into) = (segment((rank + world - k) % world), segment((rank + 2 * world - k - 1) % world));
        let hop = k as u32;
        ends =
            exchange(link, hop, (right, left), values, (out, into), ends, |value, received| *value += received).await?;
    }
    // All-gather: each whole segment travels once around the ring.
    for k in 0..world - 1 {
        let (out, into) = (segment((rank + 1 + world - k) % world), segment((rank + world - k) % world));
        let hop = (world - 1 + k) as u32;
        ends =
            exchange(link, hop, (right, left), values, (out, into), ends, |value, received| *value = received).await?;
    }
    Ok(ends)
}

/// One hop of the ring: sends segment `out` to the right neighbour while receiving the left
/// neighbour's piece, which `combine` folds into segment `into`. Returns the OR-ed flag.
async fn exchange<L: Link + Sync>(
    link: &L,
    hop: u32,
    (right, left): (usize, usize),
    values: &mut [f32],
    (out, into): (Range<usize>, Range<usize>),
    ends: bool,
    combine: impl Fn(&mut f32, f32),
) -> Result<bool, GroupError> {
    let piece = Piece { data: encode(&values[out]), round_ends: ends };
    let (_, received) = tokio::try_join!(link.send(right, hop, piece), link.receive(left, hop))?;
    let target = &mut values[into];
    check_len(&received, target.len(), left, hop)?;
    for (value, bytes) in target.iter_mut().zip(received.data.chunks_exact(4)) {
        combine(value, f32::from_le_bytes(bytes.try_into().expect("4 bytes")));
    }
    Ok(ends | received.round_ends)
}

/// Hands `data` of the member of rank `root` to every member: the root sends it to each other
/// member (and gets it back), the others receive it.
pub async fn broadcast<L: Link + Sync>(
    link: &L,
    rank: usize,
    world: usize,
    root: usize,
    data: Bytes,
) -> Result<Bytes, GroupError> {
    if rank != root {
        return Ok(link.receive(root, 0).await?.data);
    }
    let sends = (0..world).filter(|&to| to != root).map(|to| {
        let piece = Piece { data: data.clone(), round_ends: false };
        link.send(to, 0, piece)
    });
    futures_util::future::try_join_all(sends).await?;
    Ok(data)
}

/// `values` as little-endian bytes.
pub fn encode(values: &[f32]) -> Bytes {
    // Into a zeroed buffer of the final size: a loop the compiler vectorizes (megabytes a step).
    let mut bytes = BytesMut::zeroed(values.len() * 4);
    for (chunk, value) in bytes.chunks_exact_mut(4).zip(values) {
        chunk.copy_from_slice(&value.to_le_bytes());
    }
    bytes.freeze()
}

/// Little-endian bytes as values; the length must be a multiple of 4.
pub fn decode(bytes: &[u8]) -> Result<Vec<f32>, GroupError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(GroupError::InvalidArgument(format!(
            "data of {} bytes is not a whole number of little-endian f32 values",
            bytes.len()
        )));
    }
    Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect())
}

fn check_len(piece: &Piece, values: usize, from: usize, hop: u32) -> Result<(), GroupError> {
    if piece.data.len() != values * 4 {
        return Err(GroupError::InvalidArgument(format!(
            "rank {from} sent {} bytes at hop {hop} where this member expected {} values: the members' buffers differ in length",
            piece.data.len(),
            values
        )));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use tokio::sync::mpsc;

    use super::*;

    /// Receiver rank, sender rank, hop.
    type Route = (usize, usize, u32);

    /// Members in one process, joined by channels (one per receiver, sender and hop).
    #[derive(Clone)]
    pub(crate) struct ChannelLink {
        rank: usize,
        senders: Arc<Mutex<HashMap<Route, mpsc::UnboundedSender<Piece>>>>,
        receivers: Arc<Mutex<HashMap<Route, mpsc::UnboundedReceiver<Piece>>>>,
    }

    impl ChannelLink {
        pub(crate) fn group(world: usize) -> Vec<ChannelLink> {
            let (senders, receivers) = (Arc::new(Mutex::new(HashMap::new())), Arc::new(Mutex::new(HashMap::new())));
            (0..world)
                .map(|rank| ChannelLink { rank, senders: senders.clone(), receivers: receivers.clone() })
                .collect()
        }

        fn channel(&self, key: Route) {
            self.senders.lock().unwrap().entry(key).or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                self.receivers.lock().unwrap().insert(key, rx);
                tx
            });
        }
    }

    impl Link for ChannelLink {
        async fn send(&self, to: usize, hop: u32, piece: Piece) -> Result<(), GroupError> {
            let key = (to, self.rank, hop);
            self.channel(key);
            self.senders.lock().unwrap()[&key].send(piece).map_err(|_| GroupError::InvalidArgument("closed".into()))
        }

        async fn receive(&self, from: usize, hop: u32) -> Result<Piece, GroupError> {
            let key = (self.rank, from, hop);
            self.channel(key);
            let mut receiver = self.receivers.lock().unwrap().remove(&key).unwrap();
            Ok(receiver.recv().await.unwrap())
        }
    }

    fn buffer(rank: usize, len: usize) -> Vec<f32> {
        (0..len).map(|i| (i as f32 * 0.37 + rank as f32 * 1.9).sin()).collect()
    }

    #[tokio::test]
    async fn every_member_gets_the_same_sum_for_any_world_and_length() {
        for world in 1..=5 {
            for len in [0, 1, 3, 7, 1000] {
                let links = ChannelLink::group(world);
                let tasks: Vec<_> = links
                    .into_iter()
                    .enumerate()
                    .map(|(rank, link)| {
                        tokio::spawn(async move {
                            let mut values = buffer(rank, len);
                            let ends = all_reduce(&link, rank, world, &mut values, rank == world - 1 && world > 2)
                                .await
                                .unwrap();
                            (values, ends)
                        })
                    })
                    .collect();
                let mut results = Vec::new();
                for task in tasks {
                    results.push(task.await.unwrap());
                }
                let expected: Vec<f32> = (0..len).map(|i| (0..world).map(|rank| buffer(rank, len)[i]).sum()).collect();
                for (values, ends) in &results {
                    assert_eq!(values, &results[0].0, "world {world}, len {len}: members differ");
                    assert_eq!(*ends, world > 2, "world {world}: the flag of the last rank reaches everyone");
                    for (got, want) in values.iter().zip(&expected) {
                        assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "{got} vs {want}");
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn broadcast_hands_the_roots_bytes_to_everyone() {
        let links = ChannelLink::group(4);
        let tasks: Vec<_> = links
            .into_iter()
            .enumerate()
            .map(|(rank, link)| {
                tokio::spawn(async move {
                    let data = if rank == 2 { Bytes::from_static(b"state of rank 2") } else { Bytes::new() };
                    broadcast(&link, rank, 4, 2, data).await.unwrap()
                })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), Bytes::from_static(b"state of rank 2"));
        }
    }

    #[test]
    fn bytes_that_are_not_f32_values_are_refused() {
        assert_eq!(decode(&encode(&[1.5, -2.0])).unwrap(), vec![1.5, -2.0]);
        let err = decode(&[0, 0, 0]).unwrap_err();
        assert_eq!(err.to_string(), "data of 3 bytes is not a whole number of little-endian f32 values");
    }
}
