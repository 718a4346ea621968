//! The identity command service: users, on the shared write path.

mod grpc;
mod model;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use keel_proto::identity::v1::identity_commands_server::IdentityCommandsServer;
use keel_runtime::{Health, KafkaConfig, Lifecycle, ReadinessCheck};
use keel_topics::{SchemaRegistryCodec, Topic, TopicNames, kafka};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::net::TcpListener;

pub use model::{Emails, Users, registration_id};

use crate::engine::{Engine, EngineCheck, Ownership, Settings};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    pub grpc_listen: String,
    /// Where other instances reach this one to forward commands (`http://host:port`). Default:
    /// the bound gRPC address, which must then not be a wildcard address.
    pub advertised_endpoint: Option<String>,
    /// Health and metrics.
    pub admin_listen: String,
    /// Commands waiting per partition; beyond it callers get RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
    /// Commands decided and produced together.
    pub max_batch: usize,
    /// How long a caller waits for the broker's acknowledgement.
    pub command_timeout_ms: u64,
    /// Records applied between two snapshots of a partition.
    pub snapshot_every: u64,
    /// Test-only: write every partition whatever the group says, beside the real owners (a
    /// zombie). Never set it in production.
    pub unsafe_ignore_ownership: bool,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            grpc_listen: "127.0.0.1:50051".into(),
            advertised_endpoint: None,
            admin_listen: "127.0.0.1:9101".into(),
            queue_capacity: 1024,
            max_batch: 256,
            command_timeout_ms: 10_000,
            snapshot_every: 1000,
            unsafe_ignore_ownership: false,
        }
    }
}

impl IdentityConfig {
    pub fn validate(&self) -> Result<(), keel_runtime::ConfigError> {
        use keel_runtime::config::ensure;
        ensure(self.queue_capacity > 0, "identity.queue_capacity", "must be positive")?;
        ensure(self.max_batch > 0, "identity.max_batch", "must be positive")?;
        ensure(self.command_timeout_ms > 0, "identity.command_timeout_ms", "must be positive")?;
        ensure(self.snapshot_every > 0, "identity.snapshot_every", "must be positive")?;
        ensure(
            self.advertised_endpoint.as_ref().is_none_or(|endpoint| endpoint.parse::<http::Uri>().is_ok()),
            "identity.advertised_endpoint",
            "must be a URL such as http://10.0.0.5:50051",
        )
    }

    fn endpoint(&self, bound: SocketAddr) -> anyhow::Result<String> {
        match &self.advertised_endpoint {
            Some(endpoint) => Ok(endpoint.clone()),
            None if bound.ip().is_unspecified() => anyhow::bail!(
                "identity.grpc_listen binds a wildcard address ({bound}); set identity.advertised_endpoint"
            ),
            None => Ok(format!("http://{bound}")),
        }
    }
}

/// Starts the identity service: admin endpoints, gRPC (it forwards or refuses until partitions
/// are loaded) and the write path, which owns, loads and serves partitions as the group assigns
/// them.
pub async fn start(
    config: &IdentityConfig,
    kafka_config: &KafkaConfig,
    registry_url: &str,
    pool: PgPool,
    lifecycle: &mut Lifecycle,
    grpc_listener: TcpListener,
    admin_listener: TcpListener,
) -> anyhow::Result<()> {
    let names = TopicNames::new(kafka_config.topic_prefix.clone());
    let endpoint = config.endpoint(grpc_listener.local_addr()?)?;
    let codec = SchemaRegistryCodec::new(registry_url, names.clone())?;
    let settings = Settings {
        queue_capacity: config.queue_capacity,
        max_batch: config.max_batch,
        snapshot_every: config.snapshot_every,
        command_timeout: Duration::from_millis(config.command_timeout_ms),
    };
    let engine = Arc::new(
        Engine::<Users>::new(kafka_config, names.name(Topic::IdentityUsers), codec, pool, endpoint, settings).await?,
    );
    let checks: Vec<Arc<dyn ReadinessCheck>> =
        vec![Arc::new(kafka::BrokerCheck::new(kafka_config)?), Arc::new(EngineCheck(engine.clone()))];
    lifecycle.serve_http(
        "identity-admin",
        admin_listener,
        keel_runtime::admin::router(Health::new(checks, lifecycle.token())),
    );

    let ownership = if config.unsafe_ignore_ownership { Ownership::UnsafeAll } else { Ownership::Group };
    lifecycle.spawn("identity-partitions", engine.clone().run(ownership, lifecycle.token()));
    let service = grpc::IdentityGrpc::new(engine, Duration::from_millis(config.command_timeout_ms));
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<IdentityCommandsServer<grpc::IdentityGrpc>>().await;
    let token = lifecycle.token();
    lifecycle.spawn("identity-grpc", async move {
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(IdentityCommandsServer::new(service))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(grpc_listener),
                token.cancelled_owned(),
            )
            .await
            .context("gRPC server failed")
    });
    Ok(())
}
