//! The identity command service.

mod grpc;
mod state;
mod writer;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use keel_proto::identity::v1::identity_commands_server::IdentityCommandsServer;
use keel_runtime::{Health, KafkaConfig, Lifecycle, ReadinessCheck};
use keel_topics::{SchemaRegistryCodec, Topic, TopicNames, kafka};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

pub use state::IdentityState;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    pub grpc_listen: String,
    /// Health and metrics.
    pub admin_listen: String,
    /// Commands waiting for the writer; beyond it callers get RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
    /// Commands decided and produced together.
    pub max_batch: usize,
    /// How long a caller waits for the broker's acknowledgement.
    pub command_timeout_ms: u64,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            grpc_listen: "127.0.0.1:50051".into(),
            admin_listen: "127.0.0.1:9101".into(),
            queue_capacity: 4096,
            max_batch: 256,
            command_timeout_ms: 10_000,
        }
    }
}

impl IdentityConfig {
    pub fn validate(&self) -> Result<(), keel_runtime::ConfigError> {
        keel_runtime::config::ensure(self.queue_capacity > 0, "identity.queue_capacity", "must be positive")?;
        keel_runtime::config::ensure(self.max_batch > 0, "identity.max_batch", "must be positive")?;
        keel_runtime::config::ensure(self.command_timeout_ms > 0, "identity.command_timeout_ms", "must be positive")
    }
}

/// Ready once the state is loaded and while it is in sync with the log.
struct StateCheck(Arc<AtomicBool>);

#[async_trait::async_trait]
impl ReadinessCheck for StateCheck {
    fn name(&self) -> &'static str {
        "state"
    }

    async fn check(&self) -> Result<(), String> {
        if self.0.load(Ordering::Acquire) { Ok(()) } else { Err("loading or catching up with the log".into()) }
    }
}

/// Starts the identity service: admin endpoints first (so `/livez` answers while loading), then
/// the state from the log, then gRPC.
pub async fn start(
    config: &IdentityConfig,
    kafka_config: &KafkaConfig,
    registry_url: &str,
    lifecycle: &mut Lifecycle,
    grpc_listener: TcpListener,
    admin_listener: TcpListener,
) -> anyhow::Result<()> {
    let names = TopicNames::new(kafka_config.topic_prefix.clone());
    let topic = names.name(Topic::IdentityUsers);
    let in_sync = Arc::new(AtomicBool::new(false));
    let checks: Vec<Arc<dyn ReadinessCheck>> =
        vec![Arc::new(kafka::BrokerCheck::new(kafka_config)?), Arc::new(StateCheck(in_sync.clone()))];
    let health = Health::new(checks, lifecycle.token());
    lifecycle.serve_http("identity-admin", admin_listener, keel_runtime::admin::router(health));

    let codec = SchemaRegistryCodec::new(registry_url, names.clone())?;
    let schema_id = codec.register(Topic::IdentityUsers).await.context("failed to register the users schema")?;
    tracing::info!(topic = %topic, schema_id, "users schema registered");
    let metadata = kafka::consumer(kafka_config, "keel-identity-metadata")?;
    let partitions = kafka::partition_count(&metadata, &topic, Duration::from_secs(10)).await? as i32;

    let mut writer = writer::Writer {
        state: IdentityState::default(),
        codec,
        producer: kafka::producer(kafka_config)?,
        kafka: kafka_config.clone(),
        topic,
        partitions,
        max_batch: config.max_batch,
        in_sync: in_sync.clone(),
    };
    let token = lifecycle.token();
    tokio::select! {
        loaded = writer.load() => loaded.context("failed to load the identity state")?,
        () = token.cancelled() => return Ok(()),
    }
    in_sync.store(true, Ordering::Release);

    let (commands_tx, commands_rx) = tokio::sync::mpsc::channel(config.queue_capacity);
    let service = grpc::IdentityGrpc::new(commands_tx, in_sync, Duration::from_millis(config.command_timeout_ms));
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<IdentityCommandsServer<grpc::IdentityGrpc>>().await;
    lifecycle.spawn("identity-writer", writer.run(commands_rx));
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
