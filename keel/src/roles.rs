//! What each subcommand does: the composition root of every role, in the bootstrap order of the
//! design (config → telemetry → dependencies → database → migrations → servers).

use std::{process::ExitCode, time::Duration};

use anyhow::Context;
use keel_runtime::{Health, Lifecycle, lifecycle::cancel_on_signal, postgres};
use keel_topics::{TopicNames, Vault, kafka};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{AuditCommand, Command, ConfigCommand, KeysCommand, TopicsCommand, config::KeelConfig};

/// The long-running roles.
#[derive(Debug, Clone, Copy)]
enum Role {
    Registry,
    Identity,
    Auth,
    Authz,
    Blog,
    Projector,
    Gateway,
}

pub(crate) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

pub async fn run(command: Command, config: KeelConfig) -> anyhow::Result<ExitCode> {
    match command {
        Command::Registry => serve(Role::Registry, &config).await?,
        Command::Identity => serve(Role::Identity, &config).await?,
        Command::Auth => serve(Role::Auth, &config).await?,
        Command::Authz => serve(Role::Authz, &config).await?,
        Command::Blog => serve(Role::Blog, &config).await?,
        Command::Projector => serve(Role::Projector, &config).await?,
        Command::Gateway => serve(Role::Gateway, &config).await?,
        Command::Migrate => {
            let pool = postgres::pool(&config.database, "keel-migrate")?;
            migrate(&pool).await?;
            println!("migrations applied");
        }
        Command::Topics { command: TopicsCommand::Create } => {
            let names = TopicNames::new(config.kafka.topic_prefix.clone());
            let created = kafka::create_topics(&config.kafka, &names, config.topics.replication_factor).await?;
            for (topic, outcome) in created {
                println!("{topic}\t{outcome:?}");
            }
        }
        Command::Config { command: ConfigCommand::Dump } => {
            print!("{}", serde_norway::to_string(&config).context("failed to render the config")?);
        }
        Command::Audit { command: AuditCommand::Verify } => {
            let pool = postgres::pool(&config.database, "keel-audit")?;
            let verification = keel_projections::audit::verify(&pool).await?;
            match verification.broken {
                None => {
                    println!("audit log intact: {} entries in {} chains", verification.entries, verification.chains)
                }
                Some(broken) => {
                    println!(
                        "audit log BROKEN at topic {} partition {} offset {} event {} (sequence {})",
                        broken.topic, broken.partition, broken.offset, broken.event_index, broken.sequence
                    );
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        Command::Keys { command } => {
            let pool = postgres::pool(&config.database, "keel-keys")?;
            migrate(&pool).await?;
            let kek = config.auth.kek().context("auth.key_encryption_key is validated with the configuration")?;
            match command {
                KeysCommand::Rotate => {
                    let ahead = Duration::from_secs(config.auth.key_publish_ahead_secs);
                    let kid = keel_commands::auth::keys::create_key(
                        &pool,
                        &kek,
                        ahead,
                        keel_commands::auth::keys::Unless::Never,
                    )
                    .await?
                    .context("a key is always made")?;
                    println!("made key {kid}; it signs in {}s", ahead.as_secs());
                }
                KeysCommand::List => {
                    let rows: Vec<(String, chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)> =
                        sqlx::query_as(
                            "SELECT kid, created_at, activates_at FROM auth_signing_keys ORDER BY activates_at",
                        )
                        .fetch_all(&pool)
                        .await?;
                    for (kid, created_at, activates_at) in rows {
                        println!("{kid}\tmade {}\tsigns from {}", created_at.to_rfc3339(), activates_at.to_rfc3339());
                    }
                }
            }
        }
        Command::Replay(args) => return crate::replay::run(args, &config).await,
        Command::Tail(args) => return crate::tail::run(args, &config).await,
        Command::Projections(args) => return crate::projections_cli::run(args, &config).await,
        Command::Bench(args) => return crate::bench::run(args, &config).await,
    }
    Ok(ExitCode::SUCCESS)
}

async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.context("failed to apply migrations")
}

async fn bind(address: &str, what: &str) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(address).await.with_context(|| format!("failed to bind {what} on {address}"))?;
    tracing::info!(address = %listener.local_addr()?, what, "listening");
    Ok(listener)
}

/// A database pool, migrated when configured to.
async fn database(config: &KeelConfig, role: &str) -> anyhow::Result<PgPool> {
    let pool = postgres::pool(&config.database, &format!("keel-{role}"))?;
    if config.database.migrate_on_start {
        migrate(&pool).await?;
    }
    Ok(pool)
}

async fn serve(role: Role, config: &KeelConfig) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    let mut lifecycle = Lifecycle::new(shutdown.clone(), Duration::from_millis(config.shutdown.grace_period_ms));
    let role_name = format!("{role:?}").to_lowercase();
    tracing::info!(role = %role_name, version = env!("CARGO_PKG_VERSION"), "starting");
    let started = async {
        match role {
            Role::Registry => {
                let pool = database(config, "registry").await?;
                let listener = bind(&config.registry.listen, "registry").await?;
                let checks: Vec<std::sync::Arc<dyn keel_runtime::ReadinessCheck>> =
                    vec![std::sync::Arc::new(postgres::DatabaseCheck(pool.clone()))];
                let router = keel_registry::router(keel_registry::PgSchemaStore::new(pool))
                    .merge(keel_runtime::admin::router(Health::new(checks, lifecycle.token())));
                lifecycle.serve_http("registry-http", listener, router);
            }
            Role::Identity => {
                let pool = database(config, "identity").await?;
                let grpc = bind(&config.identity.grpc_listen, "identity gRPC").await?;
                let admin = bind(&config.identity.admin_listen, "identity admin").await?;
                keel_commands::identity::start(
                    &config.identity,
                    &config.personal_data,
                    &config.kafka,
                    &config.schema_registry.url,
                    pool,
                    &mut lifecycle,
                    grpc,
                    admin,
                )
                .await?;
            }
            Role::Auth => {
                let pool = database(config, "auth").await?;
                let grpc = bind(&config.auth.grpc_listen, "auth gRPC").await?;
                let admin = bind(&config.auth.admin_listen, "auth admin").await?;
                keel_commands::auth::start(
                    &config.auth,
                    &config.personal_data,
                    &config.kafka,
                    &config.schema_registry.url,
                    pool,
                    &mut lifecycle,
                    grpc,
                    admin,
                )
                .await?;
            }
            Role::Authz => {
                let pool = database(config, "authz").await?;
                let grpc = bind(&config.authz.grpc_listen, "authz gRPC").await?;
                let admin = bind(&config.authz.admin_listen, "authz admin").await?;
                keel_commands::authz::start(
                    &config.authz,
                    &config.kafka,
                    &config.schema_registry.url,
                    pool,
                    &mut lifecycle,
                    grpc,
                    admin,
                )
                .await?;
            }
            Role::Blog => {
                let pool = database(config, "blog").await?;
                let grpc = bind(&config.blog.grpc_listen, "blog gRPC").await?;
                let admin = bind(&config.blog.admin_listen, "blog admin").await?;
                keel_commands::blog::start(
                    &config.blog,
                    &config.kafka,
                    &config.schema_registry.url,
                    pool,
                    &mut lifecycle,
                    grpc,
                    admin,
                )
                .await?;
            }
            Role::Projector => {
                let pool = database(config, "projector").await?;
                let admin = bind(&config.projector.admin_listen, "projector admin").await?;
                let projector = keel_projections::Projector::new(
                    config.projector.clone(),
                    config.kafka.clone(),
                    &config.schema_registry.url,
                    pool,
                    &config.personal_data,
                )?;
                keel_projections::start(projector, &mut lifecycle, admin).await?;
            }
            Role::Gateway => {
                let pool = database(config, "gateway").await?;
                let listener = bind(&config.gateway.listen, "gateway").await?;
                let sources = keel_gateway::Sources {
                    kafka: config.kafka.clone(),
                    registry_url: config.schema_registry.url.clone(),
                    projections: keel_projections::catalogue(Vault::new(pool.clone(), &config.personal_data)?),
                };
                keel_gateway::start(&config.gateway, sources, pool, &mut lifecycle, listener).await?;
            }
        }
        anyhow::Ok(())
    };
    tokio::select! {
        started = started => started.with_context(|| format!("failed to start the {role_name} role"))?,
        () = shutdown.cancelled() => {}
    }
    tracing::info!(role = %role_name, "started");
    lifecycle.run().await?;
    tracing::info!(role = %role_name, "stopped");
    Ok(())
}
