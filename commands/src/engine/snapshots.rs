//! Partition snapshots in PostgreSQL, so that a new owner replays only the tail of its partition.
//!
//! A snapshot is one row per aggregate (its state, version, recent command results and the
//! offset of its last commit) plus, per partition, the offset the rows are complete up to. Both
//! are written in one transaction, only ever forwards: two writers of a partition derive the same
//! state from the same log, so whichever row is further is right, and a row further than its
//! partition's position is recognised on load by its own offset.

use std::collections::VecDeque;

use anyhow::Context;
use keel_topics::StreamState;
use serde::{Serialize, de::DeserializeOwned};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::partition::{CommandResult, Entries, Entry};

#[derive(Clone)]
pub struct SnapshotStore {
    pool: PgPool,
    topic: String,
}

/// A partition's snapshot: the offset it is complete up to, and its aggregates.
pub struct Snapshot<S> {
    pub next_offset: i64,
    pub entries: Entries<S>,
}

impl SnapshotStore {
    pub fn new(pool: PgPool, topic: String) -> Self {
        Self { pool, topic }
    }

    #[tracing::instrument(skip_all, fields(topic = %self.topic, partition))]
    pub async fn load<S: DeserializeOwned>(&self, partition: i32) -> anyhow::Result<Snapshot<S>> {
        let next_offset: Option<i64> =
            sqlx::query_scalar("SELECT next_offset FROM command_snapshots WHERE topic = $1 AND partition = $2")
                .bind(&self.topic)
                .bind(partition)
                .fetch_optional(&self.pool)
                .await
                .context("failed to read the snapshot position")?;
        let rows = sqlx::query(
            "SELECT aggregate_id, version, last_offset, results, state FROM command_snapshot_aggregates
             WHERE topic = $1 AND partition = $2",
        )
        .bind(&self.topic)
        .bind(partition)
        .fetch_all(&self.pool)
        .await
        .context("failed to read snapshot rows")?;
        let mut entries = Vec::with_capacity(rows.len());
        for row in rows {
            let id: Uuid = row.get("aggregate_id");
            let results: VecDeque<CommandResult> = serde_json::from_value(row.get("results"))
                .with_context(|| format!("the snapshot of {id} has unreadable results"))?;
            let state: S = serde_json::from_value(row.get("state"))
                .with_context(|| format!("the snapshot of {id} has an unreadable state"))?;
            let version = row.get::<i64, _>("version") as u64;
            let stream = StreamState::from_parts(version, results.iter().map(|result| result.command_id));
            entries.push((id, Entry { stream, state, results, last_offset: row.get("last_offset") }));
        }
        Ok(Snapshot { next_offset: next_offset.unwrap_or(0), entries })
    }

    /// Writes the aggregates changed up to `next_offset` and moves the partition's position there.
    #[tracing::instrument(skip_all, fields(topic = %self.topic, partition, next_offset, aggregates = entries.len()))]
    pub async fn save<S: Serialize>(
        &self,
        partition: i32,
        next_offset: i64,
        entries: &Entries<S>,
    ) -> anyhow::Result<()> {
        let mut ids = Vec::with_capacity(entries.len());
        let mut versions = Vec::with_capacity(entries.len());
        let mut offsets = Vec::with_capacity(entries.len());
        let mut results = Vec::with_capacity(entries.len());
        let mut states = Vec::with_capacity(entries.len());
        for (id, entry) in entries {
            ids.push(*id);
            versions.push(entry.version() as i64);
            offsets.push(entry.last_offset);
            results.push(serde_json::to_value(&entry.results).context("failed to serialize command results")?);
            states.push(serde_json::to_value(&entry.state).context("failed to serialize an aggregate")?);
        }
        let mut transaction = self.pool.begin().await.context("failed to begin a snapshot")?;
        sqlx::query(
            "INSERT INTO command_snapshot_aggregates AS existing
                 (topic, partition, aggregate_id, version, last_offset, results, state)
             SELECT $1, $2, * FROM UNNEST($3::uuid[], $4::bigint[], $5::bigint[], $6::jsonb[], $7::jsonb[])
             ON CONFLICT (topic, partition, aggregate_id) DO UPDATE SET
                 version = excluded.version, last_offset = excluded.last_offset,
                 results = excluded.results, state = excluded.state
             WHERE existing.last_offset < excluded.last_offset",
        )
        .bind(&self.topic)
        .bind(partition)
        .bind(&ids)
        .bind(&versions)
        .bind(&offsets)
        .bind(&results)
        .bind(&states)
        .execute(&mut *transaction)
        .await
        .context("failed to write snapshot rows")?;
        sqlx::query(
            "INSERT INTO command_snapshots AS existing (topic, partition, next_offset, taken_at)
             VALUES ($1, $2, $3, now())
             ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset, taken_at = now()
             WHERE existing.next_offset < excluded.next_offset",
        )
        .bind(&self.topic)
        .bind(partition)
        .bind(next_offset)
        .execute(&mut *transaction)
        .await
        .context("failed to move the snapshot position")?;
        transaction.commit().await.context("failed to commit a snapshot")?;
        Ok(())
    }
}
