//! The gRPC surface of the identity service and the conversions between wire and domain types.
//! A command for a partition owned elsewhere is forwarded once to the owner.

use std::{collections::HashMap, sync::Arc, sync::Mutex, time::Duration};

use keel_domain::{
    Aggregate,
    identity::{ChangeDisplayName, DisplayName, Email, RegisterUser, User, UserCommand, UserError, UserId},
};
use keel_proto::identity::v1::{
    ChangeDisplayNameRequest, CommandMetadata, CommandReply, Position, RegisterUserRequest,
    identity_commands_client::IdentityCommandsClient, identity_commands_server::IdentityCommands,
};
use tonic::{
    Request, Response, Status,
    transport::{Channel, Endpoint},
};
use uuid::Uuid;

use super::model::{Emails, Users, registration_id};
use crate::{
    Accepted, CommandError, CommandMeta,
    engine::{Command, Dispatch, Engine},
};

/// Marks a forwarded command, so that it is not forwarded again.
const FORWARDED: &str = "keel-forwarded";

pub struct IdentityGrpc {
    engine: Arc<Engine<Users>>,
    forwarder: Forwarder,
}

impl IdentityGrpc {
    pub fn new(engine: Arc<Engine<Users>>, timeout: Duration) -> Self {
        Self { engine, forwarder: Forwarder { channels: Mutex::default(), timeout } }
    }
}

#[tonic::async_trait]
impl IdentityCommands for IdentityGrpc {
    #[tracing::instrument(skip_all, fields(command_id))]
    async fn register_user(&self, request: Request<RegisterUserRequest>) -> Result<Response<CommandReply>, Status> {
        let forwarded = request.metadata().contains_key(FORWARDED);
        let request = request.into_inner();
        let meta = command_meta(request.metadata.clone())?;
        tracing::Span::current().record("command_id", tracing::field::display(meta.command_id));
        let email = Email::parse(&request.email).map_err(|error| invalid(error.to_string()))?;
        let display_name = DisplayName::parse(&request.display_name).map_err(|error| invalid(error.to_string()))?;
        let id = registration_id(&email);
        let command = Command {
            aggregate_id: id,
            expected_version: None,
            meta,
            claims: vec![format!("email:{}", email.as_str())],
            name: "RegisterUser",
            decide: Box::new(move |user: &User, emails: &Emails| {
                let command = UserCommand::Register(RegisterUser {
                    id: UserId::from_uuid(id),
                    email_owner: emails.owner(&email).map(UserId::from_uuid),
                    email: email.clone(),
                    display_name: display_name.clone(),
                });
                user.decide(command).map_err(domain_error)
            }),
        };
        match self.engine.dispatch(command).await {
            Dispatch::Done(outcome) => Ok(Response::new(reply_of(outcome?))),
            Dispatch::Forward(_) if forwarded => Err(not_owner()),
            Dispatch::Forward(endpoint) => {
                let mut client = self.forwarder.client(&endpoint)?;
                client.register_user(forwarded_request(request)).await
            }
        }
    }

    #[tracing::instrument(skip_all, fields(command_id))]
    async fn change_display_name(
        &self,
        request: Request<ChangeDisplayNameRequest>,
    ) -> Result<Response<CommandReply>, Status> {
        let forwarded = request.metadata().contains_key(FORWARDED);
        let request = request.into_inner();
        let meta = command_meta(request.metadata.clone())?;
        tracing::Span::current().record("command_id", tracing::field::display(meta.command_id));
        let id = Uuid::parse_str(&request.user_id).map_err(|_| invalid("user_id: must be a UUID".into()))?;
        let display_name = DisplayName::parse(&request.display_name).map_err(|error| invalid(error.to_string()))?;
        let expected_version = request
            .expected_version
            .map(|version| u64::try_from(version).map_err(|_| invalid("expected_version: must not be negative".into())))
            .transpose()?;
        let command = Command {
            aggregate_id: id,
            expected_version,
            meta,
            claims: Vec::new(),
            name: "ChangeDisplayName",
            decide: Box::new(move |user: &User, _: &Emails| {
                let change = ChangeDisplayName { display_name: display_name.clone() };
                user.decide(UserCommand::ChangeDisplayName(change)).map_err(domain_error)
            }),
        };
        match self.engine.dispatch(command).await {
            Dispatch::Done(outcome) => Ok(Response::new(reply_of(outcome?))),
            Dispatch::Forward(_) if forwarded => Err(not_owner()),
            Dispatch::Forward(endpoint) => {
                let mut client = self.forwarder.client(&endpoint)?;
                client.change_display_name(forwarded_request(request)).await
            }
        }
    }
}

/// Clients of the other instances, one lazily connected channel per endpoint.
struct Forwarder {
    channels: Mutex<HashMap<String, Channel>>,
    timeout: Duration,
}

impl Forwarder {
    fn client(&self, endpoint: &str) -> Result<IdentityCommandsClient<Channel>, Status> {
        metrics::counter!("keel_commands_forwarded_total", "service" => "identity").increment(1);
        let mut channels = self.channels.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(channel) = channels.get(endpoint) {
            return Ok(IdentityCommandsClient::new(channel.clone()));
        }
        let channel = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|_| {
                tracing::error!(endpoint, "the owner directory holds an invalid endpoint");
                Status::unavailable("cannot reach the partition's owner; retry")
            })?
            .connect_timeout(Duration::from_secs(1))
            .timeout(self.timeout)
            .connect_lazy();
        channels.insert(endpoint.to_owned(), channel.clone());
        Ok(IdentityCommandsClient::new(channel))
    }
}

fn forwarded_request<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    request
}

fn not_owner() -> Status {
    CommandError::Unavailable("this instance no longer owns the partition; retry".into()).into()
}

fn domain_error(error: UserError) -> CommandError {
    match error {
        // The registered user's id is the email's: name neither the id nor who holds it.
        UserError::EmailTaken | UserError::AlreadyRegistered(_) => {
            CommandError::Rejected(UserError::EmailTaken.to_string())
        }
        UserError::NotRegistered => CommandError::NotFound(error.to_string()),
    }
}

fn invalid(message: String) -> Status {
    CommandError::InvalidArgument(message).into()
}

fn command_meta(metadata: Option<CommandMetadata>) -> Result<CommandMeta, Status> {
    let metadata = metadata.ok_or_else(|| invalid("metadata: required".into()))?;
    let command_id =
        Uuid::parse_str(&metadata.command_id).map_err(|_| invalid("metadata.command_id: must be a UUID".into()))?;
    let correlation_id = if metadata.correlation_id.is_empty() {
        command_id
    } else {
        Uuid::parse_str(&metadata.correlation_id)
            .map_err(|_| invalid("metadata.correlation_id: must be a UUID".into()))?
    };
    let actor = if metadata.actor.is_empty() { "anonymous".to_owned() } else { metadata.actor };
    let traceparent = Some(metadata.traceparent).filter(|traceparent| !traceparent.is_empty());
    Ok(CommandMeta { command_id, actor, correlation_id, traceparent })
}

fn reply_of(accepted: Accepted) -> CommandReply {
    CommandReply {
        aggregate_id: accepted.aggregate_id.to_string(),
        version: accepted.version as i64,
        position: accepted.position.map(|position| Position {
            topic: position.topic,
            partition: position.partition,
            offset: position.offset,
        }),
        replayed: accepted.replayed,
    }
}
