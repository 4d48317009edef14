//! Percentiles of measured latencies, shared by the benchmark and the demo.

use std::time::Duration;

/// The `p`-th percentile of `sorted` (ascending) by the nearest-rank method: the smallest
/// sample such that at least `p`% of the samples are less than or equal to it. No
/// interpolation, so the answer is always a latency that was actually observed.
pub fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() || !(0.0..=100.0).contains(&p) {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(values: &[u64]) -> Vec<Duration> {
        values.iter().map(|&v| Duration::from_micros(v)).collect()
    }

    #[test]
    fn nearest_rank_percentiles_of_one_to_a_hundred() {
        let sorted = us(&(1..=100).collect::<Vec<_>>());
        assert_eq!(percentile(&sorted, 50.0), Some(Duration::from_micros(50)));
        assert_eq!(percentile(&sorted, 99.0), Some(Duration::from_micros(99)));
        assert_eq!(percentile(&sorted, 100.0), Some(Duration::from_micros(100)));
        assert_eq!(percentile(&sorted, 0.0), Some(Duration::from_micros(1)));
        assert_eq!(percentile(&sorted, 0.5), Some(Duration::from_micros(1)));
    }

    #[test]
    fn percentiles_of_small_and_odd_sample_counts() {
        assert_eq!(percentile(&us(&[7]), 50.0), Some(Duration::from_micros(7)));
        assert_eq!(percentile(&us(&[7]), 99.0), Some(Duration::from_micros(7)));
        // 3 samples: rank ceil(1.5) = 2 for p50, ceil(2.97) = 3 for p99.
        assert_eq!(percentile(&us(&[1, 2, 3]), 50.0), Some(Duration::from_micros(2)));
        assert_eq!(percentile(&us(&[1, 2, 3]), 99.0), Some(Duration::from_micros(3)));
        // 4 samples: the median is the 2nd.
        assert_eq!(percentile(&us(&[1, 2, 3, 4]), 50.0), Some(Duration::from_micros(2)));
        // 2000 samples: p99 is the 1980th, so the 20 slowest calls are above it.
        let sorted = us(&(1..=2000).collect::<Vec<_>>());
        assert_eq!(percentile(&sorted, 99.0), Some(Duration::from_micros(1980)));
    }

    #[test]
    fn no_percentile_without_samples_or_outside_the_range() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&us(&[1]), 101.0), None);
        assert_eq!(percentile(&us(&[1]), -1.0), None);
    }
}
