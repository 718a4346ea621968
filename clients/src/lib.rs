//! Typed clients of Keel's command services: one method per RPC, each over every instance of the
//! service ([`ServiceClient`]: failover with the same command id), and each call about one
//! aggregate sent first to the instance that writes its partition when a [`Placement`] knows it.
//! The gateway calls the services through them, and services call each other through them.

#![forbid(unsafe_code)]

mod failover;

use keel_domain::{
    authz::{RoleId, RoleName},
    blog::{CommentId, PostId},
    identity::UserId,
};
use keel_proto::{
    auth::v1::{
        GetJwksRequest, HashPasswordRequest, Jwks, LoginRequest, LogoutRequest, PasswordHash, RefreshRequest,
        RemovePasswordRequest, SetPasswordRequest, Tokens, auth_client::AuthClient,
    },
    authz::v1::{
        CheckPermissionReply, CheckPermissionRequest, CreateRoleRequest, RoleGrantRequest, SetRolePermissionsRequest,
        authz_client::AuthzClient,
    },
    blog::v1::{
        AddCommentRequest, DeleteCommentRequest, DraftPostRequest, EditPostRequest, PostCommandRequest,
        blog_client::BlogClient,
    },
    common::v1::{CommandMetadata, CommandReply},
    identity::v1::{
        ChangeEmailRequest, RegisterUserRequest, UpdateProfileRequest, UserCommandRequest,
        identity_commands_client::IdentityCommandsClient,
    },
};
use keel_topics::Topic;
use tonic::Status;
use uuid::Uuid;

pub use failover::{Placement, ServiceClient, ServiceEndpoint};

/// Puts the current span's trace context on a call (W3C `traceparent` in its metadata), so the
/// service's span continues the caller's trace.
pub fn carry_trace<T>(request: &mut tonic::Request<T>) {
    let traceparent = keel_runtime::telemetry::traceparent_of(&tracing::Span::current());
    if let Some(value) = traceparent.and_then(|traceparent| traceparent.parse().ok()) {
        request.metadata_mut().insert("traceparent", value);
    }
}

/// Defines the typed client of one service: per RPC, its request and reply, and (for a call
/// about one aggregate) the topic and how the aggregate's id follows from the request.
macro_rules! typed_client {
    (
        $(#[$doc:meta])*
        $name:ident => $grpc:ident {
            $(
                $(#[$rpc_doc:meta])*
                $method:ident($request:ty) -> $reply:ty $(, at $topic:expr => $aggregate:expr)?;
            )*
        }
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        pub struct $name(ServiceClient);

        impl $name {
            pub fn new(client: ServiceClient) -> Self {
                Self(client)
            }

            /// The failover client underneath (its instances, for readiness).
            pub fn service(&self) -> &ServiceClient {
                &self.0
            }

            $(
                $(#[$rpc_doc])*
                pub async fn $method(&self, request: $request) -> Result<$reply, Status> {
                    let route: Option<(Topic, Uuid)> = None $(.or_else(|| Some(($topic, ($aggregate)(&request)?))))?;
                    self.0
                        .send_to(stringify!($method), route, request, |channel, request| async move {
                            $grpc::new(channel).$method(request).await
                        })
                        .await
                }
            )*
        }
    };
}

/// The command id of a request's metadata, if it is one.
fn command_id(metadata: Option<&CommandMetadata>) -> Option<Uuid> {
    Uuid::parse_str(&metadata?.command_id).ok()
}

fn id(text: &str) -> Option<Uuid> {
    Uuid::parse_str(text).ok()
}

typed_client! {
    /// The identity service: users.
    Identity => IdentityCommandsClient {
        /// Registers a user (with their password, which identity has auth store).
        register_user(RegisterUserRequest) -> CommandReply,
            at Topic::IdentityUsers => |request: &RegisterUserRequest| {
                command_id(request.metadata.as_ref()).map(|command| UserId::for_registration(command).as_uuid())
            };
        update_profile(UpdateProfileRequest) -> CommandReply,
            at Topic::IdentityUsers => |request: &UpdateProfileRequest| id(&request.user_id);
        change_email(ChangeEmailRequest) -> CommandReply,
            at Topic::IdentityUsers => |request: &ChangeEmailRequest| id(&request.user_id);
        deactivate(UserCommandRequest) -> CommandReply,
            at Topic::IdentityUsers => |request: &UserCommandRequest| id(&request.user_id);
        /// Erases the user's personal data (and has auth remove their password).
        erase_personal_data(UserCommandRequest) -> CommandReply,
            at Topic::IdentityUsers => |request: &UserCommandRequest| id(&request.user_id);
    }
}

typed_client! {
    /// The auth service: passwords, sessions, signing keys.
    Auth => AuthClient {
        hash_password(HashPasswordRequest) -> PasswordHash;
        set_password(SetPasswordRequest) -> CommandReply,
            at Topic::AuthCredentials => |request: &SetPasswordRequest| id(&request.user_id);
        remove_password(RemovePasswordRequest) -> CommandReply,
            at Topic::AuthCredentials => |request: &RemovePasswordRequest| id(&request.user_id);
        login(LoginRequest) -> Tokens;
        refresh(RefreshRequest) -> Tokens;
        logout(LogoutRequest) -> CommandReply,
            at Topic::AuthSessions => |request: &LogoutRequest| id(&request.session_id);
        get_jwks(GetJwksRequest) -> Jwks;
    }
}

typed_client! {
    /// The authz service: roles, grants, permission checks.
    Authz => AuthzClient {
        create_role(CreateRoleRequest) -> CommandReply,
            at Topic::AuthzRoles => |request: &CreateRoleRequest| role_id(&request.name);
        set_role_permissions(SetRolePermissionsRequest) -> CommandReply,
            at Topic::AuthzRoles => |request: &SetRolePermissionsRequest| role_id(&request.name);
        grant_role(RoleGrantRequest) -> CommandReply,
            at Topic::AuthzUserRoles => |request: &RoleGrantRequest| id(&request.user_id);
        revoke_role(RoleGrantRequest) -> CommandReply,
            at Topic::AuthzUserRoles => |request: &RoleGrantRequest| id(&request.user_id);
        check_permission(CheckPermissionRequest) -> CheckPermissionReply;
    }
}

fn role_id(name: &str) -> Option<Uuid> {
    RoleName::parse(name).ok().map(|name| RoleId::of(&name).as_uuid())
}

typed_client! {
    /// The blog service: posts and comments.
    Blog => BlogClient {
        draft_post(DraftPostRequest) -> CommandReply,
            at Topic::BlogPosts => |request: &DraftPostRequest| {
                command_id(request.metadata.as_ref()).map(|command| PostId::for_draft(command).as_uuid())
            };
        edit_post(EditPostRequest) -> CommandReply,
            at Topic::BlogPosts => |request: &EditPostRequest| id(&request.post_id);
        publish_post(PostCommandRequest) -> CommandReply,
            at Topic::BlogPosts => |request: &PostCommandRequest| id(&request.post_id);
        unpublish_post(PostCommandRequest) -> CommandReply,
            at Topic::BlogPosts => |request: &PostCommandRequest| id(&request.post_id);
        delete_post(PostCommandRequest) -> CommandReply,
            at Topic::BlogPosts => |request: &PostCommandRequest| id(&request.post_id);
        add_comment(AddCommentRequest) -> CommandReply,
            at Topic::BlogComments => |request: &AddCommentRequest| {
                command_id(request.metadata.as_ref()).map(|command| CommentId::for_command(command).as_uuid())
            };
        delete_comment(DeleteCommentRequest) -> CommandReply,
            at Topic::BlogComments => |request: &DeleteCommentRequest| id(&request.comment_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_name_their_aggregate_from_the_request() {
        let command = Uuid::now_v7();
        let metadata = CommandMetadata { command_id: command.to_string(), ..CommandMetadata::default() };
        assert_eq!(command_id(Some(&metadata)), Some(command));
        assert_eq!(command_id(None), None);
        assert_eq!(role_id("editor"), Some(RoleId::of(&RoleName::parse("editor").unwrap()).as_uuid()));
        assert_eq!(role_id("not a role name!"), None);
    }
}
