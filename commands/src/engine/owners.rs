//! Which instance owns which partition, so that any instance can forward a command to the owner.
//!
//! The consumer group decides ownership; this directory only tells others where the owner
//! listens. An owner writes its row once it serves the partition and removes it when it lets go.
//! A row can be stale for a moment (an owner that died): forwarding to it fails, the caller
//! retries, and the next owner's row replaces it.

use anyhow::Context;
use keel_discovery::Partitions;
use sqlx::PgPool;
use uuid::Uuid;

pub struct OwnerDirectory {
    pool: PgPool,
    topic: String,
    endpoint: String,
    /// What the instance's registration lists.
    partitions: Partitions,
}

/// One spell of ownership of a partition; only it can withdraw its own row.
#[derive(Debug, Clone, Copy)]
pub struct Claim(Uuid);

impl OwnerDirectory {
    pub fn new(pool: PgPool, topic: String, endpoint: String, partitions: Partitions) -> Self {
        Self { pool, topic, endpoint, partitions }
    }

    /// Where this instance takes forwarded commands.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub async fn claim(&self, partition: i32) -> anyhow::Result<Claim> {
        let claim = Claim(Uuid::now_v7());
        // One statement: the row and its announcement commit together.
        sqlx::query(
            "WITH claimed AS (
                 INSERT INTO command_owners (topic, partition, instance, endpoint, since) VALUES ($1, $2, $3, $4, now())
                 ON CONFLICT (topic, partition) DO UPDATE
                     SET instance = excluded.instance, endpoint = excluded.endpoint, since = excluded.since
                 RETURNING 1
             )
             SELECT pg_notify($5, $1) FROM claimed",
        )
        .bind(&self.topic)
        .bind(partition)
        .bind(claim.0)
        .bind(&self.endpoint)
        .bind(keel_topics::OWNERS_CHANNEL)
        .execute(&self.pool)
        .await
        .context("failed to record partition ownership")?;
        self.partitions.add(&self.topic, partition);
        Ok(claim)
    }

    /// Removes the row of `claim`, not a row a newer owner (or a newer spell of this instance's)
    /// wrote meanwhile.
    pub async fn release(&self, partition: i32, claim: Claim) -> anyhow::Result<()> {
        self.partitions.remove(&self.topic, partition);
        sqlx::query(
            "WITH released AS (
                 DELETE FROM command_owners WHERE topic = $1 AND partition = $2 AND instance = $3 RETURNING 1
             )
             SELECT pg_notify($4, $1) FROM released",
        )
        .bind(&self.topic)
        .bind(partition)
        .bind(claim.0)
        .bind(keel_topics::OWNERS_CHANNEL)
        .execute(&self.pool)
        .await
        .context("failed to withdraw partition ownership")?;
        Ok(())
    }

    pub async fn owner(&self, partition: i32) -> anyhow::Result<Option<String>> {
        sqlx::query_scalar("SELECT endpoint FROM command_owners WHERE topic = $1 AND partition = $2")
            .bind(&self.topic)
            .bind(partition)
            .fetch_optional(&self.pool)
            .await
            .context("failed to look up a partition owner")
    }
}
