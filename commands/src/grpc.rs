//! What every command service's gRPC surface shares: command metadata in, command replies out,
//! and field parsing that answers INVALID_ARGUMENT with the field's name.

use keel_proto::common::v1::{CommandMetadata, CommandReply, Position};
use tonic::Status;
use uuid::Uuid;

use crate::{Accepted, CommandError, CommandMeta};

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
