//! The commit envelope: the metadata of one command's events, carried in Kafka headers.
//!
//! A commit carries two headers: `keel-commit`, a JSON document with everything readers need to
//! validate and attribute it (command, aggregate, expected version, time, actor, correlation and
//! causation, sealing, and each event's id, type, schema version and aggregate version), and the
//! W3C `traceparent` when the command had one, where tracing tools look for it. One document
//! rather than a header per field: a broker that stores headers as rows (nisshi on PostgreSQL
//! does) writes and reads two rows per record instead of a dozen.
//!
//! Records written before `keel-commit` existed carry one header per field (commit-level headers
//! once, event-level headers once per event, in event order); they are read as they are, forever.

use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The envelope as one document.
const COMMIT: &str = "keel-commit";
/// The form of `keel-commit` this build writes and the newest it reads. Fields may be added
/// without changing it (readers ignore what they do not know); a change older readers would
/// misread raises it, and they then stop at such a commit instead of skipping it.
const FORM: u32 = 1;
const TRACEPARENT: &str = "traceparent";
/// The value of `sealed`: how sensitive fields are sealed (see [`crate::sealing`]).
const SEALED_WITH: &str = "aes-256-gcm";

/// The headers of the envelope's first form, one per field.
mod legacy {
    pub const COMMAND_ID: &str = "keel-command-id";
    pub const AGGREGATE_ID: &str = "keel-aggregate-id";
    pub const EXPECTED_VERSION: &str = "keel-expected-version";
    pub const OCCURRED_AT: &str = "keel-occurred-at";
    pub const ACTOR: &str = "keel-actor";
    pub const CORRELATION_ID: &str = "keel-correlation-id";
    pub const CAUSATION_ID: &str = "keel-causation-id";
    pub const EVENT_ID: &str = "keel-event-id";
    pub const EVENT_TYPE: &str = "keel-event-type";
    pub const SCHEMA_VERSION: &str = "keel-schema-version";
    pub const SEALED: &str = "keel-sealed";
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("header `{0}` is missing")]
    Missing(&'static str),
    #[error("header `{name}` is malformed: {reason}")]
    Malformed { name: &'static str, reason: String },
    #[error("the commit carries {headers} event headers but {events} events")]
    EventCountMismatch { headers: usize, events: usize },
    /// Written by a newer version of Keel: no reader of this version may skip it.
    #[error("the commit's envelope is of form {0}, newer than this version of Keel reads ({FORM})")]
    TooNew(u32),
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

/// `keel-commit`, as written.
#[derive(Serialize, Deserialize)]
struct Document<'a> {
    form: u32,
    command: Uuid,
    aggregate: Uuid,
    expected_version: u64,
    occurred_at: &'a str,
    actor: &'a str,
    correlation: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    causation: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed: Option<&'a str>,
    #[serde(borrow)]
    events: Vec<EventDocument<'a>>,
}

#[derive(Serialize, Deserialize)]
struct EventDocument<'a> {
    id: Uuid,
    #[serde(rename = "type")]
    event_type: &'a str,
    schema_version: u32,
    /// The aggregate's version after this event: redundant with `expected_version` and the
    /// event's place, written for people and tools, checked when read.
    version: u64,
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
        let document = Document {
            form: FORM,
            command: self.command_id,
            aggregate: self.aggregate_id,
            expected_version: self.expected_version,
            occurred_at: &occurred_at,
            actor: &self.actor,
            correlation: self.correlation_id,
            causation: self.causation_id,
            sealed: self.sealed.then_some(SEALED_WITH),
            events: self
                .events
                .iter()
                .enumerate()
                .map(|(index, event)| EventDocument {
                    id: event.event_id,
                    event_type: &event.event_type,
                    schema_version: event.schema_version,
                    version: self.expected_version + index as u64 + 1,
                })
                .collect(),
        };
        let json = serde_json::to_string(&document).expect("an envelope serializes");
        let headers = OwnedHeaders::new_with_capacity(2).insert(text(COMMIT, &json));
        match &self.traceparent {
            Some(traceparent) => headers.insert(text(TRACEPARENT, traceparent)),
            None => headers,
        }
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
        let traceparent = single(TRACEPARENT).map(str::to_owned);
        match single(COMMIT) {
            Some(document) => Self::from_document(document, traceparent),
            None => Self::from_legacy(&pairs, traceparent),
        }
    }

    fn from_document(json: &str, traceparent: Option<String>) -> Result<Self, EnvelopeError> {
        let malformed = |reason: String| EnvelopeError::Malformed { name: COMMIT, reason };
        #[derive(Deserialize)]
        struct Form {
            form: u32,
        }
        let form = serde_json::from_str::<Form>(json).map_err(|error| malformed(error.to_string()))?.form;
        if form > FORM {
            return Err(EnvelopeError::TooNew(form));
        }
        let document: Document<'_> = serde_json::from_str(json).map_err(|error| malformed(error.to_string()))?;
        let sealed = match document.sealed {
            None => false,
            Some(SEALED_WITH) => true,
            Some(other) => return Err(malformed(format!("unknown sealing `{other}`"))),
        };
        let mut events = Vec::with_capacity(document.events.len());
        for (index, event) in document.events.into_iter().enumerate() {
            let version = document.expected_version + index as u64 + 1;
            if event.version != version {
                return Err(malformed(format!(
                    "event {index} says version {}, its place says {version}",
                    event.version
                )));
            }
            events.push(EventMeta {
                event_id: event.id,
                event_type: event.event_type.to_owned(),
                schema_version: event.schema_version,
            });
        }
        Ok(Self {
            command_id: document.command,
            aggregate_id: document.aggregate,
            expected_version: document.expected_version,
            occurred_at: parse_time(COMMIT, document.occurred_at)?,
            actor: document.actor.to_owned(),
            correlation_id: document.correlation,
            causation_id: document.causation,
            traceparent,
            sealed,
            events,
        })
    }

    fn from_legacy(pairs: &[(&str, &str)], traceparent: Option<String>) -> Result<Self, EnvelopeError> {
        use legacy::*;
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
        let occurred_at = parse_time(OCCURRED_AT, required(OCCURRED_AT)?)?;
        Ok(Self {
            command_id: parse(COMMAND_ID, required(COMMAND_ID)?)?,
            aggregate_id: parse(AGGREGATE_ID, required(AGGREGATE_ID)?)?,
            expected_version: parse(EXPECTED_VERSION, required(EXPECTED_VERSION)?)?,
            occurred_at,
            actor: required(ACTOR)?.to_owned(),
            correlation_id: parse(CORRELATION_ID, required(CORRELATION_ID)?)?,
            causation_id: single(CAUSATION_ID).map(|value| parse(CAUSATION_ID, value)).transpose()?,
            traceparent,
            sealed,
            events,
        })
    }
}

fn parse_time(name: &'static str, value: &str) -> Result<DateTime<Utc>, EnvelopeError> {
    DateTime::parse_from_rfc3339(value)
        .map(|time| time.with_timezone(&Utc))
        .map_err(|error| EnvelopeError::Malformed { name, reason: error.to_string() })
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
    fn a_commit_is_two_headers() {
        let headers = header(3).to_headers();
        let keys: Vec<&str> = headers.iter().map(|header| header.key).collect();
        assert_eq!(keys, [COMMIT, TRACEPARENT]);
    }

    /// The first form of the envelope, a header per field, as Keel wrote it until 2026-12.
    fn legacy_headers(header: &CommitHeader) -> OwnedHeaders {
        use legacy::*;
        const AGGREGATE_VERSION: &str = "keel-aggregate-version";
        let occurred_at = header.occurred_at.to_rfc3339_opts(SecondsFormat::Micros, true);
        let mut headers = OwnedHeaders::new()
            .insert(text(COMMAND_ID, &header.command_id.to_string()))
            .insert(text(AGGREGATE_ID, &header.aggregate_id.to_string()))
            .insert(text(EXPECTED_VERSION, &header.expected_version.to_string()))
            .insert(text(OCCURRED_AT, &occurred_at))
            .insert(text(ACTOR, &header.actor))
            .insert(text(CORRELATION_ID, &header.correlation_id.to_string()))
            .insert(text(TRACEPARENT, header.traceparent.as_deref().unwrap()))
            .insert(text(SEALED, SEALED_WITH));
        for (index, event) in header.events.iter().enumerate() {
            headers = headers
                .insert(text(EVENT_ID, &event.event_id.to_string()))
                .insert(text(EVENT_TYPE, &event.event_type))
                .insert(text(SCHEMA_VERSION, &event.schema_version.to_string()))
                .insert(text(AGGREGATE_VERSION, &(header.expected_version + index as u64 + 1).to_string()));
        }
        headers
    }

    #[test]
    fn commits_written_with_a_header_per_field_stay_readable() {
        let original = header(2);
        let decoded = CommitHeader::from_headers(&legacy_headers(&original)).unwrap();
        assert_eq!(decoded.occurred_at.timestamp_micros(), original.occurred_at.timestamp_micros());
        assert_eq!(CommitHeader { occurred_at: original.occurred_at, ..decoded }, original);
    }

    #[test]
    fn missing_and_malformed_headers_are_errors() {
        let headers = OwnedHeaders::new().insert(text(legacy::COMMAND_ID, "not-a-uuid"));
        assert!(CommitHeader::from_headers(&headers).is_err());
        assert_eq!(CommitHeader::from_headers(&OwnedHeaders::new()), Err(EnvelopeError::Missing(legacy::OCCURRED_AT)));
        for document in ["{", r#"{"command":"x"}"#] {
            let headers = OwnedHeaders::new().insert(text(COMMIT, document));
            assert!(matches!(CommitHeader::from_headers(&headers), Err(EnvelopeError::Malformed { .. })), "{document}");
        }
        // An event whose version contradicts its place.
        let mut json: serde_json::Value = serde_json::from_str(
            header(1)
                .to_headers()
                .iter()
                .next()
                .unwrap()
                .value
                .map(|value| std::str::from_utf8(value).unwrap())
                .unwrap(),
        )
        .unwrap();
        json["events"][0]["version"] = 9.into();
        let headers = OwnedHeaders::new().insert(text(COMMIT, &json.to_string()));
        assert!(matches!(CommitHeader::from_headers(&headers), Err(EnvelopeError::Malformed { .. })));
        // A newer form is no malformed record: this reader is too old for it.
        json["events"][0]["version"] = 4.into();
        json["form"] = 2.into();
        json["added_later"] = "x".into();
        let headers = OwnedHeaders::new().insert(text(COMMIT, &json.to_string()));
        assert_eq!(CommitHeader::from_headers(&headers), Err(EnvelopeError::TooNew(2)));
        // Fields added without a new form are ignored.
        json["form"] = 1.into();
        let headers = OwnedHeaders::new().insert(text(COMMIT, &json.to_string()));
        assert!(CommitHeader::from_headers(&headers).is_ok());
    }
}
