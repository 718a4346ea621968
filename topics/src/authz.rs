//! Wire form of the authz events: roles and the roles granted to users.

use std::collections::BTreeSet;

use apache_avro::types::Value;
use keel_domain::{
    authz::{Grant, RoleEvent, RoleId, RoleName, UserRolesEvent},
    identity::UserId,
};

use crate::{
    Topic,
    codec::{self, CodecError, Decoded, invalid, record},
};

const ROLE_CREATED: &str = "keel.authz.RoleCreated";
const ROLE_PERMISSIONS_CHANGED: &str = "keel.authz.RolePermissionsChanged";
const ROLE_GRANTED: &str = "keel.authz.RoleGranted";
const ROLE_REVOKED: &str = "keel.authz.RoleRevoked";

fn permissions(grants: &BTreeSet<Grant>) -> (&'static str, Value) {
    let texts: Vec<String> = grants.iter().map(Grant::to_string).collect();
    ("permissions", codec::strings(texts.iter().map(String::as_str)))
}

fn parse_permissions(record: &Value) -> Result<BTreeSet<Grant>, CodecError> {
    codec::strings_field(record, "permissions")?.into_iter().map(|text| Grant::parse(text).map_err(invalid)).collect()
}

pub fn encode_roles(events: &[RoleEvent]) -> Value {
    let records = events
        .iter()
        .map(|event| match event {
            RoleEvent::Created { id, name, permissions: grants } => (
                ROLE_CREATED,
                record(vec![
                    ("role_id", Value::Uuid(id.as_uuid())),
                    ("name", Value::String(name.as_str().to_owned())),
                    permissions(grants),
                ]),
            ),
            RoleEvent::PermissionsChanged { id, permissions: grants } => {
                (ROLE_PERMISSIONS_CHANGED, record(vec![("role_id", Value::Uuid(id.as_uuid())), permissions(grants)]))
            }
        })
        .collect();
    codec::commit_value(Topic::AuthzRoles, records)
}

pub fn decode_roles(decoded: &Decoded) -> Result<Vec<RoleEvent>, CodecError> {
    decoded
        .events
        .iter()
        .map(|event| {
            let record = &event.record;
            let id = RoleId::from_uuid(codec::uuid_field(record, "role_id")?);
            match event.type_name.as_str() {
                ROLE_CREATED => Ok(RoleEvent::Created {
                    id,
                    name: RoleName::parse(codec::string_field(record, "name")?).map_err(invalid)?,
                    permissions: parse_permissions(record)?,
                }),
                ROLE_PERMISSIONS_CHANGED => {
                    Ok(RoleEvent::PermissionsChanged { id, permissions: parse_permissions(record)? })
                }
                other => Err(CodecError::UnknownEventType(other.to_owned())),
            }
        })
        .collect()
}

pub fn encode_user_roles(events: &[UserRolesEvent]) -> Value {
    let records = events
        .iter()
        .map(|event| {
            let (name, user_id, role_id) = match event {
                UserRolesEvent::Granted { user_id, role_id } => (ROLE_GRANTED, user_id, role_id),
                UserRolesEvent::Revoked { user_id, role_id } => (ROLE_REVOKED, user_id, role_id),
            };
            (
                name,
                record(vec![("user_id", Value::Uuid(user_id.as_uuid())), ("role_id", Value::Uuid(role_id.as_uuid()))]),
            )
        })
        .collect();
    codec::commit_value(Topic::AuthzUserRoles, records)
}

pub fn decode_user_roles(decoded: &Decoded) -> Result<Vec<UserRolesEvent>, CodecError> {
    decoded
        .events
        .iter()
        .map(|event| {
            let record = &event.record;
            let user_id = UserId::from_uuid(codec::uuid_field(record, "user_id")?);
            let role_id = RoleId::from_uuid(codec::uuid_field(record, "role_id")?);
            match event.type_name.as_str() {
                ROLE_GRANTED => Ok(UserRolesEvent::Granted { user_id, role_id }),
                ROLE_REVOKED => Ok(UserRolesEvent::Revoked { user_id, role_id }),
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
        let name = RoleName::parse("editor").unwrap();
        let id = RoleId::of(&name);
        let grants: BTreeSet<Grant> =
            ["posts:update:any", "*"].iter().map(|text| Grant::parse(text).unwrap()).collect();
        let roles = encode_roles(&[
            RoleEvent::Created { id, name, permissions: grants.clone() },
            RoleEvent::PermissionsChanged { id, permissions: grants },
        ]);
        assert!(roles.validate(codec::reader_schema(Topic::AuthzRoles)));
        let user_id = UserId::new();
        let grants = encode_user_roles(&[
            UserRolesEvent::Granted { user_id, role_id: id },
            UserRolesEvent::Revoked { user_id, role_id: id },
        ]);
        assert!(grants.validate(codec::reader_schema(Topic::AuthzUserRoles)));
    }
}
