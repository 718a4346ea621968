//! `/v1/users`: register (with a password), read, update the profile, change the email,
//! deactivate, erase personal data.

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use keel_domain::{
    auth::Password,
    identity::{DisplayName, Email},
};
use keel_proto::identity::v1::{ChangeEmailRequest, RegisterUserRequest, UpdateProfileRequest, UserCommandRequest};
use keel_read_models::users;
use keel_topics::Topic;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    AppState,
    commands::{CommandRequest, command_response, created, parse_id, rejected},
    consistency, precondition,
    problem::{JsonBody, Problem},
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

/// `POST /v1/users`: 201 with `Location`, also when the request is a replay. Identity runs the
/// registration (auth stores the password, then identity registers the user) and finishes it
/// should it be interrupted between the two; a retry with the same `Idempotency-Key` gets the
/// first result.
pub(crate) async fn register(
    State(state): State<AppState>,
    command: CommandRequest,
    JsonBody(body): JsonBody<RegisterBody>,
) -> Result<Response, Problem> {
    // Every field is checked before anything is stored: a refused registration leaves nothing.
    let email = Email::parse(&body.email).map_err(invalid)?;
    DisplayName::parse(&body.display_name).map_err(invalid)?;
    Password::parse(&body.password, &email).map_err(invalid)?;
    let request = RegisterUserRequest {
        metadata: command.metadata(),
        email: body.email,
        display_name: body.display_name,
        password: body.password,
    };
    let reply = state.identity.register_user(request).await.map_err(|status| rejected("register", &status))?;
    if reply.position.is_none() && !reply.replayed {
        // A registration always appends; a reply without a position is a broken contract.
        tracing::error!(command_id = %command.command_id, "identity registered a user without a position");
        return Err(Problem::internal());
    }
    created(format!("/v1/users/{}", reply.aggregate_id), reply)
}

/// `PATCH /v1/users/{id}` with `{"display_name"?, "bio"?}`, optionally conditional on `If-Match`.
pub(crate) async fn update_profile(
    State(state): State<AppState>,
    command: CommandRequest,
    JsonBody(body): JsonBody<ProfileBody>,
) -> Result<Response, Problem> {
    let request = UpdateProfileRequest {
        metadata: command.metadata(),
        user_id: command.id("user")?.to_string(),
        display_name: body.display_name,
        bio: body.bio,
        expected_version: command.expected_version()?,
    };
    let reply = state.identity.update_profile(request).await.map_err(|status| rejected("update profile", &status))?;
    Ok(command_response(StatusCode::OK, reply))
}

/// `PUT /v1/users/{id}/email` with `{"email"}`: the address must not be anyone else's.
pub(crate) async fn change_email(
    State(state): State<AppState>,
    command: CommandRequest,
    JsonBody(body): JsonBody<EmailBody>,
) -> Result<Response, Problem> {
    let request = ChangeEmailRequest {
        metadata: command.metadata(),
        user_id: command.id("user")?.to_string(),
        email: body.email,
        expected_version: command.expected_version()?,
    };
    let reply = state.identity.change_email(request).await.map_err(|status| rejected("change email", &status))?;
    Ok(command_response(StatusCode::OK, reply))
}

/// `POST /v1/users/{id}/deactivate`: the account's tokens stop working.
pub(crate) async fn deactivate(State(state): State<AppState>, command: CommandRequest) -> Result<Response, Problem> {
    let request = UserCommandRequest {
        metadata: command.metadata(),
        user_id: command.id("user")?.to_string(),
        expected_version: command.expected_version()?,
    };
    let reply = state.identity.deactivate(request).await.map_err(|status| rejected("deactivate", &status))?;
    Ok(command_response(StatusCode::OK, reply))
}

/// `DELETE /v1/users/{id}/personal-data`: the user's personal data is erased everywhere it can
/// be read (its key is shredded, so the log's copy is ciphertext nobody can open), and identity
/// has auth remove their password, finishing it should it be interrupted.
pub(crate) async fn erase(State(state): State<AppState>, command: CommandRequest) -> Result<Response, Problem> {
    let request = UserCommandRequest {
        metadata: command.metadata(),
        user_id: command.id("user")?.to_string(),
        expected_version: command.expected_version()?,
    };
    let reply =
        state.identity.erase_personal_data(request).await.map_err(|status| rejected("erase personal data", &status))?;
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
    let user = users::user(&state.pool, id)
        .await
        .map_err(|error| {
            tracing::error!(error = %error, "failed to read the users read model");
            Problem::from_code(keel_proto::ErrorCode::Unavailable)
        })?
        .ok_or_else(|| Problem::not_found(format!("no user {id}")))?;
    let version = user.version;
    let body = UserBody {
        id: user.id,
        email: user.email,
        display_name: user.display_name,
        bio: user.bio,
        status: user.status,
        version,
    };
    Ok(([(header::ETAG, precondition::entity_tag(version))], Json(body)).into_response())
}
