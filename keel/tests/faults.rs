//! Infrastructure faults under steady command load: the broker (on PostgreSQL storage) killed and
//! restarted twice, the database server stopped and started, Redis stopped and started, the
//! schema registry killed and restarted. Each test keeps a ledger of every acknowledged command
//! and then checks it against every reader: each acknowledged registration is in the log exactly
//! once, in the read model and the audit log exactly once, nothing was skipped or dead-lettered,
//! the audit chains verify, and every role is ready again without a restart by hand. Each test
//! stops only servers of its own.

mod support;

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use keel_gateway::streams::sse::SseParser;
use serde_json::{Value, json};
use support::{
    ADMIN_EMAIL, IDENTITY_ROLES, OwnPostgres, OwnRedis, PASSWORD, Platform, Role, Setup, TestDatabase, eventually,
};
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

/// A live client of `/v1/streams/users` from its earliest event, as a browser's `EventSource`
/// is one: when the stream ends or breaks, it opens it again with the last event id it saw,
/// on the next gateway in turn, and logs in again when its token is refused. It keeps each
/// registration's user id in the order they came.
struct Follower {
    registrations: Arc<Mutex<Vec<String>>>,
    resumes: Arc<AtomicUsize>,
    /// Makes the follower drop its connection and resume, as a client whose network blinked.
    drop_connection: Arc<tokio::sync::Notify>,
    task: JoinHandle<()>,
    admin: String,
}

impl Follower {
    /// Signs the bootstrap admin up (the stream needs `streams:read:any`) and starts following.
    async fn start(platform: &Platform, gateways: &[&str]) -> Self {
        let admin = platform.admin(&reqwest::Client::new()).await.id;
        let registrations = Arc::new(Mutex::new(Vec::new()));
        let resumes = Arc::new(AtomicUsize::new(0));
        let gateways: Vec<String> = gateways.iter().map(|gateway| (*gateway).to_owned()).collect();
        let drop_connection = Arc::new(tokio::sync::Notify::new());
        let task =
            tokio::spawn(Self::follow(gateways, registrations.clone(), resumes.clone(), drop_connection.clone()));
        Self { registrations, resumes, drop_connection, task, admin }
    }

    /// Drops the stream's connection now: it resumes from its last id while the fault lasts.
    fn resume_now(&self) {
        self.drop_connection.notify_one();
    }

    async fn follow(
        gateways: Vec<String>,
        registrations: Arc<Mutex<Vec<String>>>,
        resumes: Arc<AtomicUsize>,
        drop_connection: Arc<tokio::sync::Notify>,
    ) {
        let client = reqwest::Client::builder().connect_timeout(Duration::from_secs(2)).build().unwrap();
        let (mut turn, mut token, mut last_id) = (0, None::<String>, None::<String>);
        loop {
            let gateway = &gateways[turn % gateways.len()];
            let Some(bearer) = token.clone() else {
                token = Self::login(&client, gateway).await;
                if token.is_none() {
                    turn += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                continue;
            };
            let mut request = client.get(format!("{gateway}/v1/streams/users?from=earliest")).bearer_auth(bearer);
            if let Some(id) = &last_id {
                request = request.header("last-event-id", id);
            }
            match request.send().await {
                Ok(response) if response.status() == 200 => {
                    let mut parser = SseParser::resuming(last_id.clone());
                    let mut body = response.bytes_stream();
                    loop {
                        let chunk = tokio::select! {
                            chunk = body.next() => chunk,
                            () = drop_connection.notified() => None,
                        };
                        let Some(Ok(chunk)) = chunk else { break };
                        for event in parser.push(&chunk) {
                            let Ok(data) = serde_json::from_str::<Value>(&event.data) else { continue };
                            if event.event == "message" && data["event_type"] == "UserRegistered" {
                                let user = data["aggregate_id"].as_str().unwrap().to_owned();
                                registrations.lock().unwrap().push(user);
                            }
                        }
                        last_id.clone_from(&parser.last_id);
                    }
                    resumes.fetch_add(1, Ordering::Relaxed);
                }
                Ok(response) if response.status() == 401 => token = None,
                // The gateway is down or not ready: the next one, a moment later.
                Ok(_) | Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
            turn += 1;
        }
    }

    async fn login(client: &reqwest::Client, gateway: &str) -> Option<String> {
        let body = json!({"email": ADMIN_EMAIL, "password": PASSWORD});
        let response = client.post(format!("{gateway}/v1/auth/login")).json(&body).send().await.ok()?;
        let session: Value = response.error_for_status().ok()?.json().await.ok()?;
        Some(session["access_token"].as_str()?.to_owned())
    }

    /// Every registration in `ledger` and the admin's came, each once, and nothing else.
    async fn verify(self, ledger: &[String]) {
        let mut expected: HashSet<String> = ledger.iter().cloned().collect();
        expected.insert(self.admin.clone());
        eventually(Duration::from_secs(120), "the stream to deliver every acknowledged registration", || async {
            let seen: HashSet<String> = self.registrations.lock().unwrap().iter().cloned().collect();
            expected.is_subset(&seen).then_some(())
        })
        .await;
        self.task.abort();
        let registrations = self.registrations.lock().unwrap().clone();
        let distinct: HashSet<String> = registrations.iter().cloned().collect();
        assert_eq!(registrations.len(), distinct.len(), "the stream repeated a registration across its resumes");
        assert_eq!(distinct, expected, "the stream delivered exactly the acknowledged registrations");
        let resumes = self.resumes.load(Ordering::Relaxed);
        assert!(resumes >= 1, "the stream was resumed from its last id during the fault");
        eprintln!("the stream delivered {} registrations, resumed {resumes} times", distinct.len());
    }
}

/// Every acknowledged registration (and the admin's), and nothing else, once in the log, the read
/// model, the audit log and the live stream; nothing skipped or dead-lettered; the chains
/// verify; every role ready.
async fn verify(platform: &Platform, ledger: &[String], roles: &[Role], follower: Follower) {
    let pool = platform.database.pool().await;
    let acknowledged = ledger.len() as i64;
    // The bootstrap admin the stream's follower signed up.
    let expected = acknowledged + 1;
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
        (projected == acknowledged && audited == expected).then_some(())
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
    platform.assert_nothing_skipped_or_dead_lettered().await;
    let verified = platform.keel_ok(&["audit", "verify"]);
    assert!(verified.starts_with("audit log intact"), "{verified}");
    follower.verify(ledger).await;
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
    let follower = Follower::start(&platform, &[&platform.gateway_url]).await;
    let load = Load::start(&platform.gateway_url, 8);
    load.acknowledges(50, "the load to run").await;
    for round in 1..=2 {
        platform.broker.kill9_and_restart();
        follower.resume_now();
        load.recovery(&format!("broker kill -9 and restart {round}")).await;
        load.acknowledges(50, &format!("the load to go on after broker restart {round}")).await;
    }
    let ledger = load.finish().await;
    eprintln!("{} registrations acknowledged across two broker kills", ledger.len());
    verify(&platform, &ledger, IDENTITY_ROLES, follower).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_database_server_stopped_under_load_loses_and_doubles_nothing() {
    let dir = support::test_dir();
    let postgres = OwnPostgres::start(&dir);
    let setup = Setup { dir: Some(dir), postgres_admin_url: Some(postgres.admin_url()), ..Setup::default() };
    let platform = Platform::start_with(setup, IDENTITY_ROLES).await;
    let follower = Follower::start(&platform, &[&platform.gateway_url]).await;
    let load = Load::start(&platform.gateway_url, 8);
    load.acknowledges(50, "the load to run").await;
    postgres.stop_server();
    // Up again once the outage is seen: the gateway reports its database down.
    let readiness = format!("{}/readyz", platform.admin_url(Role::Gateway));
    eventually(Duration::from_secs(30), "the gateway to report the database down", || async {
        let report: Value = reqwest::get(&readiness).await.ok()?.json().await.ok()?;
        (report["checks"]["database"]["status"] == "down").then_some(())
    })
    .await;
    // The stream resumes while the database is down.
    follower.resume_now();
    postgres.start_server();
    load.recovery("PostgreSQL stopped until the gateway saw it, then started").await;
    load.acknowledges(50, "the load to go on with the database back").await;
    let ledger = load.finish().await;
    eprintln!("{} registrations acknowledged across a database outage", ledger.len());
    verify(&platform, &ledger, IDENTITY_ROLES, follower).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_stopped_under_load_falls_back_visibly_and_is_used_again() {
    let dir = support::test_dir();
    let mut redis = OwnRedis::start(&dir);
    let setup = Setup { dir: Some(dir), redis_url: Some(redis.url()), ..Setup::default() };
    let platform = Platform::start_with(setup, IDENTITY_ROLES).await;
    let gateway = platform.admin_url(Role::Gateway).to_owned();
    let prefix = platform.setting("KEEL_GATEWAY__RATE_LIMIT__KEY_PREFIX").unwrap().to_owned();
    let follower = Follower::start(&platform, &[&platform.gateway_url]).await;
    let load = Load::start(&platform.gateway_url, 8);
    load.acknowledges(20, "the load to run").await;
    assert!(!redis.cli(&["--scan", "--pattern", &format!("{prefix}*")]).trim().is_empty(), "limits live in Redis");

    redis.stop_server();
    follower.resume_now();
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
    verify(&platform, &ledger, IDENTITY_ROLES, follower).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_schema_registry_killed_under_load_loses_and_doubles_nothing() {
    let mut platform = Platform::start_roles(IDENTITY_ROLES).await;
    let follower = Follower::start(&platform, &[&platform.gateway_url]).await;
    let load = Load::start(&platform.gateway_url, 8);
    load.acknowledges(50, "the load to run").await;
    platform.kill9(Role::Registry);
    follower.resume_now();
    load.acknowledges(20, "the load to go on without the registry (schemas are cached)").await;
    platform.spawn(Role::Registry);
    platform.wait_ready(Role::Registry, Duration::from_secs(60)).await;
    load.recovery("schema registry kill -9 and restart").await;
    load.acknowledges(50, "the load to go on with the registry back").await;
    let ledger = load.finish().await;
    eprintln!("{} registrations acknowledged across a schema registry kill", ledger.len());
    verify(&platform, &ledger, IDENTITY_ROLES, follower).await;
}

/// Records no version of Keel wrote, produced into every topic while everything runs: bytes
/// without a commit envelope, an envelope over an unknown schema id, and an envelope over a
/// registered schema that is not the topic's. Every reader skips them alike (the projections
/// dead-letter them), no writer stops serving, and live streams go on.
#[tokio::test(flavor = "multi_thread")]
async fn poison_records_in_every_topic_stop_no_reader_and_are_dead_lettered() {
    use rdkafka::{
        ClientConfig,
        producer::{FutureProducer, FutureRecord},
    };

    let mut roles = IDENTITY_ROLES.to_vec();
    roles.push(Role::Blog);
    let platform = Platform::start_roles(&roles).await;
    // The gateway's stream hub reads the users topic live, through the poison.
    let follower = Follower::start(&platform, &[&platform.gateway_url]).await;
    let load = Load::start(&platform.gateway_url, 4);
    load.acknowledges(20, "the load to run").await;

    // A schema the registry knows, which no topic uses.
    let registry = platform.setting("KEEL_SCHEMA_REGISTRY__URL").unwrap().to_owned();
    let schema = json!({"type": "record", "name": "Nobody", "namespace": "keel.poison", "fields": [{"name": "x", "type": "string"}]});
    let registered: Value = reqwest::Client::new()
        .post(format!("{registry}/subjects/keel-poison-value/versions"))
        .header("content-type", "application/vnd.schemaregistry.v1+json")
        .json(&json!({"schema": schema.to_string()}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let foreign_id = registered["id"].as_u64().expect("the registry gave the schema an id") as u32;

    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", &platform.broker.bootstrap).create().unwrap();
    let framed = |schema_id: u32, body: &[u8]| {
        let mut bytes = vec![0_u8];
        bytes.extend_from_slice(&schema_id.to_be_bytes());
        bytes.extend_from_slice(body);
        bytes
    };
    let mut poison = Vec::new();
    for topic in keel_topics::Topic::ALL {
        let name = topic.spec().base_name;
        let envelope = || {
            keel_topics::CommitHeader {
                command_id: uuid::Uuid::new_v4(),
                aggregate_id: uuid::Uuid::new_v4(),
                expected_version: 0,
                occurred_at: chrono::Utc::now(),
                actor: "poison".into(),
                correlation_id: uuid::Uuid::new_v4(),
                causation_id: None,
                traceparent: None,
                sealed: false,
                events: vec![keel_topics::EventMeta {
                    event_id: uuid::Uuid::new_v4(),
                    event_type: "Nobody".into(),
                    schema_version: 1,
                }],
            }
            .to_headers()
        };
        // "boo" as Avro: its length (3, zigzag: 6), then the bytes.
        let kinds: [(Vec<u8>, Option<rdkafka::message::OwnedHeaders>); 3] = [
            (b"\x00not a record of Keel's".to_vec(), None),
            (framed(999_999, b"\x06boo"), Some(envelope())),
            (framed(foreign_id, b"\x06boo"), Some(envelope())),
        ];
        for (index, (payload, headers)) in kinds.into_iter().enumerate() {
            let key = format!("poison-{index}");
            let mut record = FutureRecord::to(name).key(&key).payload(&payload).partition(index as i32);
            if let Some(headers) = headers {
                record = record.headers(headers);
            }
            let delivered = producer.send(record, Duration::from_secs(10)).await.map_err(|(error, _)| error).unwrap();
            poison.push((name.to_owned(), delivered.partition, delivered.offset));
        }
    }

    // The stream resumes from its last id, past the poison.
    follower.resume_now();
    // Writers keep serving every partition, the poisoned ones included.
    load.acknowledges(50, "the load to go on past the poison").await;
    // Every projection that reads a topic dead-letters its poison records, and nothing else.
    let pool = platform.database.pool().await;
    let audited = keel_topics::Topic::ALL.len() * 3;
    eventually(Duration::from_secs(60), "the audit projection to dead-letter every poison record", || async {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM projection_dead_letters WHERE projection = 'audit'")
            .fetch_one(&pool)
            .await
            .unwrap();
        (count == audited as i64).then_some(())
    })
    .await;
    let dead: Vec<(String, i32, i64)> =
        sqlx::query_as("SELECT topic, partition, \"offset\" FROM projection_dead_letters")
            .fetch_all(&pool)
            .await
            .unwrap();
    for letter in &dead {
        assert!(poison.contains(letter), "only poison is dead-lettered: {letter:?}");
    }
    let ledger = load.finish().await;
    // The same checks as the other faults, with the poison expected in the dead letters (and the
    // admin's registration besides the ledger's).
    let expected = ledger.len() as i64 + 1;
    assert_eq!(platform.broker.record_count("identity.users"), expected + 3, "the commits and the poison");
    eventually(Duration::from_secs(60), "every acknowledged registration projected and audited", || async {
        let projected: i64 = sqlx::query_scalar("SELECT count(*) FROM users").fetch_one(&pool).await.unwrap();
        let audited: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE event_type = 'UserRegistered'")
            .fetch_one(&pool)
            .await
            .unwrap();
        (projected == expected && audited == expected).then_some(())
    })
    .await;
    let verified = platform.keel_ok(&["audit", "verify"]);
    assert!(verified.starts_with("audit log intact"), "{verified}");
    follower.verify(&ledger).await;
    for role in &roles {
        let url = format!("{}/readyz", platform.admin_url(*role));
        assert_eq!(reqwest::get(&url).await.unwrap().status(), 200, "{role:?} is ready");
    }
}

/// A rebuild of the users projection while the load runs, with the projector, a writer and a
/// gateway each killed while it runs: the rebuild still swaps in, and the new version holds
/// exactly what the live one does.
#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_survives_the_projector_a_writer_and_a_gateway_killed_under_it() {
    let mut roles = IDENTITY_ROLES.to_vec();
    roles.push(Role::SecondGateway);
    let mut platform = Platform::start_roles(&roles).await;
    // Killed with the first gateway, the stream resumes on the second.
    let gateways = [platform.gateway_url.clone(), platform.admin_url(Role::SecondGateway).to_owned()];
    let follower = Follower::start(&platform, &[&gateways[0], &gateways[1]]).await;
    let load = Load::start(&platform.gateway_url, 8);
    load.acknowledges(300, "a history to rebuild").await;

    let mut rebuild =
        platform.keel(&["projections", "rebuild", "users"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let killed = [Role::Projector, Role::Identity, Role::Gateway];
    for role in killed {
        assert!(rebuild.try_wait().unwrap().is_none(), "{role:?} is killed while the rebuild runs");
        platform.kill9(role);
    }
    for role in killed {
        platform.spawn(role);
    }
    for role in killed {
        platform.wait_ready(role, Duration::from_secs(90)).await;
    }
    let finished = tokio::task::spawn_blocking(move || rebuild.wait_with_output().unwrap()).await.unwrap();
    let output = String::from_utf8_lossy(&finished.stdout);
    assert!(finished.status.success() && output.contains("version 2 is live"), "{output}");
    load.acknowledges(20, "the load to go on after the rebuild").await;
    let ledger = load.finish().await;
    eprintln!("{} registrations acknowledged across a rebuild with three kills", ledger.len());
    verify(&platform, &ledger, &roles, follower).await;
    let pool = platform.database.pool().await;
    assert_eq!(
        support::users_checksum(&pool, "users_v2").await,
        support::users_checksum(&pool, "users").await,
        "the live view is version 2"
    );
}
