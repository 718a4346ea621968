//! Keel's aggregates. Pure and synchronous: `decide` turns a command into events against the
//! current state, `evolve` folds an event into the state. Whatever a command needs from outside
//! its aggregate (is this email taken?) is looked up before `decide` and carried in the command.

#![forbid(unsafe_code)]

pub mod auth;
pub mod authz;
pub mod blog;
pub mod identity;

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

/// An event-sourced aggregate.
pub trait Aggregate: Default + Clone {
    type Command;
    type Event;
    type Error: std::error::Error;

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
