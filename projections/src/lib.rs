//! Projection workers. Each projection consumes its topics, skips invalid commits by the shared
//! validation rule, and applies a batch of commits together with its checkpoints and validation
//! state in one PostgreSQL transaction: a crash at any point neither loses nor doubles an event.

#![forbid(unsafe_code)]

pub mod audit;
mod runner;
pub mod users;

use std::sync::Arc;

use keel_runtime::{Health, KafkaConfig, Lifecycle, ReadinessCheck, postgres::DatabaseCheck};
use keel_topics::{SchemaRegistryCodec, TopicNames, kafka::BrokerCheck};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::net::TcpListener;

pub use runner::{Commit, Projection, Runner};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProjectorConfig {
    /// Health and metrics.
    pub admin_listen: String,
    /// Most records applied in one transaction.
    pub batch_size: usize,
    /// How long a batch waits to fill before it is applied.
    pub batch_timeout_ms: u64,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self { admin_listen: "127.0.0.1:9102".into(), batch_size: 500, batch_timeout_ms: 50 }
    }
}

impl ProjectorConfig {
    pub fn validate(&self) -> Result<(), keel_runtime::ConfigError> {
        keel_runtime::config::ensure(self.batch_size > 0, "projector.batch_size", "must be positive")?;
        keel_runtime::config::ensure(self.batch_timeout_ms > 0, "projector.batch_timeout_ms", "must be positive")
    }
}

/// Every projection this build knows.
pub fn all_projections() -> Vec<Arc<dyn Projection>> {
    vec![Arc::new(users::UsersProjection), Arc::new(audit::AuditProjection)]
}

/// Starts a runner for every projection and topic, plus the admin endpoints.
pub async fn start(
    config: &ProjectorConfig,
    kafka: &KafkaConfig,
    registry_url: &str,
    pool: PgPool,
    lifecycle: &mut Lifecycle,
    admin_listener: TcpListener,
) -> anyhow::Result<()> {
    let checks: Vec<Arc<dyn ReadinessCheck>> =
        vec![Arc::new(DatabaseCheck(pool.clone())), Arc::new(BrokerCheck::new(kafka)?)];
    lifecycle.serve_http(
        "projector-admin",
        admin_listener,
        keel_runtime::admin::router(Health::new(checks, lifecycle.token())),
    );
    let names = TopicNames::new(kafka.topic_prefix.clone());
    let codec = SchemaRegistryCodec::new(registry_url, names.clone())?;
    for projection in all_projections() {
        for topic in projection.topics() {
            let runner = Runner {
                projection: projection.clone(),
                topic: *topic,
                topic_name: names.name(*topic),
                pool: pool.clone(),
                codec: codec.clone(),
                kafka: kafka.clone(),
                batch_size: config.batch_size,
                batch_timeout: std::time::Duration::from_millis(config.batch_timeout_ms),
            };
            let token = lifecycle.token();
            lifecycle.spawn(format!("projection {}/{}", projection.name(), topic), runner.run(token));
        }
    }
    Ok(())
}
