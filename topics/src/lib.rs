//! Everything about Keel's log that writers and readers must agree on: which topics exist, the
//! Avro schemas of their records, the commit envelope in Kafka headers, the deterministic
//! validation rule every reader applies, and the Kafka clients configured for it.

#![forbid(unsafe_code)]

pub mod auth;
pub mod authz;
pub mod avro_json;
pub mod blog;
pub mod catalogue;
pub mod codec;
pub mod envelope;
pub mod identity;
pub mod kafka;
pub mod membership;
pub mod partitioning;
pub mod producer;
pub mod reader;
pub mod record;
pub mod sealing;
pub mod validation;
pub mod vault;
pub mod wakeups;

pub use catalogue::{Topic, TopicNames, TopicSpec};

/// The PostgreSQL channel on which a committed projection batch announces its projection's name
/// (`NOTIFY` is delivered on commit only), so that readers drop what they cached of it.
pub const APPLIED_CHANNEL: &str = "keel_projections";
/// The PostgreSQL channel on which projections announce, inside the batch that made them, the
/// accounts whose status changed: `user <id>` (registered, deactivated, erased) and
/// `session <id>` (revoked), separated by spaces, or `users *` / `sessions *` for too many to
/// list. Gateways drop exactly those from their status caches.
pub const STATUS_CHANNEL: &str = "keel_status";
/// The PostgreSQL channel on which a command service announces that it took or let go of a
/// partition (`command_owners` changed), so that gateways route commands to the new owner.
pub const OWNERS_CHANNEL: &str = "keel_owners";
pub use codec::{CodecError, Decoded, RegistryCheck, SchemaRegistryCodec};
pub use envelope::{CommitHeader, EnvelopeError, EventMeta, Position};
pub use validation::{StreamState, Verdict};
pub use vault::{Opened, PersonalDataConfig, Vault, VaultError};
