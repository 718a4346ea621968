//! Avro values as JSON for people (the audit log, `keel replay`), with the fields a schema marks
//! `"keel.sensitive": true` redacted.

use apache_avro::{Schema, types::Value};
use serde_json::{Map, Value as Json, json};

use crate::codec::DecodedEvent;

/// The placeholder of a redacted field.
pub const REDACTED: &str = "[redacted]";
/// The placeholder of a sensitive field whose key was erased.
pub const ERASED: &str = "[erased]";

/// An event's fields as JSON, sensitive fields replaced by [`REDACTED`].
pub fn redacted(event: &DecodedEvent) -> Json {
    to_json(&event.record, Some(event.schema), Redaction::Sensitive(REDACTED))
}

/// An event's fields as JSON, sensitive fields replaced by [`ERASED`]: they are sealed with a
/// key that no longer exists.
pub fn erased(event: &DecodedEvent) -> Json {
    to_json(&event.record, Some(event.schema), Redaction::Sensitive(ERASED))
}

/// An event's fields as JSON, sensitive fields included: only for an operator who asked for
/// them explicitly (`keel replay --show-sensitive`).
pub fn unredacted(event: &DecodedEvent) -> Json {
    to_json(&event.record, Some(event.schema), Redaction::None)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Redaction {
    /// Sensitive fields are replaced by this placeholder.
    Sensitive(&'static str),
    None,
}

fn to_json(value: &Value, schema: Option<&Schema>, redaction: Redaction) -> Json {
    match (value, schema) {
        (Value::Record(fields), Some(Schema::Record(record))) => {
            let mut object = Map::new();
            for (name, value) in fields {
                let field = record.fields.iter().find(|field| &field.name == name);
                let rendered = match redaction {
                    Redaction::Sensitive(placeholder) if field.is_some_and(crate::sealing::is_sensitive) => {
                        json!(placeholder)
                    }
                    _ => to_json(value, field.map(|field| &field.schema), redaction),
                };
                object.insert(name.clone(), rendered);
            }
            Json::Object(object)
        }
        (Value::Record(fields), _) => {
            Json::Object(fields.iter().map(|(name, value)| (name.clone(), to_json(value, None, redaction))).collect())
        }
        (Value::Union(index, inner), Some(Schema::Union(union))) => {
            to_json(inner, union.variants().get(*index as usize), redaction)
        }
        (Value::Union(_, inner), _) => to_json(inner, None, redaction),
        (Value::Array(items), Some(Schema::Array(array))) => {
            Json::Array(items.iter().map(|item| to_json(item, Some(&array.items), redaction)).collect())
        }
        (Value::Array(items), _) => Json::Array(items.iter().map(|item| to_json(item, None, redaction)).collect()),
        (Value::Bytes(bytes) | Value::Fixed(_, bytes), _) => json!(hex_string(bytes)),
        (Value::Uuid(uuid), _) => json!(uuid.to_string()),
        (Value::Enum(_, symbol), _) => json!(symbol),
        (other, _) => Json::try_from(other.clone()).unwrap_or(Json::Null),
    }
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Topic, codec};

    #[test]
    fn sensitive_fields_are_redacted_and_others_kept() {
        let value = crate::identity::encode(&[keel_domain::identity::UserEvent::Registered(
            keel_domain::identity::UserRegistered {
                id: keel_domain::identity::UserId::from_uuid(uuid::Uuid::nil()),
                email: keel_domain::identity::Email::parse("ada@example.com").unwrap(),
                display_name: keel_domain::identity::DisplayName::parse("Ada").unwrap(),
            },
        )]);
        let Value::Record(fields) = value else { panic!("commit is a record") };
        let Value::Array(items) = &fields[0].1 else { panic!("events is an array") };
        let Value::Union(index, record) = &items[0] else { panic!("event is a union") };
        let Schema::Record(commit) = codec::reader_schema(Topic::IdentityUsers) else { panic!() };
        let Schema::Array(array) = &commit.fields[0].schema else { panic!() };
        let Schema::Union(union) = array.items.as_ref() else { panic!() };
        let schema: &'static Schema = Box::leak(Box::new(union.variants()[*index as usize].clone()));
        let event =
            DecodedEvent { type_name: "keel.identity.UserRegistered".into(), record: (**record).clone(), schema };
        assert_eq!(
            redacted(&event),
            json!({"user_id": uuid::Uuid::nil().to_string(), "email": REDACTED, "display_name": REDACTED})
        );
        assert_eq!(
            unredacted(&event),
            json!({"user_id": uuid::Uuid::nil().to_string(), "email": "ada@example.com", "display_name": "Ada"})
        );
    }
}
