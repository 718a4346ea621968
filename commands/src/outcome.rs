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

/// A command that holds: its commit is in the log (acknowledged by the broker and valid by the
/// shared rule), or it decided no event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub aggregate_id: Uuid,
    /// The aggregate's version after the command.
    pub version: u64,
    /// Where the commit is; `None` when the command decided no event.
    pub position: Option<Position>,
    /// The command id had been applied before: this is that first result, nothing was appended.
    pub replayed: bool,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum CommandError {
    #[error("{0}")]
    InvalidArgument(String),
    /// The domain refused the command; the message is safe to show.
    #[error("{0}")]
    Rejected(String),
    #[error("{0}")]
    NotFound(String),
    /// The caller could not prove who they are (a wrong password, a dead refresh token).
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller may not do this to this aggregate (not its author).
    #[error("{0}")]
    PermissionDenied(String),
    /// The command was decided against a version that is no longer current.
    #[error("the aggregate is at version {current}, not the expected one")]
    VersionConflict { current: u64 },
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
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::Unauthenticated(_) => ErrorCode::Unauthenticated,
            Self::PermissionDenied(_) => ErrorCode::PermissionDenied,
            Self::VersionConflict { .. } => ErrorCode::VersionConflict,
            Self::Overloaded => ErrorCode::Overloaded,
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::Internal => ErrorCode::Internal,
        }
    }
}

/// The metadata key of a version conflict's current version.
pub const CURRENT_VERSION_KEY: &str = "keel-current-version";

impl From<CommandError> for tonic::Status {
    fn from(error: CommandError) -> Self {
        let code = error.code();
        let message = if code.is_client_facing() { error.to_string() } else { "internal error".to_owned() };
        let mut status = tonic::Status::new(code.grpc_code(), message);
        if let CommandError::VersionConflict { current } = error {
            status.metadata_mut().insert(CURRENT_VERSION_KEY, current.into());
        }
        status
    }
}
