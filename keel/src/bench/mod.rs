//! `keel bench`: benchmarks that print figures, each next to the raw rates of the same work
//! measured in the same run, on the same broker (and database), so a figure reads as a fraction
//! of what the infrastructure allows rather than as a bare number.
//!
//! - `replay`: how fast a projection replays a topic ([`replay`]);
//! - `commands`: how fast a running gateway accepts commands ([`commands`]);
//! - `streams`: N events fanned out to M SSE clients: delivery latency and memory ([`streams`]).
//!
//! Raw Kafka figures are taken under a throwaway topic prefix (`bench-<id>.`), so a bench can run
//! next to a live installation.

mod commands;
mod cpu;
mod idle;
mod replay;
mod streams;
mod sustained;

use std::{
    ops::Range,
    process::ExitCode,
    time::{Duration, Instant},
};

use chrono::Utc;
use clap::{Args, Subcommand};
use futures::{StreamExt, stream::FuturesUnordered};
use keel_domain::{
    DomainEvent,
    identity::{DisplayName, Email, UserEvent, UserId, UserRegistered},
};
use keel_runtime::KafkaConfig;
use keel_topics::{
    CommitHeader, EventMeta, SchemaRegistryCodec, Topic, TopicNames, Vault, identity, kafka,
    producer::{Producer, Record},
    sealing,
};
use uuid::Uuid;

use crate::config::KeelConfig;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Replay a topic of N registrations into the users read model.
    Replay {
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
    },
    /// Register N users through a running gateway (start the platform with `scripts/run`), next
    /// to the raw produce rate of the same records.
    Commands {
        /// Registrations to measure (a warm-up of min(500, N/10) comes first, not counted).
        #[arg(long, default_value_t = 20_000)]
        commands: u64,
        /// Concurrent HTTP clients, each sending its next command once the last one succeeded.
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// The gateway's base URL [default: `http://<gateway.listen>`, a wildcard address as loopback].
        #[arg(long)]
        gateway: Option<String>,
    },
    /// What a running, idle platform costs (CPU of every role, the broker, PostgreSQL and Redis),
    /// and how soon a lone command reaches the read model.
    Idle {
        /// How long to measure the idle platform.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Lone renames afterwards, one a second, timed to the read model.
        #[arg(long, default_value_t = 20)]
        probes: u32,
        /// The gateway's base URL [default: `http://<gateway.listen>`].
        #[arg(long)]
        gateway: Option<String>,
    },
    /// Renames at a constant rate for minutes through a running gateway: latency per minute and
    /// every role's memory at the start and the end.
    Sustained {
        /// Renames per second.
        #[arg(long)]
        rate: f64,
        /// How long to keep the rate.
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        /// The span each printed line covers.
        #[arg(long, default_value_t = 60)]
        window_seconds: u64,
        /// Users of the bench's own the renames spread over.
        #[arg(long, default_value_t = 200)]
        users: usize,
        /// The gateway's base URL [default: `http://<gateway.listen>`].
        #[arg(long)]
        gateway: Option<String>,
    },
    /// The broker's ceilings with Keel's producer: N commits produced as fast as it takes them
    /// (idempotent, acknowledged by all), then consumed.
    Broker {
        #[arg(long, default_value_t = 100_000)]
        records: u64,
    },
    /// The CPU seconds each process of the running platform spends over a window, as JSON (for
    /// cost-per-command figures next to a load generator).
    Cpu {
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
    },
    /// Fan N events out to M SSE clients of a running gateway: delivery latency p50/p99 and the
    /// gateway's memory.
    Streams {
        #[arg(long, default_value_t = 2_000)]
        events: u64,
        #[arg(long, default_value_t = 100)]
        clients: usize,
        /// Concurrent writers drafting the posts.
        #[arg(long, default_value_t = 8)]
        writers: usize,
        /// The gateway's base URL [default: `http://<gateway.listen>`].
        #[arg(long)]
        gateway: Option<String>,
        /// An access token of an account that may draft posts and read whole streams (an admin's).
        #[arg(long, env = "KEEL_TOKEN", hide_env_values = true)]
        token: String,
    },
}

pub async fn run(args: BenchArgs, config: &KeelConfig) -> anyhow::Result<ExitCode> {
    match args.command {
        BenchCommand::Replay { events } => replay::run(config, events).await,
        BenchCommand::Commands { commands, clients, gateway } => {
            commands::run(config, commands, clients, gateway).await
        }
        BenchCommand::Idle { seconds, probes, gateway } => {
            let gateway = gateway.unwrap_or_else(|| commands::default_gateway_url(&config.gateway.listen));
            idle::run(config, seconds, probes, gateway.trim_end_matches('/')).await
        }
        BenchCommand::Sustained { rate, seconds, window_seconds, users, gateway } => {
            let gateway = gateway.unwrap_or_else(|| commands::default_gateway_url(&config.gateway.listen));
            let gateway = gateway.trim_end_matches('/').to_owned();
            let (duration, window) = (Duration::from_secs(seconds), Duration::from_secs(window_seconds));
            sustained::run(sustained::Sustained { gateway, rate, duration, window, users }).await
        }
        BenchCommand::Broker { records } => broker(config, records).await,
        BenchCommand::Cpu { seconds } => {
            anyhow::ensure!(seconds > 0.0, "--seconds must be positive");
            let used = cpu::measure(Duration::from_secs_f64(seconds)).await;
            println!("{}", serde_json::to_string(&used)?);
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Streams { events, clients, writers, gateway, token } => {
            streams::run(config, streams::StreamsBench { events, clients, writers, gateway, token }).await
        }
    }
}

/// `keel bench broker`: the raw produce and consume rates of `records` registration commits on
/// throwaway topics, with the producer settings the command services use.
async fn broker(config: &KeelConfig, records: u64) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(records > 0, "--records must be positive");
    let id = run_id();
    let scratch = ScratchTopics::create(config, &id).await?;
    let topic = scratch.names.name(Topic::IdentityUsers);
    eprintln!("encoding {records} commits");
    let commits = encode_registrations(&scratch.codec, None, 0..records, &format!("bench-{id}-"), "bench").await?;
    let producer = Producer::commits(&scratch.kafka)?;
    eprintln!("producing");
    let produce = Rate {
        what: "produce (idempotent, acks=all)".into(),
        count: records,
        elapsed: produce(&producer, &topic, &commits, RAW_MAX_IN_FLIGHT).await?,
    };
    eprintln!("consuming");
    let partitions = Topic::IdentityUsers.spec().partitions;
    let started = Instant::now();
    let mut reader =
        keel_topics::reader::PartitionReader::assign(&scratch.kafka, &topic, 0..partitions, &Default::default())?
            .until_current_end(&Default::default())
            .await?;
    let mut consumed = 0_u64;
    while reader.next().await?.is_some() {
        consumed += 1;
    }
    let consume = Rate { what: "consume".into(), count: consumed, elapsed: started.elapsed() };
    println!(
        "broker ceilings: {records} commits of {} bytes on average",
        commits.iter().map(|commit| commit.payload.len()).sum::<usize>() / commits.len()
    );
    produce.print();
    consume.print();
    Ok(ExitCode::SUCCESS)
}

/// Unacknowledged records a raw produce keeps in flight when it goes as fast as the broker allows.
const RAW_MAX_IN_FLIGHT: usize = 20_000;

/// One measured phase.
struct Rate {
    what: String,
    count: u64,
    elapsed: Duration,
}

impl Rate {
    fn per_second(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64()
    }

    fn print(&self) {
        println!(
            "  {:<28} {:>10} in {:>8.2}s  {:>12.0}/s",
            self.what,
            self.count,
            self.elapsed.as_secs_f64(),
            self.per_second()
        );
    }
}

/// A short random id naming one run's throwaway resources.
fn run_id() -> String {
    Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// The throwaway topics of one run (`bench-<id>.`), with the users schema registered under them.
struct ScratchTopics {
    kafka: KafkaConfig,
    names: TopicNames,
    codec: SchemaRegistryCodec,
}

impl ScratchTopics {
    async fn create(config: &KeelConfig, id: &str) -> anyhow::Result<Self> {
        let mut kafka_config = config.kafka.clone();
        kafka_config.topic_prefix = format!("bench-{id}.");
        let names = TopicNames::new(kafka_config.topic_prefix.clone());
        kafka::create_topics(&kafka_config, &names, config.topics.replication_factor).await?;
        let codec = SchemaRegistryCodec::new(&config.schema_registry.url, names.clone())?;
        codec.register(Topic::IdentityUsers).await?;
        Ok(Self { kafka: kafka_config, names, codec })
    }
}

/// One registration commit, encoded and ready to produce.
struct Commit {
    key: String,
    payload: Vec<u8>,
    header: CommitHeader,
}

/// Registration commits numbered `numbers`, one new user each (`<email_prefix><n>@example.com`,
/// `Bench user <n>`, issued by `actor`), encoded the way the identity service encodes them:
/// sealed with a key per user, kept in `vault` (or thrown away, where only the size matters).
async fn encode_registrations(
    codec: &SchemaRegistryCodec,
    vault: Option<&Vault>,
    numbers: Range<u64>,
    email_prefix: &str,
    actor: &str,
) -> anyhow::Result<Vec<Commit>> {
    let mut commits = Vec::with_capacity(numbers.end.saturating_sub(numbers.start) as usize);
    for number in numbers {
        let user = UserId::new();
        let event = UserEvent::Registered(UserRegistered {
            id: user,
            email: Email::parse(&format!("{email_prefix}{number}@example.com"))?,
            display_name: DisplayName::parse(&format!("Bench user {number}"))?,
        });
        let header = CommitHeader {
            command_id: Uuid::now_v7(),
            aggregate_id: user.as_uuid(),
            expected_version: 0,
            occurred_at: Utc::now(),
            actor: actor.into(),
            correlation_id: Uuid::now_v7(),
            causation_id: None,
            traceparent: None,
            sealed: true,
            events: vec![EventMeta {
                event_id: Uuid::now_v7(),
                event_type: event.event_type().into(),
                schema_version: event.schema_version(),
            }],
        };
        let mut value = identity::encode(&[event]);
        match vault {
            Some(vault) => {
                vault.seal(Topic::IdentityUsers, user.as_uuid(), &mut value).await?;
            }
            None => {
                sealing::seal_commit(Topic::IdentityUsers, user.as_uuid(), &mut value, &sealing::DataKey::generate())?
            }
        }
        let payload = codec.encode(Topic::IdentityUsers, value).await?;
        commits.push(Commit { key: user.as_uuid().to_string(), payload, header });
    }
    Ok(commits)
}

/// Produces `commits` to `topic` with at most `max_in_flight` unacknowledged at a time, and
/// returns how long it took until the last was acknowledged.
async fn produce(
    producer: &Producer,
    topic: &str,
    commits: &[Commit],
    max_in_flight: usize,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    for commit in commits {
        if in_flight.len() >= max_in_flight
            && let Some(delivered) = in_flight.next().await
        {
            check_delivery(delivered)?;
        }
        let record = Record {
            topic,
            partition: None,
            key: commit.key.as_bytes(),
            payload: &commit.payload,
            headers: commit.header.to_headers(),
        };
        in_flight.push(producer.send(record).map_err(|error| anyhow::anyhow!("produce failed: {error}"))?);
    }
    while let Some(delivered) = in_flight.next().await {
        check_delivery(delivered)?;
    }
    Ok(started.elapsed())
}

fn check_delivery(delivered: Result<i64, rdkafka::error::KafkaError>) -> anyhow::Result<()> {
    delivered.map(|_| ()).map_err(|error| anyhow::anyhow!("produce failed: {error}"))
}
