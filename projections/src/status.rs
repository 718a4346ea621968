//! What `GET /admin/projections` and `keel projections status` report.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use keel_runtime::KafkaConfig;
use keel_topics::{TopicNames, kafka};
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::Serialize;
use sqlx::PgPool;

use crate::{projection::Projection, store};

#[derive(Debug, Serialize)]
pub struct ProjectionStatus {
    pub name: &'static str,
    pub code_version: i32,
    pub live_version: Option<i32>,
    /// The live version was built by older code.
    pub needs_rebuild: bool,
    pub unresolved_dead_letters: i64,
    pub versions: Vec<VersionStatus>,
}

#[derive(Debug, Serialize)]
pub struct VersionStatus {
    #[serde(flatten)]
    pub row: store::VersionRow,
    /// Records not yet applied, over all partitions.
    pub lag: i64,
    pub partitions: Vec<PartitionStatus>,
}

#[derive(Debug, Serialize)]
pub struct PartitionStatus {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
    pub high_watermark: i64,
    pub lag: i64,
}

/// The status of every projection, with lag measured against the broker's high watermarks.
pub async fn report(
    pool: &PgPool,
    kafka_config: &KafkaConfig,
    names: &TopicNames,
    projections: &[Arc<dyn Projection>],
) -> anyhow::Result<Vec<ProjectionStatus>> {
    let client: Arc<BaseConsumer> = Arc::new(kafka::client_config(kafka_config).create().context("kafka client")?);
    let mut report = Vec::new();
    for projection in projections {
        let name = projection.name();
        let mut watermarks = Vec::new();
        for topic in projection.topics() {
            let topic_name = names.name(*topic);
            let count = kafka::partition_count(&client, &topic_name, Duration::from_secs(5)).await?;
            let client = client.clone();
            let highs = tokio::task::spawn_blocking(move || {
                (0..count as i32)
                    .map(|partition| {
                        let (_, high) = client.fetch_watermarks(&topic_name, partition, Duration::from_secs(5))?;
                        Ok((topic_name.clone(), partition, high))
                    })
                    .collect::<Result<Vec<_>, rdkafka::error::KafkaError>>()
            })
            .await??;
            watermarks.extend(highs);
        }
        let mut connection = pool.acquire().await?;
        let live_version = store::live_version(&mut connection, name, false).await?;
        let mut versions = Vec::new();
        for row in store::versions(pool, name).await?.into_iter().filter(|row| row.state != "dropped") {
            let checkpoints = store::checkpoints(&mut connection, name, row.version).await?;
            let partitions: Vec<PartitionStatus> = watermarks
                .iter()
                .map(|(topic, partition, high)| {
                    let next_offset = checkpoints.get(&(topic.clone(), *partition)).copied().unwrap_or(0);
                    PartitionStatus {
                        topic: topic.clone(),
                        partition: *partition,
                        next_offset,
                        high_watermark: *high,
                        lag: (high - next_offset).max(0),
                    }
                })
                .collect();
            let lag = partitions.iter().map(|partition| partition.lag).sum();
            versions.push(VersionStatus { row, lag, partitions });
        }
        let live_code =
            versions.iter().find(|version| Some(version.row.version) == live_version).map(|v| v.row.code_version);
        let unresolved_dead_letters: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM projection_dead_letters WHERE projection = $1 AND resolved_at IS NULL",
        )
        .bind(name)
        .fetch_one(&mut *connection)
        .await?;
        report.push(ProjectionStatus {
            name,
            code_version: projection.code_version(),
            live_version,
            needs_rebuild: live_code.is_some_and(|code| code < projection.code_version()),
            unresolved_dead_letters,
            versions,
        });
    }
    Ok(report)
}
