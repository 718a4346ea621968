//! Rate limits shared by every gateway: GCRA (the generic cell rate algorithm, a token bucket
//! kept as one timestamp per key) evaluated atomically in Redis, so several gateways admit
//! together no more than one limit allows. Without Redis configured, each gateway limits on its
//! own, in memory. When a configured Redis fails, a gateway limits in memory until it answers
//! again, and says so (a warning, `keel_rate_limit_fallbacks_total`, and `/readyz` detail).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use redis::{Script, aio::ConnectionManager};
use serde::{Deserialize, Serialize};

/// One limit: a sustained rate and the burst admitted at once.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub per_second: f64,
    pub burst: u32,
}

impl Rule {
    pub fn is_valid(&self) -> bool {
        self.per_second > 0.0 && self.per_second.is_finite() && self.burst > 0
    }

    /// The time between two admissions at the sustained rate.
    fn interval_ms(&self) -> f64 {
        1000.0 / self.per_second
    }

    /// How far ahead of now the theoretical arrival time may be: the burst.
    fn tolerance_ms(&self) -> f64 {
        self.interval_ms() * f64::from(self.burst.saturating_sub(1))
    }
}

/// A request over its limit, and when to come back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limited {
    pub retry_after: Duration,
}

/// GCRA over one or more keys in one round trip, on Redis's clock (so gateways' clocks do not
/// matter): each key in order (`ARGV` holds an interval and a tolerance per key) admits the
/// request or refuses it, and the first refusal ends the check, as separate checks in that order
/// would. Returns `{0, 0}` when every key admitted it, `{n, retry ms}` when key `n` refused.
/// Keys expire once their bucket is full again.
const GCRA: &str = r"
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + tonumber(now_parts[2]) / 1000
for index, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[index * 2 - 1])
  local tolerance = tonumber(ARGV[index * 2])
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local allow_at = tat - tolerance
  if now < allow_at then
    return {index, math.ceil(allow_at - now)}
  end
  local next_tat = tat + interval
  redis.call('SET', key, tostring(next_tat), 'PX', math.ceil(next_tat - now) + 1000)
end
return {0, 0}
";

pub struct RateLimiter {
    redis: Option<ConnectionManager>,
    script: Script,
    prefix: String,
    /// Theoretical arrival times per key, in milliseconds since `epoch`.
    local: moka::sync::Cache<String, f64>,
    epoch: Instant,
    /// Whether the last Redis call failed (to log the change, not every request).
    degraded: Arc<AtomicBool>,
}

impl RateLimiter {
    /// `redis`: the shared store, or `None` to limit in this process only.
    pub fn new(redis: Option<ConnectionManager>, prefix: &str) -> Self {
        Self {
            redis,
            script: Script::new(GCRA),
            prefix: prefix.to_owned(),
            local: moka::sync::Cache::builder().max_capacity(1_000_000).time_to_idle(Duration::from_secs(3600)).build(),
            epoch: Instant::now(),
            degraded: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn is_shared(&self) -> bool {
        self.redis.is_some()
    }

    /// Pings the shared store; `Ok` without one (each gateway limits alone by configuration).
    pub async fn ping(&self) -> Result<(), String> {
        let Some(redis) = &self.redis else { return Ok(()) };
        let mut connection = redis.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
            .map(drop)
            .map_err(|error| format!("unreachable ({error}); each gateway limits in its own memory meanwhile"))
    }

    /// Whether the shared store is failing right now (limits are per gateway meanwhile).
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// Admits one request under `key` by `rule`, or says when to retry.
    pub async fn check(&self, key: &str, rule: Rule) -> Result<(), Limited> {
        self.check_all(&[(key, rule)]).await
    }

    /// Admits one request under every key by its rule, in order, in one round trip: the first
    /// key that refuses ends the check (the keys before it have counted the request, as separate
    /// checks would have).
    pub async fn check_all(&self, limits: &[(&str, Rule)]) -> Result<(), Limited> {
        let keys: Vec<String> = limits.iter().map(|(key, _)| format!("{}{key}", self.prefix)).collect();
        if let Some(redis) = &self.redis {
            let mut connection = redis.clone();
            let mut invocation = self.script.prepare_invoke();
            for (key, (_, rule)) in keys.iter().zip(limits) {
                invocation.key(key).arg(rule.interval_ms()).arg(rule.tolerance_ms());
            }
            let outcome: redis::RedisResult<(i64, i64)> = invocation.invoke_async(&mut connection).await;
            match outcome {
                Ok((refused_by, retry_ms)) => {
                    if self.degraded.swap(false, Ordering::Relaxed) {
                        tracing::info!("the rate limit store answers again; limits are shared");
                    }
                    return if refused_by == 0 { Ok(()) } else { Err(limited(retry_ms as f64)) };
                }
                Err(error) => {
                    metrics::counter!("keel_rate_limit_fallbacks_total").increment(1);
                    if !self.degraded.swap(true, Ordering::Relaxed) {
                        tracing::warn!(%error, "the rate limit store failed; limiting in this gateway only until it answers");
                    }
                }
            }
        }
        for (key, (_, rule)) in keys.into_iter().zip(limits) {
            self.check_locally(key, *rule)?;
        }
        Ok(())
    }

    fn check_locally(&self, key: String, rule: Rule) -> Result<(), Limited> {
        let now = self.epoch.elapsed().as_secs_f64() * 1000.0;
        let mut outcome = Ok(());
        self.local.entry(key).and_compute_with(|entry| {
            let tat = entry.map_or(now, |entry| entry.into_value()).max(now);
            let allow_at = tat - rule.tolerance_ms();
            if now < allow_at {
                outcome = Err(limited(allow_at - now));
                moka::ops::compute::Op::Nop
            } else {
                moka::ops::compute::Op::Put(tat + rule.interval_ms())
            }
        });
        outcome
    }
}

fn limited(retry_ms: f64) -> Limited {
    Limited { retry_after: Duration::from_millis(retry_ms.max(1.0).ceil() as u64) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_burst_is_admitted_then_the_sustained_rate() {
        let limiter = RateLimiter::new(None, "test:");
        let rule = Rule { per_second: 2.0, burst: 3 };
        for _ in 0..3 {
            assert!(limiter.check("ip:1", rule).await.is_ok());
        }
        let refused = limiter.check("ip:1", rule).await.unwrap_err();
        assert!(refused.retry_after <= Duration::from_millis(500) && refused.retry_after > Duration::ZERO);
        assert!(limiter.check("ip:2", rule).await.is_ok(), "keys are limited apart");
        tokio::time::sleep(refused.retry_after + Duration::from_millis(5)).await;
        assert!(limiter.check("ip:1", rule).await.is_ok());
        assert!(limiter.check("ip:1", rule).await.is_err());
    }
}
