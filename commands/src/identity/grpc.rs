//! The gRPC surface of the identity service and the conversions between wire and domain types.
//! A call for a user whose partition is owned elsewhere is forwarded once to the owner, which
//! runs it whole (the email reservation included).

use std::{sync::Arc, time::Duration};

use keel_clients::Auth;
use keel_domain::{
    DomainError,
    auth::Password,
    identity::{AccountStatus, Bio, ChangeEmail, DisplayName, Email, UpdateProfile, User, UserCommand, UserId},
};
use keel_proto::{
    common::v1::CommandReply,
    identity::v1::{
        ChangeEmailRequest, GetUserRequest, RegisterUserRequest, UpdateProfileRequest, UserCommandRequest, UserState,
        identity_commands_client::IdentityCommandsClient, identity_commands_server::IdentityCommands,
    },
};
use tonic::{Request, Response, Status};

use super::{
    claims::{Claimed, EmailClaims},
    model::Users,
};
use crate::{
    CommandError, CommandMeta,
    engine::{Command, Engine, Location, Outcome},
    forward::{Peers, forwarded, is_forwarded},
    grpc::{execute, expected_version, invalid, receive, reply, uuid},
    process::Processes,
};

pub struct IdentityGrpc {
    pub(super) users: Arc<Engine<Users>>,
    pub(super) claims: EmailClaims,
    pub(super) peers: Peers,
    pub(super) takeover_after: Duration,
    /// Where registrations store passwords and erasures remove them.
    pub(super) auth: Auth,
    /// Registrations and erasures under way.
    pub(super) processes: Processes,
    /// How long a run holds a process: past the command's deadline.
    pub(super) process_lease: Duration,
    /// Test-only: a process stops between its steps (to be killed there).
    pub(super) pause_between_steps: bool,
}

impl IdentityGrpc {
    /// Reserves `email` for `user`, taking over a reservation that outlived its command.
    pub(super) async fn reserve(&self, email: &Email, user: UserId) -> Result<(), Status> {
        let Claimed::Taken { holder, age_secs } = self.claims.claim(email, user).await.map_err(storage)? else {
            return Ok(());
        };
        if self.user_state(holder).await?.email_claim == self.claims.id(email).0.to_string() {
            return Err(CommandError::from(DomainError::conflict("the email address is already registered")).into());
        }
        if age_secs < self.takeover_after.as_secs_f64() {
            return Err(CommandError::Unavailable(
                "the email address is reserved by a command that may still complete; retry".into(),
            )
            .into());
        }
        if !self.claims.take_over(email, holder, user).await.map_err(storage)? {
            return Err(CommandError::Unavailable("the email reservation changed meanwhile; retry".into()).into());
        }
        tracing::info!(%holder, %user, age_secs, "took over an email reservation its holder does not hold");
        metrics::counter!("keel_identity_claim_takeovers_total").increment(1);
        Ok(())
    }

    /// A user as the owner of its partition knows it, current with the log.
    pub(super) async fn user_state(&self, id: UserId) -> Result<UserState, Status> {
        match self.users.locate(id.as_uuid()).await {
            Location::Here => Ok(self.state_of(&self.users.read_here(id.as_uuid()).await?)),
            Location::There(endpoint) => {
                let request = forwarded(GetUserRequest { user_id: id.to_string() });
                let mut client = IdentityCommandsClient::new(self.peers.channel(&endpoint)?);
                Ok(client.get_user(request).await?.into_inner())
            }
            Location::Nowhere(error) => Err(error.into()),
        }
    }

    fn state_of(&self, outcome: &Outcome<User>) -> UserState {
        let status = match &outcome.state {
            User::Unregistered => "unregistered",
            User::Erased { .. } => "erased",
            User::Registered { status: AccountStatus::Active, .. } => "active",
            User::Registered { status: AccountStatus::Deactivated, .. } => "deactivated",
        };
        UserState {
            status: status.to_owned(),
            version: outcome.accepted.version as i64,
            email_claim: outcome.state.email().map(|email| self.claims.id(email).0.to_string()).unwrap_or_default(),
        }
    }

    /// After a change of `user` away from `email` (or one that did not happen), the reservation
    /// of `email` goes unless the user holds it. Failing here only leaves a reservation that a
    /// later takeover resolves.
    async fn release_unless_held(&self, email: &Email, user: UserId, state: &User) {
        if state.email() == Some(email) {
            return;
        }
        if let Err(error) = self.claims.release(email, user).await {
            tracing::warn!(%user, %error, "failed to release an email reservation; a takeover will resolve it");
        }
    }

    async fn change_email_here(
        &self,
        id: UserId,
        email: Email,
        version: Option<u64>,
        meta: CommandMeta,
    ) -> Result<CommandReply, Status> {
        let before = self.users.read_here(id.as_uuid()).await?.state;
        let previous = before.email().cloned();
        if previous.as_ref() != Some(&email) && before.status() == Some(AccountStatus::Active) {
            self.reserve(&email, id).await?;
        }
        let change = UserCommand::ChangeEmail(ChangeEmail { email: email.clone() });
        let outcome = self.users.run(Command::new(id.as_uuid(), meta, "ChangeEmail", change).expecting(version)).await;
        match outcome {
            Ok(outcome) => {
                if let Some(previous) = previous {
                    self.release_unless_held(&previous, id, &outcome.state).await;
                }
                Ok(reply(&outcome.accepted))
            }
            Err(error) if error.is_answer() => {
                // The change did not happen; the new address is not this user's after all.
                if let Ok(now) = self.users.read_here(id.as_uuid()).await {
                    self.release_unless_held(&email, id, &now.state).await;
                }
                Err(error.into())
            }
            // The outcome is unknown: the reservation stays for the retry.
            Err(error) => Err(error.into()),
        }
    }
}

#[tonic::async_trait]
impl IdentityCommands for IdentityGrpc {
    #[tracing::instrument(skip_all, fields(command_id))]
    async fn register_user(&self, request: Request<RegisterUserRequest>) -> Result<Response<CommandReply>, Status> {
        let (forwarded_already, message, meta) = receive(request)?;
        let email = Email::parse(&message.email).map_err(|error| invalid(error.to_string()))?;
        let display_name = DisplayName::parse(&message.display_name).map_err(|error| invalid(error.to_string()))?;
        Password::parse(&message.password, &email).map_err(|error| invalid(error.to_string()))?;
        let id = UserId::for_registration(meta.command_id);
        let password = message.password.clone();
        let local = || self.register_here(id, email, display_name, password, meta);
        let remote =
            |channel| async move { IdentityCommandsClient::new(channel).register_user(forwarded(message)).await };
        self.peers.route(&self.users, id.as_uuid(), forwarded_already, local, remote).await.map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(command_id))]
    async fn update_profile(&self, request: Request<UpdateProfileRequest>) -> Result<Response<CommandReply>, Status> {
        let (forwarded_already, message, meta) = receive(request)?;
        let id = UserId::from_uuid(uuid("user_id", &message.user_id)?);
        let display_name = message
            .display_name
            .as_deref()
            .map(DisplayName::parse)
            .transpose()
            .map_err(|error| invalid(error.to_string()))?;
        let bio = message.bio.as_deref().map(Bio::parse).transpose().map_err(|error| invalid(error.to_string()))?;
        let version = expected_version(message.expected_version)?;
        let update = UserCommand::UpdateProfile(UpdateProfile { display_name, bio });
        let local =
            || execute(&self.users, Command::new(id.as_uuid(), meta, "UpdateProfile", update).expecting(version));
        let remote =
            |channel| async move { IdentityCommandsClient::new(channel).update_profile(forwarded(message)).await };
        self.peers.route(&self.users, id.as_uuid(), forwarded_already, local, remote).await.map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(command_id))]
    async fn change_email(&self, request: Request<ChangeEmailRequest>) -> Result<Response<CommandReply>, Status> {
        let (forwarded_already, message, meta) = receive(request)?;
        let id = UserId::from_uuid(uuid("user_id", &message.user_id)?);
        let email = Email::parse(&message.email).map_err(|error| invalid(error.to_string()))?;
        let version = expected_version(message.expected_version)?;
        let local = || self.change_email_here(id, email, version, meta);
        let remote =
            |channel| async move { IdentityCommandsClient::new(channel).change_email(forwarded(message)).await };
        self.peers.route(&self.users, id.as_uuid(), forwarded_already, local, remote).await.map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(command_id))]
    async fn deactivate(&self, request: Request<UserCommandRequest>) -> Result<Response<CommandReply>, Status> {
        let (forwarded_already, message, meta) = receive(request)?;
        let id = UserId::from_uuid(uuid("user_id", &message.user_id)?);
        let version = expected_version(message.expected_version)?;
        let deactivate = Command::new(id.as_uuid(), meta, "Deactivate", UserCommand::Deactivate);
        let local = || execute(&self.users, deactivate.expecting(version));
        let remote = |channel| async move { IdentityCommandsClient::new(channel).deactivate(forwarded(message)).await };
        self.peers.route(&self.users, id.as_uuid(), forwarded_already, local, remote).await.map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(command_id))]
    async fn erase_personal_data(
        &self,
        request: Request<UserCommandRequest>,
    ) -> Result<Response<CommandReply>, Status> {
        let (forwarded_already, message, meta) = receive(request)?;
        let id = UserId::from_uuid(uuid("user_id", &message.user_id)?);
        let version = expected_version(message.expected_version)?;
        let local = || self.erase_here(id, version, meta);
        let remote =
            |channel| async move { IdentityCommandsClient::new(channel).erase_personal_data(forwarded(message)).await };
        self.peers.route(&self.users, id.as_uuid(), forwarded_already, local, remote).await.map(Response::new)
    }

    async fn get_user(&self, request: Request<GetUserRequest>) -> Result<Response<UserState>, Status> {
        let forwarded_already = is_forwarded(&request);
        let message = request.into_inner();
        let id = uuid("user_id", &message.user_id)?;
        let local = || async move { Ok(self.state_of(&self.users.read_here(id).await?)) };
        let remote = |channel| async move { IdentityCommandsClient::new(channel).get_user(forwarded(message)).await };
        self.peers.route(&self.users, id, forwarded_already, local, remote).await.map(Response::new)
    }
}

fn storage(error: sqlx::Error) -> Status {
    tracing::error!(%error, "email reservations are unavailable");
    CommandError::Unavailable("email reservations are unavailable; retry".into()).into()
}
