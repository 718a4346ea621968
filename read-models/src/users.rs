//! The `users` read model: every user with their profile and account status. Personal data
//! arrives sealed and is opened with the user's key; an erasure empties the row and shreds the
//! key in the same transaction, so the row and the key go together, exactly once.

use std::collections::HashMap;

use anyhow::Context;
use chrono::{DateTime, Utc};
use keel_domain::identity::UserEvent;
use keel_topics::{Opened, Topic, Vault, identity};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use keel_projections::{Commit, Projection, TableSpec, Tables};

use crate::status_notice::{self, Subject};

pub struct UsersProjection {
    vault: Vault,
}

impl UsersProjection {
    pub fn new(vault: Vault) -> Self {
        Self { vault }
    }
}

/// The columns are those of version 1 (migration 2) and the ones migration 6 added to it, in
/// that order, so that every version has the same shape.
const TABLES: &[TableSpec] = &[TableSpec {
    name: "users",
    ddl: "CREATE TABLE {table} (
              id            uuid        PRIMARY KEY,
              email         text,
              display_name  text,
              version       bigint      NOT NULL,
              registered_at timestamptz NOT NULL,
              updated_at    timestamptz NOT NULL,
              bio           text        NOT NULL DEFAULT '',
              status        text        NOT NULL DEFAULT 'active'
          );
          -- Not unique: uniqueness is decided by the identity service; the read model mirrors the log.
          CREATE INDEX {table}_email ON {table} (email);",
    view: true,
}];

const ERASED: &str = "erased";

/// A user row as a batch leaves it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    email: Option<String>,
    display_name: Option<String>,
    bio: String,
    status: &'static str,
    version: i64,
    registered_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// The changed columns of a user registered before the batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Change {
    email: Option<String>,
    display_name: Option<String>,
    bio: Option<String>,
    status: Option<&'static str>,
    version: i64,
    updated_at: Option<DateTime<Utc>>,
}

/// A batch folded per user: one write per user, however many of its events the batch holds.
#[derive(Debug, Default)]
struct Fold {
    /// Users registered in the batch, as full rows with every later change applied.
    rows: HashMap<Uuid, Row>,
    /// Users registered in an earlier batch: their rows exist, only changed columns are set.
    changes: HashMap<Uuid, Change>,
    /// Users registered earlier and erased in the batch, with the version and time of it.
    erased: HashMap<Uuid, (i64, DateTime<Utc>)>,
}

impl Fold {
    /// Adds one event at the aggregate version it produced. Events come in log order; one seen
    /// again (a redelivery, a rebuild) is older than what the fold has and changes nothing.
    fn add(&mut self, user: Uuid, event: UserEvent, version: i64, at: DateTime<Utc>) {
        if let UserEvent::Registered(registered) = &event {
            self.changes.remove(&user);
            self.erased.remove(&user);
            self.rows.insert(
                user,
                Row {
                    email: Some(registered.email.as_str().to_owned()),
                    display_name: Some(registered.display_name.as_str().to_owned()),
                    bio: String::new(),
                    status: "active",
                    version,
                    registered_at: at,
                    updated_at: at,
                },
            );
            return;
        }
        let erases = matches!(event, UserEvent::PersonalDataErased { .. } | UserEvent::Forgotten { .. });
        if let Some(row) = self.rows.get_mut(&user) {
            if row.version >= version {
                return;
            }
            row.version = version;
            row.updated_at = at;
            match event {
                _ if erases => {
                    (row.email, row.display_name, row.bio, row.status) = (None, None, String::new(), ERASED);
                }
                UserEvent::DisplayNameChanged(changed) => row.display_name = Some(changed.display_name.into()),
                UserEvent::BioChanged(changed) => row.bio = changed.bio.into(),
                UserEvent::EmailChanged(changed) => row.email = Some(changed.email.into()),
                UserEvent::Deactivated { .. } => row.status = "deactivated",
                _ => {}
            }
            return;
        }
        if erases {
            self.changes.remove(&user);
            let latest = self.erased.entry(user).or_insert((version, at));
            *latest = (version.max(latest.0), at);
            return;
        }
        if self.erased.contains_key(&user) {
            return;
        }
        let change = self.changes.entry(user).or_default();
        if change.version >= version {
            return;
        }
        change.version = version;
        change.updated_at = Some(at);
        match event {
            UserEvent::DisplayNameChanged(changed) => change.display_name = Some(changed.display_name.into()),
            UserEvent::BioChanged(changed) => change.bio = Some(changed.bio.into()),
            UserEvent::EmailChanged(changed) => change.email = Some(changed.email.into()),
            UserEvent::Deactivated { .. } => change.status = Some("deactivated"),
            _ => {}
        }
    }

    /// The users whose account status the batch changed (registered, deactivated, erased).
    fn status_changed(&self) -> Vec<Uuid> {
        let registered = self.rows.keys().copied();
        let changed = self.changes.iter().filter(|(_, change)| change.status.is_some()).map(|(id, _)| *id);
        registered.chain(changed).chain(self.erased.keys().copied()).collect()
    }

    /// The users whose keys go with this batch.
    fn shredded(&self) -> Vec<Uuid> {
        let in_batch = self.rows.iter().filter(|(_, row)| row.status == ERASED).map(|(id, _)| *id);
        in_batch.chain(self.erased.keys().copied()).collect()
    }
}

#[async_trait::async_trait]
impl Projection for UsersProjection {
    fn name(&self) -> &'static str {
        "users"
    }

    /// Still 1: the same events make the same rows as before; the events added since only
    /// made new columns, which migration 6 added to every version's table.
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
        let sealed: Vec<Uuid> =
            commits.iter().filter(|commit| commit.header.sealed).map(|commit| commit.header.aggregate_id).collect();
        self.vault.prefetch(&sealed).await.context("failed to load personal data keys")?;
        let mut fold = Fold::default();
        for commit in commits {
            let mut decoded = commit.decoded.clone();
            let events = match self.vault.open(&commit.header, &mut decoded).await? {
                Opened::Clear => identity::decode(&decoded),
                Opened::Forgotten => identity::forgotten(&commit.header),
            }
            .context("a valid users commit decodes")?;
            let at = commit.header.occurred_at;
            for (index, event) in events.into_iter().enumerate() {
                // Each event of a commit is one version past the one before it.
                let version = (commit.header.expected_version + index as u64 + 1) as i64;
                fold.add(commit.header.aggregate_id, event, version, at);
            }
        }
        let table = tables.name("users");
        upsert_registered(connection, &table, &fold.rows).await?;
        update_changed(connection, &table, &fold.changes).await?;
        erase(connection, &table, &fold.erased).await?;
        if !fold.erased.is_empty() {
            // The tables a rebuild replaced are kept for a while; they must forget too.
            for retired in keel_projections::retired_tables(connection, self.name(), "users").await? {
                erase(connection, &retired, &fold.erased).await?;
            }
        }
        for user in fold.shredded() {
            keel_topics::vault::shred_in(connection, user).await.context("failed to shred a key")?;
            self.vault.forget(user);
        }
        status_notice::announce(connection, Subject::User, &fold.status_changed()).await
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
    let ids: Vec<Uuid> = rows.keys().copied().collect();
    let rows: Vec<&Row> = ids.iter().map(|id| &rows[id]).collect();
    let statement = format!(
        "INSERT INTO {table} AS existing (id, email, display_name, bio, status, version, registered_at, updated_at)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[],
                              $7::timestamptz[], $8::timestamptz[])
         ON CONFLICT (id) DO UPDATE SET
             email = excluded.email,
             display_name = excluded.display_name,
             bio = excluded.bio,
             status = excluded.status,
             version = excluded.version,
             updated_at = excluded.updated_at
         WHERE existing.version < excluded.version"
    );
    sqlx::query(sqlx::AssertSqlSafe(statement))
        .bind(&ids)
        .bind(rows.iter().map(|row| row.email.as_deref()).collect::<Vec<_>>())
        .bind(rows.iter().map(|row| row.display_name.as_deref()).collect::<Vec<_>>())
        .bind(rows.iter().map(|row| row.bio.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|row| row.status).collect::<Vec<_>>())
        .bind(rows.iter().map(|row| row.version).collect::<Vec<_>>())
        .bind(rows.iter().map(|row| row.registered_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|row| row.updated_at).collect::<Vec<_>>())
        .execute(&mut *connection)
        .await
        .context("failed to upsert users")?;
    Ok(())
}

/// Sets the changed columns of users registered before the batch. A user without a row (its
/// registration was dead-lettered) stays without one: the change has nothing to apply to.
async fn update_changed(
    connection: &mut PgConnection,
    table: &str,
    changes: &HashMap<Uuid, Change>,
) -> anyhow::Result<()> {
    if changes.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = changes.keys().copied().collect();
    let changes: Vec<&Change> = ids.iter().map(|id| &changes[id]).collect();
    let statement = format!(
        "UPDATE {table} AS u SET
             email = coalesce(c.email, u.email),
             display_name = coalesce(c.display_name, u.display_name),
             bio = coalesce(c.bio, u.bio),
             status = coalesce(c.status, u.status),
             version = c.version,
             updated_at = c.updated_at
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::timestamptz[])
             AS c(id, email, display_name, bio, status, version, updated_at)
         WHERE u.id = c.id AND u.version < c.version AND u.status <> '{ERASED}'"
    );
    sqlx::query(sqlx::AssertSqlSafe(statement))
        .bind(&ids)
        .bind(changes.iter().map(|change| change.email.as_deref()).collect::<Vec<_>>())
        .bind(changes.iter().map(|change| change.display_name.as_deref()).collect::<Vec<_>>())
        .bind(changes.iter().map(|change| change.bio.as_deref()).collect::<Vec<_>>())
        .bind(changes.iter().map(|change| change.status).collect::<Vec<_>>())
        .bind(changes.iter().map(|change| change.version).collect::<Vec<_>>())
        .bind(changes.iter().map(|change| change.updated_at).collect::<Vec<_>>())
        .execute(&mut *connection)
        .await
        .context("failed to update changed users")?;
    Ok(())
}

/// Empties the personal columns of users registered before the batch and erased in it.
async fn erase(
    connection: &mut PgConnection,
    table: &str,
    erased: &HashMap<Uuid, (i64, DateTime<Utc>)>,
) -> anyhow::Result<()> {
    if erased.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = erased.keys().copied().collect();
    let statement = format!(
        "UPDATE {table} AS u SET email = NULL, display_name = NULL, bio = '', status = '{ERASED}',
                                version = c.version, updated_at = c.updated_at
         FROM UNNEST($1::uuid[], $2::bigint[], $3::timestamptz[]) AS c(id, version, updated_at)
         WHERE u.id = c.id AND u.version < c.version"
    );
    sqlx::query(sqlx::AssertSqlSafe(statement))
        .bind(&ids)
        .bind(ids.iter().map(|id| erased[id].0).collect::<Vec<_>>())
        .bind(ids.iter().map(|id| erased[id].1).collect::<Vec<_>>())
        .execute(&mut *connection)
        .await
        .context("failed to erase users")?;
    Ok(())
}

// --- Queries -------------------------------------------------------------------------------------

/// A user as the read model shows them.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct User {
    pub id: Uuid,
    /// `None` once the user's personal data is erased.
    pub email: Option<String>,
    pub display_name: Option<String>,
    pub bio: String,
    /// `active`, `deactivated` or `erased`.
    pub status: String,
    pub version: i64,
}

/// The user `id`.
pub async fn user(pool: &PgPool, id: Uuid) -> Result<Option<User>, sqlx::Error> {
    sqlx::query_as("SELECT id, email, display_name, bio, status, version FROM users WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// The status of the user `id` (`active`, `deactivated`, `erased`), if the read model has them.
pub async fn status(pool: &PgPool, id: Uuid) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT status FROM users WHERE id = $1").bind(id).fetch_optional(pool).await
}

/// The active user holding `email` (normalized: trimmed, lower case), if any; the most recently
/// changed one should the read model briefly show two (it mirrors the log, and uniqueness is the
/// identity service's).
pub async fn active_with_email(pool: &PgPool, email: &str) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM users WHERE email = $1 AND status = 'active' ORDER BY updated_at DESC LIMIT 1")
        .bind(email)
        .fetch_optional(pool)
        .await
}

#[cfg(test)]
mod tests {
    use keel_domain::identity::{Bio, BioChanged, DisplayName, DisplayNameChanged, Email, UserId, UserRegistered};

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
        fold.add(id.as_uuid(), registered(id), 1, at(0));
        fold.add(id.as_uuid(), changed(id, "Ada L."), 2, at(1));
        let row = &fold.rows[&id.as_uuid()];
        assert_eq!((row.display_name.as_deref(), row.version), (Some("Ada L."), 2));
        assert_eq!((row.registered_at, row.updated_at), (at(0), at(1)));
        assert!(fold.changes.is_empty());
    }

    #[test]
    fn changes_of_users_registered_earlier_merge_and_keep_the_latest() {
        let id = UserId::new();
        let mut fold = Fold::default();
        fold.add(id.as_uuid(), changed(id, "Ada L."), 2, at(1));
        fold.add(id.as_uuid(), UserEvent::BioChanged(BioChanged { id, bio: Bio::parse("Poet").unwrap() }), 3, at(2));
        fold.add(id.as_uuid(), changed(id, "Ada Lovelace"), 4, at(3));
        // Seen again (a redelivery): older than what the batch has.
        fold.add(id.as_uuid(), changed(id, "Ada L."), 2, at(1));
        let change = &fold.changes[&id.as_uuid()];
        assert_eq!(change.display_name.as_deref(), Some("Ada Lovelace"));
        assert_eq!((change.bio.as_deref(), change.version), (Some("Poet"), 4));
        assert!(fold.rows.is_empty());
    }

    #[test]
    fn an_erasure_empties_the_row_and_drops_pending_changes() {
        let (early, late) = (UserId::new(), UserId::new());
        let mut fold = Fold::default();
        fold.add(late.as_uuid(), registered(late), 1, at(0));
        fold.add(late.as_uuid(), UserEvent::PersonalDataErased { id: late }, 2, at(1));
        let row = &fold.rows[&late.as_uuid()];
        assert_eq!((row.email.as_deref(), row.display_name.as_deref(), row.status), (None, None, ERASED));
        fold.add(early.as_uuid(), changed(early, "Eve"), 5, at(1));
        fold.add(early.as_uuid(), UserEvent::Forgotten { id: early, event_type: "UserDisplayNameChanged" }, 6, at(2));
        assert!(fold.changes.is_empty());
        assert_eq!(fold.erased[&early.as_uuid()], (6, at(2)));
        let mut shredded = fold.shredded();
        shredded.sort();
        let mut expected = vec![early.as_uuid(), late.as_uuid()];
        expected.sort();
        assert_eq!(shredded, expected);
    }
}
