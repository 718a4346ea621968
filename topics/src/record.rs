//! Reading a record of a commit topic the way every reader must: the envelope from the headers,
//! the events from the payload, and the two in agreement. What one reader finds unreadable,
//! every reader finds unreadable, so none of them skips a commit another one applies.

use rdkafka::message::Message;

use crate::{CodecError, CommitHeader, Decoded, EnvelopeError, SchemaRegistryCodec, Topic};

/// A record as every reader sees it.
pub enum Record {
    Commit {
        header: CommitHeader,
        decoded: Decoded,
    },
    /// Never readable as it is: skipped by the rule's readers, dead-lettered by projections.
    Unreadable {
        reason: String,
    },
}

/// Reads `message`, a record of `topic`. `Err` only for failures worth retrying (the schema
/// registry cannot answer, or a newer version of Keel wrote it), never for a bad record.
pub async fn read(codec: &SchemaRegistryCodec, topic: Topic, message: &impl Message) -> Result<Record, CodecError> {
    let unreadable = |reason: String| Ok(Record::Unreadable { reason });
    let header = match message.headers().map(CommitHeader::from_headers) {
        Some(Ok(header)) => header,
        // Written by a newer Keel: wait for a reader that knows it, skip it never.
        Some(Err(error @ EnvelopeError::TooNew(_))) => return Err(CodecError::TooNew(error.to_string())),
        Some(Err(error)) => return unreadable(error.to_string()),
        None => return unreadable("no headers".into()),
    };
    let decoded = match codec.decode(topic, message.payload().unwrap_or_default()).await {
        Ok(decoded) => decoded,
        Err(error) if error.is_retriable() => return Err(error),
        Err(error) => return unreadable(error.to_string()),
    };
    if decoded.events.len() != header.events.len() {
        return unreadable(format!("{} events but {} event headers", decoded.events.len(), header.events.len()));
    }
    Ok(Record::Commit { header, decoded })
}
