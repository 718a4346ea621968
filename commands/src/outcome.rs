//! What a command service answers, shared by every aggregate's service.

use keel_proto::ErrorCode;
use keel_topics::Position;
use uuid::Uuid;

/// The metadata every command carries in its envelope.
#[derive(Debug, Clone)]
pub struct CommandMeta {
    pub command_id: Uuid,
    pub actor: String,
    pub correlation_id: Uuid,
    pub traceparent: Option<String>,
}

/// A command whose commit the broker acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub aggregate_id: Uuid,
    pub version: u64,
    pub position: Position,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum CommandError {
    #[error("{0}")]
    InvalidArgument(String),
    /// The domain refused the command; the message is safe to show.
    #[error("{0}")]
    Rejected(String),
    /// Too many commands are queued; retry later.
    #[error("the service is overloaded")]
    Overloaded,
    /// The outcome is unknown or the service cannot append now; retry with the same command id.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal,
}

impl CommandError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::Rejected(_) => ErrorCode::Conflict,
            Self::Overloaded => ErrorCode::ResourceExhausted,
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::Internal => ErrorCode::Internal,
        }
    }
}

impl From<CommandError> for tonic::Status {
    fn from(error: CommandError) -> Self {
        let code = error.code();
        let message = if code.is_client_facing() { error.to_string() } else { "internal error".to_owned() };
        tonic::Status::new(code.grpc_code(), message)
    }
}
