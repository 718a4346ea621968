//! The User aggregate on the shared write path: its topic, wire form and email index.

use std::collections::HashMap;

use apache_avro::types::Value;
use keel_domain::identity::{Email, User, UserEvent};
use keel_topics::{CodecError, Decoded, Topic, identity as wire};
use uuid::Uuid;

use crate::engine::Model;

pub struct Users;

/// Which user holds an email: registrations of one email are one aggregate (see
/// [`registration_id`]), so the index only gives the refusal its proper reason.
#[derive(Debug, Default)]
pub struct Emails(HashMap<Email, Uuid>);

impl Emails {
    pub fn owner(&self, email: &Email) -> Option<Uuid> {
        self.0.get(email).copied()
    }
}

impl Model for Users {
    type State = User;
    type Event = UserEvent;
    type Index = Emails;

    const TOPIC: Topic = Topic::IdentityUsers;
    const SERVICE: &'static str = "identity";

    fn encode(events: &[UserEvent]) -> Value {
        wire::encode(events)
    }

    fn decode(decoded: &Decoded) -> Result<Vec<UserEvent>, CodecError> {
        wire::decode(decoded)
    }

    fn reindex(index: &mut Emails, id: Uuid, before: &User, after: &User) {
        if before.email() == after.email() {
            return;
        }
        if let Some(old) = before.email()
            && index.0.get(old) == Some(&id)
        {
            index.0.remove(old);
        }
        if let Some(new) = after.email() {
            index.0.insert(new.clone(), id);
        }
    }
}

/// Keel's namespace for ids derived from names (UUIDv5).
const USER_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6b65_656c_2d75_7365_7273_2d76_3100_0001);

/// The id of the user a registration of `email` creates: derived from the email, so that two
/// registrations of one email are two commits on one aggregate at version 0, and the shared rule
/// lets exactly one of them be valid, whichever writers decided them (two owners during a
/// rebalance, a zombie). A retried registration is the same command on the same aggregate and
/// gets the first result back.
///
/// The id is a name-based hash of the email: whoever can guess an email can compute its id. The
/// email stays personal data in the log; erasing it (a later issue) must account for this.
pub fn registration_id(email: &Email) -> Uuid {
    Uuid::new_v5(&USER_ID_NAMESPACE, email.as_str().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_email_one_user_id() {
        let email = Email::parse("Ada@Example.com").unwrap();
        assert_eq!(registration_id(&email), registration_id(&Email::parse("ada@example.com").unwrap()));
        assert_ne!(registration_id(&email), registration_id(&Email::parse("bo@example.com").unwrap()));
    }
}
