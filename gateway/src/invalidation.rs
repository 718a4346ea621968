//! Dropping what the gateway cached from read models as soon as they change.
//!
//! Each projection batch announces itself on the PostgreSQL channel `keel_projections` in its
//! own transaction, so the notification arrives only once the batch is committed and readable.
//! The gateway hears it (through its [`Notifications`](keel_runtime::notifications::Notifications))
//! and drops the caches fed by that projection. A lost connection may have lost notifications:
//! after reconnecting, every cache is dropped.

use std::sync::Arc;

use keel_runtime::notifications::Notice;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::{cache::QueryCache, security::Security};

/// What the gateway caches, by the projection that feeds it.
pub struct Caches {
    pub security: Arc<Security>,
    pub posts: Arc<QueryCache>,
}

impl Caches {
    /// A batch of `projection` committed. Account statuses are dropped by their own notices.
    fn forget(&self, projection: &str) {
        match projection {
            // Author names in post lists come from users.
            "users" | "blog" => self.posts.invalidate(),
            "authz" => self.security.permissions.forget(),
            _ => {}
        }
    }

    /// A batch changed the status of the accounts `changed` lists (see
    /// [`keel_topics::STATUS_CHANNEL`]).
    async fn forget_status(&self, changed: &str) {
        let status = &self.security.status;
        let mut words = changed.split(' ');
        while let (Some(kind), Some(id)) = (words.next(), words.next()) {
            match (kind, id.parse()) {
                ("user", Ok(id)) => status.forget_user(id).await,
                ("session", Ok(id)) => status.forget_session(id).await,
                ("sessions", _) => status.forget_sessions(),
                // `users *`, or anything this gateway cannot read: drop more rather than less.
                _ => {
                    status.forget_users();
                    status.forget_sessions();
                }
            }
        }
    }

    fn forget_all(&self) {
        for projection in ["users", "authz", "blog"] {
            self.forget(projection);
        }
        self.security.status.forget_users();
        self.security.status.forget_sessions();
    }
}

/// Drops caches as projections announce batches (`batches`) and status changes (`statuses`),
/// until shutdown. A notice that notifications may have been missed drops every cache.
pub async fn run(
    mut batches: broadcast::Receiver<Notice>,
    mut statuses: broadcast::Receiver<Notice>,
    caches: Caches,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Anything that changed before listening is not cached any more either.
    caches.forget_all();
    loop {
        let (notice, of_statuses) = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            notice = batches.recv() => (notice, false),
            notice = statuses.recv() => (notice, true),
        };
        match notice {
            Ok(Notice::Payload(payload)) => {
                metrics::counter!("keel_gateway_cache_invalidations_total").increment(1);
                if of_statuses {
                    caches.forget_status(&payload).await;
                } else {
                    caches.forget(&payload);
                }
            }
            Ok(Notice::Missed) | Err(broadcast::error::RecvError::Lagged(_)) => caches.forget_all(),
            Err(broadcast::error::RecvError::Closed) => {
                anyhow::bail!("the gateway stopped hearing projection notifications")
            }
        }
    }
}
