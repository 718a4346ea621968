//! The projection runner: read, validate, apply a batch with its checkpoints, repeat.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow};
use keel_runtime::KafkaConfig;
use keel_topics::{
    SchemaRegistryCodec, StreamState, Topic, TopicNames, Verdict, kafka,
    reader::{PartitionKey, PartitionReader},
    record::{self, Record},
};
use rdkafka::message::{Message, OwnedMessage};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    dead_letters::DeadLetters,
    projection::{Commit, Projection, Tables},
    store,
};

/// What a projection does with a commit its handler cannot apply (or a record it cannot read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoisonPolicy {
    /// Dead-letter it and go on with the others.
    Skip,
    /// Dead-letter it and stop the projection until `keel projections resume`.
    Stop,
}

#[derive(Debug, Clone)]
pub struct RunnerSettings {
    pub batch_size: usize,
    pub batch_timeout: Duration,
    pub poison: PoisonPolicy,
}

/// One version of one projection, reading every partition of its topics.
pub struct Runner {
    pub projection: Arc<dyn Projection>,
    pub version: i32,
    pub names: TopicNames,
    pub pool: PgPool,
    pub codec: SchemaRegistryCodec,
    pub kafka: KafkaConfig,
    pub settings: RunnerSettings,
    pub dead_letters: DeadLetters,
}

/// Why a runner returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Shutdown,
    /// Another version became live.
    Superseded,
    /// The projection is stopped by its poison policy.
    Stopped,
    /// This instance's share of the partitions changed.
    Reassigned,
}

/// A record as the runner understands it.
pub(crate) enum Read {
    Commit(Box<Commit>),
    /// Unreadable: goes to the dead letters by the poison policy.
    Unreadable {
        reason: String,
    },
}

/// A runner with its reader open.
pub(crate) struct Worker<'a> {
    pub runner: &'a Runner,
    pub reader: PartitionReader,
    /// Next offset to read per partition, as committed.
    pub checkpoints: BTreeMap<PartitionKey, i64>,
    apply_from: BTreeMap<PartitionKey, i64>,
    topics: HashMap<String, Topic>,
}

/// What one batch did.
pub(crate) enum Batch {
    Applied { events: u64 },
    Superseded,
    Stopped,
}

/// What applying a batch inside a transaction came to.
pub(crate) enum Applied {
    Events(u64),
    /// The poison policy stops the projection, for this reason.
    Stop(String),
}

/// The guard a batch transaction takes on the catalogue.
#[derive(Clone, Copy)]
pub(crate) enum Guard {
    /// The version must be live (shared lock: a swap waits for the batch, and vice versa).
    Live,
    /// The version must still be building.
    Building,
}

const MAX_BACKOFF: Duration = Duration::from_secs(5);
const IDLE_TICK: Duration = Duration::from_secs(1);

impl Runner {
    pub(crate) fn tables(&self) -> Tables {
        Tables::new(self.version)
    }

    /// Opens a reader on every partition of the projection's topics, or only on `only`.
    pub(crate) async fn open(&self) -> anyhow::Result<Worker<'_>> {
        self.open_partitions(None).await
    }

    pub(crate) async fn open_partitions(&self, only: Option<&[PartitionKey]>) -> anyhow::Result<Worker<'_>> {
        let name = self.projection.name();
        let metadata = kafka::consumer(&self.kafka, "keel-projector-metadata")?;
        let mut partitions = Vec::new();
        let mut topics = HashMap::new();
        for topic in self.projection.topics() {
            let topic_name = self.names.name(*topic);
            let count = kafka::partition_count(&metadata, &topic_name, Duration::from_secs(30)).await?;
            partitions.extend((0..count as i32).map(|partition| (topic_name.clone(), partition)));
            topics.insert(topic_name, *topic);
        }
        if let Some(only) = only {
            partitions.retain(|key| only.contains(key));
        }
        let mut connection = self.pool.acquire().await.context("failed to connect to the database")?;
        let checkpoints = store::checkpoints(&mut connection, name, self.version).await?;
        drop(connection);
        let apply_from = store::versions(&self.pool, name)
            .await?
            .into_iter()
            .find(|row| row.version == self.version)
            .map(|row| row.apply_from)
            .unwrap_or_default();
        tracing::info!(projection = name, version = self.version, partitions = partitions.len(), "projection starting");
        let reader = PartitionReader::assign_many(&self.kafka, partitions, &checkpoints)?;
        Ok(Worker { runner: self, reader, checkpoints, apply_from, topics })
    }

    /// Runs the live version until shutdown, until another version is live, until the poison
    /// policy stops it, or until `assignment` (this instance's share of the partitions, when
    /// several instances split them) changes. A batch in flight is finished or rolled back,
    /// never half applied.
    pub async fn run_live(
        &self,
        shutdown: &CancellationToken,
        assignment: Option<(Vec<PartitionKey>, watch::Receiver<Vec<PartitionKey>>)>,
    ) -> anyhow::Result<Exit> {
        let (only, mut reassigned) = match assignment {
            Some((partitions, changes)) => (Some(partitions), Some(changes)),
            None => (None, None),
        };
        let mut worker = self.open_partitions(only.as_deref()).await?;
        loop {
            if reassigned.as_mut().is_some_and(|changes| changes.has_changed().unwrap_or(true)) {
                return Ok(Exit::Reassigned);
            }
            let Some(batch) = worker.next_batch(Some(IDLE_TICK), shutdown).await? else { return Ok(Exit::Shutdown) };
            if batch.is_empty() {
                worker.record_lag();
                if store::live_version(&mut *self.pool.acquire().await?, self.projection.name(), false).await?
                    != Some(self.version)
                {
                    return Ok(Exit::Superseded);
                }
                continue;
            }
            match worker.apply_with_retry(&batch, Guard::Live, shutdown).await? {
                Some(Batch::Applied { .. }) => worker.record_lag(),
                Some(Batch::Superseded) => return Ok(Exit::Superseded),
                Some(Batch::Stopped) => return Ok(Exit::Stopped),
                None => return Ok(Exit::Shutdown),
            }
        }
    }
}

impl Worker<'_> {
    /// Up to `batch_size` records: waits for the first (up to `first_wait`, returning an empty
    /// batch on timeout), then gathers more for at most `batch_timeout`. `None` on shutdown.
    pub async fn next_batch(
        &mut self,
        first_wait: Option<Duration>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<Vec<OwnedMessage>>> {
        let first = tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            () = sleep_or_forever(first_wait) => return Ok(Some(Vec::new())),
            message = self.reader.next() => message?,
        };
        let Some(first) = first else { return Ok(Some(Vec::new())) };
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + self.runner.settings.batch_timeout;
        while batch.len() < self.runner.settings.batch_size {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => break,
                message = self.reader.next() => match message? {
                    Some(message) => batch.push(message),
                    None => break,
                },
            }
        }
        Ok(Some(batch))
    }

    /// Applies a batch, retrying transient failures with backoff. `None` on shutdown.
    pub async fn apply_with_retry(
        &mut self,
        batch: &[OwnedMessage],
        guard: Guard,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<Batch>> {
        let name = self.runner.projection.name();
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.apply_batch(batch, guard).await {
                Ok(outcome) => return Ok(Some(outcome)),
                Err(error) if error.downcast_ref::<store::CheckpointMoved>().is_some() => {
                    // Another worker applied these records: continue from the stored checkpoints.
                    return Err(error);
                }
                Err(error) => {
                    let text = format!("{error:#}");
                    tracing::error!(projection = name, error = %text, "failed to apply a batch; retrying");
                    metrics::counter!("keel_projection_errors_total", "projection" => name).increment(1);
                    let _ = store::record_error(&self.runner.pool, name, self.runner.version, &text, false).await;
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(None),
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    async fn apply_batch(&mut self, batch: &[OwnedMessage], guard: Guard) -> anyhow::Result<Batch> {
        let started = Instant::now();
        let runner = self.runner;
        let name = runner.projection.name();
        if runner.settings.poison == PoisonPolicy::Stop && store::is_stopped(&runner.pool, name, runner.version).await?
        {
            return Ok(Batch::Stopped);
        }
        let mut reads = Vec::with_capacity(batch.len());
        for message in batch {
            reads.push(self.read(message).await?);
        }
        let mut transaction = runner.pool.begin().await.context("failed to begin a transaction")?;
        if !self.guard(&mut transaction, guard).await? {
            return Ok(Batch::Superseded);
        }
        let mut next = self.checkpoints.clone();
        let outcome = match self.apply_in(&mut transaction, batch, &reads, &mut next, false).await {
            Ok(outcome) => outcome,
            Err(error) if is_permanent(&error) => {
                // One commit of the batch cannot be applied: find it, commit by commit.
                transaction.rollback().await.ok();
                tracing::warn!(projection = name, error = %format!("{error:#}"), "isolating a poison commit");
                transaction = runner.pool.begin().await?;
                if !self.guard(&mut transaction, guard).await? {
                    return Ok(Batch::Superseded);
                }
                next = self.checkpoints.clone();
                self.apply_in(&mut transaction, batch, &reads, &mut next, true).await?
            }
            Err(error) => return Err(error),
        };
        let events = match outcome {
            Applied::Events(events) => events,
            Applied::Stop(error) => {
                transaction.rollback().await.ok();
                store::record_error(&runner.pool, name, runner.version, &error, true).await?;
                tracing::error!(projection = name, error = %error, "projection stopped by its poison policy");
                return Ok(Batch::Stopped);
            }
        };
        if events > 0 {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(keel_topics::APPLIED_CHANNEL)
                .bind(name)
                .execute(&mut *transaction)
                .await
                .context("failed to announce a batch")?;
        }
        transaction.commit().await.context("failed to commit a batch")?;
        self.checkpoints = next;
        metrics::counter!("keel_projection_events_total", "projection" => name).increment(events);
        metrics::histogram!("keel_projection_batch_seconds", "projection" => name)
            .record(started.elapsed().as_secs_f64());
        Ok(Batch::Applied { events })
    }

    async fn guard(&self, connection: &mut PgConnection, guard: Guard) -> anyhow::Result<bool> {
        let runner = self.runner;
        let name = runner.projection.name();
        Ok(match guard {
            Guard::Live => store::live_version(connection, name, true).await? == Some(runner.version),
            Guard::Building => {
                let state: Option<String> = sqlx::query_scalar(
                    "SELECT state FROM projection_versions WHERE name = $1 AND version = $2 FOR SHARE",
                )
                .bind(name)
                .bind(runner.version)
                .fetch_optional(&mut *connection)
                .await?;
                state.as_deref() == Some("building")
            }
        })
    }

    /// Validates and applies `reads` inside `connection`'s transaction and advances `next`.
    /// With `isolate`, every commit gets a savepoint and the ones that fail are dead-lettered
    /// (or, under the stop policy, the batch is to be abandoned: [`Applied::Stop`]).
    pub async fn apply_in(
        &mut self,
        connection: &mut PgConnection,
        batch: &[OwnedMessage],
        reads: &[Read],
        next: &mut BTreeMap<PartitionKey, i64>,
        isolate: bool,
    ) -> anyhow::Result<Applied> {
        let runner = self.runner;
        let name = runner.projection.name();
        let keys: Vec<(String, Uuid)> = reads
            .iter()
            .filter_map(|read| match read {
                Read::Commit(commit) => Some((commit.topic_name.clone(), commit.header.aggregate_id)),
                Read::Unreadable { .. } => None,
            })
            .collect();
        let mut streams = store::load_streams(connection, name, runner.version, &keys).await?;
        let mut changed = HashMap::new();
        let mut to_apply = Vec::new();
        let mut poison = Vec::new();
        for (message, read) in batch.iter().zip(reads) {
            match read {
                Read::Commit(commit) => {
                    let key = (commit.topic_name.clone(), commit.header.aggregate_id);
                    let stream = streams.entry(key.clone()).or_insert_with(StreamState::default);
                    match stream.admit(&commit.header) {
                        Verdict::Valid => {
                            changed.insert(key, stream.clone());
                            let from = self.apply_from.get(&(commit.topic_name.clone(), commit.partition));
                            if from.is_none_or(|from| commit.offset >= *from) {
                                to_apply.push((message, commit.as_ref()));
                            }
                        }
                        verdict => {
                            tracing::warn!(
                                projection = name,
                                partition = commit.partition,
                                offset = commit.offset,
                                ?verdict,
                                "skipping invalid commit"
                            );
                            metrics::counter!("keel_projection_skipped_total", "projection" => name, "reason" => "invalid")
                                .increment(1);
                        }
                    }
                }
                Read::Unreadable { reason } => poison.push((message, reason.clone())),
            }
        }
        let tables = runner.tables();
        if isolate {
            for (message, commit) in &to_apply {
                sqlx::query("SAVEPOINT keel_commit").execute(&mut *connection).await?;
                match runner.projection.apply(connection, tables, std::slice::from_ref(*commit)).await {
                    Ok(()) => {
                        sqlx::query("RELEASE SAVEPOINT keel_commit").execute(&mut *connection).await?;
                    }
                    Err(error) if is_permanent(&error) => {
                        sqlx::query("ROLLBACK TO SAVEPOINT keel_commit").execute(&mut *connection).await?;
                        poison.push((message, format!("{error:#}")));
                    }
                    Err(error) => return Err(error),
                }
            }
        } else if !poison.is_empty() {
            return Err(anyhow!(Poison("unreadable record".into())));
        } else {
            let commits: Vec<Commit> = to_apply.iter().map(|(_, commit)| (*commit).clone()).collect();
            runner.projection.apply(connection, tables, &commits).await?;
        }
        if !poison.is_empty() {
            if runner.settings.poison == PoisonPolicy::Stop {
                // Recorded by the caller after rolling back: this transaction may hold a lock on
                // the very row the error is written to.
                let (message, reason) = &poison[0];
                return Ok(Applied::Stop(format!(
                    "stopped at {}/{}@{}: {reason}",
                    message.topic(),
                    message.partition(),
                    message.offset()
                )));
            }
            for (message, reason) in &poison {
                runner.dead_letters.publish(connection, name, runner.version, message, reason).await?;
                metrics::counter!("keel_projection_dead_letters_total", "projection" => name).increment(1);
            }
        }
        store::save_streams(connection, name, runner.version, &changed).await?;
        let expected = next.clone();
        for message in batch {
            let key = (message.topic().to_owned(), message.partition());
            let entry = next.entry(key).or_insert(0);
            *entry = (*entry).max(message.offset() + 1);
        }
        let moved: BTreeMap<PartitionKey, i64> = next
            .iter()
            .filter(|(key, offset)| expected.get(*key) != Some(*offset))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        store::advance_checkpoints(connection, name, runner.version, &expected, &moved).await?;
        let poisoned: Vec<(&str, i32, i64)> =
            poison.iter().map(|(message, _)| (message.topic(), message.partition(), message.offset())).collect();
        let events = to_apply
            .iter()
            .filter(|(message, _)| !poisoned.contains(&(message.topic(), message.partition(), message.offset())))
            .map(|(_, commit)| commit.header.events.len() as u64)
            .sum();
        Ok(Applied::Events(events))
    }

    pub async fn read(&self, message: &OwnedMessage) -> anyhow::Result<Read> {
        read(&self.runner.codec, self.topics.get(message.topic()).copied(), message).await
    }

    /// Records left to apply per partition, from the cached high watermarks (no request).
    pub fn lag(&self) -> BTreeMap<PartitionKey, i64> {
        self.reader
            .assigned()
            .iter()
            .filter_map(|key| {
                let high = self.reader.cached_high_watermark(&key.0, key.1)?;
                let next = self.checkpoints.get(key).copied().unwrap_or(0);
                Some((key.clone(), (high - next).max(0)))
            })
            .collect()
    }

    fn record_lag(&self) {
        let name = self.runner.projection.name();
        for ((topic, partition), lag) in self.lag() {
            metrics::gauge!("keel_projection_lag", "projection" => name, "topic" => topic, "partition" => partition.to_string())
                .set(lag as f64);
        }
    }
}

/// Decodes a record of `topic` (`None`: not a topic of the projection) into a commit.
pub(crate) async fn read(
    codec: &SchemaRegistryCodec,
    topic: Option<Topic>,
    message: &OwnedMessage,
) -> anyhow::Result<Read> {
    let unreadable = |reason: String| Read::Unreadable { reason };
    let Some(topic) = topic else {
        return Ok(unreadable(format!("unknown topic {}", message.topic())));
    };
    let (header, decoded) = match record::read(codec, topic, message).await.context("failed to decode a record")? {
        Record::Commit { header, decoded } => (header, decoded),
        Record::Unreadable { reason } => return Ok(unreadable(reason)),
    };
    Ok(Read::Commit(Box::new(Commit {
        topic,
        topic_name: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        header,
        decoded,
    })))
}

async fn sleep_or_forever(duration: Option<Duration>) {
    match duration {
        Some(duration) => tokio::time::sleep(duration).await,
        None => std::future::pending().await,
    }
}

/// A record that can never be applied as it is.
#[derive(Debug, thiserror::Error)]
#[error("poison record: {0}")]
pub struct Poison(pub String);

/// Errors that retrying cannot fix: bad data for the table, a violated constraint, an event the
/// handler cannot decode. Connection losses, timeouts and missing tables are retried instead.
pub(crate) fn is_permanent(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        if cause.downcast_ref::<Poison>().is_some() {
            return true;
        }
        if let Some(codec) = cause.downcast_ref::<keel_topics::CodecError>() {
            return !codec.is_retriable();
        }
        match cause.downcast_ref::<sqlx::Error>() {
            Some(sqlx::Error::Database(database)) => {
                database.code().is_some_and(|code| code.starts_with("22") || code.starts_with("23"))
            }
            Some(sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_)) => true,
            _ => false,
        }
    })
}
