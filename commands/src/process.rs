//! Processes: commands whose effect takes steps in more than one service, made to complete even
//! when the instance running one dies between its steps.
//!
//! A process is written to PostgreSQL (`command_processes`) before its first step and deleted
//! after its last. Each step is a command with an id of its own, derived from the process's
//! command id ([`crate::CommandMeta::step`]), so running a step again returns its first result
//! instead of acting twice. A process still stored after its command's deadline was interrupted:
//! the owner of its aggregate's partition claims it for a while and runs its steps again, until
//! it completes, or is undone when a step is refused. Nothing is ever left half-done for longer
//! than that.
//!
//! What a process stores can hold personal data (a registration's email and password hash): it
//! is then sealed with the aggregate's data key, which an erasure shreds.

use std::time::Duration;

use keel_topics::Vault;
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
    Key(#[from] keel_topics::vault::VaultError),
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

    /// Stores the process `id` of `kind` before its first step. Beginning one that is stored
    /// already (a retried command) keeps the first.
    pub async fn begin<P: Serialize>(
        &self,
        kind: &'static str,
        id: Uuid,
        aggregate_id: Uuid,
        payload: &P,
        sealing: Sealing,
    ) -> Result<(), ProcessError> {
        let json = serde_json::to_vec(payload).map_err(|error| ProcessError::Payload(id, error.to_string()))?;
        let stored = match sealing {
            Sealing::Sealed => self.vault.ensure(aggregate_id).await?.seal(&Self::aad(kind, id), &json),
            Sealing::Plain => json,
        };
        sqlx::query(
            "INSERT INTO command_processes (id, kind, aggregate_id, payload, sealed) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(kind)
        .bind(aggregate_id)
        .bind(stored)
        .bind(sealing == Sealing::Sealed)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The process is complete (or undone): it is forgotten.
    pub async fn finish(&self, id: Uuid) -> Result<(), ProcessError> {
        sqlx::query("DELETE FROM command_processes WHERE id = $1").bind(id).execute(&self.pool).await?;
        Ok(())
    }

    /// A run of the process failed without an answer; it is run again later.
    pub async fn failed(&self, id: Uuid, error: &str) -> Result<(), ProcessError> {
        sqlx::query(
            "UPDATE command_processes SET attempts = attempts + 1, last_error = $2, claimed_until = NULL
             WHERE id = $1",
        )
        .bind(id)
        .bind(error)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Processes of `kind` begun more than `older_than` ago and not claimed now: interrupted
    /// ones, oldest first.
    pub async fn due(&self, kind: &'static str, older_than: Duration, limit: i64) -> Result<Vec<Due>, ProcessError> {
        let rows: Vec<(Uuid, Uuid, i32)> = sqlx::query_as(
            "SELECT id, aggregate_id, attempts FROM command_processes
             WHERE kind = $1 AND started_at < now() - make_interval(secs => $2)
               AND (claimed_until IS NULL OR claimed_until < now())
             ORDER BY started_at LIMIT $3",
        )
        .bind(kind)
        .bind(older_than.as_secs_f64())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(id, aggregate_id, attempts)| Due { id, aggregate_id, attempts }).collect())
    }

    /// Claims the process `id` of `kind` for `lease` and opens its payload; `None` when another
    /// instance holds it, or it is gone (complete).
    pub async fn claim<P: DeserializeOwned>(
        &self,
        kind: &'static str,
        id: Uuid,
        lease: Duration,
    ) -> Result<Option<P>, ProcessError> {
        let row: Option<(Uuid, Vec<u8>, bool)> = sqlx::query_as(
            "UPDATE command_processes SET claimed_until = now() + make_interval(secs => $3)
             WHERE id = $1 AND kind = $2 AND (claimed_until IS NULL OR claimed_until < now())
             RETURNING aggregate_id, payload, sealed",
        )
        .bind(id)
        .bind(kind)
        .bind(lease.as_secs_f64())
        .fetch_optional(&self.pool)
        .await?;
        let Some((aggregate_id, payload, sealed)) = row else { return Ok(None) };
        let json = if sealed {
            let key = self.vault.get(aggregate_id).await?.ok_or(ProcessError::KeyGone(id))?;
            key.open(&Self::aad(kind, id), &payload).map_err(|error| ProcessError::Payload(id, error.to_string()))?
        } else {
            payload
        };
        serde_json::from_slice(&json).map(Some).map_err(|error| ProcessError::Payload(id, error.to_string()))
    }
}
