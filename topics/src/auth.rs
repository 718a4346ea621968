//! Wire form of the auth events: credentials and sessions.

use apache_avro::types::Value;
use keel_domain::{
    auth::{CredentialsEvent, PasswordHash, RevokeReason, SessionEvent, SessionId, TokenHash},
    identity::UserId,
};

use crate::{
    Topic,
    codec::{self, CodecError, Decoded, invalid, record},
};

const PASSWORD_SET: &str = "keel.auth.PasswordSet";
const CREDENTIALS_REMOVED: &str = "keel.auth.CredentialsRemoved";
const SESSION_STARTED: &str = "keel.auth.SessionStarted";
const SESSION_REFRESHED: &str = "keel.auth.SessionRefreshed";
const SESSION_REVOKED: &str = "keel.auth.SessionRevoked";

fn uuid(name: &'static str, id: uuid::Uuid) -> (&'static str, Value) {
    (name, Value::Uuid(id))
}

pub fn encode_credentials(events: &[CredentialsEvent]) -> Value {
    let records = events
        .iter()
        .map(|event| match event {
            CredentialsEvent::PasswordSet { user_id, hash } => (
                PASSWORD_SET,
                record(vec![
                    uuid("user_id", user_id.as_uuid()),
                    ("password_hash", Value::String(hash.as_str().to_owned())),
                ]),
            ),
            CredentialsEvent::Removed { user_id } => {
                (CREDENTIALS_REMOVED, record(vec![uuid("user_id", user_id.as_uuid())]))
            }
        })
        .collect();
    codec::commit_value(Topic::AuthCredentials, records)
}

pub fn decode_credentials(decoded: &Decoded) -> Result<Vec<CredentialsEvent>, CodecError> {
    decoded
        .events
        .iter()
        .map(|event| {
            let record = &event.record;
            let user_id = UserId::from_uuid(codec::uuid_field(record, "user_id")?);
            match event.type_name.as_str() {
                PASSWORD_SET => Ok(CredentialsEvent::PasswordSet {
                    user_id,
                    hash: PasswordHash::parse(codec::string_field(record, "password_hash")?).map_err(invalid)?,
                }),
                CREDENTIALS_REMOVED => Ok(CredentialsEvent::Removed { user_id }),
                other => Err(CodecError::UnknownEventType(other.to_owned())),
            }
        })
        .collect()
}

pub fn encode_sessions(events: &[SessionEvent]) -> Value {
    let hash = |hash: &TokenHash| ("refresh_token_hash", Value::String(hash.to_hex()));
    let records = events
        .iter()
        .map(|event| match event {
            SessionEvent::Started { id, user_id, refresh, expires_at } => (
                SESSION_STARTED,
                record(vec![
                    uuid("session_id", id.as_uuid()),
                    uuid("user_id", user_id.as_uuid()),
                    hash(refresh),
                    ("expires_at", Value::TimestampMillis(expires_at.saturating_mul(1000))),
                ]),
            ),
            SessionEvent::Refreshed { id, refresh } => {
                (SESSION_REFRESHED, record(vec![uuid("session_id", id.as_uuid()), hash(refresh)]))
            }
            SessionEvent::Revoked { id, reason } => (
                SESSION_REVOKED,
                record(vec![uuid("session_id", id.as_uuid()), ("reason", Value::String(reason.as_str().to_owned()))]),
            ),
        })
        .collect();
    codec::commit_value(Topic::AuthSessions, records)
}

pub fn decode_sessions(decoded: &Decoded) -> Result<Vec<SessionEvent>, CodecError> {
    decoded
        .events
        .iter()
        .map(|event| {
            let record = &event.record;
            let id = SessionId::from_uuid(codec::uuid_field(record, "session_id")?);
            let hash = || TokenHash::parse_hex(codec::string_field(record, "refresh_token_hash")?).map_err(invalid);
            match event.type_name.as_str() {
                SESSION_STARTED => Ok(SessionEvent::Started {
                    id,
                    user_id: UserId::from_uuid(codec::uuid_field(record, "user_id")?),
                    refresh: hash()?,
                    expires_at: codec::millis_field(record, "expires_at")?.div_euclid(1000),
                }),
                SESSION_REFRESHED => Ok(SessionEvent::Refreshed { id, refresh: hash()? }),
                SESSION_REVOKED => {
                    let reason = codec::string_field(record, "reason")?;
                    let reason = RevokeReason::parse(reason)
                        .ok_or_else(|| CodecError::Shape(format!("unknown revocation reason `{reason}`")))?;
                    Ok(SessionEvent::Revoked { id, reason })
                }
                other => Err(CodecError::UnknownEventType(other.to_owned())),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_commits_validate_against_their_schemas() {
        let user_id = UserId::new();
        let hash = PasswordHash::parse("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA").unwrap();
        let credentials = encode_credentials(&[
            CredentialsEvent::PasswordSet { user_id, hash },
            CredentialsEvent::Removed { user_id },
        ]);
        assert!(credentials.validate(codec::reader_schema(Topic::AuthCredentials)));
        let id = SessionId::from_uuid(uuid::Uuid::now_v7());
        let token = TokenHash::from_bytes([7; 32]);
        let sessions = encode_sessions(&[
            SessionEvent::Started { id, user_id, refresh: token, expires_at: 1_800_000_000 },
            SessionEvent::Refreshed { id, refresh: token },
            SessionEvent::Revoked { id, reason: RevokeReason::TokenReuse },
        ]);
        assert!(sessions.validate(codec::reader_schema(Topic::AuthSessions)));
    }
}
