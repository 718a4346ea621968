//! The whole configuration tree of a Keel installation; each role reads the sections it needs.

use keel_commands::{auth::AuthConfig, authz::AuthzConfig, blog::BlogConfig, identity::IdentityConfig};
use keel_discovery::DiscoveryConfig;
use keel_gateway::GatewayConfig;
use keel_projections::ProjectorConfig;
use keel_runtime::{
    ConfigError, DatabaseConfig, ErrorsConfig, KafkaConfig, LogConfig, ShutdownConfig, TracingConfig, config::ensure,
};
use keel_topics::PersonalDataConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeelConfig {
    pub log: LogConfig,
    pub tracing: TracingConfig,
    pub errors: ErrorsConfig,
    pub shutdown: ShutdownConfig,
    pub database: DatabaseConfig,
    pub kafka: KafkaConfig,
    pub topics: TopicsConfig,
    pub schema_registry: SchemaRegistryConfig,
    pub registry: RegistryConfig,
    /// Where every role registers and finds the others.
    pub discovery: DiscoveryConfig,
    pub personal_data: PersonalDataConfig,
    pub identity: IdentityConfig,
    pub auth: AuthConfig,
    pub authz: AuthzConfig,
    pub blog: BlogConfig,
    pub projector: ProjectorConfig,
    pub gateway: GatewayConfig,
}

/// How `keel topics create` creates topics.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    pub replication_factor: i32,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        Self { replication_factor: 1 }
    }
}

/// Where clients find the schema registry (Keel's `registry` role or Confluent's).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchemaRegistryConfig {
    pub url: String,
}

impl Default for SchemaRegistryConfig {
    fn default() -> Self {
        Self { url: "http://127.0.0.1:8081".into() }
    }
}

/// The `registry` role.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    pub listen: String,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self { listen: "127.0.0.1:8081".into() }
    }
}

impl KeelConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        ensure(self.shutdown.grace_period_ms > 0, "shutdown.grace_period_ms", "must be positive")?;
        ensure(self.database.max_connections != Some(0), "database.max_connections", "must be positive")?;
        ensure(!self.kafka.bootstrap_servers.trim().is_empty(), "kafka.bootstrap_servers", "must not be empty")?;
        ensure(self.topics.replication_factor > 0, "topics.replication_factor", "must be positive")?;
        ensure(self.schema_registry.url.starts_with("http"), "schema_registry.url", "must be an http(s) URL")?;
        self.log.validate()?;
        self.tracing.validate()?;
        self.errors.validate()?;
        self.discovery.validate()?;
        self.personal_data.validate()?;
        self.identity.validate()?;
        self.auth.validate()?;
        self.authz.validate()?;
        self.blog.validate()?;
        self.projector.validate(keel_read_models::NAMES)?;
        self.gateway.validate()
    }
}
