//! The authz aggregates on the shared write path: roles and the roles of each user.

use keel_domain::authz::{Role, RoleEvent, UserRoles, UserRolesEvent};
use keel_topics::{Topic, authz as wire};

crate::plain_model! {
    /// Roles, by name-derived id.
    Roles { state: Role, event: RoleEvent, topic: Topic::AuthzRoles, service: "authz", encode: wire::encode_roles, decode: wire::decode_roles }
}

crate::plain_model! {
    /// The roles granted to each user, by user id.
    Grants {
        state: UserRoles,
        event: UserRolesEvent,
        topic: Topic::AuthzUserRoles,
        service: "authz",
        encode: wire::encode_user_roles,
        decode: wire::decode_user_roles,
    }
}
