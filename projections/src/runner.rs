//! The projection runner: read, validate, apply a batch with its checkpoints, repeat.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use keel_runtime::KafkaConfig;
use keel_topics::{
    CommitHeader, SchemaRegistryCodec, StreamState, Topic, Verdict, codec::Decoded, kafka, reader::PartitionReader,
};
use rdkafka::message::{Message, OwnedMessage};
use sqlx::{PgConnection, PgPool, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A valid commit, decoded, in log order.
#[derive(Debug, Clone)]
pub struct Commit {
    pub topic: Topic,
    /// The installation's full topic name.
    pub topic_name: String,
    pub partition: i32,
    pub offset: i64,
    pub header: CommitHeader,
    pub decoded: Decoded,
}

/// A projection: the topics it reads and how it applies valid commits inside the runner's
/// transaction. Applying must be idempotent per row (upserts keyed by aggregate and version), but
/// the runner never applies a commit twice: checkpoints commit with the rows.
#[async_trait::async_trait]
pub trait Projection: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn topics(&self) -> &'static [Topic];
    async fn apply(&self, transaction: &mut PgConnection, commits: &[Commit]) -> anyhow::Result<()>;
}

pub struct Runner {
    pub projection: Arc<dyn Projection>,
    pub topic: Topic,
    pub topic_name: String,
    pub pool: PgPool,
    pub codec: SchemaRegistryCodec,
    pub kafka: KafkaConfig,
    pub batch_size: usize,
    pub batch_timeout: Duration,
}

/// The outcome of reading one record.
enum Read {
    Commit(Commit),
    /// Unreadable: counted and skipped (the checkpoint still moves past it).
    Unreadable {
        partition: i32,
        offset: i64,
        reason: String,
    },
}

const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Runner {
    /// Runs until `shutdown`; a batch in flight is finished or rolled back, never half applied.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let name = self.projection.name();
        let metadata = kafka::consumer(&self.kafka, "keel-projector-metadata")?;
        let partitions = kafka::partition_count(&metadata, &self.topic_name, Duration::from_secs(30)).await? as i32;
        let start = self.checkpoints().await?;
        tracing::info!(projection = name, topic = %self.topic_name, ?start, "projection starting");
        let mut reader = PartitionReader::assign(&self.kafka, &self.topic_name, 0..partitions, &start)?;
        loop {
            let first = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                message = reader.next() => message?,
            };
            let Some(first) = first else { continue };
            let mut batch = vec![first];
            let deadline = tokio::time::Instant::now() + self.batch_timeout;
            while batch.len() < self.batch_size {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => break,
                    message = reader.next() => match message? {
                        Some(message) => batch.push(message),
                        None => break,
                    },
                }
            }
            let mut backoff = Duration::from_millis(100);
            loop {
                match self.apply_batch(&batch).await {
                    Ok(()) => break,
                    Err(error) => {
                        tracing::error!(projection = name, error = %format!("{error:#}"), "failed to apply a batch; retrying");
                        metrics::counter!("keel_projection_errors_total", "projection" => name).increment(1);
                        tokio::select! {
                            () = shutdown.cancelled() => return Ok(()),
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
    }

    async fn checkpoints(&self) -> anyhow::Result<BTreeMap<i32, i64>> {
        let rows = sqlx::query(
            "SELECT partition, next_offset FROM projection_checkpoints WHERE projection = $1 AND topic = $2",
        )
        .bind(self.projection.name())
        .bind(&self.topic_name)
        .fetch_all(&self.pool)
        .await
        .context("failed to load checkpoints")?;
        Ok(rows.iter().map(|row| (row.get::<i32, _>(0), row.get::<i64, _>(1))).collect())
    }

    async fn read(&self, message: &OwnedMessage) -> anyhow::Result<Read> {
        let (partition, offset) = (message.partition(), message.offset());
        let unreadable = |reason: String| Read::Unreadable { partition, offset, reason };
        let header = match message.headers().map(CommitHeader::from_headers) {
            Some(Ok(header)) => header,
            Some(Err(error)) => return Ok(unreadable(error.to_string())),
            None => return Ok(unreadable("no headers".into())),
        };
        let decoded = match self.codec.decode(self.topic, message.payload().unwrap_or_default()).await {
            Ok(decoded) => decoded,
            Err(error) if error.is_retriable() => return Err(error).context("failed to decode a record"),
            Err(error) => return Ok(unreadable(error.to_string())),
        };
        if decoded.events.len() != header.events.len() {
            return Ok(unreadable(format!(
                "{} events but {} event headers",
                decoded.events.len(),
                header.events.len()
            )));
        }
        Ok(Read::Commit(Commit {
            topic: self.topic,
            topic_name: self.topic_name.clone(),
            partition,
            offset,
            header,
            decoded,
        }))
    }

    async fn apply_batch(&self, batch: &[OwnedMessage]) -> anyhow::Result<()> {
        let started = Instant::now();
        let name = self.projection.name();
        let mut reads = Vec::with_capacity(batch.len());
        for message in batch {
            reads.push(self.read(message).await?);
        }
        let mut next_offsets = BTreeMap::new();
        for message in batch {
            let next = next_offsets.entry(message.partition()).or_insert(0);
            *next = (*next).max(message.offset() + 1);
        }
        let aggregate_ids: Vec<Uuid> = reads
            .iter()
            .filter_map(|read| match read {
                Read::Commit(commit) => Some(commit.header.aggregate_id),
                Read::Unreadable { .. } => None,
            })
            .collect();

        let mut transaction = self.pool.begin().await.context("failed to begin a transaction")?;
        let mut streams = load_streams(&mut transaction, name, &self.topic_name, &aggregate_ids).await?;
        let mut changed = HashMap::new();
        let mut valid = Vec::with_capacity(reads.len());
        for read in reads {
            match read {
                Read::Commit(commit) => {
                    let aggregate_id = commit.header.aggregate_id;
                    let stream = streams.entry(aggregate_id).or_default();
                    match stream.admit(&commit.header) {
                        Verdict::Valid => {
                            changed.insert(aggregate_id, stream.clone());
                            valid.push(commit);
                        }
                        verdict => {
                            tracing::warn!(
                                projection = name,
                                partition = commit.partition,
                                offset = commit.offset,
                                ?verdict,
                                "skipping invalid commit"
                            );
                            metrics::counter!("keel_projection_skipped_total", "projection" => name, "reason" => "invalid").increment(1);
                        }
                    }
                }
                Read::Unreadable { partition, offset, reason } => {
                    tracing::error!(projection = name, partition, offset, reason = %reason, "skipping unreadable record");
                    metrics::counter!("keel_projection_skipped_total", "projection" => name, "reason" => "unreadable")
                        .increment(1);
                }
            }
        }
        self.projection.apply(&mut transaction, &valid).await?;
        save_streams(&mut transaction, name, &self.topic_name, &changed).await?;
        save_checkpoints(&mut transaction, name, &self.topic_name, &next_offsets).await?;
        transaction.commit().await.context("failed to commit a batch")?;
        metrics::counter!("keel_projection_events_total", "projection" => name)
            .increment(valid.iter().map(|commit| commit.header.events.len() as u64).sum());
        metrics::histogram!("keel_projection_batch_seconds", "projection" => name)
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }
}

async fn load_streams(
    connection: &mut PgConnection,
    projection: &str,
    topic: &str,
    aggregate_ids: &[Uuid],
) -> anyhow::Result<HashMap<Uuid, StreamState>> {
    let rows = sqlx::query(
        "SELECT aggregate_id, version, recent_commands FROM projection_streams
         WHERE projection = $1 AND topic = $2 AND aggregate_id = ANY($3)",
    )
    .bind(projection)
    .bind(topic)
    .bind(aggregate_ids)
    .fetch_all(&mut *connection)
    .await
    .context("failed to load stream states")?;
    Ok(rows
        .iter()
        .map(|row| {
            let version: i64 = row.get(1);
            let commands: Vec<Uuid> = row.get(2);
            (row.get::<Uuid, _>(0), StreamState::from_parts(version as u64, commands))
        })
        .collect())
}

async fn save_streams(
    connection: &mut PgConnection,
    projection: &str,
    topic: &str,
    streams: &HashMap<Uuid, StreamState>,
) -> anyhow::Result<()> {
    if streams.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = streams.keys().copied().collect();
    let versions: Vec<i64> = ids.iter().map(|id| streams[id].version() as i64).collect();
    // Postgres has no arrays of arrays of varying length: pass each window as text.
    let commands: Vec<String> = ids
        .iter()
        .map(|id| {
            let list: Vec<String> = streams[id].recent_commands().map(Uuid::to_string).collect();
            format!("{{{}}}", list.join(","))
        })
        .collect();
    sqlx::query(
        "INSERT INTO projection_streams (projection, topic, aggregate_id, version, recent_commands)
         SELECT $1, $2, id, version, commands::uuid[]
         FROM UNNEST($3::uuid[], $4::bigint[], $5::text[]) AS input(id, version, commands)
         ON CONFLICT (projection, topic, aggregate_id)
         DO UPDATE SET version = excluded.version, recent_commands = excluded.recent_commands",
    )
    .bind(projection)
    .bind(topic)
    .bind(&ids)
    .bind(&versions)
    .bind(&commands)
    .execute(&mut *connection)
    .await
    .context("failed to save stream states")?;
    Ok(())
}

async fn save_checkpoints(
    connection: &mut PgConnection,
    projection: &str,
    topic: &str,
    next_offsets: &BTreeMap<i32, i64>,
) -> anyhow::Result<()> {
    let partitions: Vec<i32> = next_offsets.keys().copied().collect();
    let offsets: Vec<i64> = next_offsets.values().copied().collect();
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, topic, partition, next_offset)
         SELECT $1, $2, partition, next_offset FROM UNNEST($3::int[], $4::bigint[]) AS input(partition, next_offset)
         ON CONFLICT (projection, topic, partition)
         DO UPDATE SET next_offset = excluded.next_offset, updated_at = now()",
    )
    .bind(projection)
    .bind(topic)
    .bind(&partitions)
    .bind(&offsets)
    .execute(&mut *connection)
    .await
    .context("failed to save checkpoints")?;
    Ok(())
}
