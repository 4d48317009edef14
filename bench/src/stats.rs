//! Latency percentiles and throughput, computed from raw samples.

use std::time::Duration;

/// Latency of a series of sequential calls.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencySummary {
    pub calls: usize,
    pub p50: Duration,
    pub p99: Duration,
}

impl LatencySummary {
    /// Summarises `samples` (in any order); `None` when there are none.
    pub fn from_samples(mut samples: Vec<Duration>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        Some(LatencySummary {
            calls: samples.len(),
            p50: percentile(&samples, 50.0)?,
            p99: percentile(&samples, 99.0)?,
        })
    }
}

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

/// Calls completed over a measured span of time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throughput {
    pub calls: u64,
    pub elapsed: Duration,
    pub in_flight: usize,
}

impl Throughput {
    pub fn per_second(&self) -> f64 {
        if self.elapsed.is_zero() { 0.0 } else { self.calls as f64 / self.elapsed.as_secs_f64() }
    }
}

/// `numerator / denominator`, or `None` when the denominator is zero.
pub fn ratio(numerator: f64, denominator: f64) -> Option<f64> {
    (denominator > 0.0).then(|| numerator / denominator)
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
        // 2000 samples: p99 is the 1980th, so the 20 slowest calls are above it.
        let sorted = us(&(1..=2000).collect::<Vec<_>>());
        assert_eq!(percentile(&sorted, 99.0), Some(Duration::from_micros(1980)));
    }

    #[test]
    fn no_percentile_without_samples_or_outside_the_range() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&us(&[1]), 101.0), None);
        assert_eq!(percentile(&us(&[1]), -1.0), None);
        assert_eq!(LatencySummary::from_samples(Vec::new()), None);
    }

    #[test]
    fn a_summary_sorts_its_samples_first() {
        let summary = LatencySummary::from_samples(us(&[40, 10, 30, 20])).unwrap();
        assert_eq!(summary.calls, 4);
        assert_eq!(summary.p50, Duration::from_micros(20));
        assert_eq!(summary.p99, Duration::from_micros(40));
    }

    #[test]
    fn throughput_and_ratios() {
        let t = Throughput { calls: 10_000, elapsed: Duration::from_secs(4), in_flight: 64 };
        assert_eq!(t.per_second(), 2500.0);
        assert_eq!(Throughput { calls: 5, elapsed: Duration::ZERO, in_flight: 1 }.per_second(), 0.0);
        assert_eq!(ratio(3.0, 2.0), Some(1.5));
        assert_eq!(ratio(3.0, 0.0), None);
    }
}
