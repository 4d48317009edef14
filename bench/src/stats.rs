//! Latency percentiles and throughput, computed from raw samples.

use std::time::Duration;

use tandem_tests::stats::percentile;

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
    fn no_summary_without_samples() {
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
