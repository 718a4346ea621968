//! The gRPC surface of the identity service and the conversions between wire and domain types.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use keel_domain::identity::{DisplayName, Email};
use keel_proto::identity::v1::{
    CommandMetadata, CommandReply, Position, RegisterUserRequest, identity_commands_server::IdentityCommands,
};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::writer::Registration;
use crate::{Accepted, CommandError, CommandMeta};

pub struct IdentityGrpc {
    commands: mpsc::Sender<Registration>,
    ready: Arc<AtomicBool>,
    timeout: Duration,
}

impl IdentityGrpc {
    pub fn new(commands: mpsc::Sender<Registration>, ready: Arc<AtomicBool>, timeout: Duration) -> Self {
        Self { commands, ready, timeout }
    }
}

#[tonic::async_trait]
impl IdentityCommands for IdentityGrpc {
    #[tracing::instrument(skip_all, fields(command_id))]
    async fn register_user(&self, request: Request<RegisterUserRequest>) -> Result<Response<CommandReply>, Status> {
        let request = request.into_inner();
        let meta = command_meta(request.metadata)?;
        tracing::Span::current().record("command_id", tracing::field::display(meta.command_id));
        let email = Email::parse(&request.email).map_err(|error| invalid(error.to_string()))?;
        let display_name = DisplayName::parse(&request.display_name).map_err(|error| invalid(error.to_string()))?;
        if !self.ready.load(Ordering::Acquire) {
            return Err(CommandError::Unavailable("the service is loading its state".into()).into());
        }
        let (reply, outcome) = oneshot::channel();
        let registration = Registration { email, display_name, meta, reply, received: Instant::now() };
        self.commands.try_send(registration).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => CommandError::Overloaded,
            mpsc::error::TrySendError::Closed(_) => CommandError::Unavailable("the service is stopping".into()),
        })?;
        let accepted = tokio::time::timeout(self.timeout, outcome)
            .await
            .map_err(|_| {
                CommandError::Unavailable("timed out waiting for the broker; retry with the same command id".into())
            })?
            .map_err(|_| CommandError::Unavailable("the writer stopped".into()))??;
        Ok(Response::new(reply_of(accepted)))
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
        position: Some(Position {
            topic: accepted.position.topic,
            partition: accepted.position.partition,
            offset: accepted.position.offset,
        }),
    }
}
