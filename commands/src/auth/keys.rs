//! The keys that sign access tokens, and their rotation without downtime.
//!
//! Keys live in PostgreSQL (`auth_signing_keys`), the private half wrapped with
//! `auth.key_encryption_key`, shared by every auth instance. A key is made `publish_ahead` before
//! it starts signing, so every gateway has it in its key set (refreshed more often than that)
//! before the first token it signs arrives. It signs until its successor activates, and stays in
//! the key set until the last token it signed has expired (`access_token_ttl` later, plus a
//! minute of clock skew). A day after that its row is deleted.

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context;
use chrono::{DateTime, Utc};
use ed25519_dalek::SigningKey;
use keel_topics::sealing::DataKey;
use serde_json::{Value, json};
use sqlx::{PgPool, Row};
use uuid::Uuid;

/// How the keys rotate.
#[derive(Debug, Clone)]
pub struct KeySettings {
    /// How long a key signs before the next one takes over.
    pub rotation: Duration,
    /// How long before it signs a key is published.
    pub publish_ahead: Duration,
    /// How long the tokens it signs live.
    pub access_ttl: Duration,
}

const SKEW: Duration = Duration::from_secs(60);
const KEEP_RETIRED: Duration = Duration::from_secs(24 * 3600);

#[derive(Clone)]
struct StoredKey {
    kid: String,
    signing: SigningKey,
    activates_at: DateTime<Utc>,
}

pub struct SigningKeys {
    pool: PgPool,
    kek: DataKey,
    settings: KeySettings,
    /// Oldest first.
    keys: RwLock<Vec<StoredKey>>,
}

impl SigningKeys {
    /// Loads the keys, making the first one if there is none that signs now.
    pub async fn load(pool: PgPool, kek: DataKey, settings: KeySettings) -> anyhow::Result<Arc<Self>> {
        let keys = Arc::new(Self { pool, kek, settings, keys: RwLock::new(Vec::new()) });
        keys.reload().await?;
        if keys.signer().is_none() {
            create_key(&keys.pool, &keys.kek, Duration::ZERO, Unless::OneSigns).await?;
            keys.reload().await?;
        }
        Ok(keys)
    }

    async fn reload(&self) -> anyhow::Result<()> {
        let rows = sqlx::query(
            "SELECT kid, wrapped_private_key, activates_at FROM auth_signing_keys ORDER BY activates_at, kid",
        )
        .fetch_all(&self.pool)
        .await
        .context("failed to load the signing keys")?;
        let mut keys = Vec::with_capacity(rows.len());
        for row in rows {
            let kid: String = row.get(0);
            let wrapped: Vec<u8> = row.get(1);
            let private = self.kek.open(kid.as_bytes(), &wrapped).map_err(|_| {
                anyhow::anyhow!("signing key {kid} does not open with auth.key_encryption_key (was it changed?)")
            })?;
            let private: [u8; 32] =
                private.try_into().map_err(|_| anyhow::anyhow!("signing key {kid} is not 32 bytes"))?;
            keys.push(StoredKey { kid, signing: SigningKey::from_bytes(&private), activates_at: row.get(2) });
        }
        *self.keys.write().unwrap_or_else(std::sync::PoisonError::into_inner) = keys;
        Ok(())
    }

    /// Reloads, makes the next key when the current one has signed long enough, and deletes
    /// keys retired long ago. Every instance runs it; they agree through a lock.
    pub async fn maintain(&self) -> anyhow::Result<()> {
        self.reload().await?;
        let newest =
            self.keys.read().unwrap_or_else(std::sync::PoisonError::into_inner).last().map(|key| key.activates_at);
        let due = newest.is_none_or(|activates_at| activates_at + self.settings.rotation <= Utc::now());
        if due && create_key(&self.pool, &self.kek, self.settings.publish_ahead, Unless::OnePending).await?.is_some() {
            self.reload().await?;
        }
        let horizon = chrono::Duration::from_std(self.settings.access_ttl + SKEW + KEEP_RETIRED)?;
        sqlx::query(
            "DELETE FROM auth_signing_keys k WHERE EXISTS (
                 SELECT 1 FROM auth_signing_keys successor
                 WHERE successor.activates_at > k.activates_at AND successor.activates_at + $1 < now())",
        )
        .bind(horizon)
        .execute(&self.pool)
        .await
        .context("failed to delete retired signing keys")?;
        Ok(())
    }

    /// The key that signs now: the newest one already active.
    pub fn signer(&self) -> Option<(String, SigningKey)> {
        let now = Utc::now();
        let keys = self.keys.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        keys.iter().rev().find(|key| key.activates_at <= now).map(|key| (key.kid.clone(), key.signing.clone()))
    }

    /// The key set gateways verify with: the keys that sign now or will soon, and those whose
    /// tokens may still be alive.
    pub fn jwks(&self) -> Value {
        let now = Utc::now();
        let tail = chrono::Duration::from_std(self.settings.access_ttl + SKEW).unwrap_or(chrono::TimeDelta::MAX);
        let keys = self.keys.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let published: Vec<Value> = keys
            .iter()
            .enumerate()
            .filter(|(index, _)| {
                // Retired once its successor has signed for longer than a token lives.
                keys[index + 1..]
                    .iter()
                    .find(|next| next.activates_at <= now)
                    .is_none_or(|next| next.activates_at + tail > now)
            })
            .map(|(_, key)| keel_proto::token::jwk(&key.kid, &key.signing.verifying_key()))
            .collect();
        json!({ "keys": published })
    }
}

/// When not to make a key: another instance may have just made the one needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unless {
    /// A key signs already (the first start).
    OneSigns,
    /// A key waits to sign (a rotation).
    OnePending,
    /// Make one whatever there is (`keel auth rotate-keys`).
    Never,
}

/// Makes a key that starts signing `ahead` from now, unless `unless` holds. Returns its id if it
/// made one.
pub async fn create_key(
    pool: &PgPool,
    kek: &DataKey,
    ahead: Duration,
    unless: Unless,
) -> anyhow::Result<Option<String>> {
    let mut transaction = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('keel-auth-signing-keys'))").execute(&mut *transaction).await?;
    let exists = match unless {
        Unless::OneSigns => Some("SELECT EXISTS (SELECT 1 FROM auth_signing_keys WHERE activates_at <= now())"),
        Unless::OnePending => Some("SELECT EXISTS (SELECT 1 FROM auth_signing_keys WHERE activates_at > now())"),
        Unless::Never => None,
    };
    if let Some(exists) = exists
        && sqlx::query_scalar::<_, bool>(exists).fetch_one(&mut *transaction).await?
    {
        return Ok(None);
    }
    let kid = format!("k{}", Uuid::now_v7().simple());
    let mut private = [0; 32];
    getrandom::fill(&mut private).map_err(|error| anyhow::anyhow!("no random bytes: {error}"))?;
    let signing = SigningKey::from_bytes(&private);
    let wrapped = kek.seal(kid.as_bytes(), &private);
    sqlx::query(
        "INSERT INTO auth_signing_keys (kid, wrapped_private_key, public_key, activates_at)
         VALUES ($1, $2, $3, now() + $4)",
    )
    .bind(&kid)
    .bind(&wrapped)
    .bind(signing.verifying_key().to_bytes().as_slice())
    .bind(chrono::Duration::from_std(ahead)?)
    .execute(&mut *transaction)
    .await
    .context("failed to store a signing key")?;
    transaction.commit().await?;
    tracing::info!(kid, ahead_secs = ahead.as_secs(), "made a signing key");
    Ok(Some(kid))
}
