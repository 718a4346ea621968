//! Projection workers. Each projection consumes its topics, skips invalid commits by the shared
//! validation rule, and applies a batch of commits together with its checkpoints and validation
//! state in one PostgreSQL transaction: a crash at any point neither loses nor doubles an event.
//! Projections are versioned: a rebuild fills a new version's shadow tables while the live one
//! serves, then takes over in one transaction.

#![forbid(unsafe_code)]

pub mod audit;
pub mod authz;
pub mod blog;
pub mod dead_letters;
mod projection;
pub mod rebuild;
mod runner;
pub mod sessions;
pub mod status;
mod store;
pub mod users;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use anyhow::Context;
use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use keel_runtime::{Health, KafkaConfig, Lifecycle, ReadinessCheck, postgres::DatabaseCheck};
use keel_topics::{PersonalDataConfig, SchemaRegistryCodec, TopicNames, Vault, kafka::BrokerCheck};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use projection::{Commit, Projection, TableSpec, Tables};
pub use runner::{Exit, PoisonPolicy, Runner, RunnerSettings};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProjectorConfig {
    /// Health, metrics and `/admin/projections`.
    pub admin_listen: String,
    /// Most records applied in one transaction.
    pub batch_size: usize,
    /// How long a batch waits to fill before it is applied.
    pub batch_timeout_ms: u64,
    /// What a projection does with a record it cannot apply: `skip` (dead-letter it and go on)
    /// or `stop` (dead-letter it and stop until `keel projections resume`).
    pub on_poison: PoisonPolicy,
    /// Per-projection overrides of `on_poison`, by projection name.
    pub on_poison_overrides: BTreeMap<String, PoisonPolicy>,
    /// How long a replaced version's tables are kept after a rebuild swapped it out.
    pub retired_grace_secs: u64,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            admin_listen: "127.0.0.1:9102".into(),
            batch_size: 500,
            batch_timeout_ms: 50,
            on_poison: PoisonPolicy::Skip,
            on_poison_overrides: BTreeMap::new(),
            retired_grace_secs: 3600,
        }
    }
}

impl ProjectorConfig {
    pub fn validate(&self) -> Result<(), keel_runtime::ConfigError> {
        keel_runtime::config::ensure(self.batch_size > 0, "projector.batch_size", "must be positive")?;
        keel_runtime::config::ensure(self.batch_timeout_ms > 0, "projector.batch_timeout_ms", "must be positive")?;
        for name in self.on_poison_overrides.keys() {
            keel_runtime::config::ensure(
                NAMES.contains(&name.as_str()),
                "projector.on_poison_overrides",
                "names a projection this build does not have",
            )?;
        }
        Ok(())
    }

    pub fn settings(&self, projection: &str) -> RunnerSettings {
        RunnerSettings {
            batch_size: self.batch_size,
            batch_timeout: Duration::from_millis(self.batch_timeout_ms),
            poison: self.on_poison_overrides.get(projection).copied().unwrap_or(self.on_poison),
        }
    }
}

/// The names of every projection this build knows, in the order of [`catalogue`].
pub const NAMES: &[&str] = &["users", "audit", "sessions", "authz", "blog"];

/// Every projection this build knows. The users projection opens personal data with `vault`.
pub fn catalogue(vault: Vault) -> Vec<Arc<dyn Projection>> {
    vec![
        Arc::new(users::UsersProjection::new(vault)),
        Arc::new(audit::AuditProjection),
        Arc::new(sessions::SessionsProjection),
        Arc::new(authz::AuthzProjection),
        Arc::new(blog::BlogProjection),
    ]
}

/// What the projector's tasks share.
#[derive(Clone)]
pub struct Projector {
    pub config: ProjectorConfig,
    pub kafka: KafkaConfig,
    pub names: TopicNames,
    pub pool: PgPool,
    pub codec: SchemaRegistryCodec,
    pub dead_letters: dead_letters::DeadLetters,
    pub projections: Vec<Arc<dyn Projection>>,
}

impl Projector {
    pub fn new(
        config: ProjectorConfig,
        kafka: KafkaConfig,
        registry_url: &str,
        pool: PgPool,
        personal_data: &PersonalDataConfig,
    ) -> anyhow::Result<Self> {
        let names = TopicNames::new(kafka.topic_prefix.clone());
        let codec = SchemaRegistryCodec::new(registry_url, names.clone())?;
        let dead_letters = dead_letters::DeadLetters::new(&kafka, &names)?;
        let projections = catalogue(Vault::new(pool.clone(), personal_data)?);
        Ok(Self { config, kafka, names, pool, codec, dead_letters, projections })
    }

    /// A projection by name.
    pub fn projection(&self, name: &str) -> Option<Arc<dyn Projection>> {
        self.projections.iter().find(|projection| projection.name() == name).cloned()
    }

    /// A runner for one version of a projection.
    pub fn runner(&self, projection: Arc<dyn Projection>, version: i32) -> Runner {
        Runner {
            settings: self.config.settings(projection.name()),
            projection,
            version,
            names: self.names.clone(),
            pool: self.pool.clone(),
            codec: self.codec.clone(),
            kafka: self.kafka.clone(),
            dead_letters: self.dead_letters.clone(),
        }
    }

    /// Runs this instance's share of the live version of `projection`, following it across
    /// rebuild swaps and rebalances, until shutdown.
    async fn supervise(self, projection: Arc<dyn Projection>, shutdown: CancellationToken) -> anyhow::Result<()> {
        let name = projection.name();
        let mut backoff = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            match self.supervise_live_version(&projection, &shutdown).await {
                Ok(Exit::Shutdown) => break,
                Ok(_) => backoff = Duration::from_millis(200),
                // The database or the broker is down: the projection waits, the projector stays.
                Err(error) => {
                    tracing::error!(projection = name, error = %format!("{error:#}"), "projection supervisor failed; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        Ok(())
    }

    /// Joins the live version's group and follows it until it is superseded or shutdown.
    async fn supervise_live_version(
        &self,
        projection: &Arc<dyn Projection>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Exit> {
        let name = projection.name();
        store::ensure_registered(&self.pool, projection.as_ref()).await?;
        let live = store::live_version(&mut *self.pool.acquire().await?, name, false)
            .await?
            .context("a registered projection has a live version")?;
        let topics: Vec<String> = projection.topics().iter().map(|topic| self.names.name(*topic)).collect();
        // One group per version: after a swap every instance moves to the new version's group.
        let group = format!("keel-projector.{}{name}.v{live}", self.kafka.topic_prefix);
        let membership = keel_topics::membership::Membership::join(&self.kafka, &group, &topics)?;
        let runner = self.runner(projection.clone(), live);
        let exit = self.follow(&runner, &membership, shutdown).await?;
        if exit == Exit::Superseded {
            tracing::info!(projection = name, previous = live, "a new version is live; following it");
            // A rebuild with no grace period wants the old tables gone now, not at the janitor's
            // next round.
            if let Err(error) = rebuild::drop_expired(&self.pool, std::slice::from_ref(projection)).await {
                tracing::warn!(error = %format!("{error:#}"), "failed to drop retired projection versions");
            }
        }
        Ok(exit)
    }

    /// Runs `runner` on the partitions `membership` assigns, until shutdown or another version is
    /// live.
    async fn follow(
        &self,
        runner: &Runner,
        membership: &keel_topics::membership::Membership,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Exit> {
        let name = runner.projection.name();
        let mut backoff = Duration::from_millis(200);
        loop {
            let mut changes = membership.watch();
            let assigned = membership.assigned();
            metrics::gauge!("keel_projector_assigned_partitions", "projection" => name).set(assigned.len() as f64);
            if assigned.is_empty() {
                // No share (yet): wait for one, noticing a swap or a shutdown meanwhile.
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(Exit::Shutdown),
                    _ = changes.changed() => continue,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                let live = store::live_version(&mut *self.pool.acquire().await?, name, false).await?;
                if live != Some(runner.version) {
                    return Ok(Exit::Superseded);
                }
                continue;
            }
            match runner.run_live(shutdown, Some((assigned, changes))).await {
                Ok(Exit::Reassigned) => backoff = Duration::from_millis(200),
                Ok(Exit::Stopped) => {
                    // Wait for `keel projections resume`.
                    while store::is_stopped(&self.pool, name, runner.version).await? {
                        tokio::select! {
                            () = shutdown.cancelled() => return Ok(Exit::Shutdown),
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
                Ok(exit) => return Ok(exit),
                Err(error) => {
                    tracing::error!(projection = name, error = %format!("{error:#}"), "projection worker failed; restarting");
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(Exit::Shutdown),
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}

/// Starts a supervisor per projection, the janitor of retired versions, and the admin endpoints.
pub async fn start(projector: Projector, lifecycle: &mut Lifecycle, admin_listener: TcpListener) -> anyhow::Result<()> {
    let checks: Vec<Arc<dyn ReadinessCheck>> =
        vec![Arc::new(DatabaseCheck(projector.pool.clone())), Arc::new(BrokerCheck::new(&projector.kafka)?)];
    let admin = keel_runtime::admin::router(Health::new(checks, lifecycle.token()))
        .merge(Router::new().route("/admin/projections", get(admin_projections)).with_state(projector.clone()));
    lifecycle.serve_http("projector-admin", admin_listener, admin);
    for projection in projector.projections.clone() {
        let name = format!("projection {}", projection.name());
        lifecycle.spawn(name, projector.clone().supervise(projection, lifecycle.token()));
    }
    let janitor = projector.clone();
    let token = lifecycle.token();
    lifecycle.spawn("projection janitor", async move {
        let projections = janitor.projections.clone();
        loop {
            if let Err(error) = rebuild::drop_expired(&janitor.pool, &projections).await {
                tracing::warn!(error = %format!("{error:#}"), "failed to drop retired projection versions");
            }
            tokio::select! {
                () = token.cancelled() => return Ok(()),
                () = tokio::time::sleep(Duration::from_secs(30)) => {}
            }
        }
    });
    Ok(())
}

async fn admin_projections(State(projector): State<Projector>) -> axum::response::Response {
    match status::report(&projector.pool, &projector.kafka, &projector.names, &projector.projections).await {
        Ok(report) => Json(report).into_response(),
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "failed to report projection status");
            (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"error": "status unavailable"}))).into_response()
        }
    }
}

/// Clears the stopped flag of a projection's live version (after fixing what stopped it).
pub async fn resume(pool: &PgPool, name: &str) -> anyhow::Result<bool> {
    let updated = sqlx::query(
        "UPDATE projection_versions SET stopped = false
         WHERE name = $1 AND version = (SELECT live_version FROM projections WHERE name = $1) AND stopped",
    )
    .bind(name)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(updated > 0)
}
