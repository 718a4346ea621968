//! Zero-downtime rebuilds: a new version fills shadow tables from the start of its topics while
//! the live version keeps serving, catches up with the head, then takes over in one transaction.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::Context;
use chrono::{DateTime, Utc};
use keel_runtime::KafkaConfig;
use keel_topics::{TopicNames, kafka, reader::PartitionKey};
use rdkafka::{Offset, TopicPartitionList, consumer::Consumer};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{
    projection::{Projection, Tables},
    runner::{Batch, Guard, Runner},
    store,
};

/// Where a rebuild starts applying. Records before it still feed the validation state, so the
/// new version skips exactly the commits every other reader skips.
#[derive(Debug, Clone, Copy)]
pub enum StartFrom {
    Beginning,
    Offset(i64),
    Time(DateTime<Utc>),
}

/// How far a rebuild is.
#[derive(Debug, Clone)]
pub struct Progress {
    pub version: i32,
    /// Records read so far and the records there were to read when the rebuild started.
    pub read: u64,
    pub total: u64,
    pub events_applied: u64,
    pub elapsed: Duration,
}

impl Progress {
    pub fn lag(&self) -> u64 {
        self.total.saturating_sub(self.read)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Swapped {
        version: i32,
        replaced: i32,
    },
    Shutdown,
    /// Stopped by the poison policy, or the version is no longer building.
    Abandoned,
}

/// Creates the next version of `projection` in state `building` (tables included), or returns
/// the version already building so that an interrupted rebuild resumes. `(version, resumed)`.
pub async fn prepare(
    pool: &PgPool,
    kafka_config: &KafkaConfig,
    names: &TopicNames,
    projection: &dyn Projection,
    start: StartFrom,
) -> anyhow::Result<(i32, bool)> {
    store::ensure_registered(pool, projection).await?;
    let name = projection.name();
    let building = store::versions(pool, name).await?.into_iter().find(|row| row.state == "building");
    if let Some(row) = building {
        return Ok((row.version, true));
    }
    let apply_from = apply_from(kafka_config, names, projection, start).await?;
    let mut transaction = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('keel-projection-catalogue'), hashtext($1))")
        .bind(name)
        .execute(&mut *transaction)
        .await?;
    let version: i32 =
        sqlx::query_scalar("SELECT COALESCE(max(version), 0) + 1 FROM projection_versions WHERE name = $1")
            .bind(name)
            .fetch_one(&mut *transaction)
            .await?;
    store::create_tables(&mut transaction, projection, Tables::new(version)).await?;
    sqlx::query(
        "INSERT INTO projection_versions (name, version, code_version, state, apply_from) VALUES ($1, $2, $3, 'building', $4)",
    )
    .bind(name)
    .bind(version)
    .bind(projection.code_version())
    .bind(store::positions_json(&apply_from))
    .execute(&mut *transaction)
    .await?;
    transaction.commit().await?;
    Ok((version, false))
}

/// Per partition, the first offset to apply.
async fn apply_from(
    kafka_config: &KafkaConfig,
    names: &TopicNames,
    projection: &dyn Projection,
    start: StartFrom,
) -> anyhow::Result<BTreeMap<PartitionKey, i64>> {
    if matches!(start, StartFrom::Beginning) {
        return Ok(BTreeMap::new());
    }
    let consumer = kafka::consumer(kafka_config, "keel-rebuild-metadata")?;
    let mut positions = BTreeMap::new();
    for topic in projection.topics() {
        let topic_name = names.name(*topic);
        let partitions = kafka::partition_count(&consumer, &topic_name, Duration::from_secs(10)).await?;
        match start {
            StartFrom::Beginning => {}
            StartFrom::Offset(offset) => {
                positions.extend((0..partitions as i32).map(|partition| ((topic_name.clone(), partition), offset)));
            }
            StartFrom::Time(time) => {
                let mut query = TopicPartitionList::new();
                for partition in 0..partitions as i32 {
                    query.add_partition_offset(&topic_name, partition, Offset::Offset(time.timestamp_millis()))?;
                }
                let found = tokio::task::block_in_place(|| consumer.offsets_for_times(query, Duration::from_secs(10)))
                    .context("failed to look up offsets for the start time")?;
                for element in found.elements() {
                    let offset = match element.offset() {
                        Offset::Offset(offset) => offset,
                        // No record at or after the time: nothing of this partition is applied.
                        _ => {
                            tokio::task::block_in_place(|| {
                                consumer.fetch_watermarks(&topic_name, element.partition(), Duration::from_secs(10))
                            })?
                            .1
                        }
                    };
                    positions.insert((topic_name.clone(), element.partition()), offset);
                }
            }
        }
    }
    Ok(positions)
}

/// Builds `runner.version` until it has caught up with the head, then makes it live.
pub async fn build(
    runner: &std::sync::Arc<Runner>,
    shutdown: &CancellationToken,
    grace: Duration,
    mut on_progress: impl FnMut(&Progress),
) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let mut worker = runner.open().await?;
    let total: u64 = worker
        .reader
        .remaining(&worker.lane.checkpoints)
        .await?
        .iter()
        .map(|(key, high)| (high - worker.lane.checkpoints.get(key).copied().unwrap_or(0)).max(0) as u64)
        .sum();
    let mut progress = Progress { version: runner.version, read: 0, total, events_applied: 0, elapsed: Duration::ZERO };
    on_progress(&progress);
    let batch_size = runner.settings.batch_size as i64;
    let mut last_check = Instant::now();
    loop {
        let Some(batch) = worker.next_batch(Some(Duration::from_millis(500)), shutdown).await? else {
            return Ok(Outcome::Shutdown);
        };
        if !batch.is_empty() {
            match worker.lane.apply_with_retry(&batch, Guard::Building, shutdown).await? {
                Some(Batch::Applied { events }) => {
                    progress.read += batch.len() as u64;
                    progress.total = progress.total.max(progress.read);
                    progress.events_applied += events;
                    progress.elapsed = started.elapsed();
                    on_progress(&progress);
                }
                Some(Batch::Superseded | Batch::Stopped) => return Ok(Outcome::Abandoned),
                None => return Ok(Outcome::Shutdown),
            }
            // Under a steady stream of new records the reader is never idle: check how far behind
            // the head it is, at most once a second.
            if last_check.elapsed() < Duration::from_secs(1) {
                continue;
            }
        }
        last_check = Instant::now();
        let remaining = worker.reader.remaining(&worker.lane.checkpoints).await?;
        let behind: i64 =
            remaining.iter().map(|(key, high)| high - worker.lane.checkpoints.get(key).copied().unwrap_or(0)).sum();
        if behind > batch_size {
            continue;
        }
        match try_swap(&mut worker, shutdown, grace).await? {
            Some(replaced) => {
                progress.elapsed = started.elapsed();
                on_progress(&progress);
                return Ok(Outcome::Swapped { version: runner.version, replaced });
            }
            // Records read inside the abandoned swap were rolled back: read them again.
            None => worker = runner.open().await?,
        }
    }
}

/// Within one transaction holding the catalogue row: applies whatever the live version is still
/// ahead by, retires it, makes this version live and repoints the views. `Some(old version)` on
/// success; `None` if it could not catch up in time (the caller keeps building and tries again).
async fn try_swap(
    worker: &mut crate::runner::Worker,
    shutdown: &CancellationToken,
    grace: Duration,
) -> anyhow::Result<Option<i32>> {
    let runner = worker.lane.runner.clone();
    let name = runner.projection.name();
    let mut transaction = runner.pool.begin().await?;
    let live: i32 = sqlx::query_scalar("SELECT live_version FROM projections WHERE name = $1 FOR UPDATE")
        .bind(name)
        .fetch_one(&mut *transaction)
        .await
        .context("the projection has no live version")?;
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM projection_versions WHERE name = $1 AND version = $2 FOR UPDATE")
            .bind(name)
            .bind(runner.version)
            .fetch_optional(&mut *transaction)
            .await?;
    if state.as_deref() != Some("building") {
        tracing::warn!(projection = name, version = runner.version, "the version is no longer building");
        return Ok(None);
    }
    let live_checkpoints = store::checkpoints(&mut transaction, name, live).await?;
    let mut next = worker.lane.checkpoints.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let behind = live_checkpoints.iter().any(|(key, offset)| next.get(key).copied().unwrap_or(0) < *offset);
        if !behind {
            break;
        }
        if Instant::now() > deadline {
            tracing::warn!(projection = name, "could not catch up with the live version in time; retrying");
            return Ok(None);
        }
        let Some(batch) = worker.next_batch(Some(Duration::from_secs(1)), shutdown).await? else { return Ok(None) };
        if let crate::runner::Applied::Stop(_) = worker.apply_in(&mut transaction, &batch, &mut next).await? {
            return Ok(None);
        }
    }
    sqlx::query(
        "UPDATE projection_versions SET state = 'retired', retired_at = now(), drop_after = now() + make_interval(secs => $3)
         WHERE name = $1 AND version = $2",
    )
    .bind(name)
    .bind(live)
    .bind(grace.as_secs_f64())
    .execute(&mut *transaction)
    .await?;
    sqlx::query("UPDATE projection_versions SET state = 'live', live_at = now() WHERE name = $1 AND version = $2")
        .bind(name)
        .bind(runner.version)
        .execute(&mut *transaction)
        .await?;
    sqlx::query("UPDATE projections SET live_version = $2, updated_at = now() WHERE name = $1")
        .bind(name)
        .bind(runner.version)
        .execute(&mut *transaction)
        .await?;
    // Repointing a view waits for the queries reading it; rather than stall every new reader
    // behind a long one, give up after a while and swap later.
    sqlx::query("SET LOCAL lock_timeout = '5s'").execute(&mut *transaction).await?;
    if let Err(error) = store::point_views(&mut transaction, runner.projection.as_ref(), runner.tables()).await {
        tracing::warn!(projection = name, error = %format!("{error:#}"), "could not repoint the views yet; retrying");
        return Ok(None);
    }
    transaction.commit().await.context("failed to commit the swap")?;
    worker.lane.checkpoints = next;
    tracing::info!(projection = name, version = runner.version, replaced = live, "projection version is live");
    Ok(Some(live))
}

/// Drops the tables of retired versions whose grace period is over.
pub async fn drop_expired(pool: &PgPool, projections: &[std::sync::Arc<dyn Projection>]) -> anyhow::Result<()> {
    for projection in projections {
        let name = projection.name();
        let expired: Vec<i32> = sqlx::query_scalar(
            "SELECT version FROM projection_versions WHERE name = $1 AND state = 'retired' AND drop_after < now()",
        )
        .bind(name)
        .fetch_all(pool)
        .await?;
        for version in expired {
            let mut transaction = pool.begin().await?;
            for table in projection.tables() {
                let statement = format!("DROP TABLE IF EXISTS {}", Tables::new(version).name(table.name));
                sqlx::raw_sql(sqlx::AssertSqlSafe(statement)).execute(&mut *transaction).await?;
            }
            for statement in [
                "DELETE FROM projection_checkpoints WHERE projection = $1 AND projection_version = $2",
                "DELETE FROM projection_streams WHERE projection = $1 AND projection_version = $2",
                "UPDATE projection_versions SET state = 'dropped' WHERE name = $1 AND version = $2",
            ] {
                sqlx::query(statement).bind(name).bind(version).execute(&mut *transaction).await?;
            }
            transaction.commit().await?;
            tracing::info!(projection = name, version, "dropped a retired projection version");
        }
    }
    Ok(())
}
