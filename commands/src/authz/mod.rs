//! The authz command service: roles, the roles granted to users, and `CheckPermission`, which
//! answers from the authz read model (the `authz` projection) plus the permissions every active
//! user has. Deny by default. The first admin comes from configuration: the service grants the
//! built-in `admin` role (`*`) to the users holding the configured emails, once they exist.

mod grpc;
mod model;

use std::time::Duration;

use keel_proto::authz::v1::{
    CreateRoleRequest, RoleGrantRequest, authz_client::AuthzClient, authz_server::AuthzServer,
};
use keel_runtime::config::ensure;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use uuid::Uuid;

pub use model::{Grants, Roles};

use crate::service::{CommandService, ServiceBuilder, ServiceSection};

/// What every active user may do without any role.
fn default_permissions() -> Vec<String> {
    [
        "users:read:own",
        "users:update:own",
        "users:deactivate:own",
        "users:erase:own",
        "posts:create:any",
        "posts:read:own",
        "posts:update:own",
        "posts:publish:own",
        "posts:delete:own",
        "comments:create:any",
        "comments:delete:own",
        "streams:read:own",
    ]
    .map(str::to_owned)
    .to_vec()
}

crate::command_service_config! {
    /// The `authz` section of the configuration.
    AuthzConfig { grpc: "127.0.0.1:50071", admin: "127.0.0.1:9121" }
    {
        /// Permissions every active user has, on top of their roles.
        default_permissions: Vec<String> = default_permissions(),
        /// The users holding these emails get the `admin` role (`*`) once they exist.
        bootstrap_admins: Vec<String> = Vec::new(),
    }
}

impl AuthzConfig {
    pub fn validate(&self) -> Result<(), keel_runtime::ConfigError> {
        self.service().validate("authz")?;
        for permission in &self.default_permissions {
            ensure(
                keel_domain::authz::Grant::parse(permission).is_ok(),
                "authz.default_permissions",
                "each must be *, or <resource>:<verb>[:any|:own]",
            )?;
        }
        for email in &self.bootstrap_admins {
            ensure(
                keel_domain::identity::Email::parse(email).is_ok(),
                "authz.bootstrap_admins",
                "each must be an email address",
            )?;
        }
        Ok(())
    }
}

/// The built-in role of the configured admins.
pub const ADMIN_ROLE: &str = "admin";

/// The authz service: roles, the roles of each user, and permission checks.
pub struct AuthzService;

impl CommandService for AuthzService {
    const NAME: &'static str = "authz";
    type Config = AuthzConfig;

    async fn build(config: &AuthzConfig, service: &mut ServiceBuilder<'_>) -> anyhow::Result<Routes> {
        let roles = service.engine(Roles).await?;
        let grants = service.engine(Grants).await?;
        let defaults = config
            .default_permissions
            .iter()
            .map(|text| keel_domain::authz::Grant::parse(text))
            .collect::<Result<_, _>>()
            .map_err(|error| anyhow::anyhow!("authz.default_permissions: {error}"))?;
        let pool = service.pool().clone();
        let grpc = grpc::AuthzGrpc { roles, grants, pool: pool.clone(), defaults, peers: service.peers() };
        let own_endpoint = service.local_endpoint()?;
        let token = service.lifecycle().token();
        let admins = config.bootstrap_admins.clone();
        service.lifecycle().spawn("authz bootstrap admins", bootstrap(own_endpoint, pool, admins, token));
        Ok(Routes::new(AuthzServer::new(grpc)))
    }
}

/// Namespace of the command ids of bootstrap commands: the same command every time, so each is
/// applied once however often the service starts.
const BOOTSTRAP_NAMESPACE: Uuid = Uuid::from_u128(0x6b65_656c_2d62_6f6f_7473_2d76_3100_0001);

fn metadata(name: &str) -> Option<keel_proto::common::v1::CommandMetadata> {
    let command_id = Uuid::new_v5(&BOOTSTRAP_NAMESPACE, name.as_bytes()).to_string();
    Some(keel_proto::common::v1::CommandMetadata {
        command_id: command_id.clone(),
        actor: "system:bootstrap".into(),
        correlation_id: command_id,
        traceparent: String::new(),
    })
}

/// Makes the `admin` role and grants it to each configured admin once their account exists,
/// through this instance's own gRPC surface (which routes to the partitions' owners).
/// Done, it waits for shutdown (a role's tasks run until then).
async fn bootstrap(
    endpoint: String,
    pool: PgPool,
    emails: Vec<String>,
    token: CancellationToken,
) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint)?.connect_lazy();
    let mut client = AuthzClient::new(channel);
    let mut pending: Vec<String> = emails;
    let mut role_made = false;
    while !pending.is_empty() {
        if !role_made {
            let request = CreateRoleRequest {
                metadata: metadata("role:admin"),
                name: ADMIN_ROLE.into(),
                permissions: vec!["*".into()],
            };
            match client.create_role(request).await {
                Ok(_) => role_made = true,
                Err(status) if status.code() == tonic::Code::AlreadyExists => role_made = true,
                Err(status) => tracing::debug!(code = ?status.code(), "bootstrap: the admin role is not made yet"),
            }
        }
        if role_made {
            let mut still = Vec::new();
            for email in pending {
                let user = keel_read_models::users::active_with_email(&pool, &email.trim().to_lowercase())
                    .await
                    .unwrap_or(None);
                let Some(user) = user else {
                    still.push(email);
                    continue;
                };
                let request = RoleGrantRequest {
                    metadata: metadata(&format!("grant:admin:{user}")),
                    user_id: user.to_string(),
                    role: ADMIN_ROLE.into(),
                };
                match client.grant_role(request).await {
                    Ok(_) => tracing::info!(%user, "bootstrap: granted the admin role"),
                    Err(status) => {
                        tracing::debug!(code = ?status.code(), "bootstrap: granting the admin role failed; retrying");
                        still.push(email);
                    }
                }
            }
            pending = still;
        }
        tokio::select! {
            () = token.cancelled() => return Ok(()),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    token.cancelled().await;
    Ok(())
}
