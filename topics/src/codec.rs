//! Record values in the Confluent wire format (magic byte, schema id, Avro datum), encoded and
//! decoded through a Confluent-compatible schema registry with `schema_registry_converter`.
//!
//! A commit value is a record with one field, `events`: an array of a union of event records.
//! Union branches are matched by record name, as the Avro specification resolves unions, so a
//! reader handles writers whose union lists the branches in another order or has more of them.

use std::{collections::HashMap, sync::Arc, sync::OnceLock, time::Duration};

use apache_avro::{Schema, types::Value};
use schema_registry_converter::{
    async_impl::{
        avro::{AvroDecoder, AvroEncoder},
        schema_registry::{SrSettings, get_schema_by_subject},
    },
    error::SRCError,
    schema_registry_common::{SchemaType, SubjectNameStrategy, SuppliedSchema},
};

use crate::catalogue::{Topic, TopicNames};

/// Confluent's error code for a schema id the registry does not have.
const SCHEMA_NOT_FOUND: &str = "40403";

#[derive(Debug, Clone, thiserror::Error)]
pub enum CodecError {
    #[error("schema registry: {message}")]
    Registry { message: String, retriable: bool },
    #[error("record does not match its schema: {0}")]
    Shape(String),
    #[error("unknown event type `{0}`")]
    UnknownEventType(String),
    /// The keys of sealed fields cannot be had now (the key store is down, or misconfigured).
    #[error("personal data keys: {0}")]
    Keys(String),
    /// Written by a newer version of Keel than this one: readers wait for one that reads it.
    #[error("{0}")]
    TooNew(String),
}

impl CodecError {
    /// Whether trying again later may succeed (the registry was unreachable, …).
    pub fn is_retriable(&self) -> bool {
        matches!(self, Self::Registry { retriable: true, .. } | Self::Keys(_) | Self::TooNew(_))
    }
}

impl From<SRCError> for CodecError {
    fn from(error: SRCError) -> Self {
        Self::Registry { message: describe(&error), retriable: error.retriable }
    }
}

fn describe(error: &SRCError) -> String {
    match &error.cause {
        Some(cause) => format!("{}: {cause}", error.error),
        None => error.error.clone(),
    }
}

/// One decoded event of a commit: its record's full name and its fields, resolved against the
/// schema this build of Keel reads with.
#[derive(Debug, Clone)]
pub struct DecodedEvent {
    pub type_name: String,
    pub record: Value,
    /// The reader schema of this event record (for field attributes such as `keel.sensitive`).
    pub schema: &'static Schema,
}

/// A decoded commit value.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub schema_id: u32,
    pub events: Vec<DecodedEvent>,
}

/// Encodes and decodes commit values of Keel's topics.
#[derive(Clone)]
pub struct SchemaRegistryCodec {
    encoder: Arc<AvroEncoder>,
    decoder: Arc<AvroDecoder>,
    /// For look-ups outside the encoder's and decoder's caches.
    settings: Arc<SrSettings>,
    names: TopicNames,
}

impl SchemaRegistryCodec {
    pub fn new(registry_url: &str, names: TopicNames) -> Result<Self, CodecError> {
        let settings = || {
            SrSettings::new_builder(registry_url.trim_end_matches('/').to_owned())
                .set_timeout(Duration::from_secs(10))
                .no_proxy()
                .build()
                .map_err(CodecError::from)
        };
        Ok(Self {
            encoder: Arc::new(AvroEncoder::new(settings()?)),
            decoder: Arc::new(AvroDecoder::new(settings()?)),
            settings: Arc::new(settings()?),
            names,
        })
    }

    fn strategy(&self, topic: Topic) -> SubjectNameStrategy {
        SubjectNameStrategy::TopicNameStrategyWithSchema(
            self.names.name(topic),
            false,
            SuppliedSchema::new(None, SchemaType::Avro, topic.spec().value_schema.to_owned()),
        )
    }

    /// Registers the topic's value schema (idempotent) and returns its id. Roles call it at start
    /// so that an incompatible schema stops them before they write anything.
    pub async fn register(&self, topic: Topic) -> Result<u32, CodecError> {
        let subject = self.names.value_subject(topic);
        let schema = self.encoder.get_schema_and_id(&subject, self.strategy(topic)).await?;
        Ok(schema.id)
    }

    /// Whether the registry serves `topic`'s own value subject right now.
    async fn serves(&self, topic: Topic) -> bool {
        let strategy = SubjectNameStrategy::TopicNameStrategy(self.names.name(topic), false);
        get_schema_by_subject(&self.settings, &strategy).await.is_ok()
    }

    /// Encodes one commit value (a `Value::Record` of the topic's value schema).
    pub async fn encode(&self, topic: Topic, value: Value) -> Result<Vec<u8>, CodecError> {
        Ok(self.encoder.encode_value(value, &self.strategy(topic)).await?)
    }

    /// Decodes a commit value of `topic`, resolving every event against the reader schema.
    ///
    /// A record is only ever declared unreadable for what it is, never for a registry failure:
    /// the writer schema is fetched first, and a failure to get it (an unreachable registry, a
    /// 500) is retriable. One exception: an id the registry says it never issued (Confluent's
    /// error 40403) while it serves this topic's own subject — the right registry, up — is a
    /// record no reader will ever read, and every reader skips it alike (else one such record
    /// would stop its partition's writer and readers for good). The client caches failed
    /// look-ups, so they are cleared before the caller retries.
    pub async fn decode(&self, topic: Topic, payload: &[u8]) -> Result<Decoded, CodecError> {
        let id = match payload {
            [0, a, b, c, d, ..] => u32::from_be_bytes([*a, *b, *c, *d]),
            _ => return Err(CodecError::Shape("not in the Confluent wire format".into())),
        };
        if let Err(error) = self.decoder.get_schema(id).await {
            self.decoder.remove_errors_from_cache();
            let message = format!("schema {id}: {}", describe(&error));
            if message.contains(SCHEMA_NOT_FOUND) && self.serves(topic).await {
                return Err(CodecError::Shape(format!("schema id {id} was never issued by the schema registry")));
            }
            return Err(CodecError::Registry { message, retriable: true });
        }
        let decoded = self
            .decoder
            .decode_with_schema(Some(payload))
            .await?
            .ok_or_else(|| CodecError::Shape("a commit has a value".into()))?;
        let writer_branches = event_branch_names(&decoded.schema.parsed)?;
        let reader = reader_branches(topic);
        let Value::Record(fields) = decoded.value else {
            return Err(CodecError::Shape("a commit value is a record".into()));
        };
        let items = match fields.into_iter().find(|(name, _)| name == "events") {
            Some((_, Value::Array(items))) => items,
            _ => return Err(CodecError::Shape("a commit has an `events` array".into())),
        };
        let events = items
            .into_iter()
            .map(|item| {
                let Value::Union(index, record) = item else {
                    return Err(CodecError::Shape("events are union values".into()));
                };
                let type_name = writer_branches
                    .get(index as usize)
                    .ok_or_else(|| CodecError::Shape(format!("union index {index} out of range")))?;
                let schema = *reader.get(type_name).ok_or_else(|| CodecError::UnknownEventType(type_name.clone()))?;
                let record = record.resolve(schema).map_err(|error| CodecError::Shape(error.to_string()))?;
                Ok(DecodedEvent { type_name: type_name.clone(), record, schema })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Decoded { schema_id: decoded.schema.id, events })
    }
}

/// The full names of the record branches of a commit schema's `events` union, in union order.
fn event_branch_names(schema: &Schema) -> Result<Vec<String>, CodecError> {
    Ok(event_branches(schema)?.iter().map(|(name, _)| name.clone()).collect())
}

fn event_branches(schema: &Schema) -> Result<Vec<(String, &Schema)>, CodecError> {
    let shape = |reason: &str| CodecError::Shape(reason.to_owned());
    let Schema::Record(record) = schema else { return Err(shape("a commit schema is a record")) };
    let field = record.fields.iter().find(|field| field.name == "events").ok_or_else(|| shape("no `events`"))?;
    let Schema::Array(array) = &field.schema else { return Err(shape("`events` is an array")) };
    let Schema::Union(union) = array.items.as_ref() else { return Err(shape("`events` items are a union")) };
    union
        .variants()
        .iter()
        .map(|variant| match variant {
            Schema::Record(record) => Ok((record.name.to_string(), variant)),
            _ => Err(shape("every event is a record")),
        })
        .collect()
}

/// The reader schema of a topic, parsed once.
pub fn reader_schema(topic: Topic) -> &'static Schema {
    static SCHEMAS: OnceLock<HashMap<Topic, Schema>> = OnceLock::new();
    let schemas = SCHEMAS.get_or_init(|| {
        Topic::ALL
            .iter()
            .map(|topic| {
                let schema = Schema::parse_str(topic.spec().value_schema)
                    .expect("catalogue schemas parse (checked by a unit test)");
                (*topic, schema)
            })
            .collect()
    });
    &schemas[&topic]
}

/// Event record schemas of a topic's reader schema by full name.
fn reader_branches(topic: Topic) -> HashMap<String, &'static Schema> {
    event_branches(reader_schema(topic)).expect("catalogue schemas are commit schemas").into_iter().collect()
}

/// Index of an event record in a topic's reader union, for encoding.
pub fn branch_index(topic: Topic, type_name: &str) -> u32 {
    event_branches(reader_schema(topic))
        .expect("catalogue schemas are commit schemas")
        .iter()
        .position(|(name, _)| name == type_name)
        .unwrap_or_else(|| panic!("`{type_name}` is a branch of the {topic} schema")) as u32
}

/// Builds a commit value from encoded event records (`(full name, record)`).
pub fn commit_value(topic: Topic, events: Vec<(&str, Value)>) -> Value {
    let items = events
        .into_iter()
        .map(|(type_name, record)| Value::Union(branch_index(topic, type_name), Box::new(record)))
        .collect();
    Value::Record(vec![("events".to_owned(), Value::Array(items))])
}

/// Reads a field of a resolved record.
pub fn field<'a>(record: &'a Value, name: &str) -> Result<&'a Value, CodecError> {
    match record {
        Value::Record(fields) => fields
            .iter()
            .find(|(field, _)| field == name)
            .map(|(_, value)| value)
            .ok_or_else(|| CodecError::Shape(format!("missing field `{name}`"))),
        _ => Err(CodecError::Shape("expected a record".into())),
    }
}

pub fn string_field<'a>(record: &'a Value, name: &str) -> Result<&'a str, CodecError> {
    match field(record, name)? {
        Value::String(value) => Ok(value),
        _ => Err(CodecError::Shape(format!("field `{name}` is a string"))),
    }
}

pub fn uuid_field(record: &Value, name: &str) -> Result<uuid::Uuid, CodecError> {
    match field(record, name)? {
        Value::Uuid(value) => Ok(*value),
        Value::String(value) => value.parse().map_err(|_| CodecError::Shape(format!("field `{name}` is a uuid"))),
        _ => Err(CodecError::Shape(format!("field `{name}` is a uuid"))),
    }
}

/// A timestamp (milliseconds since the epoch) of a resolved record, as Avro's
/// `timestamp-millis` or a plain `long`.
pub fn millis_field(record: &Value, name: &str) -> Result<i64, CodecError> {
    match field(record, name)? {
        Value::TimestampMillis(value) | Value::Long(value) => Ok(*value),
        _ => Err(CodecError::Shape(format!("field `{name}` is a timestamp"))),
    }
}

/// An array of strings of a resolved record.
pub fn strings_field<'a>(record: &'a Value, name: &str) -> Result<Vec<&'a str>, CodecError> {
    match field(record, name)? {
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(text) => Ok(text.as_str()),
                _ => Err(CodecError::Shape(format!("field `{name}` holds strings"))),
            })
            .collect(),
        _ => Err(CodecError::Shape(format!("field `{name}` is an array"))),
    }
}

/// An event record from its fields, in schema order.
pub fn record(fields: Vec<(&str, Value)>) -> Value {
    Value::Record(fields.into_iter().map(|(name, value)| (name.to_owned(), value)).collect())
}

/// An Avro array of strings.
pub fn strings<'a>(items: impl IntoIterator<Item = &'a str>) -> Value {
    Value::Array(items.into_iter().map(|item| Value::String(item.to_owned())).collect())
}

/// A domain value that failed to parse from a stored field: the record does not match its schema.
pub fn invalid(error: keel_domain::InvalidValue) -> CodecError {
    CodecError::Shape(error.to_string())
}

/// Readiness: the schema registry answers. Not critical: schemas already fetched are cached, so
/// commits of known schemas are written and read while it is down; what it would be needed for
/// (a schema seen for the first time) waits and retries.
pub struct RegistryCheck {
    client: reqwest::Client,
    url: String,
}

impl RegistryCheck {
    pub fn new(registry_url: &str) -> Result<Self, CodecError> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(1500))
            .build()
            .map_err(|error| CodecError::Registry { message: error.to_string(), retriable: false })?;
        Ok(Self { client, url: format!("{}/subjects", registry_url.trim_end_matches('/')) })
    }
}

#[async_trait::async_trait]
impl keel_runtime::ReadinessCheck for RegistryCheck {
    fn name(&self) -> &'static str {
        "schema-registry"
    }

    fn critical(&self) -> bool {
        false
    }

    async fn check(&self) -> Result<(), String> {
        let response = self.client.get(&self.url).send().await.map_err(|error| format!("unreachable: {error}"))?;
        if response.status().is_success() { Ok(()) } else { Err(format!("answered {}", response.status())) }
    }
}
