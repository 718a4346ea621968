//! The HTTP edge. Requests pass the security pipeline ([`security`]), then command routes go to
//! command services over gRPC and query routes read the read models. Every error is
//! `application/problem+json`.

#![forbid(unsafe_code)]
// The OpenAPI document is one large `json!`.
#![recursion_limit = "256"]

mod audit;
mod auth;
mod cache;
mod commands;
mod consistency;
mod console;
mod docs;
mod idempotency;
mod invalidation;
mod observe;
pub mod openapi;
mod owners;
mod pagination;
mod posts;
mod precondition;
pub mod problem;
mod projections;
mod roles;
pub mod routes;
pub mod security;
pub mod streams;
mod users;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use axum::{Router, extract::DefaultBodyLimit};
use keel_projections::Projection;
use keel_proto::token::Expectations;
use keel_runtime::{
    Health, KafkaConfig, Lifecycle, ReadinessCheck, config::ensure, notifications::Notifications,
    postgres::DatabaseCheck,
};
use keel_topics::{RegistryCheck, SchemaRegistryCodec, TopicNames};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tower_http::catch_panic::CatchPanicLayer;

use keel_clients::{Auth, Authz, Blog, Identity, ServiceClient};
use keel_discovery::Discovery;

use crate::{
    cache::QueryCache,
    problem::Problem,
    security::{Access, Permissions, RateLimiter, RouteGuard, Rule, Rules, Security, StatusCache, TokenVerifier},
    streams::{Streams, StreamsConfig, hub::HubContext},
};

/// How the gateway checks access tokens.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    /// Must equal `auth.issuer`.
    pub issuer: String,
    /// Must equal `auth.audience`.
    pub audience: String,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway_secs: i64,
    /// How often the key set is fetched from auth; below `auth.key_publish_ahead_secs`.
    pub jwks_refresh_secs: u64,
    /// How long a user's status and a session's revocation are cached: the bound on how long a
    /// token of a deactivated user or an ended session still works here if a notification is
    /// lost. Normally they stop within the projection's lag.
    pub status_cache_ms: u64,
    /// Memory for the claims of tokens already verified, so a token's signature is checked once.
    pub verified_cache_bytes: u64,
}

impl Default for TokenConfig {
    fn default() -> Self {
        Self {
            issuer: "keel".into(),
            audience: "keel".into(),
            leeway_secs: 30,
            jwks_refresh_secs: 30,
            status_cache_ms: 5_000,
            verified_cache_bytes: 32 * 1024 * 1024,
        }
    }
}

/// The rate limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// The Redis every gateway shares limits in (`redis://host:port/db`); empty: each gateway
    /// limits on its own, in memory.
    pub redis_url: String,
    /// Prefix of the Redis keys, so several installations can share a Redis.
    pub key_prefix: String,
    pub per_ip: Rule,
    pub per_user: Rule,
    pub login_per_ip: Rule,
    pub login_per_account: Rule,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            redis_url: "redis://127.0.0.1:6379/".into(),
            key_prefix: "keel:rate:".into(),
            per_ip: Rule { per_second: 100.0, burst: 200 },
            per_user: Rule { per_second: 50.0, burst: 100 },
            login_per_ip: Rule { per_second: 0.5, burst: 20 },
            login_per_account: Rule { per_second: 0.1, burst: 5 },
        }
    }
}

/// The cache of public query answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueryCacheConfig {
    pub max_bytes: u64,
    /// An upper bound; answers are dropped as soon as their projection changes.
    pub ttl_ms: u64,
}

impl Default for QueryCacheConfig {
    fn default() -> Self {
        Self { max_bytes: 64 * 1024 * 1024, ttl_ms: 60_000 }
    }
}

/// The `gateway` section of the configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// The HTTP listen address.
    pub listen: String,
    /// Send each command about one aggregate straight to the instance that writes its partition
    /// (known from `command_owners`). `false`: to any instance in turn, which forwards it to the
    /// owner (one hop more; kept to exercise forwarding).
    pub route_commands_to_owners: bool,
    /// Larger request bodies are refused with 413.
    pub max_body_bytes: usize,
    /// How long a command route waits for its command service, retries on other instances
    /// included.
    pub command_timeout_ms: u64,
    /// How long a query with `Keel-Consistency` tokens waits for its projection to pass them
    /// before it answers with what it has (`Keel-Stale: true`).
    pub consistency_timeout_ms: u64,
    /// Take the client's address from the last `X-Forwarded-For` entry (only behind a proxy
    /// that sets it).
    pub trust_forwarded_for: bool,
    pub auth: TokenConfig,
    /// How long a permission check is cached (dropped as soon as the authz projection changes).
    pub permission_cache_ms: u64,
    pub rate_limit: RateLimitConfig,
    pub query_cache: QueryCacheConfig,
    pub streams: StreamsConfig,
    /// Tests only: also serve `GET /v1/test/panic`, whose handler panics, to show that a panic
    /// is answered 500, counted and reported. Never set it in production.
    pub unsafe_panic_route: bool,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            route_commands_to_owners: true,
            max_body_bytes: 64 * 1024,
            command_timeout_ms: 15_000,
            consistency_timeout_ms: 3_000,
            trust_forwarded_for: false,
            auth: TokenConfig::default(),
            permission_cache_ms: 5_000,
            rate_limit: RateLimitConfig::default(),
            query_cache: QueryCacheConfig::default(),
            streams: StreamsConfig::default(),
            unsafe_panic_route: false,
        }
    }
}

impl GatewayConfig {
    /// Checks what serde cannot: ranges and URLs.
    pub fn validate(&self) -> Result<(), keel_runtime::ConfigError> {
        ensure(self.max_body_bytes > 0, "gateway.max_body_bytes", "must be positive")?;
        ensure(self.command_timeout_ms > 0, "gateway.command_timeout_ms", "must be positive")?;
        ensure(self.consistency_timeout_ms <= 60_000, "gateway.consistency_timeout_ms", "must be at most 60000")?;
        ensure(self.auth.leeway_secs >= 0, "gateway.auth.leeway_secs", "must not be negative")?;
        self.streams.validate()?;
        ensure(self.auth.jwks_refresh_secs > 0, "gateway.auth.jwks_refresh_secs", "must be positive")?;
        let limits = &self.rate_limit;
        for (key, rule) in [
            ("gateway.rate_limit.per_ip", limits.per_ip),
            ("gateway.rate_limit.per_user", limits.per_user),
            ("gateway.rate_limit.login_per_ip", limits.login_per_ip),
            ("gateway.rate_limit.login_per_account", limits.login_per_account),
        ] {
            ensure(rule.is_valid(), key, "per_second and burst must be positive")?;
        }
        ensure(
            limits.redis_url.is_empty() || redis::Client::open(limits.redis_url.as_str()).is_ok(),
            "gateway.rate_limit.redis_url",
            "must be empty or a URL such as redis://127.0.0.1:6379/",
        )
    }

    fn rules(&self) -> Rules {
        let limits = &self.rate_limit;
        Rules {
            per_ip: limits.per_ip,
            per_user: limits.per_user,
            login_per_ip: limits.login_per_ip,
            login_per_account: limits.login_per_account,
        }
    }
}

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    /// Full topic names (with the configured prefix), for consistency tokens.
    pub names: TopicNames,
    pub identity: Identity,
    pub auth: Auth,
    pub authz: Authz,
    pub blog: Blog,
    pub security: Arc<Security>,
    /// Public answers of the blog routes.
    pub posts_cache: Arc<QueryCache>,
    pub consistency_timeout: Duration,
    pub streams: Arc<Streams>,
    /// The projections whose status `GET /v1/projections` reports.
    pub projections: Arc<[Arc<dyn Projection>]>,
    /// The OpenAPI document of the route table, as served.
    pub openapi: bytes::Bytes,
}

/// Readiness: at least one instance of a service (as discovery lists them now) answers gRPC
/// health checks, since calls fail over to whichever does. Not critical: a service being down fails the routes that need it
/// (503), not the gateway, so `/readyz` says `degraded` for it and stays 200. Which instances answer is the gauge
/// `keel_gateway_endpoint_up{service,endpoint}`, and a log line when an instance comes or goes;
/// when none does, the reason names each with its failure.
struct ServiceCheck {
    client: ServiceClient,
    /// Whether each endpoint answered the last check, to log changes rather than every probe.
    /// An endpoint not in it is assumed up, so a healthy start logs nothing.
    last_up: Mutex<HashMap<String, bool>>,
}

/// Below the readiness timeout, so one instance that does not answer cannot hide another that
/// does.
const ENDPOINT_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

impl ServiceCheck {
    fn new(client: &ServiceClient) -> Self {
        Self { client: client.clone(), last_up: Mutex::default() }
    }
}

#[async_trait::async_trait]
impl ReadinessCheck for ServiceCheck {
    fn name(&self) -> &'static str {
        self.client.service
    }

    fn critical(&self) -> bool {
        false
    }

    async fn check(&self) -> Result<(), String> {
        let endpoints = self.client.endpoints();
        let outcomes = futures::future::join_all(endpoints.iter().map(|endpoint| async move {
            tokio::time::timeout(ENDPOINT_CHECK_TIMEOUT, grpc_serving(&endpoint.channel))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {ENDPOINT_CHECK_TIMEOUT:?}")))
        }))
        .await;
        let service = self.client.service;
        if endpoints.is_empty() {
            return Err(format!("no {service} instance is registered"));
        }
        let mut failures = Vec::new();
        let mut last_up = self.last_up.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        last_up.retain(|url, _| endpoints.iter().any(|endpoint| endpoint.url == *url));
        for (endpoint, outcome) in endpoints.iter().zip(&outcomes) {
            let up = outcome.is_ok();
            metrics::gauge!("keel_gateway_endpoint_up", "service" => service, "endpoint" => endpoint.url.clone())
                .set(f64::from(u8::from(up)));
            if last_up.insert(endpoint.url.clone(), up).unwrap_or(true) != up {
                match outcome {
                    Ok(()) => tracing::info!(service, endpoint = %endpoint.url, "endpoint is serving"),
                    Err(reason) => {
                        tracing::warn!(service, endpoint = %endpoint.url, reason = %reason, "endpoint is not serving")
                    }
                }
            }
            if let Err(reason) = outcome {
                failures.push(format!("{}: {reason}", endpoint.url));
            }
        }
        if failures.len() < endpoints.len() {
            Ok(())
        } else {
            Err(format!("no {service} endpoint is serving ({})", failures.join("; ")))
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

/// Readiness: the shared rate limit store (Redis) answers. Not critical: the gateway then limits
/// in its own memory (counted in `keel_rate_limit_fallbacks_total`), and says so here.
struct RateLimitStoreCheck(Arc<Security>);

#[async_trait::async_trait]
impl ReadinessCheck for RateLimitStoreCheck {
    fn name(&self) -> &'static str {
        "rate-limit-store"
    }

    fn critical(&self) -> bool {
        false
    }

    async fn check(&self) -> Result<(), String> {
        self.0.limiter.ping().await
    }
}

/// Readiness: the keys that verify access tokens are loaded.
struct KeysCheck(Arc<TokenVerifier>);

#[async_trait::async_trait]
impl ReadinessCheck for KeysCheck {
    fn name(&self) -> &'static str {
        "token-keys"
    }

    async fn check(&self) -> Result<(), String> {
        if self.0.has_keys() { Ok(()) } else { Err("the access-token keys are not loaded from auth yet".into()) }
    }
}

/// The gateway's routes, each behind the security pipeline with its rule, with health and
/// metrics.
pub fn router(state: AppState, health: Health, max_body_bytes: usize, panic_route: bool) -> Router {
    let guarded = |access: Access, template: &'static str| {
        let guard = RouteGuard { security: state.security.clone(), access, template };
        axum::middleware::from_fn_with_state(guard, security::pipeline)
    };
    let mut api = routes::ROUTES.iter().fold(Router::new(), |router, route| {
        router.route(route.path, (route.handler)().route_layer(guarded(route.access, route.path)))
    });
    if panic_route {
        tracing::warn!("gateway.unsafe_panic_route is set: GET /v1/test/panic panics (tests only)");
        let panics = axum::routing::get(panic_on_purpose);
        api = api.route("/v1/test/panic", panics.route_layer(guarded(Access::Public, "/v1/test/panic")));
    }
    let api = api.with_state(state).layer(DefaultBodyLimit::max(max_body_bytes));
    Router::new()
        .merge(api)
        .merge(keel_runtime::admin::router(health))
        .fallback(|| async { Problem::not_found("no route matches this path") })
        .method_not_allowed_fallback(|| async {
            Problem::new(http::StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed", "Method not allowed")
        })
        .layer(axum::middleware::from_fn(observe::record))
        .layer(CatchPanicLayer::custom(observe::panic_response))
        // Each request gets a Sentry hub of its own (its user, its route), and its reports the
        // request's method, URL and headers — those that may carry credentials left out.
        .layer(sentry::integrations::tower::SentryHttpLayer::new())
        .layer(sentry::integrations::tower::NewSentryLayer::new_from_top())
}

/// `GET /v1/test/panic` (`gateway.unsafe_panic_route`, tests only).
async fn panic_on_purpose() -> Problem {
    panic!("the test route panicked, as asked")
}

/// Starts the gateway on `listener`: the security pipeline (rate limits, keys, status and
/// permission caches), the cache invalidation listener, and the routes.
/// What the gateway reads besides its database: the broker (live streams) and the catalogue of
/// projections (their status).
pub struct Sources {
    pub kafka: KafkaConfig,
    pub registry_url: String,
    pub projections: Vec<Arc<dyn Projection>>,
    /// Heard on one connection: projection batches (caches) and appended records (streams).
    pub notifications: Notifications,
    /// Where the command services' instances are.
    pub discovery: Discovery,
}

pub async fn start(
    config: &GatewayConfig,
    sources: Sources,
    pool: PgPool,
    lifecycle: &mut Lifecycle,
    listener: TcpListener,
) -> anyhow::Result<()> {
    let names = TopicNames::new(sources.kafka.topic_prefix.clone());
    let budget = Duration::from_millis(config.command_timeout_ms);
    let owners = config.route_commands_to_owners.then(|| owners::Owners::new(names.clone()));
    let mut client = |service| -> ServiceClient {
        let client = sources.discovery.client(service, budget, lifecycle);
        match &owners {
            Some(owners) => client.with_placement(Arc::new(owners.clone())),
            None => client,
        }
    };
    let identity = Identity::new(client("identity"));
    let auth = Auth::new(client("auth"));
    let authz = Authz::new(client("authz"));
    let blog = Blog::new(client("blog"));
    if let Some(owners) = owners {
        let notices = sources.notifications.subscribe(owners::CHANNEL);
        lifecycle.spawn("gateway partition owners", owners.follow(pool.clone(), notices, lifecycle.token()));
    }
    let redis = if config.rate_limit.redis_url.is_empty() {
        tracing::info!("no rate limit store configured: each gateway limits on its own");
        None
    } else {
        let client =
            redis::Client::open(config.rate_limit.redis_url.as_str()).context("gateway.rate_limit.redis_url")?;
        let settings = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(1);
        // Lazy: a gateway starts (and limits in memory) while the store is down.
        Some(redis::aio::ConnectionManager::new_lazy_with_config(client, settings).context("failed to set up Redis")?)
    };
    let expectations = Expectations {
        issuer: config.auth.issuer.clone(),
        audience: config.auth.audience.clone(),
        leeway_secs: config.auth.leeway_secs,
    };
    let tokens = Arc::new(TokenVerifier::new(auth.clone(), expectations, config.auth.verified_cache_bytes));
    let security = Arc::new(Security {
        limiter: RateLimiter::new(redis, &config.rate_limit.key_prefix),
        tokens: tokens.clone(),
        status: StatusCache::new(pool.clone(), Duration::from_millis(config.auth.status_cache_ms)),
        permissions: Permissions::new(authz.clone(), Duration::from_millis(config.permission_cache_ms)),
        rules: config.rules(),
        trust_forwarded_for: config.trust_forwarded_for,
    });
    let posts_cache =
        Arc::new(QueryCache::new(config.query_cache.max_bytes, Duration::from_millis(config.query_cache.ttl_ms)));
    let checks: Vec<Arc<dyn ReadinessCheck>> = vec![
        Arc::new(DatabaseCheck(pool.clone())),
        Arc::new(RegistryCheck::new(&sources.registry_url)?),
        Arc::new(RateLimitStoreCheck(security.clone())),
        Arc::new(KeysCheck(tokens.clone())),
        Arc::new(ServiceCheck::new(identity.service())),
        Arc::new(ServiceCheck::new(auth.service())),
        Arc::new(ServiceCheck::new(authz.service())),
        Arc::new(ServiceCheck::new(blog.service())),
    ];
    let health = lifecycle.make_health(checks);
    lifecycle
        .spawn("gateway token keys", tokens.run(Duration::from_secs(config.auth.jwks_refresh_secs), lifecycle.token()));
    let caches = invalidation::Caches { security: security.clone(), posts: posts_cache.clone() };
    let batches = sources.notifications.subscribe(keel_topics::APPLIED_CHANNEL);
    let statuses = sources.notifications.subscribe(keel_topics::STATUS_CHANNEL);
    lifecycle.spawn("gateway cache invalidation", invalidation::run(batches, statuses, caches, lifecycle.token()));
    let hubs = HubContext {
        codec: SchemaRegistryCodec::new(&sources.registry_url, names.clone())?,
        kafka: sources.kafka,
        names: names.clone(),
        pool: pool.clone(),
        // Streams end as soon as the gateway drains, with their resume positions, so that the
        // HTTP server's drain does not wait for them.
        shutdown: lifecycle.draining(),
        notifications: sources.notifications,
    };
    let streams = Arc::new(Streams::new(hubs, config.streams.clone())?);
    let state = AppState {
        pool,
        names,
        identity,
        auth,
        authz,
        blog,
        security,
        posts_cache,
        consistency_timeout: Duration::from_millis(config.consistency_timeout_ms),
        streams,
        projections: sources.projections.into(),
        openapi: openapi::build(routes::ROUTES).to_string().into(),
    };
    lifecycle.serve_http(
        "gateway-http",
        listener,
        router(state, health, config.max_body_bytes, config.unsafe_panic_route),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_must_admit_something() {
        let mut config = GatewayConfig::default();
        config.rate_limit.per_user = Rule { per_second: 0.0, burst: 10 };
        assert!(config.validate().is_err());
        let mut config = GatewayConfig::default();
        config.rate_limit.redis_url = "not a url".into();
        assert!(config.validate().is_err());
    }
}
