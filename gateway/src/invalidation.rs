//! Dropping what the gateway cached from read models as soon as they change.
//!
//! Each projection batch announces itself on the PostgreSQL channel `keel_projections` in its
//! own transaction, so the notification arrives only once the batch is committed and readable.
//! The gateway listens and drops the caches fed by that projection. A lost connection may have
//! lost notifications: after reconnecting, every cache is dropped.

use std::{sync::Arc, time::Duration};

use sqlx::{PgPool, postgres::PgListener};
use tokio_util::sync::CancellationToken;

use crate::{cache::QueryCache, security::Security};

/// What the gateway caches, by the projection that feeds it.
pub struct Caches {
    pub security: Arc<Security>,
    pub posts: Arc<QueryCache>,
}

impl Caches {
    fn forget(&self, projection: &str) {
        match projection {
            "users" => {
                self.security.status.forget_users();
                // Author names in post lists come from users.
                self.posts.invalidate();
            }
            "sessions" => self.security.status.forget_sessions(),
            "authz" => self.security.permissions.forget(),
            "blog" => self.posts.invalidate(),
            _ => {}
        }
    }

    fn forget_all(&self) {
        for projection in ["users", "sessions", "authz", "blog"] {
            self.forget(projection);
        }
    }
}

/// Listens until shutdown, reconnecting with backoff.
pub async fn run(pool: PgPool, caches: Caches, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(100);
    loop {
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            outcome = listen(&pool, &caches) => outcome,
        };
        caches.forget_all();
        if let Err(error) = outcome {
            tracing::warn!(%error, "lost the projection notifications; caches dropped, reconnecting");
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn listen(pool: &PgPool, caches: &Caches) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(keel_topics::APPLIED_CHANNEL).await?;
    // Anything that changed before listening is not cached any more either.
    caches.forget_all();
    loop {
        let notification = listener.recv().await?;
        metrics::counter!("keel_gateway_cache_invalidations_total").increment(1);
        caches.forget(notification.payload());
    }
}
