//! Every route of the HTTP API in one table: its handler, who may call it, and what the OpenAPI
//! document says of it. The router, the security pipeline and `/openapi.json` are all made from
//! this table, so they cannot disagree.

use axum::{
    http::Method,
    routing::{MethodRouter, delete, get, patch, post, put},
};

use crate::{AppState, audit, auth, console, openapi, posts, roles, status, streams, users};

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone (a token, if sent, must still be valid).
    Public,
    /// Any signed-in, active user.
    Authenticated,
    /// Whoever authz allows `action` on the resource. Deny by default.
    Permission { action: &'static str, owner: Owner },
}

/// Whom the resource of a [`Access::Permission`] route belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// The user of the path's `{id}`: authz answers for that owner.
    PathUser,
    /// No user (roles, the audit log, the projections): only a grant on any resource (`:any`,
    /// `*`) allows it.
    Nobody,
    /// Known to the service only (a post's author): authz says whether the caller may act on
    /// any or only on their own, and the service enforces "own" with the change.
    Service,
}

/// One route.
pub struct RouteSpec {
    pub method: Method,
    /// axum's template, which is OpenAPI's too (`/v1/users/{id}`).
    pub path: &'static str,
    pub access: Access,
    pub tag: &'static str,
    pub summary: &'static str,
    /// The request body's schema in the OpenAPI components.
    pub request: Option<&'static str>,
    /// The success status and its body's schema.
    pub response: (u16, Option<&'static str>),
    pub handler: fn() -> MethodRouter<AppState>,
}

const fn permission(action: &'static str, owner: Owner) -> Access {
    Access::Permission { action, owner }
}

pub static ROUTES: &[RouteSpec] = &[
    RouteSpec {
        method: Method::POST,
        path: "/v1/users",
        access: Access::Public,
        tag: "users",
        summary: "Register a user with a password",
        request: Some("Registration"),
        response: (201, Some("CommandResult")),
        handler: || post(users::register),
    },
    RouteSpec {
        method: Method::GET,
        path: "/v1/users/{id}",
        access: permission("users:read", Owner::PathUser),
        tag: "users",
        summary: "A user's profile and account (yourself, or any with users:read:any)",
        request: None,
        response: (200, Some("User")),
        handler: || get(users::get),
    },
    RouteSpec {
        method: Method::PATCH,
        path: "/v1/users/{id}",
        access: permission("users:update", Owner::PathUser),
        tag: "users",
        summary: "Update the profile (display name, bio); honours If-Match",
        request: Some("ProfileUpdate"),
        response: (200, Some("CommandResult")),
        handler: || patch(users::update_profile),
    },
    RouteSpec {
        method: Method::PUT,
        path: "/v1/users/{id}/email",
        access: permission("users:update", Owner::PathUser),
        tag: "users",
        summary: "Change the email address (unique across users); honours If-Match",
        request: Some("EmailChange"),
        response: (200, Some("CommandResult")),
        handler: || put(users::change_email),
    },
    RouteSpec {
        method: Method::POST,
        path: "/v1/users/{id}/deactivate",
        access: permission("users:deactivate", Owner::PathUser),
        tag: "users",
        summary: "Deactivate the account: its tokens stop working",
        request: None,
        response: (200, Some("CommandResult")),
        handler: || post(users::deactivate),
    },
    RouteSpec {
        method: Method::DELETE,
        path: "/v1/users/{id}/personal-data",
        access: permission("users:erase", Owner::PathUser),
        tag: "users",
        summary: "Erase the user's personal data everywhere it can be read",
        request: None,
        response: (200, Some("CommandResult")),
        handler: || delete(users::erase),
    },
    RouteSpec {
        method: Method::GET,
        path: "/v1/users/{id}/roles",
        access: permission("roles:manage", Owner::Nobody),
        tag: "roles",
        summary: "The roles granted to a user",
        request: None,
        response: (200, Some("RoleList")),
        handler: || get(roles::of_user),
    },
    RouteSpec {
        method: Method::POST,
        path: "/v1/users/{id}/roles",
        access: permission("roles:manage", Owner::Nobody),
        tag: "roles",
        summary: "Grant a role to a user",
        request: Some("RoleGrant"),
        response: (200, Some("CommandResult")),
        handler: || post(roles::grant),
    },
    RouteSpec {
        method: Method::DELETE,
        path: "/v1/users/{id}/roles/{role}",
        access: permission("roles:manage", Owner::Nobody),
        tag: "roles",
        summary: "Revoke a role from a user",
        request: None,
        response: (200, Some("CommandResult")),
        handler: || delete(roles::revoke),
    },
    RouteSpec {
        method: Method::POST,
        path: "/v1/auth/login",
        access: Access::Public,
        tag: "auth",
        summary: "Log in: an access token and a refresh token (throttled per IP and per account)",
        request: Some("Login"),
        response: (200, Some("Tokens")),
        handler: || post(auth::login),
    },
    RouteSpec {
        method: Method::POST,
        path: "/v1/auth/refresh",
        access: Access::Public,
        tag: "auth",
        summary: "Trade a refresh token for new tokens; a spent one revokes the session",
        request: Some("Refresh"),
        response: (200, Some("Tokens")),
        handler: || post(auth::refresh),
    },
    RouteSpec {
        method: Method::POST,
        path: "/v1/auth/logout",
        access: Access::Authenticated,
        tag: "auth",
        summary: "End the caller's session",
        request: None,
        response: (204, None),
        handler: || post(auth::logout),
    },
    RouteSpec {
        method: Method::GET,
        path: "/.well-known/jwks.json",
        access: Access::Public,
        tag: "auth",
        summary: "The public keys that verify access tokens",
        request: None,
        response: (200, Some("Jwks")),
        handler: || get(auth::jwks),
    },
    RouteSpec {
        method: Method::POST,
        path: "/v1/roles",
        access: permission("roles:manage", Owner::Nobody),
        tag: "roles",
        summary: "Create a role",
        request: Some("Role"),
        response: (201, Some("CommandResult")),
        handler: || post(roles::create),
    },
    RouteSpec {
        method: Method::GET,
        path: "/v1/roles",
        access: permission("roles:manage", Owner::Nobody),
        tag: "roles",
        summary: "Every role",
        request: None,
        response: (200, Some("RoleList")),
        handler: || get(roles::list),
    },
    RouteSpec {
        method: Method::PUT,
        path: "/v1/roles/{name}",
        access: permission("roles:manage", Owner::Nobody),
        tag: "roles",
        summary: "Replace a role's permissions; honours If-Match",
        request: Some("RolePermissions"),
        response: (200, Some("CommandResult")),
        handler: || put(roles::set_permissions),
    },
    RouteSpec {
        method: Method::POST,
        path: "/v1/posts",
        access: permission("posts:create", Owner::Service),
        tag: "posts",
        summary: "Draft a post",
        request: Some("Draft"),
        response: (201, Some("CommandResult")),
        handler: || post(posts::draft),
    },
    RouteSpec {
        method: Method::GET,
        path: "/v1/posts",
        access: Access::Public,
        tag: "posts",
        summary: "Published posts, newest first; filters author and tag; cursor pagination",
        request: None,
        response: (200, Some("PostPage")),
        handler: || get(posts::list),
    },
    RouteSpec {
        method: Method::GET,
        path: "/v1/posts/{id}",
        access: Access::Public,
        tag: "posts",
        summary: "A post (a draft only for its author and editors)",
        request: None,
        response: (200, Some("Post")),
        handler: || get(posts::get),
    },
    RouteSpec {
        method: Method::PATCH,
        path: "/v1/posts/{id}",
        access: permission("posts:update", Owner::Service),
        tag: "posts",
        summary: "Edit a post (its author, or editors); honours If-Match",
        request: Some("PostEdit"),
        response: (200, Some("CommandResult")),
        handler: || patch(posts::edit),
    },
    RouteSpec {
        method: Method::DELETE,
        path: "/v1/posts/{id}",
        access: permission("posts:delete", Owner::Service),
        tag: "posts",
        summary: "Delete a post; honours If-Match",
        request: None,
        response: (200, Some("CommandResult")),
        handler: || delete(posts::delete),
    },
    RouteSpec {
        method: Method::POST,
        path: "/v1/posts/{id}/publish",
        access: permission("posts:publish", Owner::Service),
        tag: "posts",
        summary: "Publish a post; honours If-Match",
        request: None,
        response: (200, Some("CommandResult")),
        handler: || post(posts::publish),
    },
    RouteSpec {
        method: Method::POST,
        path: "/v1/posts/{id}/unpublish",
        access: permission("posts:publish", Owner::Service),
        tag: "posts",
        summary: "Unpublish a post (back to a draft); honours If-Match",
        request: None,
        response: (200, Some("CommandResult")),
        handler: || post(posts::unpublish),
    },
    RouteSpec {
        method: Method::GET,
        path: "/v1/posts/{id}/comments",
        access: Access::Public,
        tag: "comments",
        summary: "The comments of a published post, oldest first",
        request: None,
        response: (200, Some("CommentPage")),
        handler: || get(posts::comments),
    },
    RouteSpec {
        method: Method::POST,
        path: "/v1/posts/{id}/comments",
        access: permission("comments:create", Owner::Service),
        tag: "comments",
        summary: "Comment on a published post",
        request: Some("Comment"),
        response: (201, Some("CommandResult")),
        handler: || post(posts::comment),
    },
    RouteSpec {
        method: Method::DELETE,
        path: "/v1/comments/{id}",
        access: permission("comments:delete", Owner::Service),
        tag: "comments",
        summary: "Delete a comment (its author, or moderators)",
        request: None,
        response: (200, Some("CommandResult")),
        handler: || delete(posts::delete_comment),
    },
    RouteSpec {
        method: Method::GET,
        path: "/v1/me/drafts",
        access: Access::Authenticated,
        tag: "posts",
        summary: "The caller's drafts, last changed first",
        request: None,
        response: (200, Some("PostPage")),
        handler: || get(posts::my_drafts),
    },
    RouteSpec {
        method: Method::GET,
        path: "/v1/audit",
        access: permission("audit:read", Owner::Nobody),
        tag: "audit",
        summary: "The audit log, filtered by actor, aggregate, event type and time",
        request: None,
        response: (200, Some("AuditPage")),
        handler: || get(audit::list),
    },
    RouteSpec {
        method: Method::GET,
        path: "/v1/streams/{stream}",
        access: Access::Authenticated,
        tag: "streams",
        summary: "Live events of a stream (users, sessions, roles, grants, posts, comments; audit: every topic) as Server-Sent Events",
        request: None,
        response: (200, Some("EventStream")),
        handler: || get(streams::topic),
    },
    RouteSpec {
        method: Method::GET,
        path: "/v1/streams/{stream}/{id}",
        access: Access::Authenticated,
        tag: "streams",
        summary: "Live events of one aggregate (yours, or any with streams:read:any) as Server-Sent Events",
        request: None,
        response: (200, Some("EventStream")),
        handler: || get(streams::aggregate),
    },
    RouteSpec {
        method: Method::GET,
        path: "/v1/projections",
        access: permission("projections:read", Owner::Nobody),
        tag: "operations",
        summary: "Every projection's versions, state, checkpoints and lag behind the broker",
        request: None,
        response: (200, Some("ProjectionStatusList")),
        handler: || get(status::projections),
    },
    RouteSpec {
        method: Method::GET,
        path: "/console",
        access: Access::Public,
        tag: "operations",
        summary: "The console: a live stream with filters, and the projections' status and lag",
        request: None,
        response: (200, None),
        handler: || get(console::index),
    },
    RouteSpec {
        method: Method::GET,
        path: "/console/{file}",
        access: Access::Public,
        tag: "operations",
        summary: "The console's script and style sheet",
        request: None,
        response: (200, None),
        handler: || get(console::asset),
    },
    RouteSpec {
        method: Method::GET,
        path: "/openapi.json",
        access: Access::Public,
        tag: "meta",
        summary: "This document",
        request: None,
        response: (200, None),
        handler: || get(openapi::document),
    },
];

/// The route of a request, by method and matched template.
pub fn find(method: &Method, path: &str) -> Option<&'static RouteSpec> {
    ROUTES.iter().find(|route| route.method == method && route.path == path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_listed_once() {
        for (index, route) in ROUTES.iter().enumerate() {
            assert!(
                ROUTES[index + 1..].iter().all(|other| (&other.method, other.path) != (&route.method, route.path)),
                "{} {} is listed twice",
                route.method,
                route.path
            );
        }
    }
}
