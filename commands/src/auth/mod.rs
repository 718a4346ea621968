//! The auth command service: passwords (Argon2id), sessions with rotating refresh tokens and
//! reuse detection, and the keys that sign access tokens (EdDSA JWTs, rotated without downtime).

mod grpc;
pub mod keys;
mod model;
pub mod passwords;

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use keel_proto::auth::v1::auth_server::AuthServer;
use keel_runtime::{Secret, config::ensure};
use keel_topics::sealing::DataKey;
use tonic::service::Routes;

pub use keys::{KeySettings, SigningKeys};
pub use model::{CredentialStore, Sessions};
pub use passwords::Argon2Config;

use crate::service::{CommandService, ServiceBuilder, ServiceSection};

/// For development only; the role says so at start.
const DEVELOPMENT_KEY_ENCRYPTION_KEY: &str = "a2VlbC1kZXZlbG9wbWVudC1zaWduaW5nLWtleS0wMDE=";

crate::command_service_config! {
    /// The `auth` section of the configuration.
    AuthConfig { grpc: "127.0.0.1:50061", admin: "127.0.0.1:9111" }
    {
        /// `iss` of access tokens; gateways check it.
        issuer: String = "keel".into(),
        /// `aud` of access tokens; gateways check it.
        audience: String = "keel".into(),
        access_token_ttl_secs: u64 = 300,
        /// How long a session (and every refresh token of it) lives after login.
        session_ttl_secs: u64 = 30 * 24 * 3600,
        /// How long a signing key signs before the next one takes over.
        key_rotation_secs: u64 = 24 * 3600,
        /// How long before it signs a new key is published; above the gateways' JWKS refresh.
        key_publish_ahead_secs: u64 = 120,
        /// 32 bytes, base64: wraps the private signing keys stored in PostgreSQL. Unset: a fixed
        /// development key, with a warning.
        key_encryption_key: Option<Secret> = None,
        argon2: Argon2Config = Argon2Config::default(),
    }
}

impl AuthConfig {
    pub fn validate(&self) -> Result<(), keel_runtime::ConfigError> {
        self.service().validate("auth")?;
        ensure(self.access_token_ttl_secs > 0, "auth.access_token_ttl_secs", "must be positive")?;
        ensure(self.session_ttl_secs > 0, "auth.session_ttl_secs", "must be positive")?;
        ensure(self.key_rotation_secs > 0, "auth.key_rotation_secs", "must be positive")?;
        ensure(
            self.kek().is_some(),
            "auth.key_encryption_key",
            "must be 32 bytes, base64-encoded (e.g. `openssl rand -base64 32`)",
        )?;
        ensure(self.argon2.params().is_ok(), "auth.argon2", "is not a valid Argon2 cost (memory_kib ≥ 8 × parallelism)")
    }

    pub fn kek(&self) -> Option<DataKey> {
        DataKey::from_base64(self.key_encryption_key.as_ref().map_or(DEVELOPMENT_KEY_ENCRYPTION_KEY, Secret::expose))
    }

    pub fn key_settings(&self) -> KeySettings {
        KeySettings {
            rotation: Duration::from_secs(self.key_rotation_secs),
            publish_ahead: Duration::from_secs(self.key_publish_ahead_secs),
            access_ttl: Duration::from_secs(self.access_token_ttl_secs),
        }
    }
}

/// What goes into the tokens auth hands out.
#[derive(Debug, Clone)]
pub struct TokenSettings {
    pub issuer: String,
    pub audience: String,
    pub access_ttl: Duration,
    pub session_ttl: Duration,
}

/// The auth service: credentials, sessions and signing keys.
pub struct AuthService;

impl CommandService for AuthService {
    const NAME: &'static str = "auth";
    type Config = AuthConfig;

    async fn build(config: &AuthConfig, service: &mut ServiceBuilder<'_>) -> anyhow::Result<Routes> {
        if config.key_encryption_key.is_none() {
            tracing::warn!(
                "auth.key_encryption_key is not set: using the development key; set your own outside development"
            );
        }
        let kek = config.kek().context("auth.key_encryption_key is validated with the configuration")?;
        let pool = service.pool().clone();
        let keys = SigningKeys::load(pool.clone(), kek, config.key_settings()).await?;
        let credentials = service.engine(CredentialStore::new(service.vault())).await?;
        let sessions = service.engine(Sessions).await?;
        let maintained = keys.clone();
        let token = service.lifecycle().token();
        service.lifecycle().spawn("auth signing keys", async move {
            loop {
                if let Err(error) = maintained.maintain().await {
                    tracing::error!(error = %format!("{error:#}"), "failed to maintain the signing keys; retrying");
                }
                tokio::select! {
                    () = token.cancelled() => return Ok(()),
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        });
        let tokens = TokenSettings {
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            access_ttl: Duration::from_secs(config.access_token_ttl_secs),
            session_ttl: Duration::from_secs(config.session_ttl_secs),
        };
        let grpc = grpc::AuthGrpc {
            credentials,
            sessions,
            keys: Arc::clone(&keys),
            hasher: passwords::Hasher::new(&config.argon2)?,
            pool,
            peers: service.peers(),
            tokens,
        };
        Ok(Routes::new(AuthServer::new(grpc)))
    }
}
