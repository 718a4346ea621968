//! Processes: commands whose effect takes steps in more than one service, made to complete even
//! when the instance running one dies between its steps.
//!
//! A process is written to PostgreSQL (`command_processes`) before its first step, claimed by the
//! run that began it, and deleted after its last step. Each step is a command with an id of its
//! own, derived from the process's command id ([`crate::CommandMeta::step`]), so running a step
//! again returns its first result instead of acting twice. A process whose claim ran out was
//! interrupted: the owner of its aggregate's partition claims it and runs its steps again until
//! it completes, or is undone when a step is refused. A run that fails without an answer leaves
//! it for later, after a backoff that grows with its attempts (visible, with its last error).
//!
//! What a process stores can hold personal data (a registration's email and password hash): it
//! is then sealed with the aggregate's data key, which an erasure shreds.

use std::time::Duration;

use keel_topics::{Vault, VaultError};
use serde::{Serialize, de::DeserializeOwned};
use sqlx::PgPool;
use uuid::Uuid;

/// Whether a process's payload is sealed with its aggregate's data key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sealing {
    /// It holds personal data.
    Sealed,
    /// It holds none (ids, versions, metadata).
    Plain,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("the process store failed: {0}")]
    Store(#[from] sqlx::Error),
    #[error("the data key failed: {0}")]
    Key(#[from] VaultError),
    /// Its aggregate's personal data was erased: nothing it was for can happen any more.
    #[error("the payload of process {0} cannot be opened: its aggregate's data key is gone")]
    KeyGone(Uuid),
    #[error("the payload of process {0} is unreadable: {1}")]
    Payload(Uuid, String),
}

/// An interrupted process, ready to run again.
#[derive(Debug, Clone, Copy)]
pub struct Due {
    pub id: Uuid,
    pub aggregate_id: Uuid,
    pub attempts: i32,
}

/// The most a failed process waits before it runs again.
const MAX_BACKOFF: Duration = Duration::from_secs(600);

/// The wait after the `attempts`-th failed run: 5 s, doubling, at most [`MAX_BACKOFF`].
pub fn backoff(attempts: i32) -> Duration {
    Duration::from_secs(5).saturating_mul(1 << attempts.clamp(0, 16) as u32).min(MAX_BACKOFF)
}

/// The processes of one service.
#[derive(Clone)]
pub struct Processes {
    pool: PgPool,
    vault: Vault,
}

impl Processes {
    pub fn new(pool: PgPool, vault: Vault) -> Self {
        Self { pool, vault }
    }

    fn aad(kind: &str, id: Uuid) -> Vec<u8> {
        format!("keel:process:{kind}:{id}").into_bytes()
    }

    /// Records the process `id` of `kind` on `aggregate_id` (in `partition`) before its first
    /// step, claimed for `lease` by the caller, who runs it. A process begun already (a retried
    /// command) is not begun again: its first payload is returned, which the caller runs.
    pub async fn begin<P: Serialize + DeserializeOwned>(
        &self,
        kind: &'static str,
        id: Uuid,
        (aggregate_id, partition): (Uuid, i32),
        payload: P,
        sealing: Sealing,
        lease: Duration,
    ) -> Result<P, ProcessError> {
        let json = serde_json::to_vec(&payload).map_err(|error| ProcessError::Payload(id, error.to_string()))?;
        let stored = match sealing {
            Sealing::Sealed => self.vault.ensure(aggregate_id).await?.seal(&Self::aad(kind, id), &json),
            Sealing::Plain => json,
        };
        let inserted = sqlx::query(
            "INSERT INTO command_processes (id, kind, aggregate_id, partition, payload, sealed, claimed_until)
             VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7))
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(kind)
        .bind(aggregate_id)
        .bind(partition)
        .bind(stored)
        .bind(sealing == Sealing::Sealed)
        .bind(lease.as_secs_f64())
        .execute(&self.pool)
        .await?
        .rows_affected();
        if inserted == 1 {
            return Ok(payload);
        }
        let row: Option<(Uuid, Vec<u8>, bool)> =
            sqlx::query_as("SELECT aggregate_id, payload, sealed FROM command_processes WHERE id = $1 AND kind = $2")
                .bind(id)
                .bind(kind)
                .fetch_optional(&self.pool)
                .await?;
        match row {
            Some(row) => self.open(kind, id, row).await,
            // Begun and finished meanwhile: this run repeats its steps, which answer with their
            // first results.
            None => Ok(payload),
        }
    }

    async fn open<P: DeserializeOwned>(
        &self,
        kind: &str,
        id: Uuid,
        (aggregate_id, payload, sealed): (Uuid, Vec<u8>, bool),
    ) -> Result<P, ProcessError> {
        let json = if sealed {
            let key = match self.vault.get(aggregate_id).await {
                Ok(Some(key)) => key,
                Ok(None) | Err(VaultError::Shredded) => return Err(ProcessError::KeyGone(id)),
                Err(error) => return Err(error.into()),
            };
            key.open(&Self::aad(kind, id), &payload).map_err(|error| ProcessError::Payload(id, error.to_string()))?
        } else {
            payload
        };
        serde_json::from_slice(&json).map_err(|error| ProcessError::Payload(id, error.to_string()))
    }

    /// The process is complete (or undone, or can no longer happen): it is forgotten.
    pub async fn finish(&self, id: Uuid) -> Result<(), ProcessError> {
        sqlx::query("DELETE FROM command_processes WHERE id = $1").bind(id).execute(&self.pool).await?;
        Ok(())
    }

    /// A run of the process failed without an answer after `attempts` earlier ones: it runs
    /// again after [`backoff`].
    pub async fn failed(&self, id: Uuid, attempts: i32, error: &str) -> Result<(), ProcessError> {
        sqlx::query(
            "UPDATE command_processes SET attempts = attempts + 1, last_error = $2,
                 claimed_until = now() + make_interval(secs => $3)
             WHERE id = $1",
        )
        .bind(id)
        .bind(error)
        .bind(backoff(attempts).as_secs_f64())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Processes of `kind` in `partitions` whose claim ran out: interrupted (or failed and past
    /// their backoff), oldest first.
    pub async fn due(&self, kind: &'static str, partitions: &[i32], limit: i64) -> Result<Vec<Due>, ProcessError> {
        let rows: Vec<(Uuid, Uuid, i32)> = sqlx::query_as(
            "SELECT id, aggregate_id, attempts FROM command_processes
             WHERE kind = $1 AND partition = ANY($2) AND claimed_until < now()
             ORDER BY started_at LIMIT $3",
        )
        .bind(kind)
        .bind(partitions)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(id, aggregate_id, attempts)| Due { id, aggregate_id, attempts }).collect())
    }

    /// Claims the process `id` of `kind` for `lease` and opens its payload; `None` when another
    /// run holds it, or it is gone (complete).
    pub async fn claim<P: DeserializeOwned>(
        &self,
        kind: &'static str,
        id: Uuid,
        lease: Duration,
    ) -> Result<Option<P>, ProcessError> {
        let row: Option<(Uuid, Vec<u8>, bool)> = sqlx::query_as(
            "UPDATE command_processes SET claimed_until = now() + make_interval(secs => $3)
             WHERE id = $1 AND kind = $2 AND claimed_until < now()
             RETURNING aggregate_id, payload, sealed",
        )
        .bind(id)
        .bind(kind)
        .bind(lease.as_secs_f64())
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => self.open(kind, id, row).await.map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_processes_back_off_up_to_ten_minutes() {
        assert_eq!(backoff(0), Duration::from_secs(5));
        assert_eq!(backoff(3), Duration::from_secs(40));
        assert_eq!(backoff(20), MAX_BACKOFF);
        assert_eq!(backoff(-1), Duration::from_secs(5));
    }
}
