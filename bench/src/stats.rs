//! Percentiles of a set of samples (durations, byte counts), and how figures are shown.

use std::time::Duration;

/// Sorted samples, for percentiles.
pub struct Samples<T = Duration>(Vec<T>);

impl<T: Ord + Copy + Default> Samples<T> {
    /// Samples from `values`, in any order.
    pub fn new(mut values: Vec<T>) -> Self {
        values.sort_unstable();
        Self(values)
    }

    /// The `p`-th percentile (0–100), by nearest rank; zero when there are no samples.
    pub fn percentile(&self, p: f64) -> T {
        if self.0.is_empty() {
            return T::default();
        }
        let rank = (p / 100.0 * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1]
    }

    /// How many samples there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// The median of `values`, by nearest rank; zero when there are none.
pub fn median<T: Ord + Copy + Default>(values: &[T]) -> T {
    Samples::new(values.to_vec()).percentile(50.0)
}

/// A duration in milliseconds with one decimal.
pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// A duration in microseconds with one decimal.
pub fn us(d: Duration) -> String {
    format!("{:.1} us", d.as_secs_f64() * 1e6)
}

/// A byte count in MiB with one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}
