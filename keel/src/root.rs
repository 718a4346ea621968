//! What each subcommand does: the composition root of every role, in the bootstrap order of the
//! design (config → telemetry → dependencies → database → migrations → service and servers →
//! registration in the service registry, once the role is ready).

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use anyhow::Context;
use keel_commands::{
    auth::AuthService,
    authz::AuthzService,
    blog::BlogService,
    identity::IdentityService,
    service::{CommandService, ServiceContext, ServiceSection},
};
use keel_discovery::{Discovery, Instance, Partitions};
use keel_runtime::{Lifecycle, lifecycle::cancel_on_signal, listen, notifications::Notifications, postgres};
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
            let pool = postgres::pool(&config.database, "keel-migrate", TOOL_CONNECTIONS)?;
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
            let pool = postgres::pool(&config.database, "keel-audit", TOOL_CONNECTIONS)?;
            let verification = keel_read_models::audit::verify(&pool).await?;
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
            let pool = postgres::pool(&config.database, "keel-keys", TOOL_CONNECTIONS)?;
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
        Command::Traces(args) => return crate::traces::run(&args),
        Command::Projections(args) => return crate::projections_cli::run(args, &config).await,
        Command::Bench(args) => return crate::bench::run(args, &config).await,
        Command::Instances { service } => {
            let discovery = Discovery::new(&config.discovery)?;
            let services: Vec<&str> = match &service {
                Some(service) => vec![service.as_str()],
                None => Role::ALL.iter().map(|role| role.service()).collect(),
            };
            println!("{} registry", discovery.backend());
            for service in services {
                for instance in discovery.list(service).await? {
                    let partitions: usize = instance.partitions.values().map(std::collections::BTreeSet::len).sum();
                    println!(
                        "{}\t{}\tgrpc {}\tadmin {}\tversion {}\t{partitions} partitions",
                        instance.service,
                        instance.id,
                        instance.grpc.as_deref().unwrap_or("-"),
                        instance.admin.as_deref().unwrap_or("-"),
                        if instance.version.is_empty() { "-" } else { &instance.version },
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.context("failed to apply migrations")
}

/// Connections of a command-line tool's pool.
pub(crate) const TOOL_CONNECTIONS: u32 = 2;

impl Role {
    /// The service the role registers as.
    fn service(self) -> &'static str {
        match self {
            Self::Registry => "schema-registry",
            Self::Identity => "identity",
            Self::Auth => "auth",
            Self::Authz => "authz",
            Self::Blog => "blog",
            Self::Projector => "projector",
            Self::Gateway => "gateway",
        }
    }

    /// Every role, as the registry names them.
    const ALL: [Role; 7] =
        [Self::Registry, Self::Identity, Self::Auth, Self::Authz, Self::Blog, Self::Projector, Self::Gateway];

    /// The connections the role's pool needs at most (unless `database.max_connections` says
    /// otherwise): what it does at once, measured under load. A role that listens for
    /// notifications holds one connection more, outside its pool.
    fn connections(self) -> u32 {
        match self {
            // Schema look-ups, which clients cache.
            Self::Registry => 2,
            // Snapshots and ownership in the background, email reservations and key look-ups in
            // front.
            Self::Identity | Self::Auth | Self::Authz | Self::Blog => 2,
            // One transaction per projection at a time, and the janitor.
            Self::Projector => 6,
            // Queries, consistency waits and the status caches.
            Self::Gateway => 4,
        }
    }
}

/// A database pool, migrated when configured to, and closed once every task has stopped.
async fn database(config: &KeelConfig, role: Role, lifecycle: &mut Lifecycle) -> anyhow::Result<PgPool> {
    let role_name = format!("{role:?}").to_lowercase();
    let pool = postgres::pool(&config.database, &format!("keel-{role_name}"), role.connections())?;
    if config.database.migrate_on_start {
        migrate(&pool).await?;
    }
    let closed = pool.clone();
    lifecycle.on_stop("database pool", async move { closed.close().await });
    Ok(pool)
}

/// The notifications of `channels`, heard on one connection of the role's own.
fn listen(
    config: &KeelConfig,
    lifecycle: &mut Lifecycle,
    role: &str,
    channels: &[&'static str],
) -> anyhow::Result<Notifications> {
    let notifications = Notifications::new(channels);
    let pool = postgres::listen_pool(&config.database, &format!("keel-{role}"))?;
    lifecycle.spawn(format!("{role} notifications"), notifications.clone().listen(pool, lifecycle.token()));
    Ok(notifications)
}

/// What a started role registers: where it is reached, and what it writes.
struct Announce {
    grpc: Option<String>,
    admin: SocketAddr,
    partitions: Option<Partitions>,
}

impl Announce {
    fn http(admin: &TcpListener) -> anyhow::Result<Self> {
        Ok(Self { grpc: None, admin: admin.local_addr()?, partitions: None })
    }

    /// The instance to register. A wildcard admin address is named by the gRPC endpoint's host,
    /// or else the host name (`HOSTNAME`, as containers set it).
    fn instance(self, service: &str) -> Instance {
        let admin = if self.admin.ip().is_unspecified() {
            let host = self
                .grpc
                .as_deref()
                .and_then(|grpc| grpc.parse::<http::Uri>().ok())
                .and_then(|uri| uri.host().map(str::to_owned))
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_else(|| self.admin.ip().to_string());
            format!("http://{host}:{}", self.admin.port())
        } else {
            format!("http://{}", self.admin)
        };
        Instance::new(service, self.grpc, Some(admin))
    }
}

/// Starts the command service `S` of `role`: its pool, its two listeners, then the service.
async fn command_service<S: CommandService>(
    config: &KeelConfig,
    section: &S::Config,
    role: Role,
    lifecycle: &mut Lifecycle,
    discovery: &Discovery,
) -> anyhow::Result<Announce> {
    let pool = database(config, role, lifecycle).await?;
    let settings = section.service();
    let grpc_listener = listen::bind(&settings.grpc_listen, &format!("{} gRPC", S::NAME)).await?;
    let admin_listener = listen::bind(&settings.admin_listen, &format!("{} admin", S::NAME)).await?;
    let context = ServiceContext {
        kafka: &config.kafka,
        registry_url: &config.schema_registry.url,
        personal_data: &config.personal_data,
        pool,
        lifecycle,
        grpc_listener,
        admin_listener,
        discovery,
    };
    let started = keel_commands::service::start::<S>(section, context).await?;
    Ok(Announce { grpc: Some(started.endpoint), admin: started.admin, partitions: Some(started.partitions) })
}

async fn serve(role: Role, config: &KeelConfig) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    let mut lifecycle = Lifecycle::new(shutdown.clone(), Duration::from_millis(config.shutdown.grace_period_ms));
    lifecycle.set_drain_delay(Duration::from_millis(config.shutdown.drain_delay_ms));
    let role_name = format!("{role:?}").to_lowercase();
    tracing::info!(role = %role_name, version = env!("CARGO_PKG_VERSION"), "starting");
    let discovery = Discovery::new(&config.discovery)?;
    lifecycle.add_check(discovery.check());
    let started = async {
        let announce = match role {
            Role::Registry => {
                let pool = database(config, Role::Registry, &mut lifecycle).await?;
                let listener = listen::bind(&config.registry.listen, "registry").await?;
                let announce = Announce::http(&listener)?;
                let checks: Vec<std::sync::Arc<dyn keel_runtime::ReadinessCheck>> =
                    vec![std::sync::Arc::new(postgres::DatabaseCheck(pool.clone()))];
                let router = keel_registry::router(keel_registry::PgSchemaStore::new(pool))
                    .merge(keel_runtime::admin::router(lifecycle.make_health(checks)));
                lifecycle.serve_http("registry-http", listener, router);
                announce
            }
            Role::Identity => {
                command_service::<IdentityService>(config, &config.identity, role, &mut lifecycle, &discovery).await?
            }
            Role::Auth => {
                command_service::<AuthService>(config, &config.auth, role, &mut lifecycle, &discovery).await?
            }
            Role::Authz => {
                command_service::<AuthzService>(config, &config.authz, role, &mut lifecycle, &discovery).await?
            }
            Role::Blog => {
                command_service::<BlogService>(config, &config.blog, role, &mut lifecycle, &discovery).await?
            }
            Role::Projector => {
                let pool = database(config, Role::Projector, &mut lifecycle).await?;
                let admin = listen::bind(&config.projector.admin_listen, "projector admin").await?;
                let announce = Announce::http(&admin)?;
                let notifications = listen(config, &mut lifecycle, "projector", &[keel_topics::wakeups::CHANNEL])?;
                let projections = keel_read_models::catalogue(Vault::new(pool.clone(), &config.personal_data)?);
                let projector = keel_projections::Projector::new(
                    config.projector.clone(),
                    config.kafka.clone(),
                    &config.schema_registry.url,
                    pool,
                    projections,
                    notifications,
                )?;
                keel_projections::start(projector, &mut lifecycle, admin).await?;
                announce
            }
            Role::Gateway => {
                let pool = database(config, Role::Gateway, &mut lifecycle).await?;
                let listener = listen::bind(&config.gateway.listen, "gateway").await?;
                let announce = Announce::http(&listener)?;
                let channels = [
                    keel_topics::wakeups::CHANNEL,
                    keel_topics::APPLIED_CHANNEL,
                    keel_topics::STATUS_CHANNEL,
                    keel_topics::OWNERS_CHANNEL,
                ];
                let sources = keel_gateway::Sources {
                    kafka: config.kafka.clone(),
                    registry_url: config.schema_registry.url.clone(),
                    projections: keel_read_models::catalogue(Vault::new(pool.clone(), &config.personal_data)?),
                    notifications: listen(config, &mut lifecycle, "gateway", &channels)?,
                    discovery: discovery.clone(),
                };
                keel_gateway::start(&config.gateway, sources, pool, &mut lifecycle, listener).await?;
                announce
            }
        };
        // Registered once ready, withdrawn first thing on shutdown.
        let Announce { partitions, .. } = &announce;
        let partitions = partitions.clone();
        discovery.register(announce.instance(role.service()), partitions, &mut lifecycle);
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
