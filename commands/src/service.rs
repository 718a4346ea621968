//! What every command service boots with: the configuration common to them, the engines of its
//! aggregates (each owning, loading and serving its partitions), the admin endpoints and the
//! gRPC server.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use keel_clients::ServiceClient;
use keel_discovery::{Discovery, Partitions};
use keel_runtime::postgres::DatabaseCheck;
use keel_runtime::{ConfigError, KafkaConfig, Lifecycle, ReadinessCheck, config::ensure, lifecycle::Phase};
use keel_topics::{
    PersonalDataConfig, RegistryCheck, SchemaRegistryCodec, TopicNames, Vault, kafka, wakeups::Announcer,
};
use sqlx::PgPool;
use tokio::net::TcpListener;

use crate::{
    engine::{CommitProducers, Engine, EngineCheck, EngineContext, Model, Ownership, Settings},
    forward::Peers,
    panics::CatchPanicLayer,
};

/// Defines a command service's configuration section: the settings every service has, then its
/// own. (serde cannot flatten a shared struct into one that refuses unknown keys.)
#[macro_export]
macro_rules! command_service_config {
    (
        $(#[$doc:meta])*
        $name:ident { grpc: $grpc:literal, admin: $admin:literal $(,)? }
        { $( $(#[$field_doc:meta])* $field:ident : $ty:ty = $default:expr ),* $(,)? }
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name {
            pub grpc_listen: String,
            /// Where other instances reach this one to forward commands (`http://host:port`).
            /// Default: the bound gRPC address, which must then not be a wildcard address.
            pub advertised_endpoint: Option<String>,
            /// Health and metrics.
            pub admin_listen: String,
            /// Commands waiting per partition; beyond it callers get RESOURCE_EXHAUSTED.
            pub queue_capacity: usize,
            /// Commands decided and produced together.
            pub max_batch: usize,
            /// How long a caller waits for the broker's acknowledgement; a command not decided
            /// by then is not decided at all.
            pub command_timeout_ms: u64,
            /// Records applied between two snapshots of a partition.
            pub snapshot_every: u64,
            /// Producers (broker connections) the instance's partitions spread over.
            pub producers: usize,
            /// Test-only: write every partition whatever the group says, beside the real owners
            /// (a zombie). Never set it in production.
            pub unsafe_ignore_ownership: bool,
            $( $(#[$field_doc])* pub $field: $ty, )*
        }

        impl Default for $name {
            fn default() -> Self {
                Self {
                    grpc_listen: $grpc.into(),
                    advertised_endpoint: None,
                    admin_listen: $admin.into(),
                    queue_capacity: 1024,
                    max_batch: 256,
                    command_timeout_ms: 10_000,
                    snapshot_every: 1000,
                    producers: 1,
                    unsafe_ignore_ownership: false,
                    $( $field: $default, )*
                }
            }
        }

        impl $crate::service::ServiceSection for $name {
            fn service(&self) -> $crate::service::ServiceSettings {
                $crate::service::ServiceSettings {
                    grpc_listen: self.grpc_listen.clone(),
                    advertised_endpoint: self.advertised_endpoint.clone(),
                    admin_listen: self.admin_listen.clone(),
                    queue_capacity: self.queue_capacity,
                    max_batch: self.max_batch,
                    command_timeout_ms: self.command_timeout_ms,
                    snapshot_every: self.snapshot_every,
                    producers: self.producers,
                    unsafe_ignore_ownership: self.unsafe_ignore_ownership,
                }
            }
        }
    };
}

/// A command service's configuration section (made by [`command_service_config!`]).
pub trait ServiceSection: Sync {
    /// The settings every command service has.
    fn service(&self) -> ServiceSettings;
}

/// The settings every command service has (see [`command_service_config!`]).
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    pub grpc_listen: String,
    pub advertised_endpoint: Option<String>,
    pub admin_listen: String,
    pub queue_capacity: usize,
    pub max_batch: usize,
    pub command_timeout_ms: u64,
    pub snapshot_every: u64,
    pub producers: usize,
    pub unsafe_ignore_ownership: bool,
}

impl ServiceSettings {
    /// Checks the common settings of the section `section`.
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        let path = |key: &str| format!("{section}.{key}");
        ensure(self.queue_capacity > 0, &path("queue_capacity"), "must be positive")?;
        ensure(self.max_batch > 0, &path("max_batch"), "must be positive")?;
        ensure(self.command_timeout_ms > 0, &path("command_timeout_ms"), "must be positive")?;
        ensure(self.snapshot_every > 0, &path("snapshot_every"), "must be positive")?;
        ensure((1..=64).contains(&self.producers), &path("producers"), "must be between 1 and 64")?;
        ensure(
            self.advertised_endpoint.as_ref().is_none_or(|endpoint| endpoint.parse::<http::Uri>().is_ok()),
            &path("advertised_endpoint"),
            "must be a URL such as http://10.0.0.5:50051",
        )
    }

    pub fn command_timeout(&self) -> Duration {
        Duration::from_millis(self.command_timeout_ms)
    }

    fn engine_settings(&self) -> Settings {
        Settings {
            queue_capacity: self.queue_capacity,
            max_batch: self.max_batch,
            snapshot_every: self.snapshot_every,
            command_timeout: self.command_timeout(),
        }
    }

    fn endpoint(&self, section: &str, bound: SocketAddr) -> anyhow::Result<String> {
        match &self.advertised_endpoint {
            Some(endpoint) => Ok(endpoint.clone()),
            None if bound.ip().is_unspecified() => anyhow::bail!(
                "{section}.grpc_listen binds a wildcard address ({bound}); set {section}.advertised_endpoint"
            ),
            None => Ok(format!("http://{bound}")),
        }
    }
}

/// Everything a command service is started from: what the composition root has bound and
/// opened for it.
pub struct ServiceContext<'a> {
    pub kafka: &'a KafkaConfig,
    pub registry_url: &'a str,
    pub personal_data: &'a PersonalDataConfig,
    /// The role's own pool, migrated.
    pub pool: PgPool,
    pub lifecycle: &'a mut Lifecycle,
    pub grpc_listener: TcpListener,
    pub admin_listener: TcpListener,
    /// Where the services it calls are.
    pub discovery: &'a Discovery,
}

/// What a started command service registers: where callers reach it and what it writes.
pub struct Started {
    /// Its gRPC endpoint as others reach it.
    pub endpoint: String,
    pub admin: SocketAddr,
    /// The partitions it writes, as the group assigns them.
    pub partitions: Partitions,
}

/// A command service: its configuration section, its aggregates and its gRPC surface. The
/// scaffold ([`start`]) does the rest: the write path's shared parts, readiness, the admin
/// endpoints and the gRPC server with health.
pub trait CommandService {
    /// The service's name (configuration section, metrics, logs).
    const NAME: &'static str;
    /// Its configuration section (see [`command_service_config!`]).
    type Config: ServiceSection;

    /// Starts the service's engines ([`ServiceBuilder::engine`]) and background tasks, and
    /// returns its gRPC routes.
    fn build(
        config: &Self::Config,
        service: &mut ServiceBuilder<'_>,
    ) -> impl Future<Output = anyhow::Result<tonic::service::Routes>> + Send;
}

/// Starts the command service `S` from its section and what the composition root opened.
pub async fn start<S: CommandService>(config: &S::Config, context: ServiceContext<'_>) -> anyhow::Result<Started> {
    let mut service = ServiceBuilder::new(S::NAME, config.service(), context)?;
    let routes = S::build(config, &mut service).await?;
    service.serve(routes)
}

/// Builds one command service: its engines, then its servers.
pub struct ServiceBuilder<'a> {
    name: &'static str,
    settings: ServiceSettings,
    names: TopicNames,
    /// What the service's engines share.
    context: EngineContext,
    /// The service's one key store: one cache, so a key shredded by one part of the service is
    /// gone for every other.
    vault: Vault,
    lifecycle: &'a mut Lifecycle,
    checks: Vec<Arc<dyn ReadinessCheck>>,
    grpc_listener: TcpListener,
    admin_listener: TcpListener,
    discovery: Discovery,
}

impl<'a> ServiceBuilder<'a> {
    fn new(name: &'static str, settings: ServiceSettings, context: ServiceContext<'a>) -> anyhow::Result<Self> {
        let ServiceContext {
            kafka,
            registry_url,
            personal_data,
            pool,
            lifecycle,
            grpc_listener,
            admin_listener,
            discovery,
        } = context;
        let names = TopicNames::new(kafka.topic_prefix.clone());
        let endpoint = settings.endpoint(name, grpc_listener.local_addr()?)?;
        let checks: Vec<Arc<dyn ReadinessCheck>> = vec![
            Arc::new(kafka::BrokerCheck::new(kafka)?),
            Arc::new(DatabaseCheck(pool.clone())),
            Arc::new(RegistryCheck::new(registry_url)?),
        ];
        let announcer = Announcer::default();
        lifecycle.spawn(format!("{name} log announcements"), announcer.clone().run(pool.clone(), lifecycle.token()));
        let vault = Vault::new(pool.clone(), personal_data)?;
        let context = EngineContext {
            kafka: kafka.clone(),
            codec: SchemaRegistryCodec::new(registry_url, names.clone())?,
            pool,
            endpoint,
            settings: settings.engine_settings(),
            announcer,
            producers: Arc::new(CommitProducers::new(kafka, settings.producers)?),
            partitions: Partitions::default(),
        };
        Ok(Self {
            name,
            settings,
            names,
            context,
            vault,
            lifecycle,
            checks,
            grpc_listener,
            admin_listener,
            discovery: discovery.clone(),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.context.pool
    }

    pub fn lifecycle(&mut self) -> &mut Lifecycle {
        self.lifecycle
    }

    pub fn settings(&self) -> &ServiceSettings {
        &self.settings
    }

    /// The keys that seal personal data on this service's topics.
    pub fn vault(&self) -> Vault {
        self.vault.clone()
    }

    /// Channels to the other instances of this service, for calls to forward.
    pub fn peers(&self) -> Peers {
        Peers::new(self.name, self.settings.command_timeout())
    }

    /// A client of another service, over its instances as discovery lists them.
    pub fn client(&mut self, service: &'static str) -> ServiceClient {
        let budget = self.settings.command_timeout();
        self.discovery.client(service, budget, self.lifecycle)
    }

    /// Where this instance's own gRPC server listens (for calls it makes to itself).
    pub fn local_endpoint(&self) -> anyhow::Result<String> {
        Ok(format!("http://{}", self.grpc_listener.local_addr()?))
    }

    /// The write path of one aggregate type: it owns, loads and serves its partitions as the
    /// group assigns them, and the service is ready once they are loaded.
    pub async fn engine<M: Model>(&mut self, model: M) -> anyhow::Result<Arc<Engine<M>>> {
        let topic = self.names.name(M::TOPIC);
        let engine = Arc::new(
            Engine::new(model, &self.context, topic.clone())
                .await
                .with_context(|| format!("failed to start the write path of {topic}"))?,
        );
        self.checks.push(Arc::new(EngineCheck(engine.clone())));
        let ownership = if self.settings.unsafe_ignore_ownership { Ownership::UnsafeAll } else { Ownership::Group };
        let token = self.lifecycle.token();
        self.lifecycle.spawn(format!("{} partitions of {topic}", self.name), engine.clone().serve(ownership, token));
        Ok(engine)
    }

    /// Starts the admin endpoints and the gRPC server for `routes`, with gRPC health, gRPC
    /// reflection (`grpcurl -plaintext <address> list`) and panic recovery.
    fn serve(self, routes: tonic::service::Routes) -> anyhow::Result<Started> {
        let started = Started {
            endpoint: self.context.endpoint.clone(),
            admin: self.admin_listener.local_addr()?,
            partitions: self.context.partitions.clone(),
        };
        let health = self.lifecycle.make_health(self.checks);
        self.lifecycle.serve_http(self.name, self.admin_listener, keel_runtime::admin::router(health));
        let (reporter, health_service) = tonic_health::server::health_reporter();
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(keel_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("failed to build gRPC reflection")?;
        let (draining, stop) = (self.lifecycle.draining(), self.lifecycle.phase_token(Phase::Grpc));
        let listener = self.grpc_listener;
        let name = self.name;
        self.lifecycle.spawn_in(Phase::Grpc, format!("{name} gRPC"), async move {
            let server = tonic::transport::Server::builder()
                .layer(CatchPanicLayer { service: name })
                .add_routes(routes.add_service(health_service).add_service(reflection))
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    stop.cancelled_owned(),
                );
            tokio::pin!(server);
            tokio::select! {
                served = &mut server => return served.with_context(|| format!("{name} gRPC server failed")),
                () = draining.cancelled() => {}
            }
            // Draining: health checks say NOT_SERVING while the calls in flight finish.
            reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
            server.await.with_context(|| format!("{name} gRPC server failed"))
        });
        Ok(started)
    }
}

/// Defines the model of an aggregate whose topic seals nothing: its wire form is its whole story.
#[macro_export]
macro_rules! plain_model {
    ($(#[$doc:meta])* $name:ident { state: $state:ty, event: $event:ty, topic: $topic:expr, service: $service:literal, encode: $encode:path, decode: $decode:path $(,)? }) => {
        $(#[$doc])*
        pub struct $name;

        impl $crate::engine::Model for $name {
            type State = $state;
            type Command = <$state as keel_domain::Aggregate>::Command;
            type Event = $event;
            type Index = ();

            const TOPIC: keel_topics::Topic = $topic;
            const SERVICE: &'static str = $service;

            async fn encode(
                &self,
                _aggregate_id: uuid::Uuid,
                events: &[$event],
            ) -> Result<(apache_avro::types::Value, bool), keel_topics::CodecError> {
                Ok(($encode(events), false))
            }

            async fn decode(
                &self,
                _header: &keel_topics::CommitHeader,
                decoded: keel_topics::Decoded,
            ) -> Result<Vec<$event>, keel_topics::CodecError> {
                $decode(&decoded)
            }
        }
    };
}
