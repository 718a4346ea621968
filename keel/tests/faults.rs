//! Infrastructure faults under steady command load: the broker (on PostgreSQL storage) killed and
//! restarted twice, the database server stopped and started, Redis stopped and started, the
//! schema registry killed and restarted. Each test keeps a ledger of every acknowledged command
//! and then checks it against every reader: each acknowledged registration is in the log exactly
//! once, in the read model and the audit log exactly once, nothing was skipped or dead-lettered,
//! the audit chains verify, and every role is ready again without a restart by hand. Each test
//! stops only servers of its own.

mod support;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};
use support::{IDENTITY_ROLES, OwnPostgres, OwnRedis, PASSWORD, Platform, Role, Setup, TestDatabase, eventually};
use tokio::task::JoinHandle;

/// Registrations sent the way a careful client sends them: each with its idempotency key, sent
/// again with the same key while the outcome is unknown (503, 504, no answer). The ledger holds
/// every one acknowledged.
struct Load {
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Vec<String>>>,
    refusals: Arc<Mutex<Vec<String>>>,
    workers: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(gateway: &str, workers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ledger = Arc::new(Mutex::new(Vec::new()));
        let refusals = Arc::new(Mutex::new(Vec::new()));
        let run = uuid::Uuid::new_v4().simple().to_string();
        let workers = (0..workers)
            .map(|worker| {
                let (stop, ledger, refusals) = (stop.clone(), ledger.clone(), refusals.clone());
                let (url, run) = (format!("{gateway}/v1/users"), run.clone());
                tokio::spawn(async move {
                    let client = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
                    let mut index = 0;
                    while !stop.load(Ordering::Relaxed) {
                        index += 1;
                        let key = format!("{run}-{worker}-{index}");
                        let body = json!({"email": format!("{key}@example.com"), "display_name": "Ledger", "password": PASSWORD});
                        // Once sent, a command is followed to its answer, even past `stop`.
                        loop {
                            let sent = client.post(&url).header("idempotency-key", &key).json(&body).send().await;
                            match sent {
                                Ok(response) if response.status() == 201 => {
                                    let answer: Value = response.json().await.unwrap();
                                    ledger.lock().unwrap().push(answer["id"].as_str().unwrap().to_owned());
                                    break;
                                }
                                Ok(response) if !matches!(response.status().as_u16(), 503 | 504) => {
                                    let status = response.status();
                                    let text = response.text().await.unwrap_or_default();
                                    refusals.lock().unwrap().push(format!("{key}: {status} {text}"));
                                    break;
                                }
                                _ => tokio::time::sleep(Duration::from_millis(100)).await,
                            }
                        }
                    }
                })
            })
            .collect();
        Self { stop, ledger, refusals, workers }
    }

    fn acknowledged(&self) -> usize {
        self.ledger.lock().unwrap().len()
    }

    /// Waits until `count` more commands are acknowledged.
    async fn acknowledges(&self, count: usize, what: &str) {
        let target = self.acknowledged() + count;
        eventually(Duration::from_secs(120), what, || async { (self.acknowledged() >= target).then_some(()) }).await;
    }

    /// How long until the next command is acknowledged: the time to recover from a fault.
    async fn recovery(&self, fault: &str) -> Duration {
        let started = std::time::Instant::now();
        self.acknowledges(1, &format!("a command acknowledged after {fault}")).await;
        let took = started.elapsed();
        eprintln!("{fault}: next command acknowledged after {} ms", took.as_millis());
        took
    }

    /// Stops sending; every command sent is answered first. The ledger.
    async fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        for worker in self.workers {
            worker.await.unwrap();
        }
        let refusals = self.refusals.lock().unwrap().clone();
        assert!(refusals.is_empty(), "commands were refused: {refusals:#?}");
        self.ledger.lock().unwrap().clone()
    }
}

/// Every acknowledged registration, and nothing else, once in the log, the read model and the
/// audit log; nothing skipped or dead-lettered; the chains verify; every role ready.
async fn verify(platform: &Platform, ledger: &[String], roles: &[Role]) {
    let pool = platform.database.pool().await;
    let expected = ledger.len() as i64;
    assert_eq!(platform.broker.record_count("identity.users"), expected, "one commit per acknowledged command");
    eventually(Duration::from_secs(120), "every acknowledged registration projected and audited", || async {
        let projected: i64 = sqlx::query_scalar("SELECT count(*) FROM users WHERE id = ANY($1::uuid[])")
            .bind(ledger)
            .fetch_one(&pool)
            .await
            .unwrap_or(-1);
        let audited: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE event_type = 'UserRegistered'")
            .fetch_one(&pool)
            .await
            .unwrap_or(-1);
        (projected == expected && audited == expected).then_some(())
    })
    .await;
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users").fetch_one(&pool).await.unwrap();
    assert_eq!(users, expected, "no user the ledger does not have");
    let distinct: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT aggregate_id) FROM audit_log WHERE event_type = 'UserRegistered'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(distinct, expected, "each registration audited once");
    for projection in ["users", "audit"] {
        let skipped = format!(r#"keel_projection_skipped_total{{projection="{projection}",reason="invalid"}}"#);
        assert_eq!(platform.metric(Role::Projector, &skipped).await, Some(0.0), "{skipped}");
        let dead = format!(r#"keel_projection_dead_letters_total{{projection="{projection}"}}"#);
        assert_eq!(platform.metric(Role::Projector, &dead).await, Some(0.0), "{dead}");
    }
    assert_eq!(platform.keel_ok(&["projections", "dlq", "list"]).trim(), "", "no dead letter");
    let verified = platform.keel_ok(&["audit", "verify"]);
    assert!(verified.starts_with("audit log intact"), "{verified}");
    for role in roles {
        let url = format!("{}/readyz", platform.admin_url(*role));
        eventually(Duration::from_secs(60), &format!("{role:?} to be ready again"), || async {
            (reqwest::get(&url).await.ok()?.status() == 200).then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_broker_on_postgres_storage_killed_twice_under_load_loses_and_doubles_nothing() {
    // The broker stores in a database of the test's own on the machine's server, which stays up.
    let storage = TestDatabase::create().await;
    let setup = Setup { broker_storage: Some(format!("{}?sslmode=disable", storage.url)), ..Setup::default() };
    let mut platform = Platform::start_with(setup, IDENTITY_ROLES).await;
    let load = Load::start(&platform.gateway_url, 8);
    load.acknowledges(50, "the load to run").await;
    for round in 1..=2 {
        platform.broker.kill9_and_restart();
        load.recovery(&format!("broker kill -9 and restart {round}")).await;
        load.acknowledges(50, &format!("the load to go on after broker restart {round}")).await;
    }
    let ledger = load.finish().await;
    eprintln!("{} registrations acknowledged across two broker kills", ledger.len());
    verify(&platform, &ledger, IDENTITY_ROLES).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_database_server_stopped_under_load_loses_and_doubles_nothing() {
    let dir = support::test_dir();
    let postgres = OwnPostgres::start(&dir);
    let setup = Setup { dir: Some(dir), postgres_admin_url: Some(postgres.admin_url()), ..Setup::default() };
    let platform = Platform::start_with(setup, IDENTITY_ROLES).await;
    let load = Load::start(&platform.gateway_url, 8);
    load.acknowledges(50, "the load to run").await;
    postgres.stop_server();
    tokio::time::sleep(Duration::from_secs(3)).await;
    postgres.start_server();
    load.recovery("PostgreSQL stopped for 3 s and started").await;
    load.acknowledges(50, "the load to go on with the database back").await;
    let ledger = load.finish().await;
    eprintln!("{} registrations acknowledged across a database outage", ledger.len());
    verify(&platform, &ledger, IDENTITY_ROLES).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_stopped_under_load_falls_back_visibly_and_is_used_again() {
    let dir = support::test_dir();
    let mut redis = OwnRedis::start(&dir);
    let setup = Setup { dir: Some(dir), redis_url: Some(redis.url()), ..Setup::default() };
    let platform = Platform::start_with(setup, IDENTITY_ROLES).await;
    let gateway = platform.admin_url(Role::Gateway).to_owned();
    let prefix = platform.setting("KEEL_GATEWAY__RATE_LIMIT__KEY_PREFIX").unwrap().to_owned();
    let load = Load::start(&platform.gateway_url, 8);
    load.acknowledges(20, "the load to run").await;
    assert!(!redis.cli(&["--scan", "--pattern", &format!("{prefix}*")]).trim().is_empty(), "limits live in Redis");

    redis.stop_server();
    let readiness = |expected: &'static str| {
        let url = format!("{gateway}/readyz");
        async move {
            let response = reqwest::get(&url).await.ok()?;
            let ready = response.status() == 200;
            let report: Value = response.json().await.ok()?;
            (ready && report["checks"]["rate-limit-store"]["status"] == expected).then_some(())
        }
    };
    eventually(Duration::from_secs(20), "readiness to show the store degraded", || readiness("degraded")).await;
    load.acknowledges(20, "the load to go on without Redis").await;
    let fallbacks = platform.metric(Role::Gateway, "keel_rate_limit_fallbacks_total").await.unwrap_or(0.0);
    assert!(fallbacks > 0.0, "requests were limited in memory meanwhile, and counted");

    redis.start_server();
    load.recovery("Redis restarted").await;
    eventually(Duration::from_secs(30), "readiness to show the store up", || readiness("up")).await;
    load.acknowledges(20, "the load to go on with Redis back").await;
    assert!(
        !redis.cli(&["--scan", "--pattern", &format!("{prefix}*")]).trim().is_empty(),
        "the restarted (empty) Redis holds limits again"
    );
    let ledger = load.finish().await;
    eprintln!("{} registrations acknowledged across a Redis outage", ledger.len());
    verify(&platform, &ledger, IDENTITY_ROLES).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_schema_registry_killed_under_load_loses_and_doubles_nothing() {
    let mut platform = Platform::start_roles(IDENTITY_ROLES).await;
    let load = Load::start(&platform.gateway_url, 8);
    load.acknowledges(50, "the load to run").await;
    platform.kill9(Role::Registry);
    load.acknowledges(20, "the load to go on without the registry (schemas are cached)").await;
    platform.spawn(Role::Registry);
    platform.wait_ready(Role::Registry, Duration::from_secs(60)).await;
    load.recovery("schema registry kill -9 and restart").await;
    load.acknowledges(50, "the load to go on with the registry back").await;
    let ledger = load.finish().await;
    eprintln!("{} registrations acknowledged across a schema registry kill", ledger.len());
    verify(&platform, &ledger, IDENTITY_ROLES).await;
}
