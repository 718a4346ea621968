//! The projection runner: validate a batch of records, apply it with its checkpoints in one
//! transaction, repeat. Where records come from is the caller's: the live feed shared by every
//! projection of the projector ([`crate::feed`]), or a reader of the runner's own (a rebuild).

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
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
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
    /// How long a reader of its own waits for a batch to fill.
    pub batch_timeout: Duration,
    /// The least time between two batches of the live feed.
    pub batch_interval: Duration,
    pub poison: PoisonPolicy,
}

/// One version of one projection.
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

/// A record as runners understand it.
pub(crate) enum Read {
    Commit(Box<Commit>),
    /// Unreadable: goes to the dead letters by the poison policy.
    Unreadable {
        reason: String,
    },
}

/// A record and what it reads as: read once, however many projections apply it.
pub(crate) struct Item {
    pub message: OwnedMessage,
    pub read: Read,
}

impl Item {
    fn key(&self) -> PartitionKey {
        (self.message.topic().to_owned(), self.message.partition())
    }
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

/// The commits of a batch the shared rule admits, and what it leaves for the dead letters.
struct Admitted<'b> {
    to_apply: Vec<&'b Item>,
    poison: Vec<(&'b Item, String)>,
    /// The validation state of every aggregate the batch changed.
    changed: HashMap<(String, Uuid), StreamState>,
}

impl Runner {
    pub(crate) fn tables(&self) -> Tables {
        Tables::new(self.version)
    }

    /// Every partition of the projection's topics.
    pub(crate) async fn partitions(&self) -> anyhow::Result<Vec<PartitionKey>> {
        let metadata = kafka::consumer(&self.kafka, "keel-projector-metadata")?;
        let mut partitions = Vec::new();
        for topic in self.projection.topics() {
            let topic_name = self.names.name(*topic);
            let count = kafka::partition_count(&metadata, &topic_name, Duration::from_secs(30)).await?;
            partitions.extend((0..count as i32).map(|partition| (topic_name.clone(), partition)));
        }
        Ok(partitions)
    }

    /// This version's lane over `partitions`, from its stored checkpoints.
    pub(crate) async fn lane(self: &Arc<Self>, partitions: Vec<PartitionKey>) -> anyhow::Result<Lane> {
        let name = self.projection.name();
        // Present from the start at 0, so that a reader of `/metrics` tells "nothing skipped"
        // from "never counted".
        metrics::counter!("keel_projection_skipped_total", "projection" => name, "reason" => "invalid").increment(0);
        metrics::counter!("keel_projection_dead_letters_total", "projection" => name).increment(0);
        let mut connection = self.pool.acquire().await.context("failed to connect to the database")?;
        let checkpoints = store::checkpoints(&mut connection, name, self.version).await?;
        drop(connection);
        let apply_from = store::versions(&self.pool, name)
            .await?
            .into_iter()
            .find(|row| row.version == self.version)
            .map(|row| row.apply_from)
            .unwrap_or_default();
        let topics = self.projection.topics().iter().map(|topic| (self.names.name(*topic), *topic)).collect();
        Ok(Lane { runner: self.clone(), checkpoints, apply_from, partitions, topics })
    }

    /// A reader of its own over every partition of the projection's topics.
    pub(crate) async fn open(self: &Arc<Self>) -> anyhow::Result<Worker> {
        let lane = self.lane(self.partitions().await?).await?;
        tracing::info!(
            projection = self.projection.name(),
            version = self.version,
            partitions = lane.partitions.len(),
            "projection reading"
        );
        let reader = PartitionReader::assign_many(&self.kafka, lane.partitions.clone(), &lane.checkpoints)?;
        Ok(Worker { lane, reader })
    }
}

/// One version of a projection over a set of partitions: where it stands and how it applies.
pub(crate) struct Lane {
    pub runner: Arc<Runner>,
    /// Next offset to read per partition, as committed.
    pub checkpoints: BTreeMap<PartitionKey, i64>,
    apply_from: BTreeMap<PartitionKey, i64>,
    pub partitions: Vec<PartitionKey>,
    topics: HashMap<String, Topic>,
}

impl Lane {
    /// Whether this lane still has to apply `item` (it reads its topic, and has not passed it).
    pub fn wants(&self, item: &Item) -> bool {
        let key = item.key();
        self.topics.contains_key(&key.0) && self.checkpoints.get(&key).is_none_or(|next| item.message.offset() >= *next)
    }

    /// Applies a batch, retrying transient failures with backoff. `None` on shutdown.
    pub async fn apply_with_retry(
        &mut self,
        batch: &[Arc<Item>],
        guard: Guard,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<Batch>> {
        let name = self.runner.projection.name();
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.apply_batch(batch, guard).instrument(batch_span(name, batch)).await {
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

    async fn apply_batch(&mut self, batch: &[Arc<Item>], guard: Guard) -> anyhow::Result<Batch> {
        let started = Instant::now();
        let runner = self.runner.clone();
        let name = runner.projection.name();
        if runner.settings.poison == PoisonPolicy::Stop && store::is_stopped(&runner.pool, name, runner.version).await?
        {
            return Ok(Batch::Stopped);
        }
        let mut transaction = runner.pool.begin().await.context("failed to begin a transaction")?;
        if !self.guard(&mut transaction, guard).await? {
            return Ok(Batch::Superseded);
        }
        let mut next = self.checkpoints.clone();
        let outcome = match self.apply_in(&mut transaction, batch, &mut next).await {
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
                self.apply_one_by_one_in(&mut transaction, batch, &mut next).await?
            }
            Err(error) => return Err(error),
        };
        let events = match outcome {
            Applied::Events(events) => events,
            Applied::Stop(error) => {
                transaction.rollback().await.ok();
                store::record_error(&runner.pool, name, runner.version, &error, true).await?;
                keel_runtime::errors::system(
                    "projection_stopped",
                    &format!("projection {name} stopped by its poison policy: {error}"),
                    &[("projection", name)],
                    None,
                );
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
        metrics::histogram!("keel_projection_batch_records", "projection" => name).record(batch.len() as f64);
        Ok(Batch::Applied { events })
    }

    async fn guard(&self, connection: &mut PgConnection, guard: Guard) -> anyhow::Result<bool> {
        let runner = &self.runner;
        let name = runner.projection.name();
        Ok(match guard {
            Guard::Live => store::live_version(connection, name, true).await? == Some(runner.version),
            Guard::Building => store::is_building(connection, name, runner.version).await?,
        })
    }

    /// Runs the shared rule over a batch: the commits to apply (valid, and at or after where
    /// this version starts applying), the unreadable records, and the validation state to store.
    async fn admit<'b>(&self, connection: &mut PgConnection, batch: &'b [Arc<Item>]) -> anyhow::Result<Admitted<'b>> {
        let runner = &self.runner;
        let name = runner.projection.name();
        let keys: Vec<(String, Uuid)> = batch
            .iter()
            .filter_map(|item| match &item.read {
                Read::Commit(commit) => Some((commit.topic_name.clone(), commit.header.aggregate_id)),
                Read::Unreadable { .. } => None,
            })
            .collect();
        let mut streams = store::load_streams(connection, name, runner.version, &keys).await?;
        let mut admitted = Admitted { to_apply: Vec::new(), poison: Vec::new(), changed: HashMap::new() };
        for item in batch {
            match &item.read {
                Read::Commit(commit) => {
                    let key = (commit.topic_name.clone(), commit.header.aggregate_id);
                    let stream = streams.entry(key.clone()).or_insert_with(StreamState::default);
                    match stream.admit(&commit.header) {
                        Verdict::Valid => {
                            admitted.changed.insert(key, stream.clone());
                            let from = self.apply_from.get(&(commit.topic_name.clone(), commit.partition));
                            if from.is_none_or(|from| commit.offset >= *from) {
                                admitted.to_apply.push(item);
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
                Read::Unreadable { reason } => admitted.poison.push((item, reason.clone())),
            }
        }
        Ok(admitted)
    }

    /// Validates and applies a batch in `connection`'s transaction, all commits at once, and
    /// advances `next`. An unreadable record fails the whole batch as poison.
    async fn apply_in(
        &mut self,
        connection: &mut PgConnection,
        batch: &[Arc<Item>],
        next: &mut BTreeMap<PartitionKey, i64>,
    ) -> anyhow::Result<Applied> {
        let admitted = self.admit(connection, batch).await?;
        if !admitted.poison.is_empty() {
            return Err(anyhow!(Poison("unreadable record".into())));
        }
        let commits: Vec<Commit> = admitted.to_apply.iter().map(|item| commit_of(item).clone()).collect();
        self.runner.projection.apply(connection, self.runner.tables(), &commits).await?;
        self.finish(connection, batch, admitted, next).await
    }

    /// Like [`Self::apply_in`], but commit by commit, each in a savepoint: the ones that fail
    /// (and unreadable records) are dead-lettered, or, under the stop policy, the batch is to be
    /// abandoned ([`Applied::Stop`]).
    async fn apply_one_by_one_in(
        &mut self,
        connection: &mut PgConnection,
        batch: &[Arc<Item>],
        next: &mut BTreeMap<PartitionKey, i64>,
    ) -> anyhow::Result<Applied> {
        let mut admitted = self.admit(connection, batch).await?;
        let tables = self.runner.tables();
        let mut applied = Vec::with_capacity(admitted.to_apply.len());
        for item in std::mem::take(&mut admitted.to_apply) {
            sqlx::query("SAVEPOINT keel_commit").execute(&mut *connection).await?;
            match self.runner.projection.apply(connection, tables, std::slice::from_ref(commit_of(item))).await {
                Ok(()) => {
                    sqlx::query("RELEASE SAVEPOINT keel_commit").execute(&mut *connection).await?;
                    applied.push(item);
                }
                Err(error) if is_permanent(&error) => {
                    sqlx::query("ROLLBACK TO SAVEPOINT keel_commit").execute(&mut *connection).await?;
                    admitted.poison.push((item, format!("{error:#}")));
                }
                Err(error) => return Err(error),
            }
        }
        admitted.to_apply = applied;
        self.finish(connection, batch, admitted, next).await
    }

    /// Dead-letters the poison of a batch, stores the validation state and moves the
    /// checkpoints past the batch.
    async fn finish(
        &mut self,
        connection: &mut PgConnection,
        batch: &[Arc<Item>],
        admitted: Admitted<'_>,
        next: &mut BTreeMap<PartitionKey, i64>,
    ) -> anyhow::Result<Applied> {
        let runner = self.runner.clone();
        let name = runner.projection.name();
        if let Some((item, reason)) = admitted.poison.first()
            && runner.settings.poison == PoisonPolicy::Stop
        {
            // Recorded by the caller after rolling back: this transaction may hold a lock on the
            // very row the error is written to.
            let message = &item.message;
            return Ok(Applied::Stop(format!(
                "stopped at {}/{}@{}: {reason}",
                message.topic(),
                message.partition(),
                message.offset()
            )));
        }
        for (item, reason) in &admitted.poison {
            runner.dead_letters.publish(connection, name, runner.version, &item.message, reason).await?;
            metrics::counter!("keel_projection_dead_letters_total", "projection" => name).increment(1);
            let message = &item.message;
            let (partition, offset) = (message.partition().to_string(), message.offset().to_string());
            keel_runtime::errors::system(
                "dead_letter",
                &format!("projection {name} dead-lettered {}/{partition}@{offset}: {reason}", message.topic()),
                &[("projection", name), ("topic", message.topic()), ("partition", &partition), ("offset", &offset)],
                None,
            );
        }
        store::save_streams(connection, name, runner.version, &admitted.changed).await?;
        let expected = next.clone();
        for item in batch {
            let entry = next.entry(item.key()).or_insert(0);
            *entry = (*entry).max(item.message.offset() + 1);
        }
        let moved: BTreeMap<PartitionKey, i64> = next
            .iter()
            .filter(|(key, offset)| expected.get(*key) != Some(*offset))
            .map(|(key, offset)| (key.clone(), *offset))
            .collect();
        store::advance_checkpoints(connection, name, runner.version, &expected, &moved).await?;
        let events = admitted.to_apply.iter().map(|item| commit_of(item).header.events.len() as u64).sum();
        Ok(Applied::Events(events))
    }

    /// Records left to apply per partition, against the high watermarks `high` knows.
    pub fn lag(&self, high: impl Fn(&str, i32) -> Option<i64>) -> BTreeMap<PartitionKey, i64> {
        self.partitions
            .iter()
            .filter_map(|key| {
                let high = high(&key.0, key.1)?;
                let next = self.checkpoints.get(key).copied().unwrap_or(0);
                Some((key.clone(), (high - next).max(0)))
            })
            .collect()
    }

    pub fn record_lag(&self, high: impl Fn(&str, i32) -> Option<i64>) {
        let name = self.runner.projection.name();
        for ((topic, partition), lag) in self.lag(high) {
            metrics::gauge!("keel_projection_lag", "projection" => name, "topic" => topic, "partition" => partition.to_string())
                .set(lag as f64);
        }
    }
}

/// The consumer span of one attempt at a batch (`process <topic>`, kind consumer), linked to
/// each record's producer span: a batch has as many parents as records, so, as the messaging
/// conventions say, it links to them rather than being anyone's child.
fn batch_span(projection: &str, batch: &[Arc<Item>]) -> tracing::Span {
    let mut topics: Vec<&str> = batch.iter().map(|item| item.message.topic()).collect();
    topics.sort_unstable();
    topics.dedup();
    let name = match topics.as_slice() {
        [topic] => format!("process {topic}"),
        _ => "process".to_owned(),
    };
    let span = tracing::info_span!(
        "process",
        otel.name = %name,
        otel.kind = "consumer",
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.consumer.group.name = projection,
        messaging.destination.name = %topics.join(","),
        messaging.batch.message_count = batch.len() as i64,
    );
    for item in batch {
        if let Read::Commit(commit) = &item.read
            && let Some(traceparent) = &commit.header.traceparent
        {
            keel_runtime::telemetry::link(&span, traceparent);
        }
    }
    span
}

/// The commit of an admitted item.
fn commit_of(item: &Item) -> &Commit {
    match &item.read {
        Read::Commit(commit) => commit,
        Read::Unreadable { .. } => unreachable!("only commits are admitted"),
    }
}

/// A lane with a reader of its own.
pub(crate) struct Worker {
    pub lane: Lane,
    pub reader: PartitionReader,
}

impl Worker {
    /// Up to `batch_size` records: waits for the first (up to `first_wait`, returning an empty
    /// batch on timeout), then gathers more for at most `batch_timeout`. `None` on shutdown.
    pub async fn next_batch(
        &mut self,
        first_wait: Option<Duration>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<Vec<Arc<Item>>>> {
        let first = tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            () = sleep_or_forever(first_wait) => return Ok(Some(Vec::new())),
            message = self.reader.next() => message?,
        };
        let Some(first) = first else { return Ok(Some(Vec::new())) };
        let settings = &self.lane.runner.settings;
        let mut messages = vec![first];
        let deadline = tokio::time::Instant::now() + settings.batch_timeout;
        while messages.len() < settings.batch_size {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => break,
                message = self.reader.next() => match message? {
                    Some(message) => messages.push(message),
                    None => break,
                },
            }
        }
        let mut batch = Vec::with_capacity(messages.len());
        for message in messages {
            let topic = self.lane.topics.get(message.topic()).copied();
            let read = read(&self.lane.runner.codec, topic, &message).await?;
            batch.push(Arc::new(Item { message, read }));
        }
        Ok(Some(batch))
    }

    /// Applies `batch` inside `connection`'s transaction (a swap's), advancing `next`.
    pub async fn apply_in(
        &mut self,
        connection: &mut PgConnection,
        batch: &[Arc<Item>],
        next: &mut BTreeMap<PartitionKey, i64>,
    ) -> anyhow::Result<Applied> {
        self.lane.apply_in(connection, batch, next).await
    }
}

/// Decodes a record of `topic` (`None`: not a topic of the projection) into a commit. `Err`
/// only for failures worth retrying (the schema registry is unreachable).
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
