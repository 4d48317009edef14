//! Latency summaries: count, median (p50, nearest rank) and maximum.

use std::time::Duration;

/// Summary of a set of latencies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub count: usize,
    pub p50: Duration,
    pub max: Duration,
}

impl Summary {
    /// `None` for an empty set.
    pub fn of(latencies: impl IntoIterator<Item = Duration>) -> Option<Summary> {
        let mut sorted: Vec<Duration> = latencies.into_iter().collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_unstable();
        let p50 = tandem_tests::stats::percentile(&sorted, 50.0)?;
        Some(Summary { count: sorted.len(), p50, max: sorted[sorted.len() - 1] })
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} round trips, p50 {}, max {}", self.count, millis(self.p50), millis(self.max))
    }
}

/// `1.234 ms`.
pub fn millis(duration: Duration) -> String {
    format!("{:.3} ms", duration.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(values: &[u64]) -> Vec<Duration> {
        values.iter().map(|&v| Duration::from_millis(v)).collect()
    }

    #[test]
    fn median_is_the_nearest_rank() {
        let s = Summary::of(ms(&[5, 1, 3])).unwrap();
        assert_eq!((s.count, s.p50, s.max), (3, Duration::from_millis(3), Duration::from_millis(5)));
        let s = Summary::of(ms(&[4, 1, 3, 2])).unwrap();
        assert_eq!(s.p50, Duration::from_millis(2));
        assert_eq!(Summary::of(ms(&[7])).unwrap().p50, Duration::from_millis(7));
        assert!(Summary::of(Vec::new()).is_none());
    }

    #[test]
    fn summaries_print_in_milliseconds() {
        let s = Summary::of(vec![Duration::from_micros(1500), Duration::from_micros(2250)]).unwrap();
        assert_eq!(s.to_string(), "2 round trips, p50 1.500 ms, max 2.250 ms");
    }
}
