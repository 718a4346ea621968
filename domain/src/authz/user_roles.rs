//! The UserRoles aggregate: the roles granted to one user.

use std::collections::BTreeSet;

use super::RoleId;
use crate::{Aggregate, DomainEvent, identity::UserId};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserRolesCommand {
    /// Grant a role, known to exist (checked before deciding).
    Grant {
        user_id: UserId,
        role_id: RoleId,
    },
    Revoke {
        user_id: UserId,
        role_id: RoleId,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserRolesEvent {
    Granted { user_id: UserId, role_id: RoleId },
    Revoked { user_id: UserId, role_id: RoleId },
}

impl DomainEvent for UserRolesEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Granted { .. } => "RoleGranted",
            Self::Revoked { .. } => "RoleRevoked",
        }
    }

    fn schema_version(&self) -> u32 {
        1
    }
}

/// Granting and revoking never fail: whether the role exists is checked before deciding.
pub type UserRolesError = std::convert::Infallible;

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UserRoles {
    pub roles: BTreeSet<RoleId>,
}

impl Aggregate for UserRoles {
    type Command = UserRolesCommand;
    type Event = UserRolesEvent;
    type Error = UserRolesError;

    /// Granting a held role or revoking one not held changes nothing.
    fn decide(&self, command: UserRolesCommand) -> Result<Vec<UserRolesEvent>, UserRolesError> {
        Ok(match command {
            UserRolesCommand::Grant { user_id, role_id } if !self.roles.contains(&role_id) => {
                vec![UserRolesEvent::Granted { user_id, role_id }]
            }
            UserRolesCommand::Revoke { user_id, role_id } if self.roles.contains(&role_id) => {
                vec![UserRolesEvent::Revoked { user_id, role_id }]
            }
            _ => vec![],
        })
    }

    fn evolve(mut self, event: &UserRolesEvent) -> Self {
        match event {
            UserRolesEvent::Granted { role_id, .. } => {
                self.roles.insert(*role_id);
            }
            UserRolesEvent::Revoked { role_id, .. } => {
                self.roles.remove(role_id);
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;

    #[test]
    fn grants_and_revocations_are_idempotent() {
        let (user_id, role_id) = (UserId::new(), RoleId::from_uuid(Uuid::now_v7()));
        let state = UserRoles::default();
        let events = state.decide(UserRolesCommand::Grant { user_id, role_id }).unwrap();
        let state = events.iter().fold(state, UserRoles::evolve);
        assert!(state.roles.contains(&role_id));
        assert_eq!(state.decide(UserRolesCommand::Grant { user_id, role_id }), Ok(vec![]));
        let events = state.decide(UserRolesCommand::Revoke { user_id, role_id }).unwrap();
        let state = events.iter().fold(state, UserRoles::evolve);
        assert!(state.roles.is_empty());
        assert_eq!(state.decide(UserRolesCommand::Revoke { user_id, role_id }), Ok(vec![]));
    }
}
