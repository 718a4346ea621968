//! Command services: each owns an aggregate type's topic. Instances split its partitions; the
//! owner of a partition rebuilds its state (snapshot and tail), decides commands against it and
//! appends one commit per command, acknowledged only once the commit is valid in the log.

#![forbid(unsafe_code)]

pub mod auth;
pub mod authz;
pub mod blog;
pub mod engine;
pub mod forward;
pub mod grpc;
pub mod identity;
mod outcome;
pub mod panics;
pub mod process;
pub mod service;

pub use outcome::{Accepted, CURRENT_VERSION_KEY, CommandError, CommandMeta};
