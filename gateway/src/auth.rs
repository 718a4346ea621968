//! `/v1/auth`: login, refresh, logout; and `/.well-known/jwks.json`, the keys that verify access
//! tokens (as this gateway has them from auth).
//!
//! Login is throttled per client IP and per account (`gateway.rate_limit.login_per_ip`,
//! `login_per_account`), in the same shared store as the other limits. Every attempt counts,
//! successful or not, so guessing is slow however it is spread.

use axum::{
    Extension, Json,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use keel_proto::auth::v1::{LoginRequest, LogoutRequest, RefreshRequest, Tokens};
use keel_topics::Topic;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::{
    AppState,
    commands::{metadata, rejected},
    consistency,
    problem::{JsonBody, Problem},
    security::{Caller, ClientIp, too_many},
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LoginBody {
    email: String,
    password: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RefreshBody {
    refresh_token: String,
}

/// RFC 6749's token response, plus who and which session it is for.
#[derive(Debug, Serialize)]
struct TokenBody {
    access_token: String,
    token_type: &'static str,
    expires_in: i64,
    refresh_token: String,
    refresh_expires_at: i64,
    user_id: String,
    session_id: String,
}

fn token_response(tokens: Tokens) -> Response {
    let body = TokenBody {
        access_token: tokens.access_token,
        token_type: "Bearer",
        expires_in: tokens.expires_in,
        refresh_token: tokens.refresh_token,
        refresh_expires_at: tokens.refresh_expires_at,
        user_id: tokens.user_id,
        session_id: tokens.session_id,
    };
    // Tokens are secrets: no cache may keep them.
    ([(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))], Json(body)).into_response()
}

/// `POST /v1/auth/login` with `{"email", "password"}`. With `Keel-Consistency` (the token of a
/// registration), it first waits for the users projection, so a login right after registering
/// finds the account.
pub(crate) async fn login(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<LoginBody>,
) -> Result<Response, Problem> {
    let rules = state.security.rules;
    if let Err(limited) = state.security.limiter.check(&format!("login-ip:{ip}"), rules.login_per_ip).await {
        return Ok(too_many(limited));
    }
    // The account's key is a hash of the normalized address, so the store holds no email.
    let account = hex::encode(Sha256::digest(body.email.trim().to_lowercase().as_bytes()));
    if let Err(limited) =
        state.security.limiter.check(&format!("login-account:{account}"), rules.login_per_account).await
    {
        return Ok(too_many(limited));
    }
    let users = state.names.name(Topic::IdentityUsers);
    let tokens = consistency::tokens(&headers, &[users.as_str()])?;
    consistency::wait(&state.pool, "users", &tokens, state.consistency_timeout).await?;
    // Each login is a new session: never a retry of an earlier one.
    let request = LoginRequest {
        metadata: Some(metadata(&headers, Uuid::now_v7(), &caller)),
        email: body.email,
        password: body.password,
    };
    let tokens = state.auth.login(request).await.map_err(|status| rejected("login", &status))?;
    Ok(token_response(tokens))
}

/// `POST /v1/auth/refresh` with `{"refresh_token"}`: new tokens; the presented refresh token is
/// spent. Presenting a spent one again revokes the whole session.
pub(crate) async fn refresh(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<RefreshBody>,
) -> Result<Response, Problem> {
    let request = RefreshRequest {
        metadata: Some(metadata(&headers, Uuid::now_v7(), &caller)),
        refresh_token: body.refresh_token,
    };
    let tokens = state.auth.refresh(request).await.map_err(|status| rejected("refresh", &status))?;
    Ok(token_response(tokens))
}

/// `POST /v1/auth/logout`: ends the caller's session. Its refresh token stops at once, and its
/// access tokens at once on this gateway and within `gateway.auth.status_cache_ms` on others.
pub(crate) async fn logout(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let Caller::User { session, .. } = caller else {
        return Err(Problem::from_code(keel_proto::ErrorCode::Unauthenticated));
    };
    let request =
        LogoutRequest { metadata: Some(metadata(&headers, Uuid::now_v7(), &caller)), session_id: session.to_string() };
    state.auth.logout(request).await.map_err(|status| rejected("logout", &status))?;
    state.security.status.revoked(session).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /.well-known/jwks.json`.
pub(crate) async fn jwks(State(state): State<AppState>) -> Response {
    let jwks = state.security.tokens.jwks();
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/jwk-set+json")),
            (header::CACHE_CONTROL, HeaderValue::from_static("max-age=60")),
        ],
        jwks.as_str().to_owned(),
    )
        .into_response()
}
