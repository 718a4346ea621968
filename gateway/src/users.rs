//! `/v1/users`: register (with a password), read, update the profile, change the email,
//! deactivate, erase personal data.

use axum::{
    Extension, Json,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use keel_domain::{
    auth::Password,
    identity::{DisplayName, Email, UserId},
};
use keel_proto::{
    auth::v1::{RemovePasswordRequest, SetPasswordRequest, auth_client::AuthClient},
    identity::v1::{
        ChangeEmailRequest, RegisterUserRequest, UpdateProfileRequest, UserCommandRequest,
        identity_commands_client::IdentityCommandsClient,
    },
};
use keel_topics::Topic;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use uuid::Uuid;

use crate::{
    AppState,
    commands::{command_response, created, metadata, parse_id, rejected},
    consistency,
    idempotency::{self, CommandScope},
    precondition,
    problem::{JsonBody, Problem},
    security::Caller,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegisterBody {
    email: String,
    display_name: String,
    password: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProfileBody {
    display_name: Option<String>,
    bio: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EmailBody {
    email: String,
}

#[derive(Debug, Serialize)]
pub(crate) struct UserBody {
    id: Uuid,
    /// `null` once the user's personal data is erased.
    email: Option<String>,
    display_name: Option<String>,
    bio: String,
    status: String,
    version: i64,
}

fn invalid(error: keel_domain::InvalidValue) -> Problem {
    Problem::from_code(keel_proto::ErrorCode::InvalidArgument).detail(error.to_string())
}

/// `POST /v1/users`: 201 with `Location`, also when the request is a replay. The password is
/// stored (hashed, by auth) before the user is registered, under the id the registration will
/// have: a failure in between leaves credentials of a user who never exists, which nobody can use,
/// and a retry with the same `Idempotency-Key` finishes the registration.
pub(crate) async fn register(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<RegisterBody>,
) -> Result<Response, Problem> {
    // Every field is checked before anything is stored: a refused registration leaves nothing.
    let email = Email::parse(&body.email).map_err(invalid)?;
    DisplayName::parse(&body.display_name).map_err(invalid)?;
    Password::parse(&body.password, &email).map_err(invalid)?;
    let actor = caller.actor();
    let scope = CommandScope { method: "POST", route: "/v1/users", aggregate: "", actor: &actor };
    let command_id = idempotency::command_id(&headers, scope)?;
    let user_id = UserId::for_registration(command_id);
    let password = SetPasswordRequest {
        metadata: Some(metadata(&headers, Uuid::new_v5(&command_id, b"SetPassword"), &caller)),
        user_id: user_id.to_string(),
        email: body.email.clone(),
        password: body.password,
    };
    state
        .auth
        .send("SetPassword", password, |channel, request| async move {
            AuthClient::new(channel).set_password(request).await
        })
        .await
        .map_err(|status| rejected("set password", &status))?;
    let request = RegisterUserRequest {
        metadata: Some(metadata(&headers, command_id, &caller)),
        email: body.email,
        display_name: body.display_name,
    };
    let reply = state
        .identity
        .send_to(
            "RegisterUser",
            Some((Topic::IdentityUsers, user_id.as_uuid())),
            request,
            |channel, request| async move { IdentityCommandsClient::new(channel).register_user(request).await },
        )
        .await
        .map_err(|status| rejected("register", &status))?;
    if reply.position.is_none() && !reply.replayed {
        // A registration always appends; a reply without a position is a broken contract.
        tracing::error!(%command_id, "identity registered a user without a position");
        return Err(Problem::internal());
    }
    created(format!("/v1/users/{}", reply.aggregate_id), reply)
}

/// `PATCH /v1/users/{id}` with `{"display_name"?, "bio"?}`, optionally conditional on `If-Match`.
pub(crate) async fn update_profile(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<ProfileBody>,
) -> Result<Response, Problem> {
    let id = parse_id(&id, "user")?;
    let expected_version = precondition::expected_version(&headers)?;
    let command_id = idempotency::command_id_of(&headers, "PATCH", "/v1/users/{id}", &id.to_string(), &caller)?;
    let request = UpdateProfileRequest {
        metadata: Some(metadata(&headers, command_id, &caller)),
        user_id: id.to_string(),
        display_name: body.display_name,
        bio: body.bio,
        expected_version,
    };
    let reply = state
        .identity
        .send_to("UpdateProfile", Some((Topic::IdentityUsers, id)), request, |channel, request| async move {
            IdentityCommandsClient::new(channel).update_profile(request).await
        })
        .await
        .map_err(|status| rejected("update profile", &status))?;
    Ok(command_response(StatusCode::OK, reply))
}

/// `PUT /v1/users/{id}/email` with `{"email"}`: the address must not be anyone else's.
pub(crate) async fn change_email(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<EmailBody>,
) -> Result<Response, Problem> {
    let id = parse_id(&id, "user")?;
    let expected_version = precondition::expected_version(&headers)?;
    let command_id = idempotency::command_id_of(&headers, "PUT", "/v1/users/{id}/email", &id.to_string(), &caller)?;
    let request = ChangeEmailRequest {
        metadata: Some(metadata(&headers, command_id, &caller)),
        user_id: id.to_string(),
        email: body.email,
        expected_version,
    };
    let reply = state
        .identity
        .send_to("ChangeEmail", Some((Topic::IdentityUsers, id)), request, |channel, request| async move {
            IdentityCommandsClient::new(channel).change_email(request).await
        })
        .await
        .map_err(|status| rejected("change email", &status))?;
    Ok(command_response(StatusCode::OK, reply))
}

/// `POST /v1/users/{id}/deactivate`: the account's tokens stop working.
pub(crate) async fn deactivate(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let id = parse_id(&id, "user")?;
    let command_id =
        idempotency::command_id_of(&headers, "POST", "/v1/users/{id}/deactivate", &id.to_string(), &caller)?;
    let request = UserCommandRequest {
        metadata: Some(metadata(&headers, command_id, &caller)),
        user_id: id.to_string(),
        expected_version: precondition::expected_version(&headers)?,
    };
    let reply = state
        .identity
        .send_to("Deactivate", Some((Topic::IdentityUsers, id)), request, |channel, request| async move {
            IdentityCommandsClient::new(channel).deactivate(request).await
        })
        .await
        .map_err(|status| rejected("deactivate", &status))?;
    Ok(command_response(StatusCode::OK, reply))
}

/// `DELETE /v1/users/{id}/personal-data`: the user's personal data is erased everywhere it can
/// be read (its key is shredded, so the log's copy is ciphertext nobody can open), and their
/// password goes with it. A retry with the same `Idempotency-Key` finishes an interrupted one.
pub(crate) async fn erase(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let id = parse_id(&id, "user")?;
    let command_id =
        idempotency::command_id_of(&headers, "DELETE", "/v1/users/{id}/personal-data", &id.to_string(), &caller)?;
    let request = UserCommandRequest {
        metadata: Some(metadata(&headers, command_id, &caller)),
        user_id: id.to_string(),
        expected_version: precondition::expected_version(&headers)?,
    };
    let reply = state
        .identity
        .send_to("ErasePersonalData", Some((Topic::IdentityUsers, id)), request, |channel, request| async move {
            IdentityCommandsClient::new(channel).erase_personal_data(request).await
        })
        .await
        .map_err(|status| rejected("erase personal data", &status))?;
    let remove = RemovePasswordRequest {
        metadata: Some(metadata(&headers, Uuid::new_v5(&command_id, b"RemovePassword"), &caller)),
        user_id: id.to_string(),
    };
    state
        .auth
        .send("RemovePassword", remove, |channel, request| async move {
            AuthClient::new(channel).remove_password(request).await
        })
        .await
        .map_err(|status| rejected("remove password", &status))?;
    Ok(command_response(StatusCode::OK, reply))
}

/// `GET /v1/users/{id}`, with the version as `ETag`; with `Keel-Consistency` tokens, once the
/// users projection has passed them (see [`consistency`]).
pub(crate) async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let id = parse_id(&id, "user")?;
    let users = state.names.name(Topic::IdentityUsers);
    let tokens = consistency::tokens(&headers, &[users.as_str()])?;
    let freshness = consistency::wait(&state.pool, "users", &tokens, state.consistency_timeout).await?;
    let mut response = read(&state, id).await.map_or_else(IntoResponse::into_response, IntoResponse::into_response);
    if let Some((name, value)) = freshness.header() {
        response.headers_mut().insert(name, value);
    }
    Ok(response)
}

async fn read(state: &AppState, id: Uuid) -> Result<Response, Problem> {
    let row = sqlx::query("SELECT id, email, display_name, bio, status, version FROM users WHERE id = $1")
        .bind(id)
        .fetch_optional(&state.pool)
        .await
        .map_err(|error| {
            tracing::error!(error = %error, "failed to read the users read model");
            Problem::from_code(keel_proto::ErrorCode::Unavailable)
        })?
        .ok_or_else(|| Problem::not_found(format!("no user {id}")))?;
    let version: i64 = row.get("version");
    let body = UserBody {
        id: row.get("id"),
        email: row.get("email"),
        display_name: row.get("display_name"),
        bio: row.get("bio"),
        status: row.get("status"),
        version,
    };
    Ok(([(header::ETAG, precondition::entity_tag(version))], Json(body)).into_response())
}
