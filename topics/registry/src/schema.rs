//! Parsing and normalizing Avro schemas.
//!
//! A registered schema's identity is its *normalized form* (the schema re-serialized by
//! `apache_avro`: whitespace and JSON key order no longer matter, but defaults, docs, aliases,
//! logical types and custom attributes are kept) together with its references. The Avro
//! Parsing Canonical Form is deliberately not used: it drops defaults and logical types, so two
//! schemas that resolve differently (a field with and without a default) would share an id.

use apache_avro::Schema;
use serde::{Deserialize, Serialize};

/// The only schema type this registry accepts.
pub const AVRO: &str = "AVRO";

/// A reference from one schema to a named type registered under another subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaReference {
    /// The referenced type's full name (informational for Avro).
    pub name: String,
    /// The subject the referenced schema is registered under.
    pub subject: String,
    /// Its version there (`-1` means the latest when registering).
    pub version: i32,
}

/// A schema that parsed, in the forms the registry needs.
pub struct ParsedSchema {
    /// The normalized text, compared for identity.
    pub normalized: String,
    /// The text to serve: the normalized one, except for a schema with references, which is
    /// served as submitted. `schema_registry_converter` inlines a reference only where the
    /// schema names it the way it was written (e.g. a short name in the same namespace), and
    /// normalizing turns every name into a full name.
    pub served: String,
    /// Self-contained (referenced types inlined), for compatibility checks.
    pub resolved: Schema,
}

/// Parses `text` as an Avro schema whose references resolve among `referenced` (the texts of
/// every schema it references, directly or not, in any order).
pub fn parse(text: &str, referenced: &[String]) -> Result<ParsedSchema, String> {
    if text.trim().is_empty() {
        return Err("Invalid schema: the schema is empty".to_owned());
    }
    let (schema, resolved) = parse_with(text, referenced)?;
    let normalized =
        serde_json::to_string(&schema).map_err(|error| format!("Invalid schema: cannot normalize it: {error}"))?;
    // Serve the submitted text in the rare case the normalized form is not a fixed point (does
    // not parse back to itself): what is served must always mean what was registered.
    let round_trips = parse_with(&normalized, referenced)
        .ok()
        .and_then(|(reparsed, _)| serde_json::to_string(&reparsed).ok())
        .is_some_and(|again| again == normalized);
    let served = if round_trips && referenced.is_empty() { normalized.clone() } else { text.trim().to_owned() };
    Ok(ParsedSchema { normalized, served, resolved })
}

fn parse_with(text: &str, referenced: &[String]) -> Result<(Schema, Schema), String> {
    let invalid = |error: apache_avro::Error| format!("Invalid schema: {error}");
    if referenced.is_empty() {
        let schema = Schema::parse_str(text).map_err(invalid)?;
        return Ok((schema.clone(), schema));
    }
    let (schema, schemata) = Schema::parse_str_with_list(text, referenced).map_err(invalid)?;
    let mut resolved = schema.clone();
    resolved.denormalize(&schemata).map_err(invalid)?;
    Ok((schema, resolved))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitespace_and_key_order_do_not_change_the_normalized_form() {
        let compact = parse(
            r#"{"type":"record","name":"R","namespace":"n","fields":[{"name":"a","type":"int","default":1}]}"#,
            &[],
        )
        .expect("parses");
        let spaced = parse(
            r#" { "fields" : [ { "default": 1, "type": "int", "name": "a" } ],
                 "name": "R", "namespace": "n", "type": "record" } "#,
            &[],
        )
        .expect("parses");
        assert_eq!(compact.normalized, spaced.normalized);
        assert!(compact.normalized.contains("\"default\":1"));
    }

    #[test]
    fn defaults_are_part_of_the_identity() {
        let with = parse(r#"{"type":"record","name":"R","fields":[{"name":"a","type":"int","default":1}]}"#, &[])
            .expect("parses");
        let without =
            parse(r#"{"type":"record","name":"R","fields":[{"name":"a","type":"int"}]}"#, &[]).expect("parses");
        assert_ne!(with.normalized, without.normalized);
    }

    #[test]
    fn references_resolve_into_a_self_contained_schema() {
        let referenced = vec![
            r#"{"type":"record","name":"Money","namespace":"keel","fields":[{"name":"cents","type":"long"}]}"#
                .to_owned(),
        ];
        let parsed = parse(
            r#"{"type":"record","name":"Order","namespace":"keel","fields":[{"name":"total","type":"keel.Money"}]}"#,
            &referenced,
        )
        .expect("parses with its reference");
        assert!(parsed.normalized.contains("\"keel.Money\""), "{}", parsed.normalized);
        let resolved = serde_json::to_string(&parsed.resolved).expect("serializes");
        assert!(resolved.contains("cents"), "{resolved}");
    }

    #[test]
    fn invalid_schemas_are_rejected() {
        assert!(parse("", &[]).is_err());
        assert!(parse("{not json", &[]).is_err());
        assert!(parse(r#"{"type":"record","fields":[]}"#, &[]).is_err());
        assert!(parse(r#"{"type":"nonsense"}"#, &[]).is_err());
    }
}
