//! `/v1/roles` and `/v1/users/{id}/roles`: roles and the roles of users (commands to authz,
//! reads from the authz read model).

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use keel_proto::authz::v1::{CreateRoleRequest, RoleGrantRequest, SetRolePermissionsRequest};
use keel_read_models::authz;
use serde::Deserialize;

use crate::{
    AppState,
    commands::{CommandRequest, command_response, created, parse_id, rejected},
    problem::{JsonBody, Problem},
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RoleBody {
    name: String,
    permissions: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PermissionsBody {
    permissions: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GrantBody {
    role: String,
}

fn unavailable(error: sqlx::Error) -> Problem {
    tracing::error!(%error, "failed to read the authz read model");
    Problem::from_code(keel_proto::ErrorCode::Unavailable)
}

/// `POST /v1/roles` with `{"name", "permissions"}`.
pub(crate) async fn create(
    State(state): State<AppState>,
    command: CommandRequest,
    JsonBody(body): JsonBody<RoleBody>,
) -> Result<Response, Problem> {
    let name = body.name.clone();
    let request = CreateRoleRequest { metadata: command.metadata(), name: body.name, permissions: body.permissions };
    let reply = state.authz.create_role(request).await.map_err(|status| rejected("create role", &status))?;
    created(format!("/v1/roles/{name}"), reply)
}

/// `GET /v1/roles`.
pub(crate) async fn list(State(state): State<AppState>) -> Result<Response, Problem> {
    let roles = authz::roles(&state.pool).await.map_err(unavailable)?;
    Ok(Json(serde_json::json!({ "items": roles })).into_response())
}

/// `PUT /v1/roles/{name}` with `{"permissions"}`, optionally conditional on `If-Match`.
pub(crate) async fn set_permissions(
    State(state): State<AppState>,
    command: CommandRequest,
    JsonBody(body): JsonBody<PermissionsBody>,
) -> Result<Response, Problem> {
    let request = SetRolePermissionsRequest {
        metadata: command.metadata(),
        name: command.param("name")?.to_owned(),
        permissions: body.permissions,
        expected_version: command.expected_version()?,
    };
    let reply =
        state.authz.set_role_permissions(request).await.map_err(|status| rejected("set role permissions", &status))?;
    Ok(command_response(StatusCode::OK, reply))
}

/// `GET /v1/users/{id}/roles`.
pub(crate) async fn of_user(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, Problem> {
    let id = parse_id(&id, "user")?;
    let roles = authz::roles_of(&state.pool, id).await.map_err(unavailable)?;
    Ok(Json(serde_json::json!({ "items": roles })).into_response())
}

/// `POST /v1/users/{id}/roles` with `{"role"}`.
pub(crate) async fn grant(
    State(state): State<AppState>,
    command: CommandRequest,
    JsonBody(body): JsonBody<GrantBody>,
) -> Result<Response, Problem> {
    let request =
        RoleGrantRequest { metadata: command.metadata(), user_id: command.id("user")?.to_string(), role: body.role };
    let reply = state.authz.grant_role(request).await.map_err(|status| rejected("grant role", &status))?;
    Ok(command_response(StatusCode::OK, reply))
}

/// `DELETE /v1/users/{id}/roles/{role}`.
pub(crate) async fn revoke(State(state): State<AppState>, command: CommandRequest) -> Result<Response, Problem> {
    let request = RoleGrantRequest {
        metadata: command.metadata(),
        user_id: command.id("user")?.to_string(),
        role: command.param("role")?.to_owned(),
    };
    let reply = state.authz.revoke_role(request).await.map_err(|status| rejected("revoke role", &status))?;
    Ok(command_response(StatusCode::OK, reply))
}
