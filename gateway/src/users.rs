//! `/v1/users`: register and change (commands), read back (query).
//!
//! Command responses carry what a caller needs to go on without another read:
//! - `ETag: "<version>"`, the aggregate's version after the command, for the next `If-Match`;
//! - `Keel-Position: <topic>/<partition>/<offset>`, where the command's commit landed, when it
//!   appended one. It is a consistency token: a read model that has applied that offset of that
//!   partition reflects the command. A command that changed nothing has no position;
//! - `Idempotent-Replayed: true` when the request repeated an `Idempotency-Key` whose command
//!   had already been applied: the response is that first result, nothing was applied again.

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use keel_proto::identity::v1::{
    ChangeDisplayNameRequest, CommandMetadata, CommandReply, Position, RegisterUserRequest,
};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use uuid::Uuid;

use crate::{
    AppState, consistency,
    idempotency::{self, CommandScope, IDEMPOTENT_REPLAYED},
    precondition,
    problem::{JsonBody, Problem},
};

/// The consistency token of a command response; see the module documentation.
const KEEL_POSITION: HeaderName = HeaderName::from_static("keel-position");
/// Until callers authenticate, every command is issued by the same actor.
const ACTOR: &str = "anonymous";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegisterBody {
    email: String,
    display_name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChangeBody {
    display_name: String,
}

#[derive(Debug, Serialize)]
struct PositionBody {
    topic: String,
    partition: i32,
    offset: i64,
}

/// The body of a command response.
#[derive(Debug, Serialize)]
struct CommandBody {
    id: String,
    version: i64,
    /// `null` when the command changed nothing.
    position: Option<PositionBody>,
}

#[derive(Debug, Serialize)]
pub(crate) struct UserBody {
    id: Uuid,
    email: String,
    display_name: String,
    version: i64,
}

/// `POST /v1/users`: 201 with `Location`, also when the request is a replay.
pub(crate) async fn register(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<RegisterBody>,
) -> Result<Response, Problem> {
    let scope = CommandScope { method: "POST", route: "/v1/users", aggregate: "", actor: ACTOR };
    let command_id = idempotency::command_id(&headers, scope)?;
    let request = RegisterUserRequest {
        metadata: Some(metadata(&headers, command_id)),
        email: body.email,
        display_name: body.display_name,
    };
    let reply = state.identity.register_user(request).await.map_err(|status| rejected("register", &status))?;
    if reply.position.is_none() && !reply.replayed {
        // A registration always appends; a reply without a position is a broken contract.
        tracing::error!(%command_id, "identity registered a user without a position");
        return Err(Problem::internal());
    }
    let location = HeaderValue::try_from(format!("/v1/users/{}", reply.aggregate_id)).map_err(|_| {
        tracing::error!(%command_id, "identity returned an aggregate id that is no header value");
        Problem::internal()
    })?;
    let mut response = command_response(StatusCode::CREATED, reply);
    response.headers_mut().insert(header::LOCATION, location);
    Ok(response)
}

/// `PATCH /v1/users/{id}` with `{"display_name": …}`, optionally conditional on `If-Match`.
pub(crate) async fn change(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<ChangeBody>,
) -> Result<Response, Problem> {
    let id = parse_id(&id)?;
    let expected_version = precondition::expected_version(&headers)?;
    let aggregate = id.to_string();
    let scope = CommandScope { method: "PATCH", route: "/v1/users/{id}", aggregate: &aggregate, actor: ACTOR };
    let command_id = idempotency::command_id(&headers, scope)?;
    let request = ChangeDisplayNameRequest {
        metadata: Some(metadata(&headers, command_id)),
        user_id: aggregate,
        display_name: body.display_name,
        expected_version,
    };
    let reply =
        state.identity.change_display_name(request).await.map_err(|status| rejected("change display name", &status))?;
    Ok(command_response(StatusCode::OK, reply))
}

/// `GET /v1/users/{id}`, with the version as `ETag`; with `Keel-Consistency` tokens, once the
/// users projection has passed them (see [`consistency`]).
pub(crate) async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let id = parse_id(&id)?;
    let tokens = consistency::tokens(&headers, &[state.users_topic.as_str()])?;
    let freshness = consistency::wait(&state.pool, "users", &tokens, state.consistency_timeout).await?;
    let mut response = read(&state, id).await.map_or_else(IntoResponse::into_response, IntoResponse::into_response);
    if let Some((name, value)) = freshness.header() {
        response.headers_mut().insert(name, value);
    }
    Ok(response)
}

async fn read(state: &AppState, id: Uuid) -> Result<Response, Problem> {
    let row = sqlx::query("SELECT id, email, display_name, version FROM users WHERE id = $1")
        .bind(id)
        .fetch_optional(&state.pool)
        .await
        .map_err(|error| {
            tracing::error!(error = %error, "failed to read the users read model");
            Problem::from_code(keel_proto::ErrorCode::Unavailable)
        })?
        .ok_or_else(|| Problem::not_found(format!("no user {id}")))?;
    let version: i64 = row.get("version");
    let body = UserBody { id: row.get("id"), email: row.get("email"), display_name: row.get("display_name"), version };
    Ok(([(header::ETAG, precondition::entity_tag(version))], Json(body)).into_response())
}

fn parse_id(id: &str) -> Result<Uuid, Problem> {
    Uuid::parse_str(id).map_err(|_| Problem::bad_request("the user id must be a UUID"))
}

fn metadata(headers: &HeaderMap, command_id: Uuid) -> CommandMetadata {
    CommandMetadata {
        command_id: command_id.to_string(),
        actor: ACTOR.into(),
        correlation_id: correlation_id(headers).unwrap_or(command_id).to_string(),
        traceparent: header_text(headers, "traceparent").unwrap_or_default(),
    }
}

/// A refused or failed command as a problem; the status itself, which may name internals, only
/// goes to the log.
fn rejected(command: &'static str, status: &tonic::Status) -> Problem {
    let problem = Problem::from_status(status);
    if problem.status >= 500 {
        tracing::warn!(command, code = ?status.code(), message = status.message(), "command failed");
    } else {
        tracing::info!(command, code = ?status.code(), message = status.message(), "command refused");
    }
    problem
}

/// The response to an applied (or replayed) command, with the headers the module documents.
fn command_response(status: StatusCode, reply: CommandReply) -> Response {
    let position_header = reply.position.as_ref().and_then(position_token);
    let body = CommandBody {
        id: reply.aggregate_id,
        version: reply.version,
        position: reply.position.map(|Position { topic, partition, offset }| PositionBody { topic, partition, offset }),
    };
    let mut response = (status, Json(body)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::ETAG, precondition::entity_tag(reply.version));
    if let Some(position) = position_header {
        headers.insert(KEEL_POSITION, position);
    }
    if reply.replayed {
        headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    response
}

/// `<topic>/<partition>/<offset>`. Kafka topic names cannot contain `/`, so the token splits
/// unambiguously.
fn position_token(position: &Position) -> Option<HeaderValue> {
    HeaderValue::try_from(format!("{}/{}/{}", position.topic, position.partition, position.offset)).ok()
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name)?.to_str().ok().map(str::to_owned)
}

fn correlation_id(headers: &HeaderMap) -> Option<Uuid> {
    header_text(headers, "x-correlation-id")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(position: Option<Position>, replayed: bool) -> CommandReply {
        CommandReply { aggregate_id: "0193a6c2-7f5e-7d43-9a1b-2c3d4e5f6a7b".into(), version: 4, position, replayed }
    }

    #[test]
    fn a_command_response_carries_version_position_and_replay() {
        let position = Position { topic: "identity.users".into(), partition: 3, offset: 17 };
        let response = command_response(StatusCode::OK, reply(Some(position), true));
        assert_eq!(response.headers()[header::ETAG], "\"4\"");
        assert_eq!(response.headers()[KEEL_POSITION], "identity.users/3/17");
        assert_eq!(response.headers()[IDEMPOTENT_REPLAYED], "true");
    }

    #[test]
    fn a_command_that_changed_nothing_has_no_position() {
        let response = command_response(StatusCode::OK, reply(None, false));
        assert_eq!(response.headers()[header::ETAG], "\"4\"");
        assert!(!response.headers().contains_key(KEEL_POSITION));
        assert!(!response.headers().contains_key(IDEMPOTENT_REPLAYED));
    }
}
