//! The Role aggregate: a named set of grants.

use std::{collections::BTreeSet, fmt};

use uuid::Uuid;

use super::Grant;
use crate::{Aggregate, DomainEvent, InvalidValue};

/// A role's name: 2 to 64 characters, lowercase letters, digits, `-` and `_`, starting with a
/// letter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct RoleName(String);

impl RoleName {
    pub fn parse(text: &str) -> Result<Self, InvalidValue> {
        let valid = (2..=64).contains(&text.len())
            && text.starts_with(|c: char| c.is_ascii_lowercase())
            && text
                .bytes()
                .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-' || byte == b'_');
        if valid {
            Ok(Self(text.to_owned()))
        } else {
            Err(InvalidValue::new("name", "must be 2 to 64 lowercase letters, digits, - or _, starting with a letter"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<RoleName> for String {
    fn from(name: RoleName) -> Self {
        name.0
    }
}

impl TryFrom<String> for RoleName {
    type Error = InvalidValue;

    fn try_from(value: String) -> Result<Self, InvalidValue> {
        Self::parse(&value)
    }
}

/// A role's id is derived from its name, so two creations of one name are two commits on one
/// aggregate and the validation rule admits one: names are unique without a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct RoleId(Uuid);

const ROLE_NAMESPACE: Uuid = Uuid::from_u128(0x6b65_656c_2d72_6f6c_6573_2d76_3100_0001);

impl RoleId {
    pub fn of(name: &RoleName) -> Self {
        Self(Uuid::new_v5(&ROLE_NAMESPACE, name.as_str().as_bytes()))
    }

    pub const fn from_uuid(id: Uuid) -> Self {
        Self(id)
    }

    pub const fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl fmt::Display for RoleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleCommand {
    Create { name: RoleName, permissions: BTreeSet<Grant> },
    SetPermissions { permissions: BTreeSet<Grant> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleEvent {
    Created { id: RoleId, name: RoleName, permissions: BTreeSet<Grant> },
    PermissionsChanged { id: RoleId, permissions: BTreeSet<Grant> },
}

impl DomainEvent for RoleEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Created { .. } => "RoleCreated",
            Self::PermissionsChanged { .. } => "RolePermissionsChanged",
        }
    }

    fn schema_version(&self) -> u32 {
        1
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoleError {
    #[error("a role with this name exists")]
    Exists,
    #[error("no such role")]
    NoRole,
}

impl From<RoleError> for crate::DomainError {
    fn from(error: RoleError) -> Self {
        match error {
            RoleError::Exists => Self::conflict(error.to_string()),
            RoleError::NoRole => Self::not_found(error.to_string()),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Role {
    #[default]
    None,
    Defined {
        id: RoleId,
        name: RoleName,
        /// As text (`posts:update:own`), so snapshots read like the API.
        permissions: BTreeSet<String>,
    },
}

impl Role {
    pub fn is_defined(&self) -> bool {
        matches!(self, Self::Defined { .. })
    }
}

fn texts(permissions: &BTreeSet<Grant>) -> BTreeSet<String> {
    permissions.iter().map(Grant::to_string).collect()
}

impl Aggregate for Role {
    type Command = RoleCommand;
    type Event = RoleEvent;
    type Error = RoleError;

    fn decide(&self, command: RoleCommand) -> Result<Vec<RoleEvent>, RoleError> {
        match (self, command) {
            (Self::None, RoleCommand::Create { name, permissions }) => {
                Ok(vec![RoleEvent::Created { id: RoleId::of(&name), name, permissions }])
            }
            (Self::Defined { .. }, RoleCommand::Create { .. }) => Err(RoleError::Exists),
            (Self::None, RoleCommand::SetPermissions { .. }) => Err(RoleError::NoRole),
            (Self::Defined { id, permissions: held, .. }, RoleCommand::SetPermissions { permissions }) => {
                if *held == texts(&permissions) {
                    Ok(vec![])
                } else {
                    Ok(vec![RoleEvent::PermissionsChanged { id: *id, permissions }])
                }
            }
        }
    }

    fn evolve(self, event: &RoleEvent) -> Self {
        match (self, event) {
            (_, RoleEvent::Created { id, name, permissions }) => {
                Self::Defined { id: *id, name: name.clone(), permissions: texts(permissions) }
            }
            (Self::Defined { id, name, .. }, RoleEvent::PermissionsChanged { permissions, .. }) => {
                Self::Defined { id, name, permissions: texts(permissions) }
            }
            (state, RoleEvent::PermissionsChanged { .. }) => state,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(texts: &[&str]) -> BTreeSet<Grant> {
        texts.iter().map(|text| Grant::parse(text).unwrap()).collect()
    }

    #[test]
    fn a_name_is_one_role() {
        let name = RoleName::parse("editor").unwrap();
        assert_eq!(RoleId::of(&name), RoleId::of(&RoleName::parse("editor").unwrap()));
        let events =
            Role::None.decide(RoleCommand::Create { name: name.clone(), permissions: grants(&["posts:update"]) });
        let role = events.unwrap().iter().fold(Role::None, Role::evolve);
        assert_eq!(role.decide(RoleCommand::Create { name, permissions: grants(&[]) }), Err(RoleError::Exists));
        assert!(RoleName::parse("Editor").is_err() && RoleName::parse("e").is_err() && RoleName::parse("1x").is_err());
    }

    #[test]
    fn permissions_change_only_when_they_differ() {
        let name = RoleName::parse("editor").unwrap();
        let role = Role::None
            .decide(RoleCommand::Create { name, permissions: grants(&["posts:update"]) })
            .unwrap()
            .iter()
            .fold(Role::None, Role::evolve);
        assert_eq!(role.decide(RoleCommand::SetPermissions { permissions: grants(&["posts:update:any"]) }), Ok(vec![]));
        let changed = role.decide(RoleCommand::SetPermissions { permissions: grants(&["*"]) }).unwrap();
        let role = changed.iter().fold(role, Role::evolve);
        assert!(matches!(role, Role::Defined { ref permissions, .. } if permissions.contains("*")));
    }
}
