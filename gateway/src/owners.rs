//! Where each partition's writer is, so that a command goes straight to the instance that
//! decides it instead of through another instance that forwards it.
//!
//! The owners announce themselves in `command_owners` and say so on the channel [`CHANNEL`];
//! the gateway keeps a copy, read again on every announcement, whenever announcements may have
//! been missed, and every [`REFRESH`] anyway. The copy is a hint: a command sent to an instance
//! that no longer owns the partition is forwarded or refused there (UNAVAILABLE) and retried, as
//! before, so a stale copy costs a hop, never a wrong answer.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use keel_clients::Placement;
use keel_runtime::notifications::Notice;
use keel_topics::{Topic, TopicNames, partitioning};
use sqlx::PgPool;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The PostgreSQL channel on which owners announce a change of ownership.
pub use keel_topics::OWNERS_CHANNEL as CHANNEL;

/// How often the copy is read again without an announcement.
const REFRESH: Duration = Duration::from_secs(30);

/// The gateway's copy of `command_owners`.
#[derive(Debug, Clone)]
pub struct Owners {
    names: TopicNames,
    /// Endpoint by (full topic name, partition).
    endpoints: Arc<RwLock<HashMap<(String, i32), String>>>,
}

impl Placement for Owners {
    /// The endpoint of the instance that writes `aggregate`'s partition of `topic`, if known.
    fn endpoint_of(&self, topic: Topic, aggregate: Uuid) -> Option<String> {
        let partition = partitioning::partition_of(aggregate.to_string().as_bytes(), topic.spec().partitions);
        let endpoints = self.endpoints.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        endpoints.get(&(self.names.name(topic), partition)).cloned()
    }
}

impl Owners {
    pub fn new(names: TopicNames) -> Self {
        Self { names, endpoints: Arc::default() }
    }

    async fn load(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let rows: Vec<(String, i32, String)> =
            sqlx::query_as("SELECT topic, partition, endpoint FROM command_owners").fetch_all(pool).await?;
        let fresh = rows.into_iter().map(|(topic, partition, endpoint)| ((topic, partition), endpoint)).collect();
        *self.endpoints.write().unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
        Ok(())
    }

    /// Keeps the copy current until shutdown.
    pub async fn follow(
        self,
        pool: PgPool,
        mut notices: broadcast::Receiver<Notice>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        loop {
            if let Err(error) = self.load(&pool).await {
                tracing::debug!(%error, "failed to read the partition owners; commands are forwarded meanwhile");
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(REFRESH) => {}
                notice = notices.recv() => if let Err(broadcast::error::RecvError::Closed) = notice {
                    // Nothing is heard any more: the periodic refresh is all there is.
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        () = tokio::time::sleep(REFRESH) => {}
                    }
                },
            }
        }
    }
}
