//! `/v1/roles` and `/v1/users/{id}/roles`: roles and the roles of users (commands to authz,
//! reads from the authz read model).

use axum::{
    Extension, Json,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use keel_proto::authz::v1::{
    CreateRoleRequest, RoleGrantRequest, SetRolePermissionsRequest, authz_client::AuthzClient,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    AppState,
    commands::{command_response, created, metadata, parse_id, rejected},
    idempotency, precondition,
    problem::{JsonBody, Problem},
    security::Caller,
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

#[derive(Debug, Serialize, sqlx::FromRow)]
pub(crate) struct RoleItem {
    id: Uuid,
    name: String,
    permissions: Vec<String>,
    version: i64,
}

fn unavailable(error: sqlx::Error) -> Problem {
    tracing::error!(%error, "failed to read the authz read model");
    Problem::from_code(keel_proto::ErrorCode::Unavailable)
}

/// `POST /v1/roles` with `{"name", "permissions"}`.
pub(crate) async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<RoleBody>,
) -> Result<Response, Problem> {
    let command_id = idempotency::command_id_of(&headers, "POST", "/v1/roles", "", &caller)?;
    let name = body.name.clone();
    let request = CreateRoleRequest {
        metadata: Some(metadata(&headers, command_id, &caller)),
        name: body.name,
        permissions: body.permissions,
    };
    let reply =
        state
            .authz()
            .send("CreateRole", request, |channel, request| async move {
                AuthzClient::new(channel).create_role(request).await
            })
            .await
            .map_err(|status| rejected("create role", &status))?;
    created(format!("/v1/roles/{name}"), reply)
}

/// `GET /v1/roles`.
pub(crate) async fn list(State(state): State<AppState>) -> Result<Response, Problem> {
    let roles: Vec<RoleItem> = sqlx::query_as("SELECT id, name, permissions, version FROM authz_roles ORDER BY name")
        .fetch_all(&state.pool)
        .await
        .map_err(unavailable)?;
    Ok(Json(serde_json::json!({ "items": roles })).into_response())
}

/// `PUT /v1/roles/{name}` with `{"permissions"}`, optionally conditional on `If-Match`.
pub(crate) async fn set_permissions(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<PermissionsBody>,
) -> Result<Response, Problem> {
    let command_id = idempotency::command_id_of(&headers, "PUT", "/v1/roles/{name}", &name, &caller)?;
    let request = SetRolePermissionsRequest {
        metadata: Some(metadata(&headers, command_id, &caller)),
        name,
        permissions: body.permissions,
        expected_version: precondition::expected_version(&headers)?,
    };
    let reply = state
        .authz()
        .send("SetRolePermissions", request, |channel, request| async move {
            AuthzClient::new(channel).set_role_permissions(request).await
        })
        .await
        .map_err(|status| rejected("set role permissions", &status))?;
    Ok(command_response(StatusCode::OK, reply))
}

/// `GET /v1/users/{id}/roles`.
pub(crate) async fn of_user(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, Problem> {
    let id = parse_id(&id, "user")?;
    let roles: Vec<RoleItem> = sqlx::query_as(
        "SELECT r.id, r.name, r.permissions, r.version FROM authz_user_roles g
         JOIN authz_roles r ON r.id = g.role_id WHERE g.user_id = $1 ORDER BY r.name",
    )
    .bind(id)
    .fetch_all(&state.pool)
    .await
    .map_err(unavailable)?;
    Ok(Json(serde_json::json!({ "items": roles })).into_response())
}

/// `POST /v1/users/{id}/roles` with `{"role"}`.
pub(crate) async fn grant(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<GrantBody>,
) -> Result<Response, Problem> {
    let id = parse_id(&id, "user")?;
    let command_id = idempotency::command_id_of(&headers, "POST", "/v1/users/{id}/roles", &id.to_string(), &caller)?;
    let request = RoleGrantRequest {
        metadata: Some(metadata(&headers, command_id, &caller)),
        user_id: id.to_string(),
        role: body.role,
    };
    let reply =
        state
            .authz()
            .send("GrantRole", request, |channel, request| async move {
                AuthzClient::new(channel).grant_role(request).await
            })
            .await
            .map_err(|status| rejected("grant role", &status))?;
    Ok(command_response(StatusCode::OK, reply))
}

/// `DELETE /v1/users/{id}/roles/{role}`.
pub(crate) async fn revoke(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((id, role)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let id = parse_id(&id, "user")?;
    let command_id =
        idempotency::command_id_of(&headers, "DELETE", "/v1/users/{id}/roles/{role}", &id.to_string(), &caller)?;
    let request =
        RoleGrantRequest { metadata: Some(metadata(&headers, command_id, &caller)), user_id: id.to_string(), role };
    let reply =
        state
            .authz()
            .send("RevokeRole", request, |channel, request| async move {
                AuthzClient::new(channel).revoke_role(request).await
            })
            .await
            .map_err(|status| rejected("revoke role", &status))?;
    Ok(command_response(StatusCode::OK, reply))
}
