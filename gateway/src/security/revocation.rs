//! Whether a signed token still speaks for someone: its user is active and its session was not
//! revoked. Access tokens are verified locally and live for minutes, so logout and deactivation
//! reach them through the read models (`users`, `auth_sessions`), cached for at most
//! `gateway.auth.status_cache_ms` and dropped as soon as the projection behind them commits a
//! batch that changes them (see [`crate::invalidation`]).

use std::time::Duration;

use keel_read_models::{sessions, users};
use sqlx::PgPool;
use uuid::Uuid;

use crate::problem::Problem;

pub struct StatusCache {
    pool: PgPool,
    /// User id → active.
    users: moka::future::Cache<Uuid, bool>,
    /// Session id → revoked.
    sessions: moka::future::Cache<Uuid, bool>,
}

impl StatusCache {
    pub fn new(pool: PgPool, ttl: Duration) -> Self {
        let cache = || moka::future::Cache::builder().max_capacity(1_000_000).time_to_live(ttl).build();
        Self { pool, users: cache(), sessions: cache() }
    }

    /// Whether the user is active. A user the read model does not know is not: tokens exist only
    /// for users a login found there.
    pub async fn user_active(&self, user: Uuid) -> Result<bool, Problem> {
        let pool = self.pool.clone();
        self.users
            .try_get_with(user, async move {
                let status = users::status(&pool, user).await?;
                Ok::<_, sqlx::Error>(status.as_deref() == Some("active"))
            })
            .await
            .map_err(unavailable)
    }

    /// Whether the session was revoked. A session the read model does not know yet was not: it
    /// was just started, and its token is signed.
    pub async fn session_revoked(&self, session: Uuid) -> Result<bool, Problem> {
        let pool = self.pool.clone();
        self.sessions
            .try_get_with(session, async move {
                let revoked = sessions::is_revoked(&pool, session).await?;
                Ok::<_, sqlx::Error>(revoked.unwrap_or(false))
            })
            .await
            .map_err(unavailable)
    }

    /// A session this gateway revoked itself takes effect here at once.
    pub async fn revoked(&self, session: Uuid) {
        self.sessions.insert(session, true).await;
    }

    pub fn forget_users(&self) {
        self.users.invalidate_all();
    }

    pub async fn forget_user(&self, user: Uuid) {
        self.users.invalidate(&user).await;
    }

    pub async fn forget_session(&self, session: Uuid) {
        self.sessions.invalidate(&session).await;
    }

    pub fn forget_sessions(&self) {
        self.sessions.invalidate_all();
    }
}

fn unavailable(error: std::sync::Arc<sqlx::Error>) -> Problem {
    tracing::error!(%error, "failed to read account status");
    Problem::from_code(keel_proto::ErrorCode::Unavailable)
}
