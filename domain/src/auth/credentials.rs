//! The Credentials aggregate: the password hash of one user.

use crate::{Aggregate, DomainEvent, identity::UserId};

use super::PasswordHash;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialsCommand {
    /// Sets (or replaces) the user's password, already hashed.
    SetPassword { user_id: UserId, hash: PasswordHash },
    /// Removes the password: nobody can log in as the user any more.
    Remove,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialsEvent {
    PasswordSet { user_id: UserId, hash: PasswordHash },
    Removed { user_id: UserId },
}

impl DomainEvent for CredentialsEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::PasswordSet { .. } => "PasswordSet",
            Self::Removed { .. } => "CredentialsRemoved",
        }
    }

    fn schema_version(&self) -> u32 {
        1
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error("the user has no password")]
    NoPassword,
}

impl From<CredentialsError> for crate::DomainError {
    fn from(error: CredentialsError) -> Self {
        match error {
            CredentialsError::NoPassword => Self::not_found(error.to_string()),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Credentials {
    #[default]
    None,
    Password {
        user_id: UserId,
        hash: PasswordHash,
    },
    Removed {
        user_id: UserId,
    },
}

impl Credentials {
    pub fn hash(&self) -> Option<&PasswordHash> {
        match self {
            Self::Password { hash, .. } => Some(hash),
            Self::None | Self::Removed { .. } => None,
        }
    }
}

impl Aggregate for Credentials {
    type Command = CredentialsCommand;
    type Event = CredentialsEvent;
    type Error = CredentialsError;

    fn decide(&self, command: CredentialsCommand) -> Result<Vec<CredentialsEvent>, CredentialsError> {
        match (self, command) {
            (_, CredentialsCommand::SetPassword { user_id, hash }) => {
                Ok(vec![CredentialsEvent::PasswordSet { user_id, hash }])
            }
            (Self::Password { user_id, .. }, CredentialsCommand::Remove) => {
                Ok(vec![CredentialsEvent::Removed { user_id: *user_id }])
            }
            (Self::Removed { .. }, CredentialsCommand::Remove) => Ok(vec![]),
            (Self::None, CredentialsCommand::Remove) => Err(CredentialsError::NoPassword),
        }
    }

    fn evolve(self, event: &CredentialsEvent) -> Self {
        match event {
            CredentialsEvent::PasswordSet { user_id, hash } => Self::Password { user_id: *user_id, hash: hash.clone() },
            CredentialsEvent::Removed { user_id } => Self::Removed { user_id: *user_id },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(tag: &str) -> PasswordHash {
        PasswordHash::parse(&format!("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA${tag}")).unwrap()
    }

    #[test]
    fn a_password_is_set_replaced_and_removed() {
        let user_id = UserId::new();
        let state = Credentials::default();
        let events = state.decide(CredentialsCommand::SetPassword { user_id, hash: hash("a") }).unwrap();
        let state = events.iter().fold(state, Credentials::evolve);
        assert_eq!(state.hash(), Some(&hash("a")));
        let events = state.decide(CredentialsCommand::SetPassword { user_id, hash: hash("b") }).unwrap();
        let state = events.iter().fold(state, Credentials::evolve);
        assert_eq!(state.hash(), Some(&hash("b")));
        let events = state.decide(CredentialsCommand::Remove).unwrap();
        let state = events.iter().fold(state, Credentials::evolve);
        assert_eq!(state.hash(), None);
        assert_eq!(state.decide(CredentialsCommand::Remove), Ok(vec![]));
        assert_eq!(Credentials::default().decide(CredentialsCommand::Remove), Err(CredentialsError::NoPassword));
    }
}
