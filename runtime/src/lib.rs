//! The runtime every Keel role boots with.
//!
//! It knows nothing about users, posts or topics: it loads layered configuration, sets up
//! telemetry, serves health and metrics, and turns SIGTERM / SIGINT into one bounded shutdown.

pub mod admin;
pub mod config;
pub mod errors;
pub mod lifecycle;
pub mod listen;
pub mod notifications;
pub mod postgres;
pub mod telemetry;

pub use admin::{Health, ReadinessCheck};
pub use config::{
    ConfigError, ConfigSources, DatabaseConfig, ErrorsConfig, KafkaConfig, LogConfig, Secret, ShutdownConfig,
    TracingConfig,
};
pub use lifecycle::Lifecycle;
