//! The HTTP edge. Command routes go to command services over gRPC; query routes read the read
//! models. Every error is `application/problem+json`.

#![forbid(unsafe_code)]

mod audit;
mod observe;
pub mod problem;
mod users;

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use axum::{Router, extract::DefaultBodyLimit, routing::get};
use keel_proto::identity::v1::identity_commands_client::IdentityCommandsClient;
use keel_runtime::{Health, Lifecycle, ReadinessCheck, postgres::DatabaseCheck};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint};
use tower_http::catch_panic::CatchPanicLayer;

use crate::problem::Problem;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    pub listen: String,
    /// The identity command service (gRPC).
    pub identity_endpoint: String,
    /// Larger request bodies are refused with 413.
    pub max_body_bytes: usize,
    /// How long a command route waits for its command service.
    pub command_timeout_ms: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            identity_endpoint: "http://127.0.0.1:50051".into(),
            max_body_bytes: 64 * 1024,
            command_timeout_ms: 15_000,
        }
    }
}

impl GatewayConfig {
    pub fn validate(&self) -> Result<(), keel_runtime::ConfigError> {
        keel_runtime::config::ensure(self.max_body_bytes > 0, "gateway.max_body_bytes", "must be positive")?;
        keel_runtime::config::ensure(
            self.identity_endpoint.parse::<http::Uri>().is_ok(),
            "gateway.identity_endpoint",
            "must be a URL such as http://127.0.0.1:50051",
        )
    }
}

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub identity: IdentityCommandsClient<Channel>,
}

/// Readiness: the identity service answers gRPC health checks.
struct GrpcCheck {
    name: &'static str,
    channel: Channel,
}

#[async_trait::async_trait]
impl ReadinessCheck for GrpcCheck {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn check(&self) -> Result<(), String> {
        let mut client = tonic_health::pb::health_client::HealthClient::new(self.channel.clone());
        let response = client
            .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
            .await
            .map_err(|status| status.message().to_owned())?;
        match response.into_inner().status() {
            tonic_health::pb::health_check_response::ServingStatus::Serving => Ok(()),
            other => Err(format!("{other:?}")),
        }
    }
}

/// The gateway's routes, with health and metrics.
pub fn router(state: AppState, health: Health, max_body_bytes: usize) -> Router {
    let api = Router::new()
        .route("/v1/users", axum::routing::post(users::register))
        .route("/v1/users/{id}", get(users::get))
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
pub fn start(
    config: &GatewayConfig,
    pool: PgPool,
    lifecycle: &mut Lifecycle,
    listener: TcpListener,
) -> anyhow::Result<()> {
    let timeout = Duration::from_millis(config.command_timeout_ms);
    let channel = Endpoint::from_shared(config.identity_endpoint.clone())
        .context("gateway.identity_endpoint is not a valid URL")?
        .connect_timeout(Duration::from_secs(2))
        .timeout(timeout)
        .connect_lazy();
    let checks: Vec<Arc<dyn ReadinessCheck>> =
        vec![Arc::new(DatabaseCheck(pool.clone())), Arc::new(GrpcCheck { name: "identity", channel: channel.clone() })];
    let health = Health::new(checks, lifecycle.token());
    let state = AppState { pool, identity: IdentityCommandsClient::new(channel) };
    lifecycle.serve_http("gateway-http", listener, router(state, health, config.max_body_bytes));
    Ok(())
}
