//! The train/test split and the cut into batches, both done as rows stream by: a row's split
//! depends only on the seed and its position, and a batch is emitted as soon as it is full, so
//! neither needs the row count or holds more than one unfinished batch per split.

use tandem_model::rng::SeededRng;
use tandem_pipeline::messages::Split;

use crate::source::Chunk;

/// Which split row `row` (0-based, in source order) goes to: a seeded hash of its position,
/// test with probability `test_fraction`.
pub fn split_of(seed: u64, test_fraction: f64, row: u64) -> Split {
    split_from_base(SeededRng::new(seed).next_u64(), test_fraction, row)
}

fn split_from_base(base: u64, test_fraction: f64, row: u64) -> Split {
    if SeededRng::new(base ^ row).unit_f64() < test_fraction { Split::Test } else { Split::Train }
}

/// A full (or, at the end, the last) batch of one split.
#[derive(Debug, Clone, PartialEq)]
pub struct Cut {
    pub split: Split,
    /// 0-based index within its split.
    pub index: u32,
    pub rows: Vec<Vec<f32>>,
    pub labels: Vec<u32>,
}

/// Splits rows and cuts each split into batches of `batch_size` in row order.
#[derive(Debug)]
pub struct Cutter {
    width: usize,
    batch_size: usize,
    base: u64,
    test_fraction: f64,
    train: Partial,
    test: Partial,
}

#[derive(Debug)]
struct Partial {
    split: Split,
    next_index: u32,
    rows: Vec<Vec<f32>>,
    labels: Vec<u32>,
}

impl Partial {
    fn new(split: Split) -> Partial {
        Partial { split, next_index: 0, rows: Vec::new(), labels: Vec::new() }
    }

    fn take(&mut self) -> Cut {
        let cut = Cut {
            split: self.split,
            index: self.next_index,
            rows: std::mem::take(&mut self.rows),
            labels: std::mem::take(&mut self.labels),
        };
        self.next_index += 1;
        cut
    }
}

impl Cutter {
    pub fn new(width: usize, batch_size: usize, seed: u64, test_fraction: f64) -> Cutter {
        Cutter {
            width,
            batch_size,
            base: SeededRng::new(seed).next_u64(),
            test_fraction,
            train: Partial::new(Split::Train),
            test: Partial::new(Split::Test),
        }
    }

    /// Sends `chunk`'s rows to their splits; answers the batches they filled, in order.
    pub fn push(&mut self, chunk: &Chunk) -> Vec<Cut> {
        let mut full = Vec::new();
        for (offset, (row, &label)) in chunk.features.chunks(self.width).zip(&chunk.labels).enumerate() {
            let split = split_from_base(self.base, self.test_fraction, chunk.first_row + offset as u64);
            let partial = if split == Split::Test { &mut self.test } else { &mut self.train };
            partial.rows.push(row.to_vec());
            partial.labels.push(label);
            if partial.labels.len() == self.batch_size {
                full.push(partial.take());
            }
        }
        full
    }

    /// The last batches, which may be short: train's, then test's.
    pub fn finish(mut self) -> Vec<Cut> {
        [&mut self.train, &mut self.test].into_iter().filter(|p| !p.labels.is_empty()).map(Partial::take).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_is_seeded_by_position_and_near_the_fraction() {
        let tests = (0..10_000).filter(|&row| split_of(7, 0.2, row) == Split::Test).count();
        assert!((1_800..2_200).contains(&tests), "{tests} of 10000 rows went to test");
        let same: Vec<Split> = (0..100).map(|row| split_of(7, 0.2, row)).collect();
        assert_eq!(same, (0..100).map(|row| split_of(7, 0.2, row)).collect::<Vec<_>>());
        assert_ne!(same, (0..100).map(|row| split_of(8, 0.2, row)).collect::<Vec<_>>());
    }

    #[test]
    fn batches_are_cut_per_split_whatever_the_chunking() {
        let rows = 1_000u64;
        let features: Vec<f32> = (0..rows * 2).map(|v| v as f32).collect();
        let labels: Vec<u32> = (0..rows as u32).collect();
        let cut = |chunk_rows: usize| {
            let mut cutter = Cutter::new(2, 64, 3, 0.25);
            let mut cuts = Vec::new();
            for (i, (f, l)) in features.chunks(chunk_rows * 2).zip(labels.chunks(chunk_rows)).enumerate() {
                let chunk = Chunk { first_row: (i * chunk_rows) as u64, features: f.to_vec(), labels: l.to_vec() };
                cuts.extend(cutter.push(&chunk));
            }
            cuts.extend(cutter.finish());
            cuts
        };
        let cuts = cut(100);
        assert_eq!(cuts, cut(7), "the chunking changes nothing");
        let total: usize = cuts.iter().map(|c| c.labels.len()).sum();
        assert_eq!(total, 1_000);
        for split in [Split::Train, Split::Test] {
            let ours: Vec<&Cut> = cuts.iter().filter(|c| c.split == split).collect();
            assert!(ours.iter().enumerate().all(|(i, c)| c.index == i as u32), "{split} indices in order");
            assert!(ours[..ours.len() - 1].iter().all(|c| c.labels.len() == 64), "{split}: only the last is short");
            for c in ours {
                for (row, &label) in c.rows.iter().zip(&c.labels) {
                    assert_eq!(row, &vec![label as f32 * 2.0, label as f32 * 2.0 + 1.0]);
                    assert_eq!(split_of(3, 0.25, u64::from(label)), split);
                }
            }
        }
    }
}
