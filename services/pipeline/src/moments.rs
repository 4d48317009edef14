//! Per-batch sufficient statistics of the features, and their deterministic combination into
//! standardization parameters (the scaler ingest fits on the train split while it reads it).

use serde::{Deserialize, Serialize};

use crate::messages::ScalerParams;

/// Count, mean and sum of squared deviations (M2) of each feature over one batch, in f64.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchMoments {
    pub count: u64,
    pub mean: Vec<f64>,
    pub m2: Vec<f64>,
}

impl BatchMoments {
    /// The moments of `rows` (all of the same width, at least one row).
    pub fn of(rows: &[Vec<f32>]) -> BatchMoments {
        let width = rows.first().map_or(0, Vec::len);
        let count = rows.len() as u64;
        let mut mean = vec![0.0f64; width];
        for row in rows {
            for (m, &x) in mean.iter_mut().zip(row) {
                *m += f64::from(x);
            }
        }
        mean.iter_mut().for_each(|m| *m /= count.max(1) as f64);
        let mut m2 = vec![0.0f64; width];
        for row in rows {
            for ((s, &x), m) in m2.iter_mut().zip(row).zip(&mean) {
                let d = f64::from(x) - m;
                *s += d * d;
            }
        }
        BatchMoments { count, mean, m2 }
    }

    /// Folds `other` in (Chan et al.'s parallel update). Not commutative in floating point:
    /// callers fold in a fixed order.
    pub fn merge(&mut self, other: &BatchMoments) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = other.clone();
            return;
        }
        let (na, nb) = (self.count as f64, other.count as f64);
        let n = na + nb;
        for i in 0..self.mean.len() {
            let delta = other.mean[i] - self.mean[i];
            self.mean[i] += delta * nb / n;
            self.m2[i] += other.m2[i] + delta * delta * na * nb / n;
        }
        self.count += other.count;
    }
}

/// Combines the batches' moments in the order given (batch index order) into the scaler:
/// population standard deviation, 1 for a constant feature.
pub fn fit(batches: &[BatchMoments]) -> Option<ScalerParams> {
    let mut fold = Fold::default();
    for batch in batches {
        fold.add(batch).ok()?;
    }
    fold.finish()
}

/// [`fit`] one batch at a time, holding only the running total: the same bits as `fit` over
/// the batches in the order they are added, in constant memory however many there are.
#[derive(Debug, Clone, Default)]
pub struct Fold {
    total: Option<BatchMoments>,
}

impl Fold {
    /// Folds `batch` in; `Err` when its feature count differs from the earlier batches'.
    pub fn add(&mut self, batch: &BatchMoments) -> Result<(), String> {
        match &mut self.total {
            None => self.total = Some(batch.clone()),
            Some(total) if total.mean.len() != batch.mean.len() => {
                return Err(format!("a batch of {} features after batches of {}", batch.mean.len(), total.mean.len()));
            }
            Some(total) => total.merge(batch),
        }
        Ok(())
    }

    /// The scaler: population standard deviation, 1 for a constant feature; `None` before any batch.
    pub fn finish(self) -> Option<ScalerParams> {
        let total = self.total?;
        let n = total.count.max(1) as f64;
        let std = total
            .m2
            .iter()
            .map(|m2| {
                let std = (m2 / n).sqrt();
                if std > 1e-6 { std as f32 } else { 1.0 }
            })
            .collect();
        Some(ScalerParams { mean: total.mean.iter().map(|m| *m as f32).collect(), std, samples: total.count })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_batches_match_the_whole_and_constant_features_get_one() {
        let rows: Vec<Vec<f32>> = (0..100).map(|i| vec![i as f32, 3.0, (i * i % 17) as f32]).collect();
        let whole = fit(&[BatchMoments::of(&rows)]).unwrap();
        let parts: Vec<BatchMoments> = rows.chunks(7).map(BatchMoments::of).collect();
        let merged = fit(&parts).unwrap();
        assert_eq!(merged.samples, 100);
        for i in 0..3 {
            assert!((whole.mean[i] - merged.mean[i]).abs() < 1e-5, "mean {i}");
            assert!((whole.std[i] - merged.std[i]).abs() < 1e-5, "std {i}");
        }
        assert_eq!(merged.std[1], 1.0);
        assert!((merged.mean[0] - 49.5).abs() < 1e-6);
        // The same order gives the same bits.
        assert_eq!(fit(&parts), fit(&parts.clone()));
    }
}
