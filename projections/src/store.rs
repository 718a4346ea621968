//! The projection catalogue in PostgreSQL: versions, checkpoints, validation state.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, bail};
use keel_topics::{StreamState, reader::PartitionKey};
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::projection::{Projection, Tables};

/// A version's row of `projection_versions`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VersionRow {
    pub version: i32,
    pub code_version: i32,
    pub state: String,
    pub stopped: bool,
    pub last_error: Option<String>,
    pub last_error_at: Option<chrono::DateTime<chrono::Utc>>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub live_at: Option<chrono::DateTime<chrono::Utc>>,
    pub drop_after: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(skip)]
    pub apply_from: BTreeMap<PartitionKey, i64>,
}

/// Makes sure a projection has a live version, creating version 1 (tables and views) for a
/// projection the database has never seen.
pub async fn ensure_registered(pool: &PgPool, projection: &dyn Projection) -> anyhow::Result<i32> {
    let mut transaction = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('keel-projection-catalogue'), hashtext($1))")
        .bind(projection.name())
        .execute(&mut *transaction)
        .await?;
    let live: Option<i32> = sqlx::query_scalar("SELECT live_version FROM projections WHERE name = $1")
        .bind(projection.name())
        .fetch_optional(&mut *transaction)
        .await?;
    if let Some(live) = live {
        transaction.commit().await?;
        return Ok(live);
    }
    create_tables(&mut transaction, projection, Tables::new(1)).await?;
    sqlx::query(
        "INSERT INTO projection_versions (name, version, code_version, state, live_at) VALUES ($1, 1, $2, 'live', now())",
    )
    .bind(projection.name())
    .bind(projection.code_version())
    .execute(&mut *transaction)
    .await?;
    sqlx::query("INSERT INTO projections (name, live_version) VALUES ($1, 1)")
        .bind(projection.name())
        .execute(&mut *transaction)
        .await?;
    point_views(&mut transaction, projection, Tables::new(1)).await?;
    transaction.commit().await?;
    Ok(1)
}

pub async fn create_tables(
    connection: &mut PgConnection,
    projection: &dyn Projection,
    tables: Tables,
) -> anyhow::Result<()> {
    for table in projection.tables() {
        let ddl = table.ddl.replace("{table}", &tables.name(table.name));
        sqlx::raw_sql(AssertSqlSafe(ddl))
            .execute(&mut *connection)
            .await
            .with_context(|| format!("failed to create {}", tables.name(table.name)))?;
    }
    Ok(())
}

/// Points every view of the projection at the tables of `tables`' version.
pub async fn point_views(
    connection: &mut PgConnection,
    projection: &dyn Projection,
    tables: Tables,
) -> anyhow::Result<()> {
    for table in projection.tables().iter().filter(|table| table.view) {
        let statement = format!(
            "DROP VIEW IF EXISTS {view}; CREATE VIEW {view} AS SELECT * FROM {physical}",
            view = table.name,
            physical = tables.name(table.name)
        );
        sqlx::raw_sql(AssertSqlSafe(statement))
            .execute(&mut *connection)
            .await
            .with_context(|| format!("failed to point view {}", table.name))?;
    }
    Ok(())
}

pub async fn live_version(connection: &mut PgConnection, name: &str, lock: bool) -> anyhow::Result<Option<i32>> {
    let statement = if lock {
        "SELECT live_version FROM projections WHERE name = $1 FOR SHARE"
    } else {
        "SELECT live_version FROM projections WHERE name = $1"
    };
    Ok(sqlx::query_scalar(statement).bind(name).fetch_optional(&mut *connection).await?)
}

pub async fn versions(pool: &PgPool, name: &str) -> anyhow::Result<Vec<VersionRow>> {
    let rows = sqlx::query(
        "SELECT version, code_version, state, stopped, last_error, last_error_at, created_at, live_at, drop_after, apply_from
         FROM projection_versions WHERE name = $1 ORDER BY version",
    )
    .bind(name)
    .fetch_all(pool)
    .await
    .context("failed to read projection versions")?;
    rows.iter()
        .map(|row| {
            let apply_from: serde_json::Value = row.get("apply_from");
            Ok(VersionRow {
                version: row.get("version"),
                code_version: row.get("code_version"),
                state: row.get("state"),
                stopped: row.get("stopped"),
                last_error: row.get("last_error"),
                last_error_at: row.get("last_error_at"),
                created_at: row.get("created_at"),
                live_at: row.get("live_at"),
                drop_after: row.get("drop_after"),
                apply_from: parse_positions(&apply_from)?,
            })
        })
        .collect()
}

/// `{"topic/partition": offset}` ↔ positions.
pub fn positions_json(positions: &BTreeMap<PartitionKey, i64>) -> serde_json::Value {
    serde_json::Value::Object(
        positions
            .iter()
            .map(|((topic, partition), offset)| (format!("{topic}/{partition}"), (*offset).into()))
            .collect(),
    )
}

fn parse_positions(value: &serde_json::Value) -> anyhow::Result<BTreeMap<PartitionKey, i64>> {
    let Some(object) = value.as_object() else { bail!("positions are an object") };
    object
        .iter()
        .map(|(key, offset)| {
            let (topic, partition) = key.rsplit_once('/').context("position key is topic/partition")?;
            let offset = offset.as_i64().context("position offset is an integer")?;
            Ok(((topic.to_owned(), partition.parse()?), offset))
        })
        .collect()
}

pub async fn checkpoints(
    connection: &mut PgConnection,
    name: &str,
    version: i32,
) -> anyhow::Result<BTreeMap<PartitionKey, i64>> {
    let rows = sqlx::query(
        "SELECT topic, partition, next_offset FROM projection_checkpoints WHERE projection = $1 AND projection_version = $2",
    )
    .bind(name)
    .bind(version)
    .fetch_all(&mut *connection)
    .await
    .context("failed to load checkpoints")?;
    Ok(rows.iter().map(|row| ((row.get(0), row.get(1)), row.get(2))).collect())
}

/// Moves the checkpoints of a version forward, in one statement. Fails if another worker moved
/// any of them since `expected` was read: two workers never both apply the same records.
pub async fn advance_checkpoints(
    connection: &mut PgConnection,
    name: &str,
    version: i32,
    expected: &BTreeMap<PartitionKey, i64>,
    next: &BTreeMap<PartitionKey, i64>,
) -> anyhow::Result<()> {
    if next.is_empty() {
        return Ok(());
    }
    let topics: Vec<&str> = next.keys().map(|(topic, _)| topic.as_str()).collect();
    let partitions: Vec<i32> = next.keys().map(|(_, partition)| *partition).collect();
    let offsets: Vec<i64> = next.values().copied().collect();
    // -1: no checkpoint yet (the row is made).
    let previous: Vec<i64> = next.keys().map(|key| expected.get(key).copied().unwrap_or(-1)).collect();
    let moved: i64 = sqlx::query_scalar(
        "WITH wanted AS (
             SELECT * FROM UNNEST($3::text[], $4::integer[], $5::bigint[], $6::bigint[])
                 AS wanted(topic, partition, next_offset, previous)
         ),
         updated AS (
             UPDATE projection_checkpoints checkpoint
             SET next_offset = wanted.next_offset, updated_at = now()
             FROM wanted
             WHERE checkpoint.projection = $1 AND checkpoint.projection_version = $2
               AND checkpoint.topic = wanted.topic AND checkpoint.partition = wanted.partition
               AND wanted.previous >= 0 AND checkpoint.next_offset = wanted.previous
             RETURNING 1
         ),
         inserted AS (
             INSERT INTO projection_checkpoints (projection, projection_version, topic, partition, next_offset)
             SELECT $1, $2, topic, partition, next_offset FROM wanted WHERE previous < 0
             ON CONFLICT DO NOTHING
             RETURNING 1
         )
         SELECT (SELECT count(*) FROM updated) + (SELECT count(*) FROM inserted)",
    )
    .bind(name)
    .bind(version)
    .bind(&topics)
    .bind(&partitions)
    .bind(&offsets)
    .bind(&previous)
    .fetch_one(&mut *connection)
    .await?;
    if moved != next.len() as i64 {
        bail!(CheckpointMoved { moved: next.len() - moved as usize, partitions: next.len() });
    }
    Ok(())
}

/// Another worker applied these records first.
#[derive(Debug, thiserror::Error)]
#[error("{moved} of {partitions} checkpoints moved under this worker")]
pub struct CheckpointMoved {
    pub moved: usize,
    pub partitions: usize,
}

pub async fn load_streams(
    connection: &mut PgConnection,
    name: &str,
    version: i32,
    keys: &[(String, Uuid)],
) -> anyhow::Result<HashMap<(String, Uuid), StreamState>> {
    // One primary-key lookup per topic (a batch usually holds one topic).
    let mut by_topic: BTreeMap<&str, Vec<Uuid>> = BTreeMap::new();
    for (topic, id) in keys {
        by_topic.entry(topic.as_str()).or_default().push(*id);
    }
    let mut streams = HashMap::with_capacity(keys.len());
    for (topic, ids) in by_topic {
        // The primary key leads with `aggregate_id`, so this is an index scan whatever the
        // statistics say (see migration 20261125000004).
        let rows = sqlx::query(
            "SELECT aggregate_id, version, recent_commands FROM projection_streams
             WHERE aggregate_id = ANY($4) AND topic = $3 AND projection = $1 AND projection_version = $2",
        )
        .bind(name)
        .bind(version)
        .bind(topic)
        .bind(&ids)
        .fetch_all(&mut *connection)
        .await
        .context("failed to load stream states")?;
        for row in rows {
            let aggregate_version: i64 = row.get(1);
            let commands: Vec<Uuid> = row.get(2);
            streams.insert((topic.to_owned(), row.get(0)), StreamState::from_parts(aggregate_version as u64, commands));
        }
    }
    Ok(streams)
}

pub async fn save_streams(
    connection: &mut PgConnection,
    name: &str,
    version: i32,
    streams: &HashMap<(String, Uuid), StreamState>,
) -> anyhow::Result<()> {
    if streams.is_empty() {
        return Ok(());
    }
    let keys: Vec<&(String, Uuid)> = streams.keys().collect();
    let topics: Vec<&str> = keys.iter().map(|(topic, _)| topic.as_str()).collect();
    let ids: Vec<Uuid> = keys.iter().map(|(_, id)| *id).collect();
    let versions: Vec<i64> = keys.iter().map(|key| streams[*key].version() as i64).collect();
    // PostgreSQL has no arrays of arrays of varying length: each window travels as text.
    let commands: Vec<String> = keys
        .iter()
        .map(|key| {
            let list: Vec<String> = streams[*key].recent_commands().map(Uuid::to_string).collect();
            format!("{{{}}}", list.join(","))
        })
        .collect();
    sqlx::query(
        "INSERT INTO projection_streams (projection, projection_version, topic, aggregate_id, version, recent_commands)
         SELECT $1, $2, topic, id, version, commands::uuid[]
         FROM UNNEST($3::text[], $4::uuid[], $5::bigint[], $6::text[]) AS input(topic, id, version, commands)
         ON CONFLICT (projection, projection_version, topic, aggregate_id)
         DO UPDATE SET version = excluded.version, recent_commands = excluded.recent_commands",
    )
    .bind(name)
    .bind(version)
    .bind(&topics)
    .bind(&ids)
    .bind(&versions)
    .bind(&commands)
    .execute(&mut *connection)
    .await
    .context("failed to save stream states")?;
    Ok(())
}

pub async fn record_error(pool: &PgPool, name: &str, version: i32, error: &str, stop: bool) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE projection_versions SET last_error = $3, last_error_at = now(), stopped = stopped OR $4
         WHERE name = $1 AND version = $2",
    )
    .bind(name)
    .bind(version)
    .bind(error)
    .bind(stop)
    .execute(pool)
    .await?;
    Ok(())
}

/// Whether `version` of `name` is still being built, holding it so (`FOR SHARE`) until the
/// transaction ends: a swap waits for the batch.
/// The physical tables named `table` of `name`'s retired versions that are still kept (for
/// `projector.retired_grace_secs`): what erases personal data must reach them as well.
pub async fn retired_tables(connection: &mut PgConnection, name: &str, table: &str) -> anyhow::Result<Vec<String>> {
    let versions: Vec<i32> =
        sqlx::query_scalar("SELECT version FROM projection_versions WHERE name = $1 AND state = 'retired'")
            .bind(name)
            .fetch_all(&mut *connection)
            .await
            .context("failed to read retired projection versions")?;
    let mut kept = Vec::new();
    for version in versions {
        let physical = crate::Tables::new(version).name(table);
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(&physical)
            .fetch_one(&mut *connection)
            .await
            .context("failed to look up a retired table")?;
        if exists {
            kept.push(physical);
        }
    }
    Ok(kept)
}

pub async fn is_building(connection: &mut PgConnection, name: &str, version: i32) -> anyhow::Result<bool> {
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM projection_versions WHERE name = $1 AND version = $2 FOR SHARE")
            .bind(name)
            .bind(version)
            .fetch_optional(&mut *connection)
            .await?;
    Ok(state.as_deref() == Some("building"))
}

/// Whether the live version of any of `names` is no longer stopped.
pub async fn any_resumed(pool: &PgPool, names: &[&str]) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM projections live JOIN projection_versions version
             ON version.name = live.name AND version.version = live.live_version
         WHERE live.name = ANY($1) AND NOT version.stopped)",
    )
    .bind(names)
    .fetch_one(pool)
    .await
}

/// Clears the stopped flag of a projection's live version; whether it was stopped.
pub async fn resume(pool: &PgPool, name: &str) -> Result<bool, sqlx::Error> {
    let updated = sqlx::query(
        "UPDATE projection_versions SET stopped = false
         WHERE name = $1 AND version = (SELECT live_version FROM projections WHERE name = $1) AND stopped",
    )
    .bind(name)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(updated > 0)
}

/// Where the live version of `projection` is in `topic` (the next offset of each of its
/// `partitions`: 0 where it has none) and the validation state it keeps there, read in one
/// snapshot; the start of the topic and no state when `projection` has no live version.
pub async fn live_position(
    pool: &PgPool,
    projection: &str,
    topic: &str,
    partitions: i32,
) -> Result<(Vec<i64>, HashMap<Uuid, StreamState>), sqlx::Error> {
    let mut transaction = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *transaction).await?;
    let live: Option<i32> = sqlx::query_scalar("SELECT live_version FROM projections WHERE name = $1")
        .bind(projection)
        .fetch_optional(&mut *transaction)
        .await?;
    let mut head = vec![0; partitions.max(0) as usize];
    let mut streams = HashMap::new();
    if let Some(live) = live {
        let checkpoints: Vec<(i32, i64)> = sqlx::query_as(
            "SELECT partition, next_offset FROM projection_checkpoints
             WHERE projection = $1 AND projection_version = $2 AND topic = $3",
        )
        .bind(projection)
        .bind(live)
        .bind(topic)
        .fetch_all(&mut *transaction)
        .await?;
        for (partition, next_offset) in checkpoints {
            if let Some(slot) = head.get_mut(partition as usize) {
                *slot = next_offset;
            }
        }
        let rows: Vec<(Uuid, i64, Vec<Uuid>)> = sqlx::query_as(
            "SELECT aggregate_id, version, recent_commands FROM projection_streams
             WHERE projection = $1 AND projection_version = $2 AND topic = $3",
        )
        .bind(projection)
        .bind(live)
        .bind(topic)
        .fetch_all(&mut *transaction)
        .await?;
        streams = rows
            .into_iter()
            .map(|(id, version, commands)| (id, StreamState::from_parts(version as u64, commands)))
            .collect();
    }
    transaction.commit().await?;
    Ok((head, streams))
}

pub async fn is_stopped(pool: &PgPool, name: &str, version: i32) -> anyhow::Result<bool> {
    Ok(sqlx::query_scalar("SELECT stopped FROM projection_versions WHERE name = $1 AND version = $2")
        .bind(name)
        .bind(version)
        .fetch_optional(pool)
        .await?
        .unwrap_or(false))
}
