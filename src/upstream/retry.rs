//! When to try again: `Retry-After` values and exponential backoff with
//! jitter.

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, SystemTime};

/// The longest `Retry-After` wharf waits for before retrying. A longer one
/// ends the attempts at once (the caller may serve stale content instead).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// First backoff step; each retry doubles it, up to [`MAX_BACKOFF`].
const BASE_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Parses a `Retry-After` value: delay-seconds or an HTTP-date (relative to
/// `now`, a date in the past meaning zero).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // Absurdly long values saturate rather than fail.
        return Some(Duration::from_secs(v.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The delay before retry number `attempt` (0-based): `BASE * 2^attempt`,
/// capped, with "equal jitter" (a random point in the upper half).
pub fn backoff(attempt: u32) -> Duration {
    let full = BASE_BACKOFF
        .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .min(MAX_BACKOFF);
    let half = full / 2;
    half + half.mul_f64(random_unit())
}

/// The delay before retry number `attempt` (0-based) with another base and
/// cap: `base * 2^attempt`, capped at `max`, with equal jitter.
pub fn backoff_between(attempt: u32, base: Duration, max: Duration) -> Duration {
    let full = base
        .saturating_mul(1u32.checked_shl(attempt.min(24)).unwrap_or(u32::MAX))
        .min(max);
    let half = full / 2;
    half + half.mul_f64(random_unit())
}

/// A random number in [0, 1) from the standard library's randomly keyed
/// hasher (quality is irrelevant for jitter).
fn random_unit() -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x9e37_79b9_7f4a_7c15);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn backoff_between_doubles_with_jitter_and_caps(attempt in 0u32..64, base_ms in 1u64..5_000, extra_ms in 0u64..600_000) {
            let (base, max) = (Duration::from_millis(base_ms), Duration::from_millis(base_ms + extra_ms));
            let d = backoff_between(attempt, base, max);
            let full = base.saturating_mul(1u32.checked_shl(attempt.min(24)).unwrap_or(u32::MAX)).min(max);
            prop_assert!(d >= full / 2 && d <= full, "{d:?} outside [{:?}, {full:?}]", full / 2);
        }
    }

    #[test]
    fn forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        // RFC 9110's example date, 30 s after `now`.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        // In the past: retry now.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        for bad in [
            "",
            "-1",
            "1.5",
            "soon",
            "12s",
            "Wed, 32 Oct 2015 07:28:00 GMT",
        ] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn backoff_grows_and_caps() {
        for attempt in 0..40 {
            let d = backoff(attempt);
            let full = BASE_BACKOFF
                .saturating_mul(2u32.saturating_pow(attempt.min(16)))
                .min(MAX_BACKOFF);
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
    }

    proptest! {
        #[test]
        fn seconds_round_trip(secs in 0u64..1_000_000_000) {
            let now = SystemTime::now();
            prop_assert_eq!(parse_retry_after(&secs.to_string(), now), Some(Duration::from_secs(secs)));
        }

        #[test]
        fn date_round_trip(base in 0u64..4_000_000_000, delta in 0u64..100_000) {
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(base);
            let at = httpdate::fmt_http_date(now + Duration::from_secs(delta));
            prop_assert_eq!(parse_retry_after(&at, now), Some(Duration::from_secs(delta)));
        }

        #[test]
        fn never_panics(s in ".{0,64}") {
            let _ = parse_retry_after(&s, SystemTime::now());
        }
    }
}
