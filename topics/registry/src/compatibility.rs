//! Compatibility levels and the Avro checks behind them.
//!
//! The checks are `apache_avro`'s schema-resolution rules. A `Partial` result (the reader may
//! fail on some data, e.g. an enum symbol or union branch it lacks) counts as incompatible, as it
//! does in the Java Avro checker that Confluent Schema Registry uses.

use std::fmt;

use apache_avro::Schema;
use apache_avro::error::CompatibilityError;
use apache_avro::schema_compatibility::{Compatibility, SchemaCompatibility};

/// A subject's (or the registry's global) compatibility level, as Confluent names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompatibilityLevel {
    /// No checks.
    None,
    /// The new schema can read data written with the latest version.
    Backward,
    /// The new schema can read data written with every version.
    BackwardTransitive,
    /// The latest version can read data written with the new schema.
    Forward,
    /// Every version can read data written with the new schema.
    ForwardTransitive,
    /// Backward and forward against the latest version.
    Full,
    /// Backward and forward against every version.
    FullTransitive,
}

impl CompatibilityLevel {
    /// The level used when neither the subject nor the registry configures one.
    pub const DEFAULT: Self = Self::Backward;

    /// Parses a level name, ignoring ASCII case (`"full_transitive"` is accepted).
    pub fn parse(name: &str) -> Option<Self> {
        let level = match name.trim().to_ascii_uppercase().as_str() {
            "NONE" => Self::None,
            "BACKWARD" => Self::Backward,
            "BACKWARD_TRANSITIVE" => Self::BackwardTransitive,
            "FORWARD" => Self::Forward,
            "FORWARD_TRANSITIVE" => Self::ForwardTransitive,
            "FULL" => Self::Full,
            "FULL_TRANSITIVE" => Self::FullTransitive,
            _ => return None,
        };
        Some(level)
    }

    /// The Confluent name of the level.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "NONE",
            Self::Backward => "BACKWARD",
            Self::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Self::Forward => "FORWARD",
            Self::ForwardTransitive => "FORWARD_TRANSITIVE",
            Self::Full => "FULL",
            Self::FullTransitive => "FULL_TRANSITIVE",
        }
    }

    /// Whether the level checks against every version rather than only the latest.
    pub fn is_transitive(self) -> bool {
        matches!(self, Self::BackwardTransitive | Self::ForwardTransitive | Self::FullTransitive)
    }

    fn checks_backward(self) -> bool {
        matches!(self, Self::Backward | Self::BackwardTransitive | Self::Full | Self::FullTransitive)
    }

    fn checks_forward(self) -> bool {
        matches!(self, Self::Forward | Self::ForwardTransitive | Self::Full | Self::FullTransitive)
    }
}

impl fmt::Display for CompatibilityLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A registered version to check a candidate schema against.
pub struct ExistingVersion {
    /// The subject version (or 0 when unknown).
    pub version: i32,
    /// The version's self-contained schema.
    pub schema: Schema,
}

/// Checks `candidate` against `existing` (ascending by version) under `level`.
///
/// Non-transitive levels look at the last element only; transitive ones at all of them.
/// Returns one message per failed check; an empty result means compatible.
pub fn check(level: CompatibilityLevel, candidate: &Schema, existing: &[ExistingVersion]) -> Vec<String> {
    let against: &[ExistingVersion] = if level.is_transitive() {
        existing
    } else {
        match existing.split_last() {
            Some((latest, _)) => std::slice::from_ref(latest),
            None => &[],
        }
    };
    let mut messages = Vec::new();
    for version in against {
        if level.checks_backward()
            && let Err(reason) = can_read(&version.schema, candidate)
        {
            messages.push(format!(
                "the new schema cannot read data written with version {} ({level}): {reason}",
                version.version
            ));
        }
        if level.checks_forward()
            && let Err(reason) = can_read(candidate, &version.schema)
        {
            messages.push(format!(
                "version {} cannot read data written with the new schema ({level}): {reason}",
                version.version
            ));
        }
    }
    messages
}

/// Whether every datum written with `writer` can be read with `reader`; the reason if not.
pub fn can_read(writer: &Schema, reader: &Schema) -> Result<(), String> {
    match SchemaCompatibility::can_read(writer, reader) {
        Ok(Compatibility::Full) => Ok(()),
        Ok(Compatibility::Partial) => {
            Err("some data written with the writer schema cannot be read: the reader lacks enum symbols \
             (and has no enum default) or union branches that the writer has"
                .to_owned())
        }
        Err(error) => Err(describe(&error)),
    }
}

/// Renders the whole error chain on one line, without the multi-line schema dumps that
/// `WrongType` carries.
fn describe(error: &CompatibilityError) -> String {
    let mut parts = Vec::new();
    let mut current = Some(error);
    while let Some(error) = current {
        match error {
            CompatibilityError::WrongType { writer_schema_type, reader_schema_type } => parts.push(format!(
                "the writer type {} cannot be read as the reader type {}",
                kind_of(writer_schema_type),
                kind_of(reader_schema_type)
            )),
            CompatibilityError::FieldTypeMismatch(field, inner) => {
                parts
                    .push(format!("field '{field}' in the reader schema does not match the type in the writer schema"));
                current = Some(inner);
                continue;
            }
            other => parts.push(other.to_string()),
        }
        current = None;
    }
    parts.join(": ")
}

/// The variant name at the start of a `{:#?}` schema dump (`"Record(\n..."` → `"Record"`).
fn kind_of(debug_dump: &str) -> &str {
    let end = debug_dump.find(|c: char| !c.is_ascii_alphanumeric()).unwrap_or(debug_dump.len());
    &debug_dump[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(text: &str) -> Schema {
        Schema::parse_str(text).expect("test schema parses")
    }

    fn version(version: i32, text: &str) -> ExistingVersion {
        ExistingVersion { version, schema: schema(text) }
    }

    const V1: &str = r#"{"type":"record","name":"R","fields":[{"name":"a","type":"int"}]}"#;
    const V2_DEFAULT: &str = r#"{"type":"record","name":"R","fields":[{"name":"a","type":"int"},{"name":"b","type":"string","default":""}]}"#;
    const V2_NO_DEFAULT: &str =
        r#"{"type":"record","name":"R","fields":[{"name":"a","type":"int"},{"name":"b","type":"string"}]}"#;

    #[test]
    fn levels_parse_case_insensitively_and_round_trip() {
        for name in
            ["NONE", "BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE", "FULL", "FULL_TRANSITIVE"]
        {
            let level = CompatibilityLevel::parse(&name.to_lowercase()).expect("known level");
            assert_eq!(level.as_str(), name);
        }
        assert_eq!(CompatibilityLevel::parse("SIDEWAYS"), None);
    }

    #[test]
    fn backward_requires_defaults_for_added_fields() {
        let existing = [version(1, V1)];
        assert!(check(CompatibilityLevel::Backward, &schema(V2_DEFAULT), &existing).is_empty());
        let messages = check(CompatibilityLevel::Backward, &schema(V2_NO_DEFAULT), &existing);
        assert_eq!(messages.len(), 1);
        assert!(messages[0].contains("'b'"), "{messages:?}");
    }

    #[test]
    fn forward_allows_adding_fields_without_default() {
        let existing = [version(1, V1)];
        assert!(check(CompatibilityLevel::Forward, &schema(V2_NO_DEFAULT), &existing).is_empty());
        assert_eq!(check(CompatibilityLevel::Full, &schema(V2_NO_DEFAULT), &existing).len(), 1);
    }

    #[test]
    fn type_mismatch_is_described_briefly() {
        let reader = schema(r#"{"type":"record","name":"R","fields":[{"name":"a","type":"string"}]}"#);
        let reason = can_read(&schema(V1), &reader).expect_err("int is not a string");
        assert!(reason.contains("field 'a'"), "{reason}");
        assert!(!reason.contains('\n'), "{reason}");
    }

    #[test]
    fn dropped_enum_symbol_is_incompatible() {
        let writer = schema(r#"{"type":"enum","name":"E","symbols":["A","B"]}"#);
        let reader = schema(r#"{"type":"enum","name":"E","symbols":["A"]}"#);
        assert!(can_read(&writer, &reader).is_err());
        assert!(can_read(&reader, &writer).is_ok());
    }
}
