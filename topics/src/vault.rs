//! The keys that seal personal data in the log, one per person, kept in PostgreSQL outside it.
//!
//! A data key is stored wrapped (AES-256-GCM) with the installation's master key
//! (`personal_data.master_key`), so a copy of the database alone opens nothing. Shredding a key
//! keeps its row as a tombstone without the key: a shredded person never gets a key again, so
//! nothing written later can be read with a key that once was erased.

use std::{sync::Arc, time::Duration};

use keel_runtime::Secret;
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::{
    CommitHeader, Decoded, Topic,
    sealing::{self, DataKey, SealError},
};

/// The `personal_data` section of the configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PersonalDataConfig {
    /// 32 random bytes, base64: wraps every data key. Losing it loses every sealed field; it must
    /// be the same for every role of an installation. Unset: a fixed development key, and every
    /// role using it says so at start.
    pub master_key: Option<Secret>,
}

/// For development only.
const DEVELOPMENT_MASTER_KEY: &str = "a2VlbC1kZXZlbG9wbWVudC1tYXN0ZXIta2V5LTAwMDE=";

impl PersonalDataConfig {
    pub fn validate(&self) -> Result<(), keel_runtime::ConfigError> {
        keel_runtime::config::ensure(
            self.master_key().is_ok(),
            "personal_data.master_key",
            "must be 32 bytes, base64-encoded (e.g. `openssl rand -base64 32`)",
        )
    }

    fn master_key(&self) -> Result<DataKey, ()> {
        let text = self.master_key.as_ref().map_or(DEVELOPMENT_MASTER_KEY, Secret::expose);
        DataKey::from_base64(text).ok_or(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("the key store is unavailable: {0}")]
    Database(#[from] sqlx::Error),
    #[error("the person's key was erased")]
    Shredded,
    #[error("a stored key does not open with the master key (was personal_data.master_key changed?)")]
    WrongMasterKey,
    #[error(transparent)]
    Seal(#[from] SealError),
}

impl From<VaultError> for crate::CodecError {
    /// A sealed field that does not open is an unreadable record; anything else is the key
    /// store failing, which waiting can fix (or an operator, for a wrong master key).
    fn from(error: VaultError) -> Self {
        match error {
            VaultError::Seal(error) => Self::Shape(error.to_string()),
            other => Self::Keys(other.to_string()),
        }
    }
}

/// How a sealed commit came out of [`Vault::open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// Its sensitive fields are in the clear now (or were never sealed).
    Clear,
    /// Its aggregate's key was erased: its sensitive fields stay unreadable.
    Forgotten,
}

/// The store of data keys, with a cache in front (keys never change; a shredded key is cached as
/// absent, and a cached key is dropped after a few minutes so that one shredded elsewhere is
/// not kept in this process's memory for long).
#[derive(Clone)]
pub struct Vault {
    pool: PgPool,
    master: Arc<DataKey>,
    cache: moka::sync::Cache<Uuid, Option<DataKey>>,
}

const CACHE_ENTRIES: u64 = 100_000;
const CACHE_TTL: Duration = Duration::from_secs(300);

impl Vault {
    pub fn new(pool: PgPool, config: &PersonalDataConfig) -> Result<Self, keel_runtime::ConfigError> {
        config.validate()?;
        if config.master_key.is_none() {
            tracing::warn!(
                "personal_data.master_key is not set: using the development key; set your own outside development"
            );
        }
        let master = config.master_key().expect("validated above");
        let cache = moka::sync::Cache::builder().max_capacity(CACHE_ENTRIES).time_to_live(CACHE_TTL).build();
        Ok(Self { pool, master: Arc::new(master), cache })
    }

    /// The key of `subject`, made now if it has none yet. Fails for a subject whose key was
    /// shredded: nothing new is ever sealed for them.
    pub async fn ensure(&self, subject: Uuid) -> Result<DataKey, VaultError> {
        if let Some(cached) = self.cache.get(&subject) {
            return cached.ok_or(VaultError::Shredded);
        }
        let fresh = DataKey::generate();
        let wrapped = self.master.seal(subject.as_bytes(), fresh.as_bytes());
        sqlx::query(
            "INSERT INTO personal_data_keys (subject, wrapped_key) VALUES ($1, $2) ON CONFLICT (subject) DO NOTHING",
        )
        .bind(subject)
        .bind(&wrapped)
        .execute(&self.pool)
        .await?;
        self.get(subject).await?.ok_or(VaultError::Shredded)
    }

    /// The key of `subject`; `None` when it was shredded or never made.
    pub async fn get(&self, subject: Uuid) -> Result<Option<DataKey>, VaultError> {
        if let Some(cached) = self.cache.get(&subject) {
            return Ok(cached);
        }
        let wrapped: Option<Option<Vec<u8>>> =
            sqlx::query_scalar("SELECT wrapped_key FROM personal_data_keys WHERE subject = $1")
                .bind(subject)
                .fetch_optional(&self.pool)
                .await?;
        // A key that was never made is not cached: a reader may race its creation.
        let Some(row) = wrapped else { return Ok(None) };
        let key = row.map(|wrapped| self.unwrap(subject, &wrapped)).transpose()?;
        self.cache.insert(subject, key.clone());
        Ok(key)
    }

    /// Loads the keys of `subjects` not cached yet, in one query (a reader's batch).
    pub async fn prefetch(&self, subjects: &[Uuid]) -> Result<(), VaultError> {
        let mut missing: Vec<Uuid> =
            subjects.iter().filter(|subject| !self.cache.contains_key(*subject)).copied().collect();
        missing.sort_unstable();
        missing.dedup();
        if missing.is_empty() {
            return Ok(());
        }
        let rows: Vec<(Uuid, Option<Vec<u8>>)> =
            sqlx::query_as("SELECT subject, wrapped_key FROM personal_data_keys WHERE subject = ANY($1)")
                .bind(&missing)
                .fetch_all(&self.pool)
                .await?;
        for (subject, wrapped) in rows {
            let key = wrapped.map(|wrapped| self.unwrap(subject, &wrapped)).transpose()?;
            self.cache.insert(subject, key);
        }
        Ok(())
    }

    fn unwrap(&self, subject: Uuid, wrapped: &[u8]) -> Result<DataKey, VaultError> {
        let bytes = self.master.open(subject.as_bytes(), wrapped).map_err(|_| VaultError::WrongMasterKey)?;
        Ok(DataKey::from_bytes(bytes.try_into().map_err(|_| VaultError::WrongMasterKey)?))
    }

    /// Erases the key of `subject` for good. Idempotent.
    pub async fn shred(&self, subject: Uuid) -> Result<(), VaultError> {
        shred_in(&mut *self.pool.acquire().await?, subject).await?;
        self.forget(subject);
        Ok(())
    }

    /// Drops `subject`'s key from this process's cache (it was shredded elsewhere).
    pub fn forget(&self, subject: Uuid) {
        self.cache.insert(subject, None);
    }

    /// Seals the sensitive fields of a commit value of `topic` for `aggregate_id`, if the topic
    /// is sealed; whether it did, for the header.
    pub async fn seal(
        &self,
        topic: Topic,
        aggregate_id: Uuid,
        value: &mut apache_avro::types::Value,
    ) -> Result<bool, VaultError> {
        if !topic.spec().sealed {
            return Ok(false);
        }
        let key = self.ensure(aggregate_id).await?;
        sealing::seal_commit(topic, aggregate_id, value, &key)?;
        Ok(true)
    }

    /// Opens the sensitive fields of a decoded commit in place.
    pub async fn open(&self, header: &CommitHeader, decoded: &mut Decoded) -> Result<Opened, VaultError> {
        if !header.sealed {
            return Ok(Opened::Clear);
        }
        let Some(key) = self.get(header.aggregate_id).await? else { return Ok(Opened::Forgotten) };
        for event in &mut decoded.events {
            sealing::open_event(header.aggregate_id, event, &key)?;
        }
        Ok(Opened::Clear)
    }
}

/// Erases the key of `subject` inside a transaction (a projection's, so that the erasure and the
/// rows it empties commit together). Idempotent.
pub async fn shred_in(connection: &mut PgConnection, subject: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO personal_data_keys (subject, wrapped_key, shredded_at) VALUES ($1, NULL, now())
         ON CONFLICT (subject) DO UPDATE SET wrapped_key = NULL, shredded_at = coalesce(personal_data_keys.shredded_at, now())",
    )
    .bind(subject)
    .execute(connection)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_master_key_must_be_32_bytes_of_base64() {
        assert!(PersonalDataConfig::default().validate().is_ok());
        for bad in ["", "not base64!", "c2hvcnQ="] {
            let config = PersonalDataConfig { master_key: Some(Secret::new(bad)) };
            assert!(config.validate().is_err(), "{bad:?}");
        }
    }
}
