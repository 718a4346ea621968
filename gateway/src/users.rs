//! `/v1/users`: register (command) and read back (query).

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use keel_proto::identity::v1::{CommandMetadata, RegisterUserRequest};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use uuid::Uuid;

use crate::{
    AppState,
    problem::{JsonBody, Problem},
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegisterBody {
    email: String,
    display_name: String,
}

#[derive(Debug, Serialize)]
struct PositionBody {
    topic: String,
    partition: i32,
    offset: i64,
}

#[derive(Debug, Serialize)]
struct RegisteredBody {
    id: String,
    position: PositionBody,
}

#[derive(Debug, Serialize)]
pub(crate) struct UserBody {
    id: Uuid,
    email: String,
    display_name: String,
    version: i64,
}

/// `POST /v1/users`
pub(crate) async fn register(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<RegisterBody>,
) -> Result<Response, Problem> {
    let command_id = Uuid::now_v7();
    let request = RegisterUserRequest {
        metadata: Some(CommandMetadata {
            command_id: command_id.to_string(),
            actor: "anonymous".into(),
            correlation_id: correlation_id(&headers).unwrap_or(command_id).to_string(),
            traceparent: header_text(&headers, "traceparent").unwrap_or_default(),
        }),
        email: body.email,
        display_name: body.display_name,
    };
    let reply = state.identity.clone().register_user(request).await.map_err(|status| {
        tracing::info!(code = ?status.code(), message = status.message(), "register rejected");
        Problem::from_status(&status)
    })?;
    let reply = reply.into_inner();
    let position = reply.position.ok_or_else(|| {
        tracing::error!("identity reply without a position");
        Problem::internal()
    })?;
    let location = format!("/v1/users/{}", reply.aggregate_id);
    let body = RegisteredBody {
        id: reply.aggregate_id,
        position: PositionBody { topic: position.topic, partition: position.partition, offset: position.offset },
    };
    let mut response = (StatusCode::CREATED, Json(body)).into_response();
    if let Ok(location) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// `GET /v1/users/{id}`
pub(crate) async fn get(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<UserBody>, Problem> {
    let id = Uuid::parse_str(&id).map_err(|_| Problem::bad_request("the user id must be a UUID"))?;
    let row = sqlx::query("SELECT id, email, display_name, version FROM users WHERE id = $1")
        .bind(id)
        .fetch_optional(&state.pool)
        .await
        .map_err(|error| {
            tracing::error!(error = %error, "failed to read the users read model");
            Problem::from_code(keel_proto::ErrorCode::Unavailable)
        })?
        .ok_or_else(|| Problem::not_found(format!("no user {id}")))?;
    Ok(Json(UserBody {
        id: row.get("id"),
        email: row.get("email"),
        display_name: row.get("display_name"),
        version: row.get("version"),
    }))
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name)?.to_str().ok().map(str::to_owned)
}

fn correlation_id(headers: &HeaderMap) -> Option<Uuid> {
    header_text(headers, "x-correlation-id")?.parse().ok()
}
