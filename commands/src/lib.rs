//! Command services: each owns an aggregate type's topic, rebuilds its state from the log,
//! decides commands against it and appends one commit per command.

#![forbid(unsafe_code)]

pub mod identity;
mod outcome;

pub use outcome::{Accepted, CommandError, CommandMeta};
