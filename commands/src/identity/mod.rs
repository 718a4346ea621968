//! The identity command service: users (registration, profile, email, deactivation, erasure of
//! personal data), on the shared write path, with unique email addresses ([`claims`]).

mod claims;
mod grpc;
mod model;
mod processes;

use std::{sync::Arc, time::Duration};

use keel_clients::Auth;
use keel_proto::identity::v1::identity_commands_server::IdentityCommandsServer;
use keel_runtime::{Secret, config::ensure};
use tonic::service::Routes;

pub use claims::{Claimed, EmailClaims};
pub use model::Users;

use crate::{
    process::Processes,
    service::{CommandService, ServiceBuilder, ServiceSection},
};

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
        /// Test-only: a registration or erasure stops for good between its two steps, so that a
        /// test can kill the instance there. Never set it in production.
        unsafe_pause_between_steps: bool = false,
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
        )?;
        Ok(())
    }
}

/// The identity service: users, with unique email addresses. Its gRPC server forwards or
/// refuses until partitions are loaded; the write path owns, loads and serves partitions as the
/// group assigns them.
pub struct IdentityService;

impl CommandService for IdentityService {
    const NAME: &'static str = "identity";
    type Config = IdentityConfig;

    async fn build(config: &IdentityConfig, service: &mut ServiceBuilder<'_>) -> anyhow::Result<Routes> {
        let email_key = match &config.email_key {
            Some(key) => key.expose(),
            None => {
                tracing::warn!(
                    "identity.email_key is not set: using the development key; set your own outside development"
                );
                DEVELOPMENT_EMAIL_KEY
            }
        };
        let users = service.engine(Users::new(service.vault())).await?;
        let timeout = service.settings().command_timeout();
        let grpc = Arc::new(grpc::IdentityGrpc {
            users,
            claims: EmailClaims::new(service.pool().clone(), email_key),
            peers: service.peers(),
            takeover_after: Duration::from_secs(config.claim_takeover_secs),
            // Registrations store passwords there, erasures remove them.
            auth: Auth::new(service.client("auth")),
            processes: Processes::new(service.pool().clone(), service.vault()),
            // Past the command's deadline: a process still claimed then was interrupted.
            process_lease: 2 * timeout,
            pause_between_steps: config.unsafe_pause_between_steps,
        });
        let token = service.lifecycle().token();
        service.lifecycle().spawn("identity processes", grpc.clone().recover(token));
        Ok(Routes::new(IdentityCommandsServer::from_arc(grpc)))
    }
}
