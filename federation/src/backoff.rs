//! Exponential backoff with jitter, deterministic: the caller draws the jitter, so tests pick
//! it. Used by the outbound queue ([`crate::queue`]).
//!
//! The SDK has its own helper (`client-sdk/src/connection/state.rs`, `backoff_delay`) with a
//! different floor (it never waits less than its minimum; this one waits between half of and
//! the full delay, as the federation sender always has). The SDK does not depend on this
//! crate; sharing one helper means moving it to a crate both depend on.

use std::time::Duration;

/// The delay before retry number `failures` (≥ 1; 0 counts as 1): `min · 2^(failures − 1)`
/// capped at `max`, then jittered into [50 %, 100 %] of that so that destinations which failed
/// together do not retry together. `jitter` is in `0.0..=1.0` (clamped): 0 gives the lower
/// bound, 1 the upper. Works in whole milliseconds and never returns less than 1 ms.
pub fn backoff(min: Duration, max: Duration, failures: u32, jitter: f64) -> Duration {
    let min_ms = u64::try_from(min.as_millis()).unwrap_or(u64::MAX);
    let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
    let capped = min_ms.saturating_mul(1u64 << failures.saturating_sub(1).min(30)).min(max_ms);
    let half = capped / 2;
    // `half · jitter` rounds to at most `half`, so the result stays within [half, 2 · half].
    let extra = (half as f64 * jitter.clamp(0.0, 1.0)).round() as u64;
    Duration::from_millis((half + extra.min(half)).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn doubles_from_min_and_stops_at_max() {
        assert_eq!(backoff(MS(100), MS(1_000), 1, 1.0), MS(100));
        assert_eq!(backoff(MS(100), MS(1_000), 2, 1.0), MS(200));
        assert_eq!(backoff(MS(100), MS(1_000), 4, 1.0), MS(800));
        assert_eq!(backoff(MS(100), MS(1_000), 5, 1.0), MS(1_000));
        assert_eq!(backoff(MS(100), MS(1_000), u32::MAX, 1.0), MS(1_000));
        assert_eq!(backoff(MS(100), MS(1_000), 0, 1.0), MS(100), "0 counts as the first failure");
    }

    #[test]
    fn jitter_spans_half_to_full_and_is_clamped() {
        assert_eq!(backoff(MS(100), MS(1_000), 3, 0.0), MS(200));
        assert_eq!(backoff(MS(100), MS(1_000), 3, 0.5), MS(300));
        assert_eq!(backoff(MS(100), MS(1_000), 3, 1.0), MS(400));
        assert_eq!(backoff(MS(100), MS(1_000), 3, -3.0), MS(200));
        assert_eq!(backoff(MS(100), MS(1_000), 3, 7.0), MS(400));
        // Odd delays: [⌊d/2⌋, 2·⌊d/2⌋], as the sender's `d/2 + random % (d/2 + 1)` always was.
        assert_eq!(backoff(MS(101), MS(1_000), 1, 1.0), MS(100));
        assert_eq!(backoff(MS(1), MS(1), 1, 0.0), MS(1), "never below 1 ms");
    }

    #[test]
    fn every_jitter_stays_within_bounds() {
        for failures in 1..40 {
            let ceiling = (100u64 << (failures - 1).min(30)).min(1_000);
            for step in 0..=20 {
                let delay = backoff(MS(100), MS(1_000), failures, f64::from(step) / 20.0).as_millis() as u64;
                assert!(
                    delay >= ceiling / 2 && delay <= ceiling,
                    "failures {failures}: {delay} not in [{}, {ceiling}]",
                    ceiling / 2
                );
            }
        }
    }
}
