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
use keel_projections::Projector;
use keel_runtime::postgres;
use keel_topics::{Topic, reader::PartitionReader};
use sqlx::{Connection, PgConnection, PgPool, postgres::PgConnectOptions};
use tokio_util::sync::CancellationToken;

use super::{Commit, Rate, ScratchTopics};
use crate::config::KeelConfig;

pub(super) async fn run(config: &KeelConfig, events: u64) -> anyhow::Result<ExitCode> {
    let id = super::run_id();
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
        rate.print();
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
    let scratch = ScratchTopics::create(config, id).await?;
    let kafka_config = scratch.kafka.clone();
    let topic = scratch.names.name(Topic::IdentityUsers);

    // The records: encoded before timing, so the produce rate is the broker's.
    eprintln!("encoding {events} commits");
    let vault = keel_topics::Vault::new(pool.clone(), &config.personal_data)?;
    let records = super::encode_registrations(&scratch.codec, Some(&vault), 0..events, "bench", "bench").await?;

    eprintln!("producing");
    let producer = keel_topics::producer::Producer::commits(&kafka_config)?;
    let elapsed = super::produce(&producer, &topic, &records, super::RAW_MAX_IN_FLIGHT).await?;
    let produce = Rate { what: "raw produce (idempotent)".into(), count: events, elapsed };

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
    let consume = Rate { what: "raw consume".into(), count: consumed, elapsed: started.elapsed() };

    eprintln!("copying");
    let copy = copy_rows(&pool, &records).await?;

    eprintln!("projecting");
    let projector = Projector::new(
        config.projector.clone(),
        kafka_config.clone(),
        &config.schema_registry.url,
        pool.clone(),
        &config.personal_data,
        keel_runtime::notifications::Notifications::new(&[]),
    )?;
    let users = projector.projection("users").context("the users projection exists")?;
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn({
        let (runner, shutdown) = (std::sync::Arc::new(projector.runner(users, 1)), shutdown.clone());
        async move { projector.run_alone(vec![runner], &shutdown).await }
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
    let projection = Rate { what: "users projection".into(), count: events, elapsed: started.elapsed() };
    shutdown.cancel();
    task.await??;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM users").fetch_one(&pool).await?;
    anyhow::ensure!(rows as u64 == events, "the read model has {rows} rows, expected {events}");
    pool.close().await;
    Ok(vec![produce, consume, copy, projection])
}

/// `COPY` of the same rows the projection writes, into a table of the same shape.
async fn copy_rows(pool: &PgPool, records: &[Commit]) -> anyhow::Result<Rate> {
    sqlx::query("CREATE TABLE users_copy (LIKE users_v1 INCLUDING ALL)").execute(pool).await?;
    let now = Utc::now().to_rfc3339();
    let mut text = String::with_capacity(records.len() * 120);
    for (index, Commit { key, .. }) in records.iter().enumerate() {
        text.push_str(&format!("{key}\tbench{index}@example.com\tBench user {index}\t1\t{now}\t{now}\n"));
    }
    let started = Instant::now();
    let mut connection = pool.acquire().await?;
    let mut copy = connection.copy_in_raw("COPY users_copy FROM STDIN").await?;
    copy.send(text.as_bytes()).await?;
    let rows = copy.finish().await?;
    Ok(Rate { what: "raw COPY into PostgreSQL".into(), count: rows, elapsed: started.elapsed() })
}
