//! The authz context: roles (named sets of permissions), the roles granted to each user, and the
//! one rule that turns them into an answer. Deny by default: only a permission held says yes.

mod policy;
mod role;
mod user_roles;

pub use policy::{Action, Decision, Grant, Scope, evaluate};
pub use role::{Role, RoleCommand, RoleError, RoleEvent, RoleId, RoleName};
pub use user_roles::{UserRoles, UserRolesCommand, UserRolesError, UserRolesEvent};
