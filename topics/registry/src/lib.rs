//! Keel's schema registry role.
//!
//! The subset of the Confluent Schema Registry REST API that `schema_registry_converter`
//! needs (plus the config, compatibility and delete endpoints operators use), stored in
//! PostgreSQL (`registry_*` tables) and checking Avro compatibility with `apache_avro`'s
//! schema-resolution rules. In production Keel can point at Confluent Schema Registry instead.
//!
//! ```no_run
//! # async fn serve(pool: sqlx::PgPool) -> std::io::Result<()> {
//! let app = keel_registry::router(keel_registry::PgSchemaStore::new(pool));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8081").await?;
//! axum::serve(listener, app).await
//! # }
//! ```
#![forbid(unsafe_code)]

mod api;
pub mod compatibility;
pub mod error;
mod schema;
mod store;

pub use api::{CONTENT_TYPE, router};
pub use compatibility::CompatibilityLevel;
pub use error::RegistryError;
pub use store::PgSchemaStore;
