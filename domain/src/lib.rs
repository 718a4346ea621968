//! Keel's aggregates. Pure and synchronous: `decide` turns a command into events against the
//! current state, `evolve` folds an event into the state. Whatever a command needs from outside
//! its aggregate (is this email taken?) is looked up before `decide` and carried in the command.

#![forbid(unsafe_code)]

pub mod auth;
pub mod authz;
pub mod blog;
pub mod identity;
pub mod jobs;

/// Why an input could not become a domain value; the message is safe to show to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidValue {
    pub field: &'static str,
    pub reason: &'static str,
}

impl InvalidValue {
    pub const fn new(field: &'static str, reason: &'static str) -> Self {
        Self { field, reason }
    }
}

/// Why the domain refuses a command. The message is safe to show to the caller. A refusal is
/// an answer, not a failure: nothing went wrong, and retrying the same command gets the same one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DomainError {
    pub refusal: Refusal,
    pub message: String,
}

/// The kinds of refusal, each one answer a caller can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The command contradicts the aggregate's state (it exists already, it is not published).
    Conflict,
    /// The aggregate does not exist, or no longer does.
    NotFound,
    /// The caller may not do this to this aggregate (not its author).
    NotAllowed,
    /// The caller could not prove who they are (a revoked session, an unknown token).
    Unauthenticated,
}

impl DomainError {
    pub fn new(refusal: Refusal, message: impl Into<String>) -> Self {
        Self { refusal, message: message.into() }
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(Refusal::Conflict, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Refusal::NotFound, message)
    }

    pub fn not_allowed(message: impl Into<String>) -> Self {
        Self::new(Refusal::NotAllowed, message)
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(Refusal::Unauthenticated, message)
    }
}

/// An aggregate that never refuses.
impl From<std::convert::Infallible> for DomainError {
    fn from(never: std::convert::Infallible) -> Self {
        match never {}
    }
}

/// An event-sourced aggregate.
pub trait Aggregate: Default + Clone {
    type Command;
    type Event;
    /// Each refusal says which kind it is ([`DomainError`]).
    type Error: std::error::Error + Into<DomainError>;

    /// Decides which events a command produces, or why it is rejected. Never performs IO.
    fn decide(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Folds one event into the state.
    fn evolve(self, event: &Self::Event) -> Self;
}

/// Every domain event names its type and the version of its schema, so the wire format can
/// carry both without stringly typed guesses.
pub trait DomainEvent {
    fn event_type(&self) -> &'static str;
    fn schema_version(&self) -> u32;
}
