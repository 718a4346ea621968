//! Reading partitions from offsets Keel stored itself, optionally only up to the end of the log
//! as it was when reading started.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context;
use keel_runtime::KafkaConfig;
use rdkafka::{
    Offset, TopicPartitionList,
    consumer::{Consumer, StreamConsumer},
    message::{Message, OwnedMessage},
};

use crate::kafka::client_config;

/// Reads assigned partitions of one topic, without consumer-group offsets.
pub struct PartitionReader {
    consumer: StreamConsumer,
    topic: String,
    /// For a bounded read: the offset each partition must reach (its high watermark at start).
    until: Option<BTreeMap<i32, i64>>,
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
        let consumer: StreamConsumer = client_config(config)
            .set("group.id", format!("keel-reader-{topic}"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .create()
            .context("failed to create a Kafka reader")?;
        let mut assignment = TopicPartitionList::new();
        for partition in partitions {
            let offset = start.get(&partition).map_or(Offset::Beginning, |offset| Offset::Offset(*offset));
            assignment.add_partition_offset(topic, partition, offset).context("invalid partition offset")?;
        }
        consumer.assign(&assignment).with_context(|| format!("failed to assign partitions of {topic}"))?;
        Ok(Self { consumer, topic: topic.to_owned(), until: None })
    }

    /// Makes this reader stop at the current end of the log: [`Self::next`] returns `None` once
    /// every assigned partition has been read up to its high watermark as of now.
    pub async fn until_current_end(mut self, start: &BTreeMap<i32, i64>) -> anyhow::Result<Self> {
        // Partition numbers only: assignment elements are not `Send` and must not cross awaits.
        let partitions: Vec<i32> = {
            let assignment = self.consumer.assignment().context("failed to read the assignment")?;
            assignment.elements().iter().map(|element| element.partition()).collect()
        };
        let mut until = BTreeMap::new();
        for partition in partitions {
            let (low, high) = self.watermarks(partition).await?;
            let from = start.get(&partition).copied().unwrap_or(low).max(low);
            if from < high {
                until.insert(partition, high);
            }
        }
        self.until = Some(until);
        Ok(self)
    }

    /// The low and high watermarks of one partition.
    pub async fn watermarks(&self, partition: i32) -> anyhow::Result<(i64, i64)> {
        tokio::task::block_in_place(|| self.consumer.fetch_watermarks(&self.topic, partition, Duration::from_secs(10)))
            .with_context(|| format!("failed to fetch watermarks of {}/{partition}", self.topic))
    }

    /// The next record, or `None` when a bounded read is complete.
    pub async fn next(&mut self) -> anyhow::Result<Option<OwnedMessage>> {
        if self.until.as_ref().is_some_and(BTreeMap::is_empty) {
            return Ok(None);
        }
        let message = self.consumer.recv().await.context("failed to read from Kafka")?.detach();
        if let Some(until) = &mut self.until
            && let Some(high) = until.get(&message.partition())
            && message.offset() + 1 >= *high
        {
            until.remove(&message.partition());
        }
        Ok(Some(message))
    }
}
