//! What every command service's gRPC surface shares: command metadata in, command replies out,
//! and field parsing that answers INVALID_ARGUMENT with the field's name.

use keel_proto::{
    auth::v1::{
        LoginRequest, LogoutRequest, RefreshRequest, RemovePasswordRequest, SetPasswordRequest, StartSessionRequest,
    },
    authz::v1::{CreateRoleRequest, RoleGrantRequest, SetRolePermissionsRequest},
    blog::v1::{AddCommentRequest, DeleteCommentRequest, DraftPostRequest, EditPostRequest, PostCommandRequest},
    common::v1::{CommandMetadata, CommandReply, Position},
    identity::v1::{ChangeEmailRequest, RegisterUserRequest, UpdateProfileRequest, UserCommandRequest},
};
use tonic::{Request, Status};
use uuid::Uuid;

use crate::{
    Accepted, CommandError, CommandMeta,
    engine::{Command, Engine, Model},
    forward::is_forwarded,
};

/// A request that carries a command: its envelope metadata.
pub trait CommandRequest {
    fn metadata(&self) -> Option<CommandMetadata>;
}

macro_rules! command_requests {
    ($($request:ty),* $(,)?) => {
        $(
            impl CommandRequest for $request {
                fn metadata(&self) -> Option<CommandMetadata> {
                    self.metadata.clone()
                }
            }
        )*
    };
}

command_requests!(
    RegisterUserRequest,
    UpdateProfileRequest,
    ChangeEmailRequest,
    UserCommandRequest,
    SetPasswordRequest,
    RemovePasswordRequest,
    LoginRequest,
    RefreshRequest,
    LogoutRequest,
    StartSessionRequest,
    CreateRoleRequest,
    SetRolePermissionsRequest,
    RoleGrantRequest,
    DraftPostRequest,
    EditPostRequest,
    PostCommandRequest,
    AddCommentRequest,
    DeleteCommentRequest,
);

/// A command call as it arrives: whether another instance forwarded it already, its message, and
/// its envelope metadata, checked; the command id is recorded on the current span, whose trace
/// context the command carries on.
pub fn receive<T: CommandRequest>(request: Request<T>) -> Result<(bool, T, CommandMeta), Status> {
    let forwarded = is_forwarded(&request);
    let message = request.into_inner();
    let mut meta = command_meta(message.metadata())?;
    let span = tracing::Span::current();
    span.record("command_id", tracing::field::display(meta.command_id));
    // The commit's trace context is this call's: the span that continued the caller's (from the
    // call's metadata, else from the command's own).
    if let Some(traceparent) = keel_runtime::telemetry::traceparent_of(&span) {
        meta.traceparent = Some(traceparent);
    }
    Ok((forwarded, message, meta))
}

pub fn invalid(message: impl Into<String>) -> Status {
    CommandError::InvalidArgument(message.into()).into()
}

/// The envelope metadata of a command, checked.
pub fn command_meta(metadata: Option<CommandMetadata>) -> Result<CommandMeta, Status> {
    let metadata = metadata.ok_or_else(|| invalid("metadata: required"))?;
    let command_id = uuid("metadata.command_id", &metadata.command_id)?;
    let correlation_id = if metadata.correlation_id.is_empty() {
        command_id
    } else {
        uuid("metadata.correlation_id", &metadata.correlation_id)?
    };
    let actor = if metadata.actor.is_empty() { "anonymous".to_owned() } else { metadata.actor };
    let traceparent = Some(metadata.traceparent).filter(|traceparent| !traceparent.is_empty());
    Ok(CommandMeta { command_id, actor, correlation_id, traceparent })
}

/// The wire form of a command's metadata, for a call to another service.
pub fn metadata(meta: &CommandMeta) -> CommandMetadata {
    CommandMetadata {
        command_id: meta.command_id.to_string(),
        actor: meta.actor.clone(),
        correlation_id: meta.correlation_id.to_string(),
        traceparent: meta.traceparent.clone().unwrap_or_default(),
    }
}

/// An answer of another service about the command itself (it did not take effect, and sending
/// it again gets the same answer), as opposed to a failure whose outcome may be unknown.
pub fn is_answer(status: &Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::Aborted
            | Code::FailedPrecondition
            | Code::PermissionDenied
            | Code::Unauthenticated
    )
}

pub fn uuid(field: &str, text: &str) -> Result<Uuid, Status> {
    Uuid::parse_str(text).map_err(|_| invalid(format!("{field}: must be a UUID")))
}

/// An `If-Match` version: absent, or not negative.
pub fn expected_version(version: Option<i64>) -> Result<Option<u64>, Status> {
    version
        .map(|version| u64::try_from(version).map_err(|_| invalid("expected_version: must not be negative")))
        .transpose()
}

pub fn position(position: &keel_topics::Position) -> Position {
    Position { topic: position.topic.clone(), partition: position.partition, offset: position.offset }
}

pub fn reply(accepted: &Accepted) -> CommandReply {
    CommandReply {
        aggregate_id: accepted.aggregate_id.to_string(),
        version: accepted.version as i64,
        position: accepted.position.as_ref().map(position),
        replayed: accepted.replayed,
    }
}

/// Runs `command` on this instance (the caller found that it serves the aggregate) and answers
/// with what it came to.
pub async fn execute<M: Model>(engine: &Engine<M>, command: Command<M>) -> Result<CommandReply, Status> {
    Ok(reply(&engine.run(command).await?.accepted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_told_apart_from_unknown_outcomes() {
        assert!(is_answer(&Status::aborted("stale")));
        assert!(is_answer(&Status::already_exists("taken")));
        assert!(is_answer(&Status::invalid_argument("bad hash")));
        assert!(!is_answer(&Status::unavailable("outcome unknown")));
        assert!(!is_answer(&Status::deadline_exceeded("slow")));
        assert!(!is_answer(&Status::internal("a bug")));
    }

    #[test]
    fn a_step_is_a_command_of_its_own_the_same_each_time() {
        let meta = CommandMeta {
            command_id: Uuid::now_v7(),
            actor: "someone".into(),
            correlation_id: Uuid::now_v7(),
            traceparent: None,
        };
        let step = meta.step("SetPassword");
        assert_eq!(step.command_id, meta.step("SetPassword").command_id);
        assert_ne!(step.command_id, meta.step("RemovePassword").command_id);
        assert_ne!(step.command_id, meta.command_id);
        assert_eq!((step.actor.as_str(), step.correlation_id), (meta.actor.as_str(), meta.correlation_id));
        assert_eq!(metadata(&step).command_id, step.command_id.to_string());
    }
}
