//! Dead letters: records a projection could not apply. Each is published to the dead-letter
//! topic (the original key, value and headers, plus where it came from and why it failed) and
//! indexed in `projection_dead_letters`, in the transaction that moves the checkpoint past it.
//! The original record stays in its topic, so a retry re-reads it from there.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use keel_runtime::KafkaConfig;
use keel_topics::{
    SchemaRegistryCodec, TopicNames,
    catalogue::DEAD_LETTERS,
    producer::{Producer, Record},
    reader::PartitionReader,
};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use sqlx::{PgConnection, PgPool, Row};

use crate::{
    projection::{Projection, Tables},
    runner::{Read, read},
};

/// Publishes dead letters.
#[derive(Clone)]
pub struct DeadLetters {
    producer: Arc<Producer>,
    topic: String,
}

impl DeadLetters {
    pub fn new(kafka_config: &KafkaConfig, names: &TopicNames) -> anyhow::Result<Self> {
        Ok(Self { producer: Arc::new(Producer::commits(kafka_config)?), topic: names.auxiliary(&DEAD_LETTERS) })
    }

    /// Publishes `message` with its error and records it in the caller's transaction.
    pub async fn publish(
        &self,
        connection: &mut PgConnection,
        projection: &str,
        version: i32,
        message: &OwnedMessage,
        error: &str,
    ) -> anyhow::Result<()> {
        let mut headers = OwnedHeaders::new();
        if let Some(original) = message.headers() {
            for header in original.iter() {
                headers = headers.insert(Header { key: header.key, value: header.value });
            }
        }
        let partition = message.partition().to_string();
        let offset = message.offset().to_string();
        let version_text = version.to_string();
        for (key, value) in [
            ("keel-dlq-projection", projection),
            ("keel-dlq-projection-version", version_text.as_str()),
            ("keel-dlq-topic", message.topic()),
            ("keel-dlq-partition", partition.as_str()),
            ("keel-dlq-offset", offset.as_str()),
            ("keel-dlq-error", error),
        ] {
            headers = headers.insert(Header { key, value: Some(value) });
        }
        let record = Record {
            topic: &self.topic,
            partition: None,
            key: message.key().unwrap_or_default(),
            payload: message.payload().unwrap_or_default(),
            headers,
        };
        self.producer
            .send(record)
            .map_err(|error| anyhow::anyhow!("failed to publish a dead letter: {error}"))?
            .await
            .map_err(|error| anyhow::anyhow!("failed to publish a dead letter: {error}"))?;
        sqlx::query(
            "INSERT INTO projection_dead_letters (projection, version, topic, partition, \"offset\", error)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(projection)
        .bind(version)
        .bind(message.topic())
        .bind(message.partition())
        .bind(message.offset())
        .bind(error)
        .execute(&mut *connection)
        .await
        .context("failed to record a dead letter")?;
        tracing::warn!(
            projection,
            topic = message.topic(),
            partition = message.partition(),
            offset = message.offset(),
            error,
            "dead-lettered a record"
        );
        Ok(())
    }
}

/// One row of `projection_dead_letters`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    pub projection: String,
    pub version: i32,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub error: String,
    pub dead_lettered_at: DateTime<Utc>,
    pub retried_at: Option<DateTime<Utc>>,
    pub resolved_at: Option<DateTime<Utc>>,
}

/// Dead letters, unresolved first, optionally of one projection.
pub async fn list(pool: &PgPool, projection: Option<&str>, include_resolved: bool) -> anyhow::Result<Vec<DeadLetter>> {
    let rows = sqlx::query(
        "SELECT projection, version, topic, partition, \"offset\", error, dead_lettered_at, retried_at, resolved_at
         FROM projection_dead_letters
         WHERE ($1::text IS NULL OR projection = $1) AND ($2 OR resolved_at IS NULL)
         ORDER BY resolved_at IS NOT NULL, dead_lettered_at, topic, partition, \"offset\"",
    )
    .bind(projection)
    .bind(include_resolved)
    .fetch_all(pool)
    .await
    .context("failed to list dead letters")?;
    Ok(rows
        .iter()
        .map(|row| DeadLetter {
            projection: row.get(0),
            version: row.get(1),
            topic: row.get(2),
            partition: row.get(3),
            offset: row.get(4),
            error: row.get(5),
            dead_lettered_at: row.get(6),
            retried_at: row.get(7),
            resolved_at: row.get(8),
        })
        .collect())
}

/// The outcome of retrying one dead letter.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Retry {
    pub letter: DeadLetter,
    pub error: Option<String>,
}

/// Re-reads every unresolved dead letter of `projection`'s live version from its topic and
/// applies it again; a success resolves it in the same transaction.
pub async fn retry(
    pool: &PgPool,
    kafka_config: &KafkaConfig,
    codec: &SchemaRegistryCodec,
    names: &TopicNames,
    projection: Arc<dyn Projection>,
) -> anyhow::Result<Vec<Retry>> {
    let live = crate::store::live_version(&mut *pool.acquire().await?, projection.name(), false)
        .await?
        .context("the projection has no live version")?;
    let letters: Vec<DeadLetter> =
        list(pool, Some(projection.name()), false).await?.into_iter().filter(|letter| letter.version == live).collect();
    let mut outcomes = Vec::with_capacity(letters.len());
    for letter in letters {
        let message = fetch(kafka_config, &letter.topic, letter.partition, letter.offset).await?;
        let outcome = apply_again(pool, codec, names, projection.as_ref(), live, &letter, &message).await;
        let error = match outcome {
            Ok(()) => None,
            Err(error) => {
                let text = format!("{error:#}");
                mark_retried(&mut *pool.acquire().await?, &letter, Some(&text)).await?;
                Some(text)
            }
        };
        outcomes.push(Retry { letter, error });
    }
    Ok(outcomes)
}

async fn apply_again(
    pool: &PgPool,
    codec: &SchemaRegistryCodec,
    names: &TopicNames,
    projection: &dyn Projection,
    version: i32,
    letter: &DeadLetter,
    message: &OwnedMessage,
) -> anyhow::Result<()> {
    let commit = match read(codec, names.parse(&letter.topic), message).await? {
        Read::Commit(commit) => commit,
        Read::Unreadable { reason } => bail!("still unreadable: {reason}"),
    };
    let mut transaction = pool.begin().await?;
    // Like a live batch: only into the live version, and never interleaved with a swap.
    let live = crate::store::live_version(&mut transaction, projection.name(), true).await?;
    if live != Some(version) {
        bail!("version {version} is no longer live; rebuild or retry against the live version");
    }
    // Its validation state was accounted for when it was dead-lettered: apply its effects only.
    projection.apply(&mut transaction, Tables::new(version), std::slice::from_ref(&*commit)).await?;
    mark_retried(&mut transaction, letter, None).await?;
    transaction.commit().await?;
    Ok(())
}

/// Records a retry: resolved when it succeeded (`error` is `None`), with its new error otherwise.
async fn mark_retried(connection: &mut PgConnection, letter: &DeadLetter, error: Option<&str>) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE projection_dead_letters
         SET retried_at = now(),
             resolved_at = CASE WHEN $6::text IS NULL THEN now() END,
             error = COALESCE($6, error)
         WHERE projection = $1 AND version = $2 AND topic = $3 AND partition = $4 AND \"offset\" = $5",
    )
    .bind(&letter.projection)
    .bind(letter.version)
    .bind(&letter.topic)
    .bind(letter.partition)
    .bind(letter.offset)
    .bind(error)
    .execute(&mut *connection)
    .await
    .context("failed to record a dead-letter retry")?;
    Ok(())
}

/// The record at one position of a topic.
async fn fetch(kafka_config: &KafkaConfig, topic: &str, partition: i32, offset: i64) -> anyhow::Result<OwnedMessage> {
    let mut reader = PartitionReader::assign(kafka_config, topic, [partition], &BTreeMap::from([(partition, offset)]))?;
    let message = tokio::time::timeout(Duration::from_secs(30), reader.next())
        .await
        .with_context(|| format!("timed out reading {topic}/{partition}@{offset}"))??
        .with_context(|| format!("no record at {topic}/{partition}@{offset}"))?;
    if message.offset() != offset {
        bail!("{topic}/{partition}@{offset} is gone (the next record is at {})", message.offset());
    }
    Ok(message)
}
