//! The `users` read model.

use std::collections::{HashMap, hash_map::Entry};

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
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    email: String,
    display_name: String,
    version: i64,
    registered_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// The latest display name change of a user registered before the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rename {
    display_name: String,
    version: i64,
    updated_at: DateTime<Utc>,
}

/// A batch folded per user: one write per user, however many of its events the batch holds.
#[derive(Debug, Default)]
struct Fold {
    /// Users registered in the batch, as full rows with every later change applied.
    rows: HashMap<Uuid, Row>,
    /// Users registered in an earlier batch: their rows exist, only the changed columns are set.
    renames: HashMap<Uuid, Rename>,
}

impl Fold {
    /// Adds one event at the aggregate version it produced.
    fn add(&mut self, event: UserEvent, version: i64, at: DateTime<Utc>) {
        match event {
            UserEvent::Registered(registered) => {
                let mut row = Row {
                    email: registered.email.as_str().to_owned(),
                    display_name: registered.display_name.as_str().to_owned(),
                    version,
                    registered_at: at,
                    updated_at: at,
                };
                // Cannot happen in log order, but a change folded before its registration must
                // not be lost.
                if let Some(rename) = self.renames.remove(&registered.id.as_uuid()) {
                    rename.apply_to(&mut row);
                }
                self.rows.insert(registered.id.as_uuid(), row);
            }
            UserEvent::DisplayNameChanged(changed) => {
                let rename = Rename { display_name: changed.display_name.as_str().to_owned(), version, updated_at: at };
                if let Some(row) = self.rows.get_mut(&changed.id.as_uuid()) {
                    rename.apply_to(row);
                } else {
                    match self.renames.entry(changed.id.as_uuid()) {
                        Entry::Occupied(mut latest) if latest.get().version < rename.version => {
                            latest.insert(rename);
                        }
                        Entry::Occupied(_) => {}
                        Entry::Vacant(slot) => {
                            slot.insert(rename);
                        }
                    }
                }
            }
        }
    }
}

impl Rename {
    /// Only a newer change counts: a batch may see an event again (a redelivery, a rebuild).
    fn apply_to(self, row: &mut Row) {
        if row.version < self.version {
            row.display_name = self.display_name;
            row.version = self.version;
            row.updated_at = self.updated_at;
        }
    }
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
        let mut fold = Fold::default();
        for commit in commits {
            let events = identity::decode(&commit.decoded).context("a valid users commit decodes")?;
            let at = commit.header.occurred_at;
            for (index, event) in events.into_iter().enumerate() {
                // Each event of a commit is one version past the one before it.
                let version = (commit.header.expected_version + index as u64 + 1) as i64;
                fold.add(event, version, at);
            }
        }
        let table = tables.name("users");
        upsert_registered(connection, &table, &fold.rows).await?;
        update_renamed(connection, &table, &fold.renames).await
    }
}

/// Inserts the users registered in the batch; a row the table already has (a rebuild's rerun,
/// a redelivery) is overwritten only by a newer version.
async fn upsert_registered(
    connection: &mut PgConnection,
    table: &str,
    rows: &HashMap<Uuid, Row>,
) -> anyhow::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(rows.len());
    let mut emails = Vec::with_capacity(rows.len());
    let mut names = Vec::with_capacity(rows.len());
    let mut versions = Vec::with_capacity(rows.len());
    let mut registered = Vec::with_capacity(rows.len());
    let mut updated = Vec::with_capacity(rows.len());
    for (id, row) in rows {
        ids.push(*id);
        emails.push(row.email.as_str());
        names.push(row.display_name.as_str());
        versions.push(row.version);
        registered.push(row.registered_at);
        updated.push(row.updated_at);
    }
    let statement = format!(
        "INSERT INTO {table} AS existing (id, email, display_name, version, registered_at, updated_at)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::bigint[], $5::timestamptz[], $6::timestamptz[])
         ON CONFLICT (id) DO UPDATE SET
             email = excluded.email,
             display_name = excluded.display_name,
             version = excluded.version,
             updated_at = excluded.updated_at
         WHERE existing.version < excluded.version"
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

/// Sets the display name of users registered before the batch. A user without a row (its
/// registration was dead-lettered) stays without one: the change has nothing to apply to.
async fn update_renamed(
    connection: &mut PgConnection,
    table: &str,
    renames: &HashMap<Uuid, Rename>,
) -> anyhow::Result<()> {
    if renames.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(renames.len());
    let mut names = Vec::with_capacity(renames.len());
    let mut versions = Vec::with_capacity(renames.len());
    let mut updated = Vec::with_capacity(renames.len());
    for (id, rename) in renames {
        ids.push(*id);
        names.push(rename.display_name.as_str());
        versions.push(rename.version);
        updated.push(rename.updated_at);
    }
    let statement = format!(
        "UPDATE {table} AS u SET display_name = c.display_name, version = c.version, updated_at = c.updated_at
         FROM UNNEST($1::uuid[], $2::text[], $3::bigint[], $4::timestamptz[]) AS c(id, display_name, version, updated_at)
         WHERE u.id = c.id AND u.version < c.version"
    );
    sqlx::query(sqlx::AssertSqlSafe(statement))
        .bind(&ids)
        .bind(&names)
        .bind(&versions)
        .bind(&updated)
        .execute(&mut *connection)
        .await
        .context("failed to update renamed users")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use keel_domain::identity::{DisplayName, DisplayNameChanged, Email, UserId, UserRegistered};

    use super::*;

    fn registered(id: UserId) -> UserEvent {
        UserEvent::Registered(UserRegistered {
            id,
            email: Email::parse("ada@example.com").unwrap(),
            display_name: DisplayName::parse("Ada").unwrap(),
        })
    }

    fn changed(id: UserId, name: &str) -> UserEvent {
        UserEvent::DisplayNameChanged(DisplayNameChanged { id, display_name: DisplayName::parse(name).unwrap() })
    }

    fn at(second: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_764_000_000 + second, 0).unwrap()
    }

    #[test]
    fn a_change_after_a_registration_in_the_batch_updates_its_row() {
        let id = UserId::new();
        let mut fold = Fold::default();
        fold.add(registered(id), 1, at(0));
        fold.add(changed(id, "Ada L."), 2, at(1));
        let row = &fold.rows[&id.as_uuid()];
        assert_eq!((row.display_name.as_str(), row.version), ("Ada L.", 2));
        assert_eq!((row.registered_at, row.updated_at), (at(0), at(1)));
        assert!(fold.renames.is_empty());
    }

    #[test]
    fn changes_of_users_registered_earlier_keep_the_latest() {
        let id = UserId::new();
        let mut fold = Fold::default();
        fold.add(changed(id, "Ada L."), 2, at(1));
        fold.add(changed(id, "Ada Lovelace"), 3, at(2));
        // Seen again (a redelivery): older than what the batch has.
        fold.add(changed(id, "Ada L."), 2, at(1));
        assert!(fold.rows.is_empty());
        assert_eq!(
            fold.renames[&id.as_uuid()],
            Rename { display_name: "Ada Lovelace".into(), version: 3, updated_at: at(2) }
        );
    }

    #[test]
    fn an_older_change_never_overwrites_a_newer_row() {
        let id = UserId::new();
        let mut fold = Fold::default();
        fold.add(registered(id), 1, at(0));
        fold.add(changed(id, "Ada Lovelace"), 3, at(2));
        fold.add(changed(id, "Ada L."), 2, at(1));
        assert_eq!(fold.rows[&id.as_uuid()].display_name, "Ada Lovelace");
    }
}
