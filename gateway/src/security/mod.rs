//! The gateway's security pipeline, in the order of the platform's request pipeline:
//!
//! 1. **rate limit per client IP**, before anything costs work (`gateway.rate_limit.per_ip`);
//! 2. **JWT validation**: a bearer token is verified locally (EdDSA, keys from auth's JWKS), and
//!    must belong to an active user and an unrevoked session; an invalid token is `401`, never
//!    treated as anonymous;
//! 3. **rate limit per user** (`gateway.rate_limit.per_user`);
//! 4. **permission check** through authz, by the route's [`Access`]:
//!    `401` without a user where one is needed, `403` when authz says no;
//! 5. the handler, with the [`Caller`] and its [`Decision`] in the request's extensions.
//!
//! Every refusal is problem+json: `429` with `Retry-After`, `401` with `WWW-Authenticate`.

pub mod access;
pub mod permissions;
pub mod ratelimit;
pub mod revocation;
pub mod tokens;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use axum::{
    extract::{ConnectInfo, Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use keel_proto::ErrorCode;
use uuid::Uuid;

pub use access::{Access, Owner, permission};
pub use permissions::{Decision, Permissions};
pub use ratelimit::{Limited, RateLimiter, Rule};
pub use revocation::StatusCache;
pub use tokens::TokenVerifier;

use crate::problem::Problem;

/// Who sent a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    Anonymous,
    User {
        id: Uuid,
        session: Uuid,
        /// When the access token expires (seconds since the epoch): long-lived responses (streams)
        /// end then.
        expires_at: i64,
    },
}

impl Caller {
    /// The actor commands carry.
    pub fn actor(&self) -> String {
        match self {
            Self::Anonymous => "anonymous".to_owned(),
            Self::User { id, .. } => id.to_string(),
        }
    }

    pub fn user(&self) -> Option<Uuid> {
        match self {
            Self::Anonymous => None,
            Self::User { id, .. } => Some(*id),
        }
    }
}

/// The client's address, as the limits see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

/// The limits of the pipeline and of login.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub per_ip: Rule,
    pub per_user: Rule,
    pub login_per_ip: Rule,
    pub login_per_account: Rule,
}

/// What the pipeline of one route needs: the shared parts, and the route's rule.
#[derive(Clone)]
pub struct RouteGuard {
    pub security: Arc<Security>,
    pub access: Access,
    /// The route's path template (`/v1/users/{id}`), where [`Owner::PathUser`] finds the owner.
    pub template: &'static str,
}

/// What the pipeline needs.
pub struct Security {
    pub limiter: RateLimiter,
    pub tokens: std::sync::Arc<TokenVerifier>,
    pub status: StatusCache,
    pub permissions: Permissions,
    pub rules: Rules,
    /// Take the client's address from the last `X-Forwarded-For` entry (set by a proxy in front).
    pub trust_forwarded_for: bool,
}

/// `429 Too Many Requests` with the seconds to wait.
pub fn too_many(limited: Limited) -> Response {
    let seconds = limited.retry_after.as_secs_f64().ceil().max(1.0) as u64;
    metrics::counter!("keel_gateway_rate_limited_total").increment(1);
    Problem::from_code(ErrorCode::RateLimited)
        .detail(format!("too many requests; retry in {seconds} s"))
        .header(header::RETRY_AFTER, HeaderValue::from(seconds))
        .into_response()
}

fn unauthenticated(detail: &str) -> Response {
    Problem::from_code(ErrorCode::Unauthenticated)
        .detail(detail)
        .header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer error=\"invalid_token\""))
        .into_response()
}

fn forbidden() -> Response {
    Problem::from_code(ErrorCode::PermissionDenied).detail("you may not do this").into_response()
}

fn client_ip(request: &Request, peer: SocketAddr, trust_forwarded_for: bool) -> IpAddr {
    if trust_forwarded_for
        && let Some(forwarded) = request.headers().get("x-forwarded-for").and_then(|value| value.to_str().ok())
        && let Some(last) = forwarded.rsplit(',').next()
        && let Ok(ip) = last.trim().parse()
    {
        return ip;
    }
    peer.ip()
}

/// The bearer token of a request: `None` without an `Authorization` header, `Err` for one that
/// is not a bearer token.
fn bearer(request: &Request) -> Option<Result<&str, ()>> {
    let value = request.headers().get(header::AUTHORIZATION)?;
    let text = value.to_str().map_err(|_| ());
    Some(text.and_then(|text| match text.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => Ok(token.trim()),
        _ => Err(()),
    }))
}

/// Who the token speaks for, or the response refusing it.
async fn authenticate(security: &Security, token: &str) -> Result<Caller, Response> {
    let claims = match security.tokens.verify(token).await {
        Ok(claims) => claims,
        Err(error) => {
            metrics::counter!("keel_gateway_tokens_refused_total", "reason" => error.label()).increment(1);
            tracing::info!(reason = %error, "refused an access token");
            return Err(unauthenticated("the access token is invalid or expired"));
        }
    };
    if security.status.session_revoked(claims.sid).await.map_err(IntoResponse::into_response)? {
        metrics::counter!("keel_gateway_tokens_refused_total", "reason" => "revoked").increment(1);
        return Err(unauthenticated("the session was ended"));
    }
    if !security.status.user_active(claims.sub).await.map_err(IntoResponse::into_response)? {
        metrics::counter!("keel_gateway_tokens_refused_total", "reason" => "inactive").increment(1);
        return Err(unauthenticated("the account is not active"));
    }
    Ok(Caller::User { id: claims.sub, session: claims.sid, expires_at: claims.exp })
}

/// The pipeline, as an axum middleware on each API route, with that route's rule. The handler
/// finds the [`Caller`], the [`ClientIp`], the [`Decision`] and the route's [`Access`] in the
/// request's extensions.
pub async fn pipeline(
    State(guard): State<RouteGuard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut request: Request,
    next: Next,
) -> Response {
    let security = &guard.security;
    let ip = client_ip(&request, peer, security.trust_forwarded_for);
    let ip_key = format!("ip:{ip}");
    // The per-IP limit comes before any work a request could make the gateway do. A token whose
    // signature was checked before costs no such work: its request is limited per IP and per
    // user together, in one round trip to the limit store, after it.
    let token = bearer(&request);
    let cheap = matches!(token, Some(Ok(token)) if security.tokens.is_known(token));
    if !cheap && let Err(limited) = security.limiter.check(&ip_key, security.rules.per_ip).await {
        return too_many(limited);
    }
    let caller = match token {
        None => Caller::Anonymous,
        Some(Err(())) => return unauthenticated("send `Authorization: Bearer <access token>`"),
        Some(Ok(token)) => match authenticate(security, token).await {
            Ok(caller) => caller,
            Err(response) => return response,
        },
    };
    // Reports of this request (it has a Sentry hub of its own) name the user, by id only.
    if let Some(user) = caller.user() {
        sentry::configure_scope(|scope| {
            scope.set_user(Some(sentry::User { id: Some(user.to_string()), ..Default::default() }));
        });
    }
    let user_key = caller.user().map(|id| format!("user:{id}"));
    let limits: Vec<(&str, Rule)> = match (&user_key, cheap) {
        (Some(user), true) => vec![(&ip_key, security.rules.per_ip), (user, security.rules.per_user)],
        (Some(user), false) => vec![(user, security.rules.per_user)],
        (None, true) => vec![(&ip_key, security.rules.per_ip)],
        (None, false) => Vec::new(),
    };
    if !limits.is_empty()
        && let Err(limited) = security.limiter.check_all(&limits).await
    {
        return too_many(limited);
    }
    let decision = match guard.access {
        Access::Public => Decision::Allow,
        Access::Authenticated if caller == Caller::Anonymous => return unauthenticated("sign in first"),
        Access::Authenticated => Decision::Allow,
        Access::Permission { action, owner: whose } => {
            let Some(user) = caller.user() else { return unauthenticated("sign in first") };
            let owner = match whose {
                Owner::PathUser => match path_uuid(request.uri().path(), guard.template) {
                    Some(owner) => Some(owner),
                    None => return Problem::bad_request("the user id must be a UUID").into_response(),
                },
                Owner::Resource | Owner::Nobody => None,
            };
            match security.permissions.check(user, action, owner).await {
                Ok(Decision::Deny) => return forbidden(),
                Ok(Decision::AllowOwn) if whose == Owner::Nobody => return forbidden(),
                Ok(decision) => decision,
                Err(problem) => return problem.into_response(),
            }
        }
    };
    request.extensions_mut().insert(caller);
    request.extensions_mut().insert(ClientIp(ip));
    request.extensions_mut().insert(decision);
    request.extensions_mut().insert(guard.access);
    let response = next.run(request).await;
    if response.status() == StatusCode::UNAUTHORIZED && !response.headers().contains_key(header::WWW_AUTHENTICATE) {
        let mut response = response;
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    response
}

/// The `{id}` segment of `path` where `template` has it.
fn path_uuid(path: &str, template: &str) -> Option<Uuid> {
    let index = template.split('/').position(|segment| segment == "{id}")?;
    path.split('/').nth(index).and_then(|segment| Uuid::parse_str(segment).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_is_the_id_segment_of_the_path() {
        let id = Uuid::now_v7();
        assert_eq!(path_uuid(&format!("/v1/users/{id}/email"), "/v1/users/{id}/email"), Some(id));
        assert_eq!(path_uuid("/v1/users/nope", "/v1/users/{id}"), None);
    }

    #[test]
    fn only_bearer_tokens_are_tokens() {
        let request = |value: &str| {
            axum::http::Request::builder().header(header::AUTHORIZATION, value).body(axum::body::Body::empty()).unwrap()
        };
        assert_eq!(bearer(&request("Bearer abc")), Some(Ok("abc")));
        assert_eq!(bearer(&request("bearer  abc ")), Some(Ok("abc")));
        assert_eq!(bearer(&request("Basic abc")), Some(Err(())));
        assert_eq!(bearer(&request("Bearer ")), Some(Err(())));
        assert_eq!(bearer(&axum::http::Request::new(axum::body::Body::empty())), None);
    }

    #[test]
    fn forwarded_addresses_count_only_when_trusted() {
        let peer: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let request = axum::http::Request::builder()
            .header("x-forwarded-for", "203.0.113.9, 198.51.100.7")
            .body(axum::body::Body::empty())
            .unwrap();
        assert_eq!(client_ip(&request, peer, false), peer.ip());
        assert_eq!(client_ip(&request, peer, true), "198.51.100.7".parse::<IpAddr>().unwrap());
    }
}
