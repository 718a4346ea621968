//! How a failed attempt is retried: exponential backoff with full jitter (the delay before
//! attempt n+1 is drawn from 0 to min(max_delay, base_delay × 2ⁿ⁻¹)), up to a number of attempts,
//! each bounded by a timeout. The draw comes from the job's id and the attempt, so deciding the
//! same failure again decides the same retry time, and retries of many jobs that failed together
//! spread out instead of coming back at once.

use crate::InvalidValue;

use super::JobId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; then the job is dead-lettered.
    pub max_attempts: u32,
    /// The cap of the first retry's delay; it doubles per attempt.
    pub base_delay_ms: u64,
    /// The largest delay between two attempts.
    pub max_delay_ms: u64,
    /// How long one attempt may run before it counts as failed (its worker died or hangs).
    pub attempt_timeout_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { max_attempts: 5, base_delay_ms: 1_000, max_delay_ms: 300_000, attempt_timeout_ms: 30_000 }
    }
}

impl RetryPolicy {
    pub fn validate(&self) -> Result<(), InvalidValue> {
        if !(1..=100).contains(&self.max_attempts) {
            return Err(InvalidValue::new("max_attempts", "must be 1 to 100"));
        }
        if self.base_delay_ms == 0 || self.base_delay_ms > self.max_delay_ms {
            return Err(InvalidValue::new("base_delay_ms", "must be positive and at most max_delay_ms"));
        }
        if self.max_delay_ms > 7 * 24 * 3_600_000 {
            return Err(InvalidValue::new("max_delay_ms", "must be at most a week"));
        }
        if !(100..=24 * 3_600_000).contains(&self.attempt_timeout_ms) {
            return Err(InvalidValue::new("attempt_timeout_ms", "must be 100 ms to a day"));
        }
        Ok(())
    }

    /// The most the delay after the failure of `attempt` (1 for the first) can be.
    pub fn cap(&self, attempt: u32) -> u64 {
        let doublings = attempt.saturating_sub(1).min(62);
        self.base_delay_ms.saturating_mul(1 << doublings).min(self.max_delay_ms)
    }

    /// The delay after the failure of `attempt` of `job`: drawn from 0 to [`Self::cap`].
    pub fn delay(&self, job: JobId, attempt: u32) -> u64 {
        let cap = self.cap(attempt);
        let draw = mix(job.as_uuid().as_u128() ^ u128::from(attempt));
        // A fraction of the cap, in millionths, so the draw is uniform over it.
        let fraction = draw % 1_000_001;
        ((u128::from(cap) * u128::from(fraction)) / 1_000_000) as u64
    }
}

/// SplitMix64 over both halves: a well-spread 64-bit draw from a 128-bit seed.
fn mix(seed: u128) -> u64 {
    let mut z = (seed as u64) ^ ((seed >> 64) as u64).rotate_left(17);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;

    #[test]
    fn caps_double_up_to_the_maximum() {
        let policy =
            RetryPolicy { max_attempts: 10, base_delay_ms: 100, max_delay_ms: 1_000, attempt_timeout_ms: 1_000 };
        let caps: Vec<u64> = (1..=6).map(|attempt| policy.cap(attempt)).collect();
        assert_eq!(caps, [100, 200, 400, 800, 1_000, 1_000]);
        assert_eq!(policy.cap(u32::MAX), 1_000, "no overflow");
    }

    #[test]
    fn delays_are_drawn_under_the_cap_the_same_every_time_and_spread_across_jobs() {
        let policy =
            RetryPolicy { max_attempts: 10, base_delay_ms: 1_000, max_delay_ms: 60_000, attempt_timeout_ms: 1_000 };
        let jobs: Vec<JobId> = (0..1_000).map(|_| JobId::from_uuid(Uuid::new_v4())).collect();
        for job in &jobs {
            for attempt in 1..=8 {
                let delay = policy.delay(*job, attempt);
                assert!(delay <= policy.cap(attempt), "{delay} under {}", policy.cap(attempt));
                assert_eq!(delay, policy.delay(*job, attempt), "deterministic");
            }
        }
        // Full jitter: the first retries of jobs that failed together spread over the whole cap.
        let delays: Vec<u64> = jobs.iter().map(|job| policy.delay(*job, 1)).collect();
        let (low, high) = (delays.iter().filter(|d| **d < 250).count(), delays.iter().filter(|d| **d > 750).count());
        assert!(low > 150 && high > 150, "spread: {low} below a quarter, {high} above three quarters");
    }

    #[test]
    fn policies_are_checked() {
        assert!(RetryPolicy::default().validate().is_ok());
        let bad = [
            RetryPolicy { max_attempts: 0, ..RetryPolicy::default() },
            RetryPolicy { base_delay_ms: 0, ..RetryPolicy::default() },
            RetryPolicy { base_delay_ms: 10, max_delay_ms: 5, ..RetryPolicy::default() },
            RetryPolicy { attempt_timeout_ms: 10, ..RetryPolicy::default() },
        ];
        for policy in bad {
            assert!(policy.validate().is_err(), "{policy:?}");
        }
    }
}
