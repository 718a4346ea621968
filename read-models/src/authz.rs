//! The `authz` read model: roles with their permissions, and the roles granted to each user. The
//! authz service answers `CheckPermission` from it.

use anyhow::Context;
use keel_domain::authz::{Grant, RoleEvent, UserRolesEvent};
use keel_topics::{Topic, authz};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use keel_projections::{Commit, Projection, TableSpec, Tables};

pub struct AuthzProjection;

const TABLES: &[TableSpec] = &[
    TableSpec {
        name: "authz_roles",
        ddl: "CREATE TABLE {table} (
                  id          uuid        PRIMARY KEY,
                  name        text        NOT NULL UNIQUE,
                  permissions text[]      NOT NULL,
                  version     bigint      NOT NULL,
                  created_at  timestamptz NOT NULL,
                  updated_at  timestamptz NOT NULL
              );",
        view: true,
    },
    TableSpec {
        name: "authz_user_roles",
        ddl: "CREATE TABLE {table} (
                  user_id    uuid        NOT NULL,
                  role_id    uuid        NOT NULL,
                  granted_at timestamptz NOT NULL,
                  PRIMARY KEY (user_id, role_id)
              );",
        view: true,
    },
];

fn texts(permissions: &std::collections::BTreeSet<Grant>) -> Vec<String> {
    permissions.iter().map(Grant::to_string).collect()
}

#[async_trait::async_trait]
impl Projection for AuthzProjection {
    fn name(&self) -> &'static str {
        "authz"
    }

    fn code_version(&self) -> i32 {
        1
    }

    fn topics(&self) -> &'static [Topic] {
        &[Topic::AuthzRoles, Topic::AuthzUserRoles]
    }

    fn tables(&self) -> &'static [TableSpec] {
        TABLES
    }

    async fn apply(&self, connection: &mut PgConnection, tables: Tables, commits: &[Commit]) -> anyhow::Result<()> {
        let roles = tables.name("authz_roles");
        let grants = tables.name("authz_user_roles");
        for commit in commits {
            let at = commit.header.occurred_at;
            let first = commit.header.expected_version as i64 + 1;
            match commit.topic {
                Topic::AuthzRoles => {
                    for (index, event) in authz::decode_roles(&commit.decoded)
                        .context("a valid roles commit decodes")?
                        .into_iter()
                        .enumerate()
                    {
                        let version = first + index as i64;
                        let query = match event {
                            RoleEvent::Created { id, name, permissions } => sqlx::query(sqlx::AssertSqlSafe(format!(
                                "INSERT INTO {roles} (id, name, permissions, version, created_at, updated_at)
                                 VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (id) DO NOTHING"
                            )))
                            .bind(id.as_uuid())
                            .bind(name.as_str().to_owned())
                            .bind(texts(&permissions))
                            .bind(version)
                            .bind(at),
                            RoleEvent::PermissionsChanged { id, permissions } => {
                                sqlx::query(sqlx::AssertSqlSafe(format!(
                                    "UPDATE {roles} SET permissions = $2, version = $3, updated_at = $4
                                 WHERE id = $1 AND version < $3"
                                )))
                                .bind(id.as_uuid())
                                .bind(texts(&permissions))
                                .bind(version)
                                .bind(at)
                            }
                        };
                        query.execute(&mut *connection).await.context("failed to apply a role event")?;
                    }
                }
                Topic::AuthzUserRoles => {
                    for event in authz::decode_user_roles(&commit.decoded).context("a valid grants commit decodes")? {
                        let query = match event {
                            UserRolesEvent::Granted { user_id, role_id } => sqlx::query(sqlx::AssertSqlSafe(format!(
                                "INSERT INTO {grants} (user_id, role_id, granted_at) VALUES ($1, $2, $3)
                                 ON CONFLICT DO NOTHING"
                            )))
                            .bind(user_id.as_uuid())
                            .bind(role_id.as_uuid())
                            .bind(at),
                            UserRolesEvent::Revoked { user_id, role_id } => sqlx::query(sqlx::AssertSqlSafe(format!(
                                "DELETE FROM {grants} WHERE user_id = $1 AND role_id = $2"
                            )))
                            .bind(user_id.as_uuid())
                            .bind(role_id.as_uuid()),
                        };
                        query.execute(&mut *connection).await.context("failed to apply a grant")?;
                    }
                }
                other => anyhow::bail!("the authz projection does not read {other}"),
            }
        }
        Ok(())
    }
}

// --- Queries -------------------------------------------------------------------------------------

/// A role as the read model shows it.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct Role {
    pub id: Uuid,
    pub name: String,
    pub permissions: Vec<String>,
    pub version: i64,
}

/// Every role, by name.
pub async fn roles(pool: &PgPool) -> Result<Vec<Role>, sqlx::Error> {
    sqlx::query_as("SELECT id, name, permissions, version FROM authz_roles ORDER BY name").fetch_all(pool).await
}

/// The roles granted to `user`, by name.
pub async fn roles_of(pool: &PgPool, user: Uuid) -> Result<Vec<Role>, sqlx::Error> {
    sqlx::query_as(
        "SELECT r.id, r.name, r.permissions, r.version FROM authz_user_roles g
         JOIN authz_roles r ON r.id = g.role_id WHERE g.user_id = $1 ORDER BY r.name",
    )
    .bind(user)
    .fetch_all(pool)
    .await
}

/// The permissions `user` holds through roles, as stored (one list per role).
pub async fn permissions_of(pool: &PgPool, user: Uuid) -> Result<Vec<Vec<String>>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT r.permissions FROM authz_user_roles g JOIN authz_roles r ON r.id = g.role_id WHERE g.user_id = $1",
    )
    .bind(user)
    .fetch_all(pool)
    .await
}
