//! Reconnecting: exponential backoff with full jitter, as both the host and the
//! invoker wait between attempts to reach a broker that went away.

use std::time::{Duration, SystemTime};

/// The first wait before reconnecting.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);

/// The longest wait before reconnecting.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Exponential backoff with full jitter between [`BACKOFF_MIN`] and [`BACKOFF_MAX`].
#[derive(Debug, Default)]
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    /// The wait before the next attempt; each call doubles the ceiling.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = BACKOFF_MIN
            .saturating_mul(1 << self.attempt.min(16))
            .min(BACKOFF_MAX);
        self.attempt = self.attempt.saturating_add(1);
        // Full jitter: anywhere from the minimum up to the ceiling, so that many devices
        // losing one broker do not come back in lockstep.
        let span = ceiling.saturating_sub(BACKOFF_MIN).as_millis() as u64;
        BACKOFF_MIN + Duration::from_millis(jitter(span))
    }

    /// Starts again from the shortest wait, after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A number in `0..=max` from the clock's low bits: jitter needs no better randomness.
fn jitter(max: u64) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::from(d.subsec_nanos()))
        .unwrap_or(0);
    nanos % (max + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_ceiling_and_resets() {
        let mut backoff = Backoff::default();
        for _ in 0..40 {
            let delay = backoff.next_delay();
            assert!((BACKOFF_MIN..=BACKOFF_MAX).contains(&delay), "{delay:?}");
        }
        assert_eq!(backoff.attempt, 40);
        backoff.reset();
        assert_eq!(
            backoff.next_delay(),
            BACKOFF_MIN,
            "the first retry after a reset is quick"
        );
    }
}
