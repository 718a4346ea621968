//! Everything about Keel's log that writers and readers must agree on: which topics exist, the
//! Avro schemas of their records, the commit envelope in Kafka headers, the deterministic
//! validation rule every reader applies, and the Kafka clients configured for it.

#![forbid(unsafe_code)]

pub mod avro_json;
pub mod catalogue;
pub mod codec;
pub mod envelope;
pub mod identity;
pub mod kafka;
pub mod membership;
pub mod partitioning;
pub mod reader;
pub mod record;
pub mod validation;

pub use catalogue::{Topic, TopicNames, TopicSpec};
pub use codec::{CodecError, Decoded, SchemaRegistryCodec};
pub use envelope::{CommitHeader, EnvelopeError, EventMeta, Position};
pub use validation::{StreamState, Verdict};
