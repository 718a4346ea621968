//! The `sessions` read model: every login with its user, expiry and revocation. Gateways read it
//! to refuse the access tokens of revoked sessions.

use anyhow::Context;
use keel_domain::auth::SessionEvent;
use keel_topics::{Topic, auth};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use keel_projections::{Commit, Projection, TableSpec, Tables};

use crate::status_notice::{self, Subject};

pub struct SessionsProjection;

const TABLES: &[TableSpec] = &[TableSpec {
    name: "auth_sessions",
    ddl: "CREATE TABLE {table} (
              id            uuid        PRIMARY KEY,
              user_id       uuid        NOT NULL,
              started_at    timestamptz NOT NULL,
              expires_at    timestamptz NOT NULL,
              refreshed_at  timestamptz,
              refreshes     bigint      NOT NULL DEFAULT 0,
              revoked_at    timestamptz,
              revoke_reason text,
              version       bigint      NOT NULL
          );
          CREATE INDEX {table}_user ON {table} (user_id);",
    view: true,
}];

#[async_trait::async_trait]
impl Projection for SessionsProjection {
    fn name(&self) -> &'static str {
        "sessions"
    }

    fn code_version(&self) -> i32 {
        1
    }

    fn topics(&self) -> &'static [Topic] {
        &[Topic::AuthSessions]
    }

    fn tables(&self) -> &'static [TableSpec] {
        TABLES
    }

    async fn apply(&self, connection: &mut PgConnection, tables: Tables, commits: &[Commit]) -> anyhow::Result<()> {
        let table = tables.name("auth_sessions");
        let mut revoked = Vec::new();
        for commit in commits {
            let at = commit.header.occurred_at;
            let events = auth::decode_sessions(&commit.decoded).context("a valid sessions commit decodes")?;
            for (index, event) in events.into_iter().enumerate() {
                let version = (commit.header.expected_version + index as u64 + 1) as i64;
                let query = match event {
                    SessionEvent::Started { id, user_id, expires_at, .. } => sqlx::query(sqlx::AssertSqlSafe(format!(
                        "INSERT INTO {table} (id, user_id, started_at, expires_at, version)
                         VALUES ($1, $2, $3, to_timestamp($4), $5) ON CONFLICT (id) DO NOTHING"
                    )))
                    .bind(id.as_uuid())
                    .bind(user_id.as_uuid())
                    .bind(at)
                    .bind(expires_at as f64)
                    .bind(version),
                    SessionEvent::Refreshed { id, .. } => sqlx::query(sqlx::AssertSqlSafe(format!(
                        "UPDATE {table} SET refreshed_at = $2, refreshes = refreshes + 1, version = $3
                         WHERE id = $1 AND version < $3"
                    )))
                    .bind(id.as_uuid())
                    .bind(at)
                    .bind(version),
                    SessionEvent::Revoked { id, reason } => {
                        revoked.push(id.as_uuid());
                        sqlx::query(sqlx::AssertSqlSafe(format!(
                            "UPDATE {table} SET revoked_at = $2, revoke_reason = $3, version = $4
                         WHERE id = $1 AND version < $4"
                        )))
                        .bind(id.as_uuid())
                        .bind(at)
                        .bind(reason.as_str())
                        .bind(version)
                    }
                };
                query.execute(&mut *connection).await.context("failed to apply a session event")?;
            }
        }
        status_notice::announce(connection, Subject::Session, &revoked).await
    }
}

// --- Queries -------------------------------------------------------------------------------------

/// Whose session `id` is, if the read model has it.
pub async fn owner(pool: &PgPool, id: Uuid) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT user_id FROM auth_sessions WHERE id = $1").bind(id).fetch_optional(pool).await
}

/// Whether the session `id` was revoked, if the read model has it.
pub async fn is_revoked(pool: &PgPool, id: Uuid) -> Result<Option<bool>, sqlx::Error> {
    sqlx::query_scalar("SELECT revoked_at IS NOT NULL FROM auth_sessions WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}
