//! The HTTP edge. Command routes go to command services over gRPC; query routes read the read
//! models. Every error is `application/problem+json`.

#![forbid(unsafe_code)]

mod audit;
mod consistency;
mod idempotency;
pub mod identity_client;
mod observe;
mod precondition;
pub mod problem;
mod users;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::DefaultBodyLimit, routing::get};
use keel_runtime::{Health, Lifecycle, ReadinessCheck, postgres::DatabaseCheck};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tower_http::catch_panic::CatchPanicLayer;

use crate::{
    identity_client::{IdentityClient, IdentityEndpoint},
    problem::Problem,
};

/// The `gateway` section of the configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// The HTTP listen address.
    pub listen: String,
    /// Instances of the identity command service (gRPC). Commands start at a different one each
    /// time and move on to the next while one is unavailable, so list several for failover.
    pub identity_endpoints: Vec<String>,
    /// Larger request bodies are refused with 413.
    pub max_body_bytes: usize,
    /// How long a command route waits for its command service, retries on other instances
    /// included.
    pub command_timeout_ms: u64,
    /// How long a query with `Keel-Consistency` tokens waits for its projection to pass them
    /// before it answers with what it has (`Keel-Stale: true`).
    pub consistency_timeout_ms: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            identity_endpoints: vec!["http://127.0.0.1:50051".into()],
            max_body_bytes: 64 * 1024,
            command_timeout_ms: 15_000,
            consistency_timeout_ms: 3_000,
        }
    }
}

impl GatewayConfig {
    /// Checks what serde cannot: ranges and URLs.
    pub fn validate(&self) -> Result<(), keel_runtime::ConfigError> {
        use keel_runtime::config::ensure;
        ensure(self.max_body_bytes > 0, "gateway.max_body_bytes", "must be positive")?;
        ensure(self.command_timeout_ms > 0, "gateway.command_timeout_ms", "must be positive")?;
        ensure(self.consistency_timeout_ms <= 60_000, "gateway.consistency_timeout_ms", "must be at most 60000")?;
        ensure(!self.identity_endpoints.is_empty(), "gateway.identity_endpoints", "must name at least one endpoint")?;
        for endpoint in &self.identity_endpoints {
            ensure(
                is_grpc_url(endpoint),
                "gateway.identity_endpoints",
                "every entry must be a URL such as http://127.0.0.1:50051",
            )?;
        }
        Ok(())
    }
}

/// An absolute http(s) URL: what a tonic endpoint connects to. A bare `host:port` parses as a
/// URI too, but has no scheme to connect with.
fn is_grpc_url(text: &str) -> bool {
    text.parse::<http::Uri>().is_ok_and(|uri| {
        matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some_and(|host| !host.is_empty())
    })
}

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub identity: IdentityClient,
    /// The full name of the users topic (with the configured prefix), for consistency tokens.
    pub users_topic: String,
    pub consistency_timeout: Duration,
}

/// Readiness: at least one identity instance answers gRPC health checks, since commands fail
/// over to whichever does. Which instances answer is the gauge
/// `keel_gateway_identity_endpoint_up{endpoint}`, and a log line when an instance comes or goes;
/// when none does, the reason names each with its failure.
struct IdentityCheck {
    endpoints: Vec<IdentityEndpoint>,
    /// Whether each endpoint answered the last check, to log changes rather than every probe.
    last_up: Vec<AtomicBool>,
}

/// Below the readiness timeout, so one instance that does not answer cannot hide another that
/// does.
const ENDPOINT_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

impl IdentityCheck {
    fn new(client: &IdentityClient) -> Self {
        let endpoints = client.endpoints().to_vec();
        // Assumed up until a check says otherwise, so a healthy start logs nothing.
        let last_up = endpoints.iter().map(|_| AtomicBool::new(true)).collect();
        Self { endpoints, last_up }
    }
}

#[async_trait::async_trait]
impl ReadinessCheck for IdentityCheck {
    fn name(&self) -> &'static str {
        "identity"
    }

    async fn check(&self) -> Result<(), String> {
        let outcomes = futures::future::join_all(self.endpoints.iter().map(|endpoint| async move {
            tokio::time::timeout(ENDPOINT_CHECK_TIMEOUT, grpc_serving(&endpoint.channel))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {ENDPOINT_CHECK_TIMEOUT:?}")))
        }))
        .await;
        let mut failures = Vec::new();
        for ((endpoint, outcome), last_up) in self.endpoints.iter().zip(&outcomes).zip(&self.last_up) {
            let up = outcome.is_ok();
            metrics::gauge!("keel_gateway_identity_endpoint_up", "endpoint" => endpoint.url.clone())
                .set(f64::from(u8::from(up)));
            if last_up.swap(up, Ordering::Relaxed) != up {
                match outcome {
                    Ok(()) => tracing::info!(endpoint = %endpoint.url, "identity endpoint is serving"),
                    Err(reason) => {
                        tracing::warn!(endpoint = %endpoint.url, reason = %reason, "identity endpoint is not serving")
                    }
                }
            }
            if let Err(reason) = outcome {
                failures.push(format!("{}: {reason}", endpoint.url));
            }
        }
        if failures.len() < self.endpoints.len() {
            Ok(())
        } else {
            Err(format!("no identity endpoint is serving ({})", failures.join("; ")))
        }
    }
}

async fn grpc_serving(channel: &Channel) -> Result<(), String> {
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let response = client
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .map_err(|status| status.message().to_owned())?;
    match response.into_inner().status() {
        tonic_health::pb::health_check_response::ServingStatus::Serving => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

/// The gateway's routes, with health and metrics.
pub fn router(state: AppState, health: Health, max_body_bytes: usize) -> Router {
    let api = Router::new()
        .route("/v1/users", axum::routing::post(users::register))
        .route("/v1/users/{id}", get(users::get).patch(users::change))
        .route("/v1/audit", get(audit::list))
        .with_state(state)
        .layer(DefaultBodyLimit::max(max_body_bytes));
    Router::new()
        .merge(api)
        .merge(keel_runtime::admin::router(health))
        .fallback(|| async { Problem::not_found("no route matches this path") })
        .method_not_allowed_fallback(|| async {
            Problem::new(http::StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed", "Method not allowed")
        })
        .layer(axum::middleware::from_fn(observe::record))
        .layer(CatchPanicLayer::custom(observe::panic_response))
}

/// Starts the gateway on `listener`.
/// `users_topic` is the users topic's full name (topic prefix included).
pub fn start(
    config: &GatewayConfig,
    users_topic: String,
    pool: PgPool,
    lifecycle: &mut Lifecycle,
    listener: TcpListener,
) -> anyhow::Result<()> {
    let identity = IdentityClient::new(&config.identity_endpoints, Duration::from_millis(config.command_timeout_ms))?;
    let checks: Vec<Arc<dyn ReadinessCheck>> =
        vec![Arc::new(DatabaseCheck(pool.clone())), Arc::new(IdentityCheck::new(&identity))];
    let health = Health::new(checks, lifecycle.token());
    let consistency_timeout = Duration::from_millis(config.consistency_timeout_ms);
    let state = AppState { pool, identity, users_topic, consistency_timeout };
    lifecycle.serve_http("gateway-http", listener, router(state, health, config.max_body_bytes));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_endpoints_must_be_present_and_urls() {
        assert!(GatewayConfig::default().validate().is_ok());
        let with = |endpoints: &[&str]| GatewayConfig {
            identity_endpoints: endpoints.iter().map(|endpoint| (*endpoint).to_owned()).collect(),
            ..GatewayConfig::default()
        };
        assert!(with(&["http://identity-0:50051", "https://identity-1:50051"]).validate().is_ok());
        for endpoints in [&[][..], &["127.0.0.1:50051"], &["http://a:1", "not a url"], &["ftp://a:1"]] {
            assert!(with(endpoints).validate().is_err(), "{endpoints:?}");
        }
    }
}
