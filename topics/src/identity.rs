//! Wire form of the identity events and the explicit conversions to and from the domain.

use apache_avro::types::Value;
use keel_domain::identity::{DisplayName, DisplayNameChanged, Email, UserEvent, UserId, UserRegistered};

use crate::{
    Topic,
    codec::{self, CodecError, Decoded},
};

const USER_REGISTERED: &str = "keel.identity.UserRegistered";
const USER_DISPLAY_NAME_CHANGED: &str = "keel.identity.UserDisplayNameChanged";

/// The commit value of a user's events.
pub fn encode(events: &[UserEvent]) -> Value {
    let records = events
        .iter()
        .map(|event| match event {
            UserEvent::Registered(registered) => (
                USER_REGISTERED,
                Value::Record(vec![
                    ("user_id".into(), Value::Uuid(registered.id.as_uuid())),
                    ("email".into(), Value::String(registered.email.as_str().to_owned())),
                    ("display_name".into(), Value::String(registered.display_name.as_str().to_owned())),
                ]),
            ),
            UserEvent::DisplayNameChanged(changed) => (
                USER_DISPLAY_NAME_CHANGED,
                Value::Record(vec![
                    ("user_id".into(), Value::Uuid(changed.id.as_uuid())),
                    ("display_name".into(), Value::String(changed.display_name.as_str().to_owned())),
                ]),
            ),
        })
        .collect();
    codec::commit_value(Topic::IdentityUsers, records)
}

/// The domain events of a decoded user commit.
pub fn decode(decoded: &Decoded) -> Result<Vec<UserEvent>, CodecError> {
    decoded
        .events
        .iter()
        .map(|event| {
            let record = &event.record;
            let invalid = |error: keel_domain::identity::InvalidValue| CodecError::Shape(error.to_string());
            match event.type_name.as_str() {
                USER_REGISTERED => Ok(UserEvent::Registered(UserRegistered {
                    id: UserId::from_uuid(codec::uuid_field(record, "user_id")?),
                    email: Email::parse(codec::string_field(record, "email")?).map_err(invalid)?,
                    display_name: DisplayName::parse(codec::string_field(record, "display_name")?).map_err(invalid)?,
                })),
                USER_DISPLAY_NAME_CHANGED => Ok(UserEvent::DisplayNameChanged(DisplayNameChanged {
                    id: UserId::from_uuid(codec::uuid_field(record, "user_id")?),
                    display_name: DisplayName::parse(codec::string_field(record, "display_name")?).map_err(invalid)?,
                })),
                other => Err(CodecError::UnknownEventType(other.to_owned())),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_commits_validate_against_the_topic_schema() {
        let event = UserEvent::Registered(UserRegistered {
            id: UserId::new(),
            email: Email::parse("ada@example.com").unwrap(),
            display_name: DisplayName::parse("Ada").unwrap(),
        });
        let changed = UserEvent::DisplayNameChanged(DisplayNameChanged {
            id: UserId::new(),
            display_name: DisplayName::parse("Ada L.").unwrap(),
        });
        let value = encode(&[event, changed]);
        assert!(value.validate(codec::reader_schema(Topic::IdentityUsers)));
    }
}
