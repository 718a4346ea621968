//! Answers of query routes kept in memory (moka, bounded by bytes), dropped as soon as the
//! projection behind them commits a batch ([`crate::invalidation`]).
//!
//! An answer read before such a commit but finished after the drop must not be kept: each drop
//! starts a new generation, and an answer is kept only if no drop happened while it was read.

use std::{
    future::Future,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use bytes::Bytes;

use crate::problem::Problem;

pub struct QueryCache {
    cache: moka::future::Cache<String, Bytes>,
    generation: AtomicU64,
}

impl QueryCache {
    pub fn new(max_bytes: u64, ttl: Duration) -> Self {
        let cache = moka::future::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|key: &String, value: &Bytes| u32::try_from(key.len() + value.len()).unwrap_or(u32::MAX))
            .time_to_live(ttl)
            .build();
        Self { cache, generation: AtomicU64::new(0) }
    }

    /// The cached answer under `key`, or `load`'s (kept when it is `Some` and no drop happened
    /// meanwhile). `None` from `load` is an answer not to keep (e.g. not public).
    pub async fn get_or_load<F>(&self, key: String, load: F) -> Result<Option<Bytes>, Problem>
    where
        F: Future<Output = Result<Option<Bytes>, Problem>>,
    {
        if let Some(hit) = self.cache.get(&key).await {
            metrics::counter!("keel_gateway_query_cache_total", "outcome" => "hit").increment(1);
            return Ok(Some(hit));
        }
        metrics::counter!("keel_gateway_query_cache_total", "outcome" => "miss").increment(1);
        let generation = self.generation.load(Ordering::Acquire);
        let loaded = load.await?;
        if let Some(value) = &loaded
            && self.generation.load(Ordering::Acquire) == generation
        {
            self.cache.insert(key, value.clone()).await;
        }
        Ok(loaded)
    }

    /// Drops every answer.
    pub fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.cache.invalidate_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_answer_read_across_a_drop_is_not_kept() {
        let cache = QueryCache::new(1 << 20, Duration::from_secs(60));
        let first = cache.get_or_load("k".into(), async { Ok(Some(Bytes::from_static(b"old"))) }).await.unwrap();
        assert_eq!(first.as_deref(), Some(&b"old"[..]));
        let hit = cache.get_or_load("k".into(), async { panic!("cached") }).await.unwrap();
        assert_eq!(hit.as_deref(), Some(&b"old"[..]));
        cache.invalidate();
        let raced = cache
            .get_or_load("k".into(), async {
                cache.invalidate();
                Ok(Some(Bytes::from_static(b"stale")))
            })
            .await
            .unwrap();
        assert_eq!(raced.as_deref(), Some(&b"stale"[..]), "the caller still gets its answer");
        let fresh = cache.get_or_load("k".into(), async { Ok(Some(Bytes::from_static(b"new"))) }).await.unwrap();
        assert_eq!(fresh.as_deref(), Some(&b"new"[..]), "the raced answer was not kept");
    }
}
