//! `keel bench replay`: how fast a projection replays a topic, next to the raw rates of the
//! same records and rows measured in the same run, on the same broker and database.
//!
//! It works in a throwaway database (`keel_bench_<id>`, dropped afterwards) and under a throwaway
//! topic prefix (`bench-<id>.`), so it can run next to a live installation.

use std::{
    collections::BTreeMap,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context;
use chrono::Utc;
use clap::{Args, Subcommand};
use futures::{StreamExt, stream::FuturesUnordered};
use keel_domain::{
    DomainEvent,
    identity::{DisplayName, Email, UserEvent, UserId, UserRegistered},
};
use keel_projections::Projector;
use keel_runtime::postgres;
use keel_topics::{
    CommitHeader, EventMeta, SchemaRegistryCodec, Topic, TopicNames, identity, kafka, reader::PartitionReader,
};
use rdkafka::producer::FutureRecord;
use sqlx::{Connection, PgConnection, PgPool, postgres::PgConnectOptions};
use tokio_util::sync::CancellationToken;
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
}

/// One measured phase.
struct Rate {
    what: &'static str,
    count: u64,
    elapsed: Duration,
}

impl Rate {
    fn per_second(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64()
    }
}

pub async fn run(args: BenchArgs, config: &KeelConfig) -> anyhow::Result<ExitCode> {
    let BenchCommand::Replay { events } = args.command;
    let id = Uuid::new_v4().simple().to_string()[..12].to_owned();
    let database = format!("keel_bench_{id}");
    let server = postgres::connect_options(&config.database)?;
    let mut admin = PgConnection::connect_with(&server.clone().database("postgres")).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}"))).execute(&mut admin).await?;
    let outcome = replay(config, events, &id, server.clone().database(&database)).await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)")))
        .execute(&mut admin)
        .await?;
    let rates = outcome?;
    println!("replay of {events} events (one registration per commit) into the users read model");
    for rate in &rates {
        println!(
            "  {:<28} {:>10} in {:>8.2}s  {:>12.0}/s",
            rate.what,
            rate.count,
            rate.elapsed.as_secs_f64(),
            rate.per_second()
        );
    }
    let [produce, consume, copy, projection] = [&rates[0], &rates[1], &rates[2], &rates[3]];
    println!("  projection / raw consume     {:>8.2}", projection.per_second() / consume.per_second());
    println!("  projection / raw COPY        {:>8.2}", projection.per_second() / copy.per_second());
    println!("  (raw produce for reference: {:.0}/s)", produce.per_second());
    Ok(ExitCode::SUCCESS)
}

async fn replay(config: &KeelConfig, events: u64, id: &str, database: PgConnectOptions) -> anyhow::Result<Vec<Rate>> {
    let pool = PgPool::connect_with(database).await.context("failed to connect to the bench database")?;
    crate::roles::MIGRATOR.run(&pool).await?;
    let mut kafka_config = config.kafka.clone();
    kafka_config.topic_prefix = format!("bench-{id}.");
    let names = TopicNames::new(kafka_config.topic_prefix.clone());
    kafka::create_topics(&kafka_config, &names, config.topics.replication_factor).await?;
    let topic = names.name(Topic::IdentityUsers);
    let codec = SchemaRegistryCodec::new(&config.schema_registry.url, names.clone())?;
    codec.register(Topic::IdentityUsers).await?;

    // The records: encoded before timing, so the produce rate is the broker's.
    eprintln!("encoding {events} commits");
    let mut records = Vec::with_capacity(events as usize);
    for index in 0..events {
        let user = UserId::new();
        let event = UserEvent::Registered(UserRegistered {
            id: user,
            email: Email::parse(&format!("bench{index}@example.com"))?,
            display_name: DisplayName::parse(&format!("Bench user {index}"))?,
        });
        let header = CommitHeader {
            command_id: Uuid::now_v7(),
            aggregate_id: user.as_uuid(),
            expected_version: 0,
            occurred_at: Utc::now(),
            actor: "bench".into(),
            correlation_id: Uuid::now_v7(),
            causation_id: None,
            traceparent: None,
            events: vec![EventMeta {
                event_id: Uuid::now_v7(),
                event_type: event.event_type().into(),
                schema_version: event.schema_version(),
            }],
        };
        let payload = codec.encode(Topic::IdentityUsers, identity::encode(&[event])).await?;
        records.push((user.as_uuid().to_string(), payload, header));
    }

    eprintln!("producing");
    let producer = kafka::producer(&kafka_config)?;
    let started = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    for (key, payload, header) in &records {
        if in_flight.len() >= 20_000
            && let Some(delivered) = in_flight.next().await
        {
            check_delivery(delivered)?;
        }
        let record = FutureRecord::to(&topic).key(key).payload(payload).headers(header.to_headers());
        in_flight.push(producer.send(record, Duration::from_secs(60)));
    }
    while let Some(delivered) = in_flight.next().await {
        check_delivery(delivered)?;
    }
    let produce = Rate { what: "raw produce (idempotent)", count: events, elapsed: started.elapsed() };

    eprintln!("consuming");
    let partitions = Topic::IdentityUsers.spec().partitions;
    let started = Instant::now();
    let mut reader = PartitionReader::assign(&kafka_config, &topic, 0..partitions, &BTreeMap::new())?
        .until_current_end(&BTreeMap::new())
        .await?;
    let mut consumed = 0_u64;
    while reader.next().await?.is_some() {
        consumed += 1;
    }
    let consume = Rate { what: "raw consume", count: consumed, elapsed: started.elapsed() };

    eprintln!("copying");
    let copy = copy_rows(&pool, &records).await?;

    eprintln!("projecting");
    let projector =
        Projector::new(config.projector.clone(), kafka_config.clone(), &config.schema_registry.url, pool.clone())?;
    let users = keel_projections::projection("users").context("the users projection exists")?;
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn({
        let (runner, shutdown) = (projector.runner(users, 1), shutdown.clone());
        async move { runner.run_live(&shutdown, None).await }
    });
    loop {
        let applied: i64 = sqlx::query_scalar(
            "SELECT COALESCE(sum(next_offset), 0)::bigint FROM projection_checkpoints WHERE projection = 'users'",
        )
        .fetch_one(&pool)
        .await?;
        if applied as u64 >= consumed {
            break;
        }
        if task.is_finished() {
            anyhow::bail!("the projection stopped before it caught up");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let projection = Rate { what: "users projection", count: events, elapsed: started.elapsed() };
    shutdown.cancel();
    task.await??;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM users").fetch_one(&pool).await?;
    anyhow::ensure!(rows as u64 == events, "the read model has {rows} rows, expected {events}");
    pool.close().await;
    Ok(vec![produce, consume, copy, projection])
}

fn check_delivery(delivered: rdkafka::producer::future_producer::OwnedDeliveryResult) -> anyhow::Result<()> {
    delivered.map(|_| ()).map_err(|(error, _)| anyhow::anyhow!("produce failed: {error}"))
}

/// `COPY` of the same rows the projection writes, into a table of the same shape.
async fn copy_rows(pool: &PgPool, records: &[(String, Vec<u8>, CommitHeader)]) -> anyhow::Result<Rate> {
    sqlx::query("CREATE TABLE users_copy (LIKE users_v1 INCLUDING ALL)").execute(pool).await?;
    let now = Utc::now().to_rfc3339();
    let mut text = String::with_capacity(records.len() * 120);
    for (index, (key, _, _)) in records.iter().enumerate() {
        text.push_str(&format!("{key}\tbench{index}@example.com\tBench user {index}\t1\t{now}\t{now}\n"));
    }
    let started = Instant::now();
    let mut connection = pool.acquire().await?;
    let mut copy = connection.copy_in_raw("COPY users_copy FROM STDIN").await?;
    copy.send(text.as_bytes()).await?;
    let rows = copy.finish().await?;
    Ok(Rate { what: "raw COPY into PostgreSQL", count: rows, elapsed: started.elapsed() })
}
