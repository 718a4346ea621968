//! The User aggregate on the shared write path: its topic, wire form and email index.

use std::collections::HashMap;

use apache_avro::types::Value;
use keel_domain::identity::{Email, User, UserEvent};
use keel_topics::{CodecError, Decoded, Topic, identity as wire, partitioning};
use uuid::Uuid;

use crate::engine::Model;

pub struct Users;

/// Which user holds an email. Registrations of one email all land on one partition (see
/// [`registration_id`]), so a partition's index is the whole truth for its emails.
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

/// The id of the user a registration creates: derived from the command id, so that a retried
/// registration is the same command on the same aggregate and gets the first result back, and
/// chosen among such ids so that it falls on the email's partition. Every registration of an
/// email is then decided by one owner, against one index, which keeps emails unique without
/// coordination between owners.
pub fn registration_id(command_id: Uuid, email: &Email, partitions: i32) -> Uuid {
    let target = partitioning::partition_of(email.as_str().as_bytes(), partitions);
    (0u32..)
        .map(|attempt| Uuid::new_v5(&command_id, &attempt.to_be_bytes()))
        .find(|id| partitioning::partition_of(id.to_string().as_bytes(), partitions) == target)
        .expect("some derived id falls on every partition")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_ids_are_deterministic_and_on_the_emails_partition() {
        let email = Email::parse("ada@example.com").unwrap();
        let command = Uuid::now_v7();
        let id = registration_id(command, &email, 8);
        assert_eq!(id, registration_id(command, &email, 8));
        assert_ne!(id, registration_id(Uuid::now_v7(), &email, 8));
        let partition = |key: &str| partitioning::partition_of(key.as_bytes(), 8);
        assert_eq!(partition(&id.to_string()), partition(email.as_str()));
    }
}
