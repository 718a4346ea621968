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
use futures::StreamExt;
use keel_projections::Projector;
use keel_runtime::postgres;
use keel_topics::{Topic, reader::PartitionReader};
use sqlx::{Connection, PgConnection, PgPool, postgres::PgConnectOptions};
use tokio_util::sync::CancellationToken;

use super::{Rate, ScratchTopics};
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
    let figures = outcome?;
    println!("replay of {events} events (one registration per commit, personal data sealed)");
    for rate in
        [&figures.produce, &figures.consume, &figures.users, &figures.users_copy, &figures.audit, &figures.audit_copy]
    {
        rate.print();
    }
    let ratio = |a: &Rate, b: &Rate| a.per_second() / b.per_second();
    println!("  users rebuild / raw COPY     {:>8.2}", ratio(&figures.users, &figures.users_copy));
    println!("  audit rebuild / raw COPY     {:>8.2}", ratio(&figures.audit, &figures.audit_copy));
    println!("  users rebuild / raw consume  {:>8.2}", ratio(&figures.users, &figures.consume));
    Ok(ExitCode::SUCCESS)
}

/// The rates of one run.
struct Figures {
    produce: Rate,
    consume: Rate,
    users: Rate,
    users_copy: Rate,
    audit: Rate,
    audit_copy: Rate,
}

async fn replay(config: &KeelConfig, events: u64, id: &str, database: PgConnectOptions) -> anyhow::Result<Figures> {
    let pool = PgPool::connect_with(database).await.context("failed to connect to the bench database")?;
    crate::root::MIGRATOR.run(&pool).await?;
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
    anyhow::ensure!(consumed == events, "consumed {consumed} of {events} records");
    let consume = Rate { what: "raw consume".into(), count: consumed, elapsed: started.elapsed() };

    let projector = Projector::new(
        config.projector.clone(),
        kafka_config.clone(),
        &config.schema_registry.url,
        pool.clone(),
        keel_read_models::catalogue(keel_topics::Vault::new(pool.clone(), &config.personal_data)?),
        keel_runtime::notifications::Notifications::new(&[]),
    )?;
    eprintln!("rebuilding users");
    let users = rebuild(&projector, "users", events).await?;
    let users_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM users").fetch_one(&pool).await?;
    anyhow::ensure!(users_rows as u64 == events, "the users read model has {users_rows} rows, expected {events}");
    eprintln!("rebuilding the audit log");
    let audit = rebuild(&projector, "audit", events).await?;
    eprintln!("copying the same rows");
    let users_copy = copy_rows(&pool, "users", "raw COPY of the users rows").await?;
    let audit_copy = copy_rows(&pool, "audit_log", "raw COPY of the audit rows").await?;
    anyhow::ensure!(users_copy.count == events && audit_copy.count == events, "the read models hold other rows");
    pool.close().await;
    Ok(Figures { produce, consume, users, users_copy, audit, audit_copy })
}

/// Rebuilds `name` from the start of its topics (a new version, swapped in at the end), timed.
async fn rebuild(projector: &Projector, name: &str, events: u64) -> anyhow::Result<Rate> {
    let projection = projector.projection(name).with_context(|| format!("the {name} projection exists"))?;
    let (version, _) = keel_projections::rebuild::prepare(
        &projector.pool,
        &projector.kafka,
        &projector.names,
        projection.as_ref(),
        keel_projections::rebuild::StartFrom::Beginning,
    )
    .await?;
    let runner = std::sync::Arc::new(projector.runner(projection, version));
    let started = Instant::now();
    let outcome = keel_projections::rebuild::build(&runner, &CancellationToken::new(), Duration::ZERO, |_| {}).await?;
    let elapsed = started.elapsed();
    anyhow::ensure!(
        matches!(outcome, keel_projections::rebuild::Outcome::Swapped { .. }),
        "the {name} rebuild ended {outcome:?}"
    );
    Ok(Rate { what: format!("{name} rebuild"), count: events, elapsed })
}

/// `COPY` of the rows of the live version of `view` into a table of the same shape, timed: the
/// ceiling of any projection writing those rows.
async fn copy_rows(pool: &PgPool, view: &str, what: &str) -> anyhow::Result<Rate> {
    let mut connection = pool.acquire().await?;
    let table = format!("{view}_copy");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE TEMPORARY TABLE {table} AS SELECT * FROM {view} WITH NO DATA")))
        .execute(&mut *connection)
        .await?;
    let mut rows = Vec::new();
    {
        let mut out = connection.copy_out_raw(&format!("COPY (SELECT * FROM {view}) TO STDOUT")).await?;
        while let Some(chunk) = out.next().await {
            rows.extend_from_slice(&chunk?);
        }
    }
    let started = Instant::now();
    let mut copy = connection.copy_in_raw(&format!("COPY {table} FROM STDIN")).await?;
    copy.send(rows.as_slice()).await?;
    let count = copy.finish().await?;
    Ok(Rate { what: what.into(), count, elapsed: started.elapsed() })
}
