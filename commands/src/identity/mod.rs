//! The identity command service: users (registration, profile, email, deactivation, erasure of
//! personal data), on the shared write path, with unique email addresses ([`claims`]).

mod claims;
mod grpc;
mod model;

use keel_proto::identity::v1::identity_commands_server::IdentityCommandsServer;
use keel_runtime::{KafkaConfig, Lifecycle, Secret, config::ensure};
use keel_topics::{PersonalDataConfig, Vault};
use sqlx::PgPool;
use tokio::net::TcpListener;

pub use claims::{Claimed, EmailClaims};
pub use model::Users;

use crate::service::ServiceBuilder;

/// For development only.
const DEVELOPMENT_EMAIL_KEY: &str = "keel-development-email-key";

crate::command_service_config! {
    /// The `identity` section of the configuration.
    IdentityConfig { grpc: "127.0.0.1:50051", admin: "127.0.0.1:9101" }
    {
        /// The HMAC key of email reservations. The same for every instance, and never changed
        /// (reservations are found by it). Unset: a fixed development key, with a warning.
        email_key: Option<Secret> = None,
        /// How old an email reservation must be before another user may take it over, when its
        /// holder does not hold the address (an interrupted command). Well above
        /// `command_timeout_ms`.
        claim_takeover_secs: u64 = 30,
    }
}

impl IdentityConfig {
    pub fn validate(&self) -> Result<(), keel_runtime::ConfigError> {
        self.service().validate("identity")?;
        ensure(
            self.email_key.as_ref().is_none_or(|key| !key.expose().is_empty()),
            "identity.email_key",
            "must not be empty",
        )?;
        ensure(
            self.claim_takeover_secs * 1000 >= 2 * self.command_timeout_ms,
            "identity.claim_takeover_secs",
            "must be at least twice identity.command_timeout_ms",
        )
    }
}

/// Starts the identity service: admin endpoints, gRPC (it forwards or refuses until partitions
/// are loaded) and the write path, which owns, loads and serves partitions as the group assigns
/// them.
#[allow(clippy::too_many_arguments)]
pub async fn start(
    config: &IdentityConfig,
    personal_data: &PersonalDataConfig,
    kafka_config: &KafkaConfig,
    registry_url: &str,
    pool: PgPool,
    lifecycle: &mut Lifecycle,
    grpc_listener: TcpListener,
    admin_listener: TcpListener,
) -> anyhow::Result<()> {
    let email_key = match &config.email_key {
        Some(key) => key.expose(),
        None => {
            tracing::warn!(
                "identity.email_key is not set: using the development key; set your own outside development"
            );
            DEVELOPMENT_EMAIL_KEY
        }
    };
    let mut service = ServiceBuilder::new(
        "identity",
        config.service(),
        kafka_config,
        registry_url,
        pool.clone(),
        lifecycle,
        grpc_listener,
    )?;
    let vault = Vault::new(pool.clone(), personal_data)?;
    let users = service.engine(Users::new(vault)).await?;
    let claims = EmailClaims::new(pool, email_key);
    let grpc = grpc::IdentityGrpc::new(
        users,
        claims,
        config.service().command_timeout(),
        std::time::Duration::from_secs(config.claim_takeover_secs),
    );
    service.serve(admin_listener, tonic::service::Routes::new(IdentityCommandsServer::new(grpc)));
    Ok(())
}
