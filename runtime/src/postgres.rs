//! PostgreSQL pools and their readiness check.

use std::{str::FromStr, time::Duration};

use anyhow::Context;
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::{admin::ReadinessCheck, config::DatabaseConfig};

/// The connect options of a config: its URL, with the password from the secret if one is set.
pub fn connect_options(config: &DatabaseConfig) -> anyhow::Result<PgConnectOptions> {
    let options = PgConnectOptions::from_str(&config.url).context("database.url is not a PostgreSQL URL")?;
    Ok(match &config.password {
        Some(password) => options.password(password.expose()),
        None => options,
    })
}

/// A pool that connects lazily: a role starts (and reports not ready) while the database is down.
/// It opens at most `database.max_connections`, or `role_default` (what the role needs) when that
/// is unset.
pub fn pool(config: &DatabaseConfig, application_name: &str, role_default: u32) -> anyhow::Result<PgPool> {
    let options = connect_options(config)?.application_name(application_name);
    Ok(PgPoolOptions::new()
        .max_connections(config.max_connections.unwrap_or(role_default))
        // Idle connections go back to the server after a while: a quiet role holds few.
        .idle_timeout(Duration::from_secs(60))
        .acquire_timeout(Duration::from_millis(config.acquire_timeout_ms))
        .connect_lazy_with(options))
}

/// One connection for `LISTEN`, at `database.listen_url` when set (a transaction-mode pooler
/// cannot keep a session's `LISTEN`).
pub fn listen_pool(config: &DatabaseConfig, application_name: &str) -> anyhow::Result<PgPool> {
    let options = match &config.listen_url {
        Some(url) => {
            let options = PgConnectOptions::from_str(url).context("database.listen_url is not a PostgreSQL URL")?;
            match &config.password {
                Some(password) => options.password(password.expose()),
                None => options,
            }
        }
        None => connect_options(config)?,
    };
    Ok(PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_millis(config.acquire_timeout_ms))
        .connect_lazy_with(options.application_name(&format!("{application_name}-listen"))))
}

/// Readiness: the database answers a trivial query.
pub struct DatabaseCheck(pub PgPool);

#[async_trait::async_trait]
impl ReadinessCheck for DatabaseCheck {
    fn name(&self) -> &'static str {
        "database"
    }

    async fn check(&self) -> Result<(), String> {
        sqlx::query("SELECT 1").execute(&self.0).await.map(|_| ()).map_err(|error| error.to_string())
    }
}
