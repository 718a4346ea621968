//! Splitting a topic's partitions among the instances of a service with a Kafka consumer group:
//! projector instances split a projection's partitions, command-service instances split the
//! partitions they write.
//!
//! The group only assigns: every assigned partition is paused at once, nothing is read through
//! the group and no offset is ever committed to it. Each instance reads its partitions with its
//! own reader from positions it keeps itself (projection checkpoints, command snapshots). Two
//! instances may briefly both hold a partition during a rebalance; what they write stays correct
//! by other means (compare-and-set checkpoints, the deterministic validation rule).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use crate::{kafka::client_config, reader::PartitionKey};
use anyhow::Context;
use keel_runtime::KafkaConfig;
use rdkafka::{
    ClientContext,
    consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance},
};
use tokio::sync::watch;

struct MembershipContext {
    assigned: watch::Sender<Vec<PartitionKey>>,
}

impl ClientContext for MembershipContext {}

impl ConsumerContext for MembershipContext {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(assignment) => {
                if let Err(error) = consumer.pause(assignment) {
                    tracing::error!(%error, "failed to pause assigned partitions");
                }
                let mut partitions: Vec<PartitionKey> = assignment
                    .elements()
                    .iter()
                    .map(|element| (element.topic().to_owned(), element.partition()))
                    .collect();
                partitions.sort();
                tracing::info!(partitions = partitions.len(), "partitions assigned");
                self.assigned.send_replace(partitions);
            }
            Rebalance::Revoke(_) => {
                self.assigned.send_replace(Vec::new());
            }
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance error"),
        }
    }
}

/// This instance's membership in a group. Leaves the group when dropped.
pub struct Membership {
    assigned: watch::Receiver<Vec<PartitionKey>>,
    running: Arc<AtomicBool>,
    poller: Option<std::thread::JoinHandle<()>>,
}

impl Membership {
    /// Joins `group` for `topics`; the assignment arrives through [`Self::assigned`].
    pub fn join(kafka_config: &KafkaConfig, group: &str, topics: &[String]) -> anyhow::Result<Self> {
        let (assigned_tx, assigned) = watch::channel(Vec::new());
        let consumer: BaseConsumer<MembershipContext> = client_config(kafka_config)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .set("partition.assignment.strategy", "range")
            .create_with_context(MembershipContext { assigned: assigned_tx })
            .context("failed to create the group membership consumer")?;
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).with_context(|| format!("failed to join the group {group}"))?;
        let running = Arc::new(AtomicBool::new(true));
        // librdkafka runs rebalances and heartbeats from poll: a thread of its own keeps polling.
        let poller = std::thread::Builder::new().name(format!("membership {group}")).spawn({
            let running = running.clone();
            move || {
                while running.load(Ordering::Acquire) {
                    // Partitions are paused: anything returned is a fetch that raced the pause.
                    let _ = consumer.poll(Duration::from_millis(200));
                }
                consumer.unsubscribe();
                let _ = consumer.poll(Duration::from_millis(200));
            }
        })?;
        Ok(Self { assigned, running, poller: Some(poller) })
    }

    /// The partitions this instance owns now.
    pub fn assigned(&self) -> Vec<PartitionKey> {
        self.assigned.borrow().clone()
    }

    /// A receiver that wakes when the assignment changes.
    pub fn watch(&self) -> watch::Receiver<Vec<PartitionKey>> {
        let mut receiver = self.assigned.clone();
        receiver.mark_unchanged();
        receiver
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.running.store(false, Ordering::Release);
        if let Some(poller) = self.poller.take() {
            let _ = poller.join();
        }
    }
}
