//! The gRPC surface of the authz service.

use std::{collections::BTreeSet, sync::Arc};

use keel_domain::{
    DomainError,
    authz::{Action, Decision, Grant, RoleCommand, RoleId, RoleName, UserRolesCommand, evaluate},
    identity::UserId,
};
use keel_proto::{
    authz::v1::{
        CheckPermissionReply, CheckPermissionRequest, CreateRoleRequest, Decision as WireDecision, GetRoleRequest,
        RoleGrantRequest, RoleState, SetRolePermissionsRequest, authz_client::AuthzClient, authz_server::Authz,
    },
    common::v1::CommandReply,
};
use keel_read_models::authz;
use sqlx::PgPool;
use tonic::{Request, Response, Status};

use super::{Grants, Roles};
use crate::{
    CommandError,
    engine::{Command, Engine, Location},
    forward::{Peers, forwarded, is_forwarded},
    grpc::{execute, expected_version, invalid, receive, uuid},
};

pub struct AuthzGrpc {
    pub roles: Arc<Engine<Roles>>,
    pub grants: Arc<Engine<Grants>>,
    /// For the authz read model.
    pub pool: PgPool,
    pub defaults: Vec<Grant>,
    pub peers: Peers,
}

fn role_name(text: &str) -> Result<RoleName, Status> {
    RoleName::parse(text).map_err(|error| invalid(error.to_string()))
}

fn grants(texts: &[String]) -> Result<BTreeSet<Grant>, Status> {
    texts.iter().map(|text| Grant::parse(text).map_err(|error| invalid(error.to_string()))).collect()
}

impl AuthzGrpc {
    /// Whether the role exists, as the owner of its partition knows it.
    async fn role_exists(&self, name: &RoleName) -> Result<bool, Status> {
        let id = RoleId::of(name);
        match self.roles.locate(id.as_uuid()).await {
            Location::Here => Ok(self.roles.read_here(id.as_uuid()).await?.state.is_defined()),
            Location::There(endpoint) => {
                let mut client = AuthzClient::new(self.peers.channel(&endpoint)?);
                let request = forwarded(GetRoleRequest { name: name.as_str().to_owned() });
                Ok(client.get_role(request).await?.into_inner().exists)
            }
            Location::Nowhere(error) => Err(error.into()),
        }
    }

    /// The permissions `subject` holds through roles, from the authz read model.
    async fn held(&self, subject: UserId) -> Result<Vec<Grant>, Status> {
        let rows = authz::permissions_of(&self.pool, subject.as_uuid()).await.map_err(|error| {
            tracing::error!(%error, "failed to read the authz read model");
            Status::from(CommandError::Unavailable("cannot check permissions now; retry".into()))
        })?;
        let mut held = self.defaults.clone();
        for text in rows.iter().flatten() {
            match Grant::parse(text) {
                Ok(grant) => held.push(grant),
                // Validated when the role was made; a row that does not parse grants nothing.
                Err(error) => tracing::warn!(permission = %text, %error, "ignoring an unreadable permission"),
            }
        }
        Ok(held)
    }
}

#[tonic::async_trait]
impl Authz for AuthzGrpc {
    #[tracing::instrument(skip_all, fields(command_id))]
    async fn create_role(&self, request: Request<CreateRoleRequest>) -> Result<Response<CommandReply>, Status> {
        let (forwarded_already, message, meta) = receive(request)?;
        let name = role_name(&message.name)?;
        let permissions = grants(&message.permissions)?;
        let id = RoleId::of(&name);
        let create = RoleCommand::Create { name, permissions };
        let local = || execute(&self.roles, Command::new(id.as_uuid(), meta, "CreateRole", create));
        let remote = |channel| async move { AuthzClient::new(channel).create_role(forwarded(message)).await };
        self.peers.route(&self.roles, id.as_uuid(), forwarded_already, local, remote).await.map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(command_id))]
    async fn set_role_permissions(
        &self,
        request: Request<SetRolePermissionsRequest>,
    ) -> Result<Response<CommandReply>, Status> {
        let (forwarded_already, message, meta) = receive(request)?;
        let id = RoleId::of(&role_name(&message.name)?);
        let permissions = grants(&message.permissions)?;
        let version = expected_version(message.expected_version)?;
        let set = Command::new(id.as_uuid(), meta, "SetRolePermissions", RoleCommand::SetPermissions { permissions });
        let local = || execute(&self.roles, set.expecting(version));
        let remote = |channel| async move { AuthzClient::new(channel).set_role_permissions(forwarded(message)).await };
        self.peers.route(&self.roles, id.as_uuid(), forwarded_already, local, remote).await.map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(command_id))]
    async fn grant_role(&self, request: Request<RoleGrantRequest>) -> Result<Response<CommandReply>, Status> {
        let (forwarded_already, message, meta) = receive(request)?;
        let user_id = UserId::from_uuid(uuid("user_id", &message.user_id)?);
        let name = role_name(&message.role)?;
        let local = || async move {
            if !self.role_exists(&name).await? {
                return Err(CommandError::from(DomainError::not_found(format!("no role `{}`", name.as_str()))).into());
            }
            let grant = UserRolesCommand::Grant { user_id, role_id: RoleId::of(&name) };
            execute(&self.grants, Command::new(user_id.as_uuid(), meta, "GrantRole", grant)).await
        };
        let remote = |channel| async move { AuthzClient::new(channel).grant_role(forwarded(message)).await };
        self.peers.route(&self.grants, user_id.as_uuid(), forwarded_already, local, remote).await.map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(command_id))]
    async fn revoke_role(&self, request: Request<RoleGrantRequest>) -> Result<Response<CommandReply>, Status> {
        let (forwarded_already, message, meta) = receive(request)?;
        let user_id = UserId::from_uuid(uuid("user_id", &message.user_id)?);
        let role_id = RoleId::of(&role_name(&message.role)?);
        let revoke = UserRolesCommand::Revoke { user_id, role_id };
        let local = || execute(&self.grants, Command::new(user_id.as_uuid(), meta, "RevokeRole", revoke));
        let remote = |channel| async move { AuthzClient::new(channel).revoke_role(forwarded(message)).await };
        self.peers.route(&self.grants, user_id.as_uuid(), forwarded_already, local, remote).await.map(Response::new)
    }

    async fn check_permission(
        &self,
        request: Request<CheckPermissionRequest>,
    ) -> Result<Response<CheckPermissionReply>, Status> {
        let message = request.into_inner();
        let subject = UserId::from_uuid(uuid("subject", &message.subject)?);
        let action = Action::parse(&message.action).map_err(|error| invalid(error.to_string()))?;
        let owner = message.owner.as_deref().map(|owner| uuid("owner", owner)).transpose()?.map(UserId::from_uuid);
        let decision = evaluate(&self.held(subject).await?, &action, subject, owner);
        metrics::counter!("keel_authz_checks_total", "decision" => match decision {
            Decision::Deny => "deny",
            Decision::AllowOwn => "allow_own",
            Decision::Allow => "allow",
        })
        .increment(1);
        let decision = match decision {
            Decision::Deny => WireDecision::Deny,
            Decision::AllowOwn => WireDecision::AllowOwn,
            Decision::Allow => WireDecision::Allow,
        };
        Ok(Response::new(CheckPermissionReply { decision: decision.into() }))
    }

    async fn get_role(&self, request: Request<GetRoleRequest>) -> Result<Response<RoleState>, Status> {
        let forwarded_already = is_forwarded(&request);
        let message = request.into_inner();
        let id = RoleId::of(&role_name(&message.name)?);
        let local = || async move {
            let outcome = self.roles.read_here(id.as_uuid()).await?;
            Ok(RoleState { exists: outcome.state.is_defined(), version: outcome.accepted.version as i64 })
        };
        let remote = |channel| async move { AuthzClient::new(channel).get_role(forwarded(message)).await };
        self.peers.route(&self.roles, id.as_uuid(), forwarded_already, local, remote).await.map(Response::new)
    }
}
