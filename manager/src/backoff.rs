//! Jittered exponential backoff between retries.

use std::time::Duration;

/// Pauses that start at `min`, double after each failure up to `max`, and
/// are jittered by ±50% so many retrying peers do not move in step.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Backoff from `min` up to `max`.
    pub(crate) fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The pause before the next retry; later pauses are longer.
    pub(crate) fn next_pause(&mut self) -> Duration {
        let pause = self.next.mul_f64(rand::random_range(0.5..1.5));
        self.next = (self.next * 2).min(self.max);
        pause
    }

    /// Back to the shortest pause (after a success).
    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_within_the_jitter_up_to_the_cap_and_reset() {
        let min = Duration::from_millis(100);
        let max = Duration::from_millis(350);
        let mut b = Backoff::new(min, max);
        for base in [100, 200, 350, 350] {
            let pause = b.next_pause();
            let base = Duration::from_millis(base);
            assert!(
                pause >= base.mul_f64(0.5) && pause <= base.mul_f64(1.5),
                "{pause:?}"
            );
        }
        b.reset();
        assert!(b.next_pause() <= min.mul_f64(1.5));
    }
}
