//! The projection framework. Each projection consumes its topics, skips invalid commits by the
//! shared validation rule, and applies a batch of commits together with its checkpoints and
//! validation state in one PostgreSQL transaction: a crash at any point neither loses nor doubles
//! an event. Projections are versioned: a rebuild fills a new version's shadow tables while the
//! live one serves, then takes over in one transaction.
//!
//! The framework knows projections only through the [`Projection`] trait: which exist is the
//! composition root's choice (Keel's read models are in `keel-read-models`).

#![forbid(unsafe_code)]

pub mod dead_letters;
mod feed;
mod projection;
pub mod rebuild;
mod runner;
pub mod status;
mod store;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use anyhow::Context;
use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use keel_runtime::notifications::Notifications;
use keel_runtime::{KafkaConfig, Lifecycle, ReadinessCheck, postgres::DatabaseCheck};
use keel_topics::{RegistryCheck, SchemaRegistryCodec, TopicNames, kafka::BrokerCheck};
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
    /// How long a rebuild's batch waits to fill before it is applied.
    pub batch_timeout_ms: u64,
    /// The least time between two batches of a live projection: a record after a quiet spell is
    /// applied at once, a steady stream in batches of what arrived meanwhile (each batch is a
    /// transaction with a fixed cost).
    pub batch_interval_ms: u64,
    /// The least time between two fetches of the live feed while records keep coming (each fetch
    /// costs the broker a pass over every partition it names).
    pub fetch_interval_ms: u64,
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
            batch_interval_ms: 25,
            fetch_interval_ms: 25,
            on_poison: PoisonPolicy::Skip,
            on_poison_overrides: BTreeMap::new(),
            retired_grace_secs: 3600,
        }
    }
}

impl ProjectorConfig {
    /// Checks the section; `names` are the projections this build has.
    pub fn validate(&self, names: &[&str]) -> Result<(), keel_runtime::ConfigError> {
        keel_runtime::config::ensure(self.batch_size > 0, "projector.batch_size", "must be positive")?;
        keel_runtime::config::ensure(self.batch_timeout_ms > 0, "projector.batch_timeout_ms", "must be positive")?;
        keel_runtime::config::ensure(
            self.batch_interval_ms <= 10_000,
            "projector.batch_interval_ms",
            "must be at most 10000",
        )?;
        keel_runtime::config::ensure(
            self.fetch_interval_ms <= 10_000,
            "projector.fetch_interval_ms",
            "must be at most 10000",
        )?;
        for name in self.on_poison_overrides.keys() {
            keel_runtime::config::ensure(
                names.contains(&name.as_str()),
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
            batch_interval: Duration::from_millis(self.batch_interval_ms),
            poison: self.on_poison_overrides.get(projection).copied().unwrap_or(self.on_poison),
        }
    }
}

/// What the projector's tasks share.
#[derive(Clone)]
pub struct Projector {
    pub config: ProjectorConfig,
    pub kafka: KafkaConfig,
    pub names: TopicNames,
    pub pool: PgPool,
    pub codec: SchemaRegistryCodec,
    /// Where the codec fetches schemas (for readiness).
    pub registry_url: String,
    pub dead_letters: dead_letters::DeadLetters,
    pub projections: Vec<Arc<dyn Projection>>,
    /// What the log's writers announce, so the live feed fetches only what exists.
    pub notifications: Notifications,
}

impl Projector {
    /// The projector of `projections`.
    pub fn new(
        config: ProjectorConfig,
        kafka: KafkaConfig,
        registry_url: &str,
        pool: PgPool,
        projections: Vec<Arc<dyn Projection>>,
        notifications: Notifications,
    ) -> anyhow::Result<Self> {
        let names = TopicNames::new(kafka.topic_prefix.clone());
        let codec = SchemaRegistryCodec::new(registry_url, names.clone())?;
        let dead_letters = dead_letters::DeadLetters::new(&kafka, &names)?;
        let registry_url = registry_url.to_owned();
        Ok(Self { config, kafka, names, pool, codec, registry_url, dead_letters, projections, notifications })
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

    /// Runs the live versions of every projection on this instance's share of the partitions,
    /// following them across rebuild swaps, poison stops and rebalances, until shutdown.
    async fn supervise(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut backoff = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            match self.supervise_membership(&shutdown).await {
                Ok(()) => break,
                // The database or the broker is down: the projector waits and stays.
                Err(error) => {
                    tracing::error!(error = %format!("{error:#}"), "projector failed; retrying");
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

    /// Joins the projector's group for every topic a projection reads, and runs the live feed on
    /// what it assigns until shutdown.
    async fn supervise_membership(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        for projection in &self.projections {
            store::ensure_registered(&self.pool, projection.as_ref()).await?;
        }
        let mut topics: Vec<String> = self
            .projections
            .iter()
            .flat_map(|projection| projection.topics().iter().map(|topic| self.names.name(*topic)))
            .collect();
        topics.sort();
        topics.dedup();
        // One group for every projection: an instance applies every projection of the partitions
        // it is assigned, from one reader.
        let group = format!("keel-projector.{}live", self.kafka.topic_prefix);
        let membership = keel_topics::membership::Membership::join(&self.kafka, &group, &topics)?;
        let mut backoff = Duration::from_millis(200);
        loop {
            let mut changes = membership.watch();
            let assigned = membership.assigned();
            for projection in &self.projections {
                let topics: Vec<String> = projection.topics().iter().map(|topic| self.names.name(*topic)).collect();
                let own = assigned.iter().filter(|(topic, _)| topics.contains(topic)).count();
                metrics::gauge!("keel_projector_assigned_partitions", "projection" => projection.name())
                    .set(own as f64);
            }
            if assigned.is_empty() {
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    _ = changes.changed() => continue,
                }
            }
            let (runners, stopped) = self.live_runners().await?;
            let restart = shutdown.child_token();
            let watcher = tokio::spawn(watch_for_restart(self.pool.clone(), changes, stopped, restart.clone()));
            let outcome = feed::run(self, runners, assigned, shutdown, &restart).await;
            watcher.abort();
            match outcome {
                Ok(stop) if shutdown.is_cancelled() || stop.exit == Exit::Shutdown => return Ok(()),
                Ok(stop) => {
                    backoff = Duration::from_millis(200);
                    if stop.exit == Exit::Superseded
                        && let Some(projection) = stop.projection.and_then(|name| self.projection(name))
                    {
                        tracing::info!(projection = projection.name(), "a new version is live; following it");
                        // A rebuild with no grace period wants the old tables gone now, not at the
                        // janitor's next round.
                        if let Err(error) = rebuild::drop_expired(&self.pool, std::slice::from_ref(&projection)).await {
                            tracing::warn!(error = %format!("{error:#}"), "failed to drop retired projection versions");
                        }
                    }
                }
                Err(error) => {
                    tracing::error!(error = %format!("{error:#}"), "projector feed failed; restarting");
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// Runs `runners` over every partition of their topics, as the only instance (no group), until
    /// shutdown or until one of them stops. For tools and benchmarks.
    pub async fn run_alone(&self, runners: Vec<Arc<Runner>>, shutdown: &CancellationToken) -> anyhow::Result<Exit> {
        let mut partitions = Vec::new();
        for runner in &runners {
            partitions.extend(runner.partitions().await?);
        }
        partitions.sort();
        partitions.dedup();
        let restart = shutdown.child_token();
        Ok(feed::run(self, runners, partitions, shutdown, &restart).await?.exit)
    }

    /// A runner for the live version of every projection its poison policy has not stopped, and
    /// the names of the stopped ones.
    async fn live_runners(&self) -> anyhow::Result<(Vec<Arc<Runner>>, Vec<&'static str>)> {
        let mut runners = Vec::new();
        let mut stopped = Vec::new();
        for projection in &self.projections {
            let name = projection.name();
            let live = store::live_version(&mut *self.pool.acquire().await?, name, false)
                .await?
                .context("a registered projection has a live version")?;
            if store::is_stopped(&self.pool, name, live).await? {
                stopped.push(name);
            } else {
                runners.push(Arc::new(self.runner(projection.clone(), live)));
            }
        }
        Ok((runners, stopped))
    }
}

/// Cancels `restart` when the assignment changes or a stopped projection is resumed.
async fn watch_for_restart(
    pool: PgPool,
    mut changes: tokio::sync::watch::Receiver<Vec<keel_topics::reader::PartitionKey>>,
    stopped: Vec<&'static str>,
    restart: CancellationToken,
) {
    let resumed = async {
        if stopped.is_empty() {
            return std::future::pending().await;
        }
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if store::any_resumed(&pool, &stopped).await.unwrap_or(false) {
                return;
            }
        }
    };
    tokio::select! {
        _ = changes.changed() => {}
        () = resumed => {}
    }
    restart.cancel();
}

/// Starts the projector (the live feed of every projection), the janitor of retired versions,
/// and the admin endpoints.
pub async fn start(projector: Projector, lifecycle: &mut Lifecycle, admin_listener: TcpListener) -> anyhow::Result<()> {
    let checks: Vec<Arc<dyn ReadinessCheck>> = vec![
        Arc::new(DatabaseCheck(projector.pool.clone())),
        Arc::new(BrokerCheck::new(&projector.kafka)?),
        Arc::new(RegistryCheck::new(&projector.registry_url)?),
    ];
    let admin = keel_runtime::admin::router(lifecycle.make_health(checks))
        .merge(Router::new().route("/admin/projections", get(admin_projections)).with_state(projector.clone()));
    lifecycle.serve_http("projector-admin", admin_listener, admin);
    lifecycle.spawn("projector", projector.clone().supervise(lifecycle.token()));
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

/// How many of `records` (topic, partition, offset of a record) the live version of `projection`
/// has not applied yet: `0` when a read of it reflects every one of them.
pub async fn unapplied(pool: &PgPool, projection: &str, records: &[(String, i32, i64)]) -> Result<i64, sqlx::Error> {
    let topics: Vec<&str> = records.iter().map(|(topic, _, _)| topic.as_str()).collect();
    let partitions: Vec<i32> = records.iter().map(|(_, partition, _)| *partition).collect();
    let offsets: Vec<i64> = records.iter().map(|(_, _, offset)| *offset).collect();
    sqlx::query_scalar(
        "SELECT count(*) FROM UNNEST($2::text[], $3::integer[], $4::bigint[]) AS record(topic, partition, \"offset\")
         WHERE NOT EXISTS (
             SELECT 1 FROM projection_checkpoints checkpoint
             JOIN projections live ON live.name = checkpoint.projection
                                  AND live.live_version = checkpoint.projection_version
             WHERE checkpoint.projection = $1 AND checkpoint.topic = record.topic
               AND checkpoint.partition = record.partition AND checkpoint.next_offset > record.\"offset\"
         )",
    )
    .bind(projection)
    .bind(&topics)
    .bind(&partitions)
    .bind(&offsets)
    .fetch_one(pool)
    .await
}

/// Clears the stopped flag of a projection's live version (after fixing what stopped it).
pub async fn resume(pool: &PgPool, name: &str) -> anyhow::Result<bool> {
    Ok(store::resume(pool, name).await?)
}

/// Where the live version of `projection` is in `topic` and the validation state it keeps
/// there, read in one snapshot (see [`store::live_position`]).
pub use store::{live_position, retired_tables};
