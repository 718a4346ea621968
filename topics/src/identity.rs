//! Wire form of the identity events and the explicit conversions to and from the domain.

use apache_avro::types::Value;
use keel_domain::identity::{
    Bio, BioChanged, DisplayName, DisplayNameChanged, Email, EmailChanged, UserEvent, UserId, UserRegistered,
};

use crate::{
    CommitHeader, Topic,
    codec::{self, CodecError, Decoded, invalid, record},
};

const USER_REGISTERED: &str = "keel.identity.UserRegistered";
const USER_DISPLAY_NAME_CHANGED: &str = "keel.identity.UserDisplayNameChanged";
const USER_BIO_CHANGED: &str = "keel.identity.UserBioChanged";
const USER_EMAIL_CHANGED: &str = "keel.identity.UserEmailChanged";
const USER_DEACTIVATED: &str = "keel.identity.UserDeactivated";
const USER_PERSONAL_DATA_ERASED: &str = "keel.identity.UserPersonalDataErased";

fn id(user: UserId) -> (&'static str, Value) {
    ("user_id", Value::Uuid(user.as_uuid()))
}

fn text(name: &'static str, value: &str) -> (&'static str, Value) {
    (name, Value::String(value.to_owned()))
}

/// The commit value of a user's events (sensitive fields in the clear; the writer seals them).
pub fn encode(events: &[UserEvent]) -> Value {
    let records = events
        .iter()
        .map(|event| match event {
            UserEvent::Registered(registered) => (
                USER_REGISTERED,
                record(vec![
                    id(registered.id),
                    text("email", registered.email.as_str()),
                    text("display_name", registered.display_name.as_str()),
                ]),
            ),
            UserEvent::DisplayNameChanged(changed) => (
                USER_DISPLAY_NAME_CHANGED,
                record(vec![id(changed.id), text("display_name", changed.display_name.as_str())]),
            ),
            UserEvent::BioChanged(changed) => {
                (USER_BIO_CHANGED, record(vec![id(changed.id), text("bio", changed.bio.as_str())]))
            }
            UserEvent::EmailChanged(changed) => {
                (USER_EMAIL_CHANGED, record(vec![id(changed.id), text("email", changed.email.as_str())]))
            }
            UserEvent::Deactivated { id: user } => (USER_DEACTIVATED, record(vec![id(*user)])),
            UserEvent::PersonalDataErased { id: user } => (USER_PERSONAL_DATA_ERASED, record(vec![id(*user)])),
            UserEvent::Forgotten { .. } => unreachable!("a forgotten event is only ever read, never decided"),
        })
        .collect();
    codec::commit_value(Topic::IdentityUsers, records)
}

/// The domain events of a decoded user commit whose sensitive fields are in the clear.
pub fn decode(decoded: &Decoded) -> Result<Vec<UserEvent>, CodecError> {
    decoded
        .events
        .iter()
        .map(|event| {
            let record = &event.record;
            let user = || Ok::<_, CodecError>(UserId::from_uuid(codec::uuid_field(record, "user_id")?));
            let string = |name| codec::string_field(record, name);
            match event.type_name.as_str() {
                USER_REGISTERED => Ok(UserEvent::Registered(UserRegistered {
                    id: user()?,
                    email: Email::parse(string("email")?).map_err(invalid)?,
                    display_name: DisplayName::parse(string("display_name")?).map_err(invalid)?,
                })),
                USER_DISPLAY_NAME_CHANGED => Ok(UserEvent::DisplayNameChanged(DisplayNameChanged {
                    id: user()?,
                    display_name: DisplayName::parse(string("display_name")?).map_err(invalid)?,
                })),
                USER_BIO_CHANGED => Ok(UserEvent::BioChanged(BioChanged {
                    id: user()?,
                    bio: Bio::parse(string("bio")?).map_err(invalid)?,
                })),
                USER_EMAIL_CHANGED => Ok(UserEvent::EmailChanged(EmailChanged {
                    id: user()?,
                    email: Email::parse(string("email")?).map_err(invalid)?,
                })),
                USER_DEACTIVATED => Ok(UserEvent::Deactivated { id: user()? }),
                USER_PERSONAL_DATA_ERASED => Ok(UserEvent::PersonalDataErased { id: user()? }),
                other => Err(CodecError::UnknownEventType(other.to_owned())),
            }
        })
        .collect()
}

/// The events of a sealed commit whose key was erased: what the header says of them, nothing
/// personal (see [`UserEvent::Forgotten`]).
pub fn forgotten(header: &CommitHeader) -> Result<Vec<UserEvent>, CodecError> {
    const TYPES: &[&str] = &[
        "UserRegistered",
        "UserDisplayNameChanged",
        "UserBioChanged",
        "UserEmailChanged",
        "UserDeactivated",
        "UserPersonalDataErased",
    ];
    let id = UserId::from_uuid(header.aggregate_id);
    header
        .events
        .iter()
        .map(|meta| match TYPES.iter().find(|known| **known == meta.event_type) {
            Some(event_type) => Ok(UserEvent::Forgotten { id, event_type }),
            None => Err(CodecError::UnknownEventType(meta.event_type.clone())),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_commits_validate_against_the_topic_schema() {
        let id = UserId::new();
        let events = [
            UserEvent::Registered(UserRegistered {
                id,
                email: Email::parse("ada@example.com").unwrap(),
                display_name: DisplayName::parse("Ada").unwrap(),
            }),
            UserEvent::DisplayNameChanged(DisplayNameChanged {
                id,
                display_name: DisplayName::parse("Ada L.").unwrap(),
            }),
            UserEvent::BioChanged(BioChanged { id, bio: Bio::parse("Analyst").unwrap() }),
            UserEvent::EmailChanged(EmailChanged { id, email: Email::parse("ada@lovelace.org").unwrap() }),
            UserEvent::Deactivated { id },
            UserEvent::PersonalDataErased { id },
        ];
        let value = encode(&events);
        assert!(value.validate(codec::reader_schema(Topic::IdentityUsers)));
    }
}
