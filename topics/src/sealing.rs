//! Personal data in the log, sealed with a key per person ("crypto-shredding").
//!
//! Kafka keeps every event forever, so personal data cannot be deleted from it. Instead, in the
//! topics the catalogue marks `sealed`, every field the schema marks `"keel.sensitive": true` is
//! encrypted (AES-256-GCM) with a data key of the aggregate (a user), kept outside the log in the
//! [`Vault`](crate::vault::Vault). Erasing a user erases their key: their events stay in the log,
//! their personal fields become unreadable ciphertext for every reader, every rebuild and every
//! later consumer alike. The commit header says a commit is sealed (`keel-sealed`).
//!
//! A sealed field is `base64url(nonce ‖ ciphertext ‖ tag)` in the field's string. The associated
//! data binds it to its aggregate, event type and field, so a ciphertext moved to another user
//! or field does not open.

use std::fmt;

use aes_gcm::{
    Aes256Gcm,
    aead::{Aead, Generate, Key, KeyInit, Nonce, Payload},
};
use apache_avro::{Schema, types::Value};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use serde_json::json;
use uuid::Uuid;

use crate::{Topic, codec};

const NONCE_BYTES: usize = 12;
const SENSITIVE: &str = "keel.sensitive";

/// A 256-bit AES key. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct DataKey([u8; 32]);

impl DataKey {
    pub fn generate() -> Self {
        let mut bytes = [0; 32];
        getrandom::fill(&mut bytes).expect("the operating system provides random bytes");
        Self(bytes)
    }

    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// A key from 32 bytes in standard base64 (how keys are configured).
    pub fn from_base64(text: &str) -> Option<Self> {
        let bytes = base64::engine::general_purpose::STANDARD.decode(text.trim()).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }

    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(&Key::<Aes256Gcm>::from(self.0))
    }

    /// Encrypts `plaintext`, bound to `aad`: `nonce ‖ ciphertext ‖ tag`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let nonce = Nonce::<Aes256Gcm>::generate();
        let ciphertext = self
            .cipher()
            .encrypt(&nonce, Payload { msg: plaintext, aad })
            .expect("AES-GCM encrypts any message below 64 GiB");
        let mut sealed = Vec::with_capacity(NONCE_BYTES + ciphertext.len());
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&ciphertext);
        sealed
    }

    /// Decrypts what [`Self::seal`] made with the same key and `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < NONCE_BYTES {
            return Err(SealError::Malformed);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_BYTES);
        let nonce = Nonce::<Aes256Gcm>::try_from(nonce).map_err(|_| SealError::Malformed)?;
        self.cipher().decrypt(&nonce, Payload { msg: ciphertext, aad }).map_err(|_| SealError::WrongKey)
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey([redacted])")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("a sealed field is not base64url(nonce ‖ ciphertext)")]
    Malformed,
    #[error("a sealed field does not open with its aggregate's key (tampered, or moved)")]
    WrongKey,
    #[error("a sealed field holds text that is not UTF-8")]
    NotText,
}

/// What binds a sealed field to its place.
fn aad(aggregate_id: Uuid, event_type: &str, field: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(16 + event_type.len() + field.len() + 2);
    aad.extend_from_slice(aggregate_id.as_bytes());
    aad.extend_from_slice(event_type.as_bytes());
    aad.push(0);
    aad.extend_from_slice(field.as_bytes());
    aad
}

/// Whether a field of an event record schema holds personal data.
pub fn is_sensitive(field: &apache_avro::schema::RecordField) -> bool {
    field.custom_attributes.get(SENSITIVE) == Some(&json!(true))
}

/// Seals every sensitive field of a commit value of `topic` (built with
/// [`codec::commit_value`]) in place.
pub fn seal_commit(topic: Topic, aggregate_id: Uuid, value: &mut Value, key: &DataKey) -> Result<(), SealError> {
    let Schema::Record(commit) = codec::reader_schema(topic) else { return Err(SealError::Malformed) };
    let Some(Schema::Array(array)) = commit.fields.first().map(|field| &field.schema) else {
        return Err(SealError::Malformed);
    };
    let Schema::Union(union) = array.items.as_ref() else { return Err(SealError::Malformed) };
    let Value::Record(fields) = value else { return Err(SealError::Malformed) };
    let Some((_, Value::Array(items))) = fields.first_mut() else { return Err(SealError::Malformed) };
    for item in items {
        let Value::Union(index, record) = item else { return Err(SealError::Malformed) };
        let Some(Schema::Record(schema)) = union.variants().get(*index as usize) else {
            return Err(SealError::Malformed);
        };
        let Value::Record(values) = record.as_mut() else { return Err(SealError::Malformed) };
        for (name, field_value) in values.iter_mut() {
            let sensitive = schema.fields.iter().any(|field| field.name == *name && is_sensitive(field));
            if let (true, Value::String(text)) = (sensitive, &mut *field_value) {
                let sealed = key.seal(&aad(aggregate_id, schema.name.as_ref(), name), text.as_bytes());
                *text = URL_SAFE_NO_PAD.encode(sealed);
            }
        }
    }
    Ok(())
}

/// Opens the sensitive fields of a decoded event of `aggregate_id` in place.
pub fn open_event(aggregate_id: Uuid, event: &mut codec::DecodedEvent, key: &DataKey) -> Result<(), SealError> {
    let Schema::Record(schema) = event.schema else { return Err(SealError::Malformed) };
    let Value::Record(values) = &mut event.record else { return Err(SealError::Malformed) };
    for (name, field_value) in values.iter_mut() {
        let sensitive = schema.fields.iter().any(|field| field.name == *name && is_sensitive(field));
        if let (true, Value::String(text)) = (sensitive, &mut *field_value) {
            let sealed = URL_SAFE_NO_PAD.decode(text.as_bytes()).map_err(|_| SealError::Malformed)?;
            let opened = key.open(&aad(aggregate_id, &event.type_name, name), &sealed)?;
            *text = String::from_utf8(opened).map_err(|_| SealError::NotText)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use keel_domain::identity::{DisplayName, Email, UserEvent, UserId, UserRegistered};

    use super::*;
    use crate::identity;

    fn registration(id: Uuid) -> Value {
        identity::encode(&[UserEvent::Registered(UserRegistered {
            id: UserId::from_uuid(id),
            email: Email::parse("ada@example.com").unwrap(),
            display_name: DisplayName::parse("Ada").unwrap(),
        })])
    }

    fn fields(value: &Value) -> Vec<(String, Value)> {
        let Value::Record(fields) = value else { panic!() };
        let Value::Array(items) = &fields[0].1 else { panic!() };
        let Value::Union(_, record) = &items[0] else { panic!() };
        let Value::Record(values) = record.as_ref() else { panic!() };
        values.clone()
    }

    #[test]
    fn sensitive_fields_are_sealed_and_the_rest_kept() {
        let id = Uuid::now_v7();
        let key = DataKey::generate();
        let mut value = registration(id);
        seal_commit(Topic::IdentityUsers, id, &mut value, &key).unwrap();
        let sealed = fields(&value);
        assert_eq!(sealed[0].1, Value::Uuid(id));
        let Value::String(email) = &sealed[1].1 else { panic!() };
        assert_ne!(email, "ada@example.com");
        let bytes = URL_SAFE_NO_PAD.decode(email).unwrap();
        let opened = key.open(&aad(id, "keel.identity.UserRegistered", "email"), &bytes).unwrap();
        assert_eq!(opened, b"ada@example.com");
        assert!(value.validate(codec::reader_schema(Topic::IdentityUsers)));
    }

    #[test]
    fn a_sealed_field_opens_only_with_its_key_in_its_place() {
        let (key, other) = (DataKey::generate(), DataKey::generate());
        let id = Uuid::now_v7();
        let sealed = key.seal(&aad(id, "E", "email"), b"secret");
        assert_eq!(key.open(&aad(id, "E", "email"), &sealed).unwrap(), b"secret");
        assert_eq!(other.open(&aad(id, "E", "email"), &sealed), Err(SealError::WrongKey));
        assert_eq!(key.open(&aad(Uuid::now_v7(), "E", "email"), &sealed), Err(SealError::WrongKey));
        assert_eq!(key.open(&aad(id, "E", "display_name"), &sealed), Err(SealError::WrongKey));
        assert_eq!(key.open(b"", &[1, 2]), Err(SealError::Malformed));
        assert!(!format!("{key:?}").contains(&format!("{:?}", key.as_bytes())));
    }
}
