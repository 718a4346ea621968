//! What a command service answers, shared by every aggregate's service.

use keel_domain::{DomainError, Refusal};
use keel_proto::ErrorCode;
use keel_topics::Position;
use uuid::Uuid;

/// The metadata every command carries in its envelope.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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

/// Why a command did not hold. Two kinds that callers must never mix up: an **answer** about
/// the command (bad input, a domain refusal, a stale `If-Match`) that retrying cannot change, and
/// an **infrastructure failure** (overloaded, unavailable, internal) whose outcome may still be
/// unknown, so the same command id may and should be retried.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommandError {
    #[error("{0}")]
    InvalidArgument(String),
    /// The domain refused the command.
    #[error(transparent)]
    Refused(#[from] DomainError),
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
            Self::Refused(refused) => match refused.refusal {
                Refusal::Conflict => ErrorCode::Conflict,
                Refusal::NotFound => ErrorCode::NotFound,
                Refusal::NotAllowed => ErrorCode::PermissionDenied,
                Refusal::Unauthenticated => ErrorCode::Unauthenticated,
            },
            Self::VersionConflict { .. } => ErrorCode::VersionConflict,
            Self::Overloaded => ErrorCode::Overloaded,
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::Internal => ErrorCode::Internal,
        }
    }

    /// An answer about the command itself (the caller's to act on), not a failure of the
    /// platform: retrying the same command gets the same answer.
    pub fn is_answer(&self) -> bool {
        matches!(self, Self::InvalidArgument(_) | Self::Refused(_) | Self::VersionConflict { .. })
    }
}

impl CommandMeta {
    /// The metadata of one step of a process this command started (a command of another
    /// service): its own command id, derived from this one and the step's name, so a step run
    /// again is the same command; the same actor, correlation and trace.
    pub fn step(&self, name: &str) -> Self {
        Self { command_id: Uuid::new_v5(&self.command_id, name.as_bytes()), ..self.clone() }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_answers_and_failures_are_not() {
        let refused = CommandError::from(DomainError::not_found("no such post"));
        assert!(refused.is_answer());
        assert_eq!(refused.code(), ErrorCode::NotFound);
        assert_eq!(CommandError::from(DomainError::not_allowed("not yours")).code(), ErrorCode::PermissionDenied);
        assert!(CommandError::VersionConflict { current: 3 }.is_answer());
        assert!(CommandError::InvalidArgument("email: required".into()).is_answer());
        for failure in [CommandError::Overloaded, CommandError::Unavailable("retry".into()), CommandError::Internal] {
            assert!(!failure.is_answer(), "{failure:?}");
        }
    }

    #[test]
    fn a_refusal_keeps_its_message_and_a_failure_hides_its_own() {
        let status = tonic::Status::from(CommandError::from(DomainError::conflict("the post exists")));
        assert_eq!(status.message(), "the post exists");
        assert_eq!(tonic::Status::from(CommandError::Internal).message(), "internal error");
    }
}
