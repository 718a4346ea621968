//! The auth aggregates on the shared write path: credentials (password hashes sealed with the
//! user's key, so an erasure leaves none readable) and sessions.

use apache_avro::types::Value;
use keel_domain::{
    Aggregate, DomainError,
    auth::{Credentials, CredentialsCommand, CredentialsError, CredentialsEvent, Session, SessionEvent},
};
use keel_topics::{CodecError, CommitHeader, Decoded, Opened, Topic, Vault, auth as wire};
use uuid::Uuid;

use crate::engine::Model;

pub struct CredentialStore {
    vault: Vault,
}

impl CredentialStore {
    pub fn new(vault: Vault) -> Self {
        Self { vault }
    }
}

impl Model for CredentialStore {
    type State = Credentials;
    type Command = CredentialsCommand;
    type Event = CredentialsEvent;
    type Index = ();

    const TOPIC: Topic = Topic::AuthCredentials;
    const SERVICE: &'static str = "auth";

    /// Removing a password that is not there is what was asked for: nothing to do, no refusal
    /// (an erasure removes the password whether or not the user set one).
    fn decide(
        credentials: &Credentials,
        _: &(),
        command: &CredentialsCommand,
    ) -> Result<Vec<CredentialsEvent>, DomainError> {
        match credentials.decide(command.clone()) {
            Err(CredentialsError::NoPassword) if matches!(command, CredentialsCommand::Remove) => Ok(Vec::new()),
            decided => decided.map_err(Into::into),
        }
    }

    async fn encode(&self, aggregate_id: Uuid, events: &[CredentialsEvent]) -> Result<(Value, bool), CodecError> {
        let mut value = wire::encode_credentials(events);
        let sealed = self.vault.seal(Self::TOPIC, aggregate_id, &mut value).await?;
        Ok((value, sealed))
    }

    async fn decode(&self, header: &CommitHeader, mut decoded: Decoded) -> Result<Vec<CredentialsEvent>, CodecError> {
        match self.vault.open(header, &mut decoded).await? {
            Opened::Clear => wire::decode_credentials(&decoded),
            // The user was erased: their password hash is gone with their key.
            Opened::Forgotten => {
                let user_id = keel_domain::identity::UserId::from_uuid(header.aggregate_id);
                Ok(header.events.iter().map(|_| CredentialsEvent::Removed { user_id }).collect())
            }
        }
    }
}

crate::plain_model! {
    /// Sessions, by login-derived id.
    Sessions {
        state: Session,
        event: SessionEvent,
        topic: Topic::AuthSessions,
        service: "auth",
        encode: wire::encode_sessions,
        decode: wire::decode_sessions,
    }
}
