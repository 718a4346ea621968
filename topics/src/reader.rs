//! Reading partitions from offsets Keel stored itself, optionally only up to the end of the log
//! as it was when reading started.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use keel_runtime::KafkaConfig;
use rdkafka::{
    ClientContext, Offset, Statistics, TopicPartitionList,
    consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer},
    message::{Message, OwnedMessage},
};

use crate::kafka::client_config;

/// A partition of a topic, by full topic name.
pub type PartitionKey = (String, i32);

/// High watermarks as librdkafka's statistics report them, every second, from fetch responses.
#[derive(Clone, Default)]
struct WatermarkContext {
    high: Arc<Mutex<HashMap<PartitionKey, i64>>>,
}

impl ClientContext for WatermarkContext {
    fn stats(&self, statistics: Statistics) {
        let mut high = self.high.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (topic, topic_statistics) in statistics.topics {
            for (partition, partition_statistics) in topic_statistics.partitions {
                if partition >= 0 && partition_statistics.hi_offset >= 0 {
                    high.insert((topic.clone(), partition), partition_statistics.hi_offset);
                }
            }
        }
    }
}

impl ConsumerContext for WatermarkContext {}

/// Reads assigned partitions of one or more topics, without consumer-group offsets.
pub struct PartitionReader {
    consumer: StreamConsumer<WatermarkContext>,
    /// Watermark queries on a handle of their own: on the consuming one they wait behind its
    /// long-polling fetches, up to `fetch.wait.max.ms` each.
    queries: BaseConsumer,
    watermarks: WatermarkContext,
    assigned: Vec<PartitionKey>,
    /// For a bounded read: the offset each partition must reach (its high watermark at start).
    until: Option<BTreeMap<PartitionKey, i64>>,
}

impl PartitionReader {
    /// Assigns `partitions` of `topic`, each starting at the offset in `start` (the next offset
    /// to read) or at the beginning of the partition.
    pub fn assign(
        config: &KafkaConfig,
        topic: &str,
        partitions: impl IntoIterator<Item = i32>,
        start: &BTreeMap<i32, i64>,
    ) -> anyhow::Result<Self> {
        let keys: Vec<PartitionKey> = partitions.into_iter().map(|partition| (topic.to_owned(), partition)).collect();
        let start = start.iter().map(|(partition, offset)| ((topic.to_owned(), *partition), *offset)).collect();
        Self::assign_many(config, keys, &start)
    }

    /// Assigns partitions of several topics; `start` holds the next offset to read per partition
    /// (absent: the beginning).
    pub fn assign_many(
        config: &KafkaConfig,
        partitions: Vec<PartitionKey>,
        start: &BTreeMap<PartitionKey, i64>,
    ) -> anyhow::Result<Self> {
        let watermarks = WatermarkContext::default();
        let consumer: StreamConsumer<WatermarkContext> = client_config(config)
            .set("group.id", "keel-reader")
            .set("statistics.interval.ms", "1000")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            // How long the broker may hold a fetch that found nothing new. A broker that answers
            // a held fetch only when this runs out (nisshi does) adds half of it, on average, to
            // the time from a commit to its projection, which read-your-writes waits for.
            .set("fetch.wait.max.ms", "50")
            .create_with_context(watermarks.clone())
            .context("failed to create a Kafka reader")?;
        let mut assignment = TopicPartitionList::new();
        for key in &partitions {
            let offset = start.get(key).map_or(Offset::Beginning, |offset| Offset::Offset(*offset));
            assignment.add_partition_offset(&key.0, key.1, offset).context("invalid partition offset")?;
        }
        consumer.assign(&assignment).context("failed to assign partitions")?;
        let queries = client_config(config).create().context("failed to create a Kafka query client")?;
        Ok(Self { consumer, queries, watermarks, assigned: partitions, until: None })
    }

    /// Makes this reader stop at the current end of the log: [`Self::next`] returns `None` once
    /// every assigned partition has been read up to its high watermark as of now.
    pub async fn until_current_end(mut self, start: &BTreeMap<i32, i64>) -> anyhow::Result<Self> {
        let start: BTreeMap<PartitionKey, i64> =
            self.assigned.iter().filter_map(|key| start.get(&key.1).map(|offset| (key.clone(), *offset))).collect();
        self.until = Some(self.remaining(&start).await?);
        Ok(self)
    }

    /// Per partition whose high watermark lies beyond `start` (absent: the low watermark), that
    /// high watermark.
    pub async fn remaining(&self, start: &BTreeMap<PartitionKey, i64>) -> anyhow::Result<BTreeMap<PartitionKey, i64>> {
        let mut remaining = BTreeMap::new();
        for key in &self.assigned {
            let (low, high) = self.watermarks(&key.0, key.1).await?;
            let from = start.get(key).copied().unwrap_or(low).max(low);
            if from < high {
                remaining.insert(key.clone(), high);
            }
        }
        Ok(remaining)
    }

    /// The low and high watermarks of one partition, asked of the broker.
    pub async fn watermarks(&self, topic: &str, partition: i32) -> anyhow::Result<(i64, i64)> {
        tokio::task::block_in_place(|| self.queries.fetch_watermarks(topic, partition, Duration::from_secs(10)))
            .with_context(|| format!("failed to fetch watermarks of {topic}/{partition}"))
    }

    /// The high watermark of a partition as the last statistics report (at most a second old)
    /// gave it; no request to the broker.
    pub fn cached_high_watermark(&self, topic: &str, partition: i32) -> Option<i64> {
        let high = self.watermarks.high.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        high.get(&(topic.to_owned(), partition)).copied()
    }

    pub fn assigned(&self) -> &[PartitionKey] {
        &self.assigned
    }

    /// The next record, or `None` when a bounded read is complete.
    pub async fn next(&mut self) -> anyhow::Result<Option<OwnedMessage>> {
        if self.until.as_ref().is_some_and(BTreeMap::is_empty) {
            return Ok(None);
        }
        let message = self.consumer.recv().await.context("failed to read from Kafka")?.detach();
        if let Some(until) = &mut self.until {
            let key = (message.topic().to_owned(), message.partition());
            if until.get(&key).is_some_and(|high| message.offset() + 1 >= *high) {
                until.remove(&key);
            }
        }
        Ok(Some(message))
    }
}
