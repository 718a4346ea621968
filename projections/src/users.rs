//! The `users` read model.

use std::collections::HashMap;

use anyhow::Context;
use chrono::{DateTime, Utc};
use keel_domain::identity::UserEvent;
use keel_topics::{Topic, identity};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{Commit, Projection, TableSpec, Tables};

pub struct UsersProjection;

const TABLES: &[TableSpec] = &[TableSpec {
    name: "users",
    ddl: "CREATE TABLE {table} (
              id            uuid        PRIMARY KEY,
              email         text        NOT NULL,
              display_name  text        NOT NULL,
              version       bigint      NOT NULL,
              registered_at timestamptz NOT NULL,
              updated_at    timestamptz NOT NULL
          );
          -- Not unique: uniqueness is decided by the identity service; the read model mirrors the log.
          CREATE INDEX {table}_email ON {table} (email);",
    view: true,
}];

/// A user row as a batch leaves it.
struct Row {
    email: String,
    display_name: String,
    version: i64,
    registered_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

#[async_trait::async_trait]
impl Projection for UsersProjection {
    fn name(&self) -> &'static str {
        "users"
    }

    fn code_version(&self) -> i32 {
        1
    }

    fn topics(&self) -> &'static [Topic] {
        &[Topic::IdentityUsers]
    }

    fn tables(&self) -> &'static [TableSpec] {
        TABLES
    }

    async fn apply(&self, connection: &mut PgConnection, tables: Tables, commits: &[Commit]) -> anyhow::Result<()> {
        // Fold the batch per user first: one upsert per user, however many of its commits the
        // batch holds.
        let mut rows: HashMap<Uuid, Row> = HashMap::new();
        for commit in commits {
            let events = identity::decode(&commit.decoded).context("a valid users commit decodes")?;
            let at = commit.header.occurred_at;
            let version = commit.header.version_after() as i64;
            for event in events {
                match event {
                    UserEvent::Registered(registered) => {
                        rows.insert(
                            registered.id.as_uuid(),
                            Row {
                                email: registered.email.as_str().to_owned(),
                                display_name: registered.display_name.as_str().to_owned(),
                                version,
                                registered_at: at,
                                updated_at: at,
                            },
                        );
                    }
                }
            }
        }
        if rows.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = rows.keys().copied().collect();
        let column = |f: fn(&Row) -> String| ids.iter().map(|id| f(&rows[id])).collect::<Vec<_>>();
        let emails = column(|row| row.email.clone());
        let names = column(|row| row.display_name.clone());
        let versions: Vec<i64> = ids.iter().map(|id| rows[id].version).collect();
        let registered: Vec<DateTime<Utc>> = ids.iter().map(|id| rows[id].registered_at).collect();
        let updated: Vec<DateTime<Utc>> = ids.iter().map(|id| rows[id].updated_at).collect();
        let statement = format!(
            "INSERT INTO {table} AS existing (id, email, display_name, version, registered_at, updated_at)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::bigint[], $5::timestamptz[], $6::timestamptz[])
             ON CONFLICT (id) DO UPDATE SET
                 email = excluded.email,
                 display_name = excluded.display_name,
                 version = excluded.version,
                 updated_at = excluded.updated_at
             WHERE existing.version < excluded.version",
            table = tables.name("users"),
        );
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .bind(&ids)
            .bind(&emails)
            .bind(&names)
            .bind(&versions)
            .bind(&registered)
            .bind(&updated)
            .execute(&mut *connection)
            .await
            .context("failed to upsert users")?;
        Ok(())
    }
}
