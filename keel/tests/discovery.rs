//! Service discovery under steady load, on a real etcd: instances join and take traffic, die and
//! are dropped, restart one at a time, and the registry itself goes away — and no request fails.
//! Health tells the truth when a role's own PostgreSQL server stops.

mod support;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use support::{ALL_ROLES, Account, Etcd, IDENTITY_ROLES, OwnPostgres, PASSWORD, Platform, Role, Setup, eventually};
use tokio::task::JoinHandle;

/// Steady load through the gateway, each answer recorded: registrations (identity, and auth for
/// the password) and drafts (blog, after authz's permission check).
struct Load {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    workers: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(gateway: &str, author: &Account, workers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let workers = (0..workers)
            .map(|worker| {
                let (stop, served, failures) = (stop.clone(), served.clone(), failures.clone());
                let (gateway, token) = (gateway.to_owned(), author.access_token.clone());
                tokio::spawn(async move {
                    let client = reqwest::Client::new();
                    let mut round = 0_u64;
                    while !stop.load(Ordering::Relaxed) {
                        round += 1;
                        let (what, request) = if (round + worker as u64).is_multiple_of(2) {
                            let email = format!("load-{}@example.com", uuid::Uuid::new_v4().simple());
                            let body = json!({"email": email, "display_name": "Load", "password": PASSWORD});
                            ("registration", client.post(format!("{gateway}/v1/users")).json(&body))
                        } else {
                            let body = json!({"title": "Under load", "body": "Still serving."});
                            ("draft", client.post(format!("{gateway}/v1/posts")).bearer_auth(&token).json(&body))
                        };
                        match request.send().await {
                            Ok(response) if response.status() == 201 => {
                                served.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(response) => {
                                let status = response.status();
                                let body = response.text().await.unwrap_or_default();
                                failures.lock().unwrap().push(format!("{what}: {status} {body}"));
                            }
                            Err(error) => failures.lock().unwrap().push(format!("{what}: {error}")),
                        }
                    }
                })
            })
            .collect();
        Self { stop, served, failures, workers }
    }

    /// Waits until `count` more requests have been answered with success.
    async fn serves(&self, count: u64, what: &str) {
        let target = self.served.load(Ordering::Relaxed) + count;
        eventually(Duration::from_secs(60), what, || async {
            (self.served.load(Ordering::Relaxed) >= target).then_some(())
        })
        .await;
    }

    /// Stops the load; how many requests succeeded, and every failure.
    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for worker in self.workers {
            worker.await.unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.served.load(Ordering::Relaxed), failures)
    }
}

/// The gRPC calls an instance has served (health checks and reflection not counted).
async fn calls_served(platform: &Platform, role: Role) -> f64 {
    let text = reqwest::get(format!("{}/metrics", platform.admin_url(role))).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|line| line.starts_with("keel_grpc_requests_total{") && line.contains(r#"kind="call""#))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The gRPC endpoints the registry lists for `service` (`keel instances`).
fn listed(platform: &Platform, service: &str) -> Vec<String> {
    let output = platform.keel_ok(&["instances", service]);
    let mut lines = output.lines();
    assert_eq!(lines.next(), Some("etcd registry"), "{output}");
    lines.filter_map(|line| line.split('\t').find_map(|field| field.strip_prefix("grpc ")).map(str::to_owned)).collect()
}

fn grpc_url(platform: &Platform, role: Role) -> String {
    format!("http://{}", platform.grpc_address(role))
}

async fn readiness(url: &str) -> (u16, Value) {
    let response = reqwest::get(format!("{url}/readyz")).await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_third_instance_takes_traffic_and_a_killed_one_is_dropped_without_a_failed_request() {
    let mut platform = Platform::start().await;
    let client = reqwest::Client::new();
    let author = platform.signup(&client, "author@example.com", "Author").await;
    assert_eq!(listed(&platform, "identity").len(), 2, "both instances registered themselves once ready");
    let load = Load::start(&platform.gateway_url, &author, 4);
    load.serves(20, "the load to run").await;

    // A third instance joins: no one is restarted or reconfigured, and it serves calls (direct
    // from the gateway, or forwarded) within seconds of being ready.
    platform.spawn(Role::ThirdIdentity);
    platform.wait_ready(Role::ThirdIdentity, Duration::from_secs(90)).await;
    let third = grpc_url(&platform, Role::ThirdIdentity);
    eventually(Duration::from_secs(5), "the registry to list the third instance", || async {
        listed(&platform, "identity").contains(&third).then_some(())
    })
    .await;
    eventually(Duration::from_secs(15), "the third instance to serve calls", || async {
        (calls_served(&platform, Role::ThirdIdentity).await > 0.0).then_some(())
    })
    .await;
    load.serves(20, "the load to go on with three instances").await;

    // Killed outright: it cannot deregister, so the registry drops it when its lease expires;
    // meanwhile the gateway retries calls that met it on the other two.
    platform.kill9(Role::ThirdIdentity);
    let killed = Instant::now();
    load.serves(20, "the load to go on after the kill").await;
    eventually(Duration::from_secs(20), "the registry to drop the killed instance", || async {
        (!listed(&platform, "identity").contains(&third)).then_some(())
    })
    .await;
    let dropped_after = killed.elapsed();
    load.serves(20, "the load to go on with two instances").await;
    let (served, failures) = load.finish().await;
    assert!(failures.is_empty(), "{} of {served} requests failed: {failures:#?}", failures.len());
    assert_eq!(listed(&platform, "identity").len(), 2);
    let third_log = std::fs::read_to_string(platform.dir.join("thirdidentity.log")).unwrap();
    assert!(third_log.contains("registered"), "{third_log}");
    assert!(!third_log.contains("deregistered"), "a killed instance never deregisters; its lease expires");
    assert!(dropped_after < Duration::from_secs(15), "dropped with its lease (5 s TTL): {dropped_after:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_restart_of_every_command_service_fails_no_request() {
    let roles: Vec<Role> =
        ALL_ROLES.iter().copied().chain([Role::SecondAuth, Role::SecondAuthz, Role::SecondBlog]).collect();
    let mut platform = Platform::start_roles(&roles).await;
    let client = reqwest::Client::new();
    let author = platform.signup(&client, "author@example.com", "Author").await;
    let load = Load::start(&platform.gateway_url, &author, 4);
    load.serves(20, "the load to run").await;

    let instances = [
        Role::Identity,
        Role::SecondIdentity,
        Role::Auth,
        Role::SecondAuth,
        Role::Authz,
        Role::SecondAuthz,
        Role::Blog,
        Role::SecondBlog,
    ];
    for role in instances {
        let service = role_service(role);
        let endpoint = grpc_url(&platform, role);
        let status = platform.terminate(role, Duration::from_secs(30));
        assert!(status.success(), "{role:?} exits 0 after draining: {status}");
        let log = platform.log_tail(role);
        assert_phases_in_order(&log, role);
        assert!(!listed(&platform, service).contains(&endpoint), "{role:?} deregistered before it exited");
        platform.spawn(role);
        platform.wait_ready(role, Duration::from_secs(90)).await;
        eventually(Duration::from_secs(5), "the restarted instance to be listed again", || async {
            listed(&platform, service).contains(&endpoint).then_some(())
        })
        .await;
        load.serves(10, &format!("the load to go on after restarting {role:?}")).await;
    }
    let (served, failures) = load.finish().await;
    assert!(failures.is_empty(), "{} of {served} requests failed: {failures:#?}", failures.len());
}

fn role_service(role: Role) -> &'static str {
    match role {
        Role::Identity | Role::SecondIdentity | Role::ThirdIdentity => "identity",
        Role::Auth | Role::SecondAuth => "auth",
        Role::Authz | Role::SecondAuthz => "authz",
        Role::Blog | Role::SecondBlog => "blog",
        other => panic!("{other:?} is not a command service"),
    }
}

/// The stopping role's log shows the seed's order: not ready, deregistered, then each phase.
fn assert_phases_in_order(log: &str, role: Role) {
    let entries: Vec<Value> = log.lines().filter_map(|line| serde_json::from_str(line).ok()).collect();
    let position = |what: &dyn Fn(&Value) -> bool| entries.iter().rposition(what);
    let not_ready = position(&|entry| entry["message"] == "shutting down: not ready");
    let deregistered = position(&|entry| entry["message"] == "deregistered");
    let phase = |name: &'static str| {
        position(&|entry: &Value| entry["message"] == "shutdown phase done" && entry["phase"] == name)
    };
    let order = [not_ready, deregistered, phase("deregister"), phase("http"), phase("grpc"), phase("workers")];
    assert!(order.iter().all(Option::is_some), "{role:?}: every step is logged: {order:?}\n{log}");
    assert!(order.windows(2).all(|pair| pair[0] < pair[1]), "{role:?}: in the seed's order: {order:?}\n{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn traffic_goes_on_while_the_registry_is_down_and_every_role_registers_again() {
    let dir = support::test_dir();
    let mut etcd = Etcd::start(&dir);
    let setup = Setup { dir: Some(dir), etcd_url: Some(etcd.url()), ..Setup::default() };
    let mut roles = IDENTITY_ROLES.to_vec();
    roles.push(Role::Blog);
    let mut platform = Platform::start_with(setup, &roles).await;
    let client = reqwest::Client::new();
    let author = platform.signup(&client, "author@example.com", "Author").await;
    let load = Load::start(&platform.gateway_url, &author, 4);
    load.serves(20, "the load to run").await;

    etcd.kill9();
    // Readiness says the registry is degraded, and stays 200: the last known instances serve.
    for role in [Role::Gateway, Role::Identity] {
        let url = platform.admin_url(role).to_owned();
        eventually(Duration::from_secs(15), "readiness to report discovery degraded", || async {
            let (status, report) = readiness(&url).await;
            (status == 200 && report["checks"]["discovery"]["status"] == "degraded").then_some(())
        })
        .await;
    }
    load.serves(40, "the load to go on without the registry").await;

    // Back with none of its state: every instance registers again and callers find them.
    etcd.restart(true);
    eventually(Duration::from_secs(20), "every instance to register again", || async {
        let identity = listed(&platform, "identity").len();
        let auth = listed(&platform, "auth").len();
        let gateway = platform.keel_ok(&["instances", "gateway"]).lines().count() - 1;
        (identity == 2 && auth == 1 && gateway == 1).then_some(())
    })
    .await;
    for role in [Role::Gateway, Role::Identity] {
        let url = platform.admin_url(role).to_owned();
        eventually(Duration::from_secs(15), "readiness to report discovery up again", || async {
            let (status, report) = readiness(&url).await;
            (status == 200 && report["checks"]["discovery"]["status"] == "up").then_some(())
        })
        .await;
    }
    load.serves(20, "the load to go on with the registry back").await;
    let (served, failures) = load.finish().await;
    assert!(failures.is_empty(), "{} of {served} requests failed: {failures:#?}", failures.len());
    for role in roles {
        assert!(platform.is_running(role), "{role:?} kept running through the outage");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_names_the_database_while_its_server_is_down_and_recovers_without_a_restart() {
    let dir = support::test_dir();
    let postgres = OwnPostgres::start(&dir);
    let setup = Setup { dir: Some(dir), postgres_admin_url: Some(postgres.admin_url()), ..Setup::default() };
    let roles = [Role::Registry, Role::Identity, Role::Auth, Role::Projector, Role::Gateway];
    let mut platform = Platform::start_with(setup, &roles).await;

    postgres.stop_server();
    for role in roles {
        let url = platform.admin_url(role).to_owned();
        eventually(Duration::from_secs(15), "readiness to name the database", || async {
            let (status, report) = readiness(&url).await;
            let database = report["checks"]["database"]["status"].as_str().map(str::to_owned);
            (status == 503 && database.as_deref() == Some("down")).then_some(())
        })
        .await;
    }

    postgres.start_server();
    for role in roles {
        let url = platform.admin_url(role).to_owned();
        eventually(Duration::from_secs(30), "readiness to recover", || async {
            let (status, report) = readiness(&url).await;
            (status == 200 && report["checks"]["database"]["status"] == "up").then_some(())
        })
        .await;
        assert!(platform.is_running(role), "{role:?} recovered without a restart");
    }
    // And it serves again.
    let client = reqwest::Client::new();
    platform.signup(&client, "after@example.com", "After").await;
}
