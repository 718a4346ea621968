//! The User aggregate on the shared write path: its topic and wire form, with personal data
//! sealed by the user's key.

use apache_avro::types::Value;
use keel_domain::identity::{User, UserCommand, UserEvent};
use keel_topics::{CodecError, CommitHeader, Decoded, Opened, Topic, Vault, identity as wire};
use uuid::Uuid;

use crate::engine::Model;

pub struct Users {
    vault: Vault,
}

impl Users {
    pub fn new(vault: Vault) -> Self {
        Self { vault }
    }

    pub fn vault(&self) -> &Vault {
        &self.vault
    }
}

impl Model for Users {
    type State = User;
    type Command = UserCommand;
    type Event = UserEvent;
    type Index = ();

    const TOPIC: Topic = Topic::IdentityUsers;
    const SERVICE: &'static str = "identity";

    async fn encode(&self, aggregate_id: Uuid, events: &[UserEvent]) -> Result<(Value, bool), CodecError> {
        let mut value = wire::encode(events);
        let sealed = self.vault.seal(Self::TOPIC, aggregate_id, &mut value).await?;
        Ok((value, sealed))
    }

    async fn decode(&self, header: &CommitHeader, mut decoded: Decoded) -> Result<Vec<UserEvent>, CodecError> {
        match self.vault.open(header, &mut decoded).await? {
            Opened::Clear => wire::decode(&decoded),
            Opened::Forgotten => wire::forgotten(header),
        }
    }

    fn snapshot_at_once(event: &UserEvent) -> bool {
        matches!(event, UserEvent::PersonalDataErased { .. })
    }
}
