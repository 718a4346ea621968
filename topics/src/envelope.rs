//! The commit envelope: the metadata of one command's events, carried in Kafka headers.
//!
//! Commit-level headers appear once; event-level headers repeat once per event, in event order
//! (Kafka keeps the order and duplicates of header keys).

use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use uuid::Uuid;

const COMMAND_ID: &str = "keel-command-id";
const AGGREGATE_ID: &str = "keel-aggregate-id";
const EXPECTED_VERSION: &str = "keel-expected-version";
const OCCURRED_AT: &str = "keel-occurred-at";
const ACTOR: &str = "keel-actor";
const CORRELATION_ID: &str = "keel-correlation-id";
const CAUSATION_ID: &str = "keel-causation-id";
const TRACEPARENT: &str = "traceparent";
const EVENT_ID: &str = "keel-event-id";
const EVENT_TYPE: &str = "keel-event-type";
const SCHEMA_VERSION: &str = "keel-schema-version";
const AGGREGATE_VERSION: &str = "keel-aggregate-version";
const SEALED: &str = "keel-sealed";
/// The value of `keel-sealed`: how sensitive fields are sealed (see [`crate::sealing`]).
const SEALED_WITH: &str = "aes-256-gcm";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("header `{0}` is missing")]
    Missing(&'static str),
    #[error("header `{name}` is malformed: {reason}")]
    Malformed { name: &'static str, reason: String },
    #[error("the commit carries {headers} event headers but {events} events")]
    EventCountMismatch { headers: usize, events: usize },
}

/// Metadata of one event within a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventMeta {
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: u32,
}

/// Metadata of one commit: everything readers need to validate and attribute it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitHeader {
    pub command_id: Uuid,
    pub aggregate_id: Uuid,
    /// The aggregate's version the command was decided against; its events get the versions
    /// `expected_version + 1 ..= expected_version + events.len()`.
    pub expected_version: u64,
    pub occurred_at: DateTime<Utc>,
    pub actor: String,
    pub correlation_id: Uuid,
    pub causation_id: Option<Uuid>,
    pub traceparent: Option<String>,
    /// Whether the fields the schema marks sensitive are sealed with the aggregate's key.
    /// Commits written before sealing existed carry them in the clear.
    pub sealed: bool,
    pub events: Vec<EventMeta>,
}

impl CommitHeader {
    /// The aggregate's version once this commit is applied.
    pub fn version_after(&self) -> u64 {
        self.expected_version + self.events.len() as u64
    }

    /// The trace id of the commit's W3C `traceparent` (`00-<trace id>-<span id>-<flags>`), if it
    /// has a valid one.
    pub fn trace_id(&self) -> Option<String> {
        let trace_id = self.traceparent.as_deref()?.split('-').nth(1)?;
        (trace_id.len() == 32 && trace_id.chars().all(|c| c.is_ascii_hexdigit())).then(|| trace_id.to_owned())
    }

    pub fn to_headers(&self) -> OwnedHeaders {
        let occurred_at = self.occurred_at.to_rfc3339_opts(SecondsFormat::Micros, true);
        let mut headers = OwnedHeaders::new_with_capacity(8 + 4 * self.events.len())
            .insert(text(COMMAND_ID, &self.command_id.to_string()))
            .insert(text(AGGREGATE_ID, &self.aggregate_id.to_string()))
            .insert(text(EXPECTED_VERSION, &self.expected_version.to_string()))
            .insert(text(OCCURRED_AT, &occurred_at))
            .insert(text(ACTOR, &self.actor))
            .insert(text(CORRELATION_ID, &self.correlation_id.to_string()));
        if let Some(causation_id) = self.causation_id {
            headers = headers.insert(text(CAUSATION_ID, &causation_id.to_string()));
        }
        if let Some(traceparent) = &self.traceparent {
            headers = headers.insert(text(TRACEPARENT, traceparent));
        }
        if self.sealed {
            headers = headers.insert(text(SEALED, SEALED_WITH));
        }
        for (index, event) in self.events.iter().enumerate() {
            let version = self.expected_version + index as u64 + 1;
            headers = headers
                .insert(text(EVENT_ID, &event.event_id.to_string()))
                .insert(text(EVENT_TYPE, &event.event_type))
                .insert(text(SCHEMA_VERSION, &event.schema_version.to_string()))
                .insert(text(AGGREGATE_VERSION, &version.to_string()));
        }
        headers
    }

    pub fn from_headers<H: Headers>(headers: &H) -> Result<Self, EnvelopeError> {
        let mut pairs = Vec::with_capacity(headers.count());
        for header in headers.iter() {
            let value = header
                .value
                .map(std::str::from_utf8)
                .transpose()
                .map_err(|error| EnvelopeError::Malformed { name: "header", reason: error.to_string() })?;
            pairs.push((header.key, value.unwrap_or_default()));
        }
        let single = |name: &'static str| pairs.iter().find(|(key, _)| *key == name).map(|(_, value)| *value);
        let required = |name: &'static str| single(name).ok_or(EnvelopeError::Missing(name));
        let all = |name: &'static str| pairs.iter().filter(move |(key, _)| *key == name).map(|(_, value)| *value);

        let event_ids: Vec<_> = all(EVENT_ID).collect();
        let event_types: Vec<_> = all(EVENT_TYPE).collect();
        let schema_versions: Vec<_> = all(SCHEMA_VERSION).collect();
        if event_types.len() != event_ids.len() || schema_versions.len() != event_ids.len() {
            return Err(EnvelopeError::Malformed {
                name: EVENT_ID,
                reason: "event headers do not come in complete groups".into(),
            });
        }
        let events = event_ids
            .iter()
            .zip(&event_types)
            .zip(&schema_versions)
            .map(|((id, event_type), version)| {
                Ok(EventMeta {
                    event_id: parse(EVENT_ID, id)?,
                    event_type: (*event_type).to_owned(),
                    schema_version: parse(SCHEMA_VERSION, version)?,
                })
            })
            .collect::<Result<Vec<_>, EnvelopeError>>()?;
        let sealed = match single(SEALED) {
            None => false,
            Some(SEALED_WITH) => true,
            Some(other) => {
                return Err(EnvelopeError::Malformed { name: SEALED, reason: format!("unknown sealing `{other}`") });
            }
        };
        let occurred_at = DateTime::parse_from_rfc3339(required(OCCURRED_AT)?)
            .map_err(|error| EnvelopeError::Malformed { name: OCCURRED_AT, reason: error.to_string() })?
            .with_timezone(&Utc);
        Ok(Self {
            command_id: parse(COMMAND_ID, required(COMMAND_ID)?)?,
            aggregate_id: parse(AGGREGATE_ID, required(AGGREGATE_ID)?)?,
            expected_version: parse(EXPECTED_VERSION, required(EXPECTED_VERSION)?)?,
            occurred_at,
            actor: required(ACTOR)?.to_owned(),
            correlation_id: parse(CORRELATION_ID, required(CORRELATION_ID)?)?,
            causation_id: single(CAUSATION_ID).map(|value| parse(CAUSATION_ID, value)).transpose()?,
            traceparent: single(TRACEPARENT).map(str::to_owned),
            sealed,
            events,
        })
    }
}

fn text<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header { key, value: Some(value) }
}

fn parse<T: std::str::FromStr>(name: &'static str, value: &str) -> Result<T, EnvelopeError>
where
    T::Err: std::fmt::Display,
{
    value.parse().map_err(|error: T::Err| EnvelopeError::Malformed { name, reason: error.to_string() })
}

/// Where a record is in the log; a command's reply carries it as a consistency token.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(events: usize) -> CommitHeader {
        CommitHeader {
            command_id: Uuid::new_v4(),
            aggregate_id: Uuid::new_v4(),
            expected_version: 3,
            occurred_at: Utc::now(),
            actor: "anonymous".into(),
            correlation_id: Uuid::new_v4(),
            causation_id: None,
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            sealed: true,
            events: (0..events)
                .map(|index| EventMeta {
                    event_id: Uuid::new_v4(),
                    event_type: format!("Event{index}"),
                    schema_version: 1,
                })
                .collect(),
        }
    }

    #[test]
    fn headers_round_trip_with_repeated_event_groups() {
        let original = header(3);
        let decoded = CommitHeader::from_headers(&original.to_headers()).unwrap();
        assert_eq!(decoded.events, original.events);
        assert_eq!(decoded.command_id, original.command_id);
        assert!(decoded.sealed);
        assert_eq!(decoded.version_after(), 6);
        assert_eq!(decoded.occurred_at.timestamp_micros(), original.occurred_at.timestamp_micros());
        assert_eq!(decoded.trace_id().as_deref(), Some("0af7651916cd43dd8448eb211c80319c"));
        assert_eq!(CommitHeader { traceparent: Some("garbage".into()), ..decoded }.trace_id(), None);
    }

    #[test]
    fn missing_and_malformed_headers_are_errors() {
        let headers = OwnedHeaders::new().insert(text(COMMAND_ID, "not-a-uuid"));
        assert!(CommitHeader::from_headers(&headers).is_err());
        assert_eq!(CommitHeader::from_headers(&OwnedHeaders::new()), Err(EnvelopeError::Missing(OCCURRED_AT)));
    }
}
