//! The write path on real servers, with two identity instances splitting the partitions:
//! optimistic concurrency, idempotent retries, a killed owner, a zombie writer, and restarts
//! from snapshots.

mod support;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{IDENTITY_ROLES, PASSWORD, Platform, Role, count, eventually};

const USERS_TOPIC: &str = "identity.users";

/// A command route's answer: status, body and the headers the tests look at.
struct Answer {
    status: StatusCode,
    body: Value,
    etag: Option<String>,
    replayed: bool,
}

async fn send(request: reqwest::RequestBuilder) -> Result<Answer, reqwest::Error> {
    let response = request.send().await?;
    let status = response.status();
    let header = |name: &str| response.headers().get(name).map(|value| value.to_str().unwrap().to_owned());
    let etag = header("etag");
    let replayed = header("idempotent-replayed").as_deref() == Some("true");
    let body = response.json().await.unwrap_or(Value::Null);
    Ok(Answer { status, body, etag, replayed })
}

/// A registration's body.
fn registration(email: &str, display_name: &str) -> Value {
    json!({"email": email, "display_name": display_name, "password": PASSWORD})
}

/// A display name change of user `id`, sent with `token` (the user's, or an admin's).
fn patch(
    client: &reqwest::Client,
    gateway: &str,
    token: &str,
    id: &str,
    if_match: Option<u64>,
    name: &str,
) -> reqwest::RequestBuilder {
    let request =
        client.patch(format!("{gateway}/v1/users/{id}")).bearer_auth(token).json(&json!({"display_name": name}));
    match if_match {
        Some(version) => request.header("if-match", format!("\"{version}\"")),
        None => request,
    }
}

/// Sends a command the way a careful client does: with an idempotency key, retried with the
/// same key while the outcome is unknown (503, 504 or no answer at all).
async fn until_answered(request: impl Fn() -> reqwest::RequestBuilder, key: &str) -> Answer {
    for _ in 0..600 {
        match send(request().header("idempotency-key", key)).await {
            Ok(answer) if !matches!(answer.status.as_u16(), 503 | 504) => return answer,
            Ok(_) | Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    panic!("command {key} still unanswered after 600 attempts");
}

async fn forwarded(platform: &Platform) -> f64 {
    let mut total = 0.0;
    for role in [Role::Identity, Role::SecondIdentity] {
        total += platform.metric(role, "keel_commands_forwarded_total{service=\"identity\"}").await.unwrap_or(0.0);
    }
    total
}

/// A gateway that sends each command to any instance in turn, not to its partition's owner.
const FORWARD_EVERYTHING: &[(&str, &str)] = &[("KEEL_GATEWAY__ROUTE_COMMANDS_TO_OWNERS", "false")];

#[tokio::test(flavor = "multi_thread")]
async fn of_200_concurrent_patches_with_one_if_match_exactly_one_wins() {
    // Commands go to either instance, so that the race crosses the forwarding hop.
    let platform = Platform::start_roles_with(IDENTITY_ROLES, Role::Gateway, FORWARD_EVERYTHING).await;
    let client = reqwest::Client::new();
    let gateway = platform.gateway_url.clone();
    let ada = platform.signup(&client, "ada@example.com", "Ada").await;
    let (id, token) = (ada.id.clone(), ada.access_token.clone());
    let etag = eventually(Duration::from_secs(20), "the user in the read model", || async {
        let response = client.get(format!("{gateway}/v1/users/{id}")).bearer_auth(&token).send().await.unwrap();
        (response.status() == StatusCode::OK).then(|| response.headers()["etag"].to_str().unwrap().to_owned())
    })
    .await;
    assert_eq!(etag, "\"1\"");

    let answers = join_all((0..200).map(|attempt| {
        let name = format!("Ada #{attempt}");
        let request = patch(&client, &gateway, &token, &id, Some(1), &name);
        async move { (name, send(request).await.unwrap()) }
    }))
    .await;
    let winners: Vec<&(String, Answer)> =
        answers.iter().filter(|(_, answer)| answer.status == StatusCode::OK).collect();
    assert_eq!(winners.len(), 1, "exactly one command decided against version 1 succeeds");
    let (winner, answer) = winners[0];
    assert_eq!(answer.body["version"], 2);
    assert_eq!(answer.etag.as_deref(), Some("\"2\""));
    for (_, answer) in answers.iter().filter(|(_, answer)| answer.status != StatusCode::OK) {
        assert_eq!(answer.status, StatusCode::CONFLICT, "{}", answer.body);
        assert_eq!(answer.body["type"], "urn:keel:problem:version-conflict");
        assert_eq!(answer.body["current_version"], 2);
    }
    assert!(forwarded(&platform).await > 0.0, "commands reached the non-owner and were forwarded");

    // Every reader ends in the same state: the read model, the audit log, the command state.
    let pool = platform.database.pool().await;
    eventually(Duration::from_secs(20), "the winner in the read model", || async {
        let user: Value = client
            .get(format!("{gateway}/v1/users/{id}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (user["version"] == 2).then_some(()).inspect(|()| assert_eq!(user["display_name"], winner.as_str()))
    })
    .await;
    let audited: Vec<(String, i64)> = sqlx::query_as(
        "SELECT event_type, aggregate_version FROM audit_log WHERE aggregate_id = $1::uuid AND topic = 'identity.users'
         ORDER BY aggregate_version",
    )
    .bind(&id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(audited, [("UserRegistered".to_owned(), 1), ("UserDisplayNameChanged".to_owned(), 2)]);
    assert_eq!(platform.broker.record_count(USERS_TOPIC), 2, "refused commands append nothing");
    for _ in 0..2 {
        let stale = send(patch(&client, &gateway, &token, &id, Some(1), "Late")).await.unwrap();
        assert_eq!(stale.status, StatusCode::CONFLICT);
        assert_eq!(stale.etag.as_deref(), Some("\"2\""));
    }
    let next = send(patch(&client, &gateway, &token, &id, Some(2), "Ada Lovelace")).await.unwrap();
    assert_eq!((next.status, next.body["version"].clone()), (StatusCode::OK, json!(3)));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_command_returns_its_first_result_and_appends_once() {
    let platform = Platform::start_roles(IDENTITY_ROLES).await;
    let client = reqwest::Client::new();
    let gateway = platform.gateway_url.clone();
    let register = || client.post(format!("{gateway}/v1/users")).json(&registration("bo@example.com", "Bo"));
    let first = send(register().header("idempotency-key", "register-bo")).await.unwrap();
    let again = send(register().header("idempotency-key", "register-bo")).await.unwrap();
    assert_eq!((first.status, again.status), (StatusCode::CREATED, StatusCode::CREATED));
    assert_eq!(first.body, again.body, "the retry gets the first result");
    assert!(!first.replayed && again.replayed);
    let id = first.body["id"].as_str().unwrap().to_owned();
    let registered = format!(
        "{}/{}/{}",
        first.body["position"]["topic"].as_str().unwrap(),
        first.body["position"]["partition"],
        first.body["position"]["offset"]
    );
    let token = platform.login(&client, "bo@example.com", Some(&registered)).await.access_token;

    let rename = || patch(&client, &gateway, &token, &id, None, "Bo B.").header("idempotency-key", "rename-bo");
    let first = send(rename()).await.unwrap();
    let again = send(rename()).await.unwrap();
    assert_eq!((first.status, again.status), (StatusCode::OK, StatusCode::OK));
    assert_eq!((first.body["version"].clone(), again.body["version"].clone()), (json!(2), json!(2)));
    assert!(again.replayed);
    // Renaming to the current name changes nothing and appends nothing.
    let same = send(patch(&client, &gateway, &token, &id, None, "Bo B.")).await.unwrap();
    assert_eq!(
        (same.status, same.body["version"].clone(), same.body["position"].clone()),
        (StatusCode::OK, json!(2), Value::Null)
    );

    let admin = platform.admin(&client).await;
    let nobody = uuid::Uuid::now_v7().to_string();
    let missing = send(patch(&client, &gateway, &admin.access_token, &nobody, None, "Nobody")).await.unwrap();
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let bad = send(patch(&client, &gateway, &token, &id, None, "Bo").header("if-match", "three")).await.unwrap();
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(platform.broker.record_count(USERS_TOPIC), 3, "Bo's registration and rename, the admin's registration");
}

#[tokio::test(flavor = "multi_thread")]
async fn when_an_instance_stops_its_partitions_move_and_callers_do_not_notice() {
    let mut platform = Platform::start_roles(IDENTITY_ROLES).await;
    let client = reqwest::Client::new();
    let gateway = platform.gateway_url.clone();
    let admin = platform.admin(&client).await;
    let token = admin.access_token.clone();
    let mut ids = Vec::new();
    for user in 0..16 {
        ids.push(platform.register(&client, &format!("m{user}@example.com"), "M").await);
    }
    let partitions: HashSet<i64> = join_all(ids.iter().map(|id| {
        let request = patch(&client, &gateway, &token, id, None, "Before");
        async move { send(request).await.unwrap().body["position"]["partition"].as_i64().unwrap() }
    }))
    .await
    .into_iter()
    .collect();
    assert!(partitions.len() > 4, "the users spread over both instances' partitions: {partitions:?}");

    assert!(platform.terminate(Role::SecondIdentity, Duration::from_secs(15)).success());
    let started = Instant::now();
    // Plain requests, no client-side retries: the gateway and the survivor absorb the move.
    for answer in join_all(ids.iter().map(|id| send(patch(&client, &gateway, &token, id, Some(2), "After")))).await {
        let answer = answer.unwrap();
        assert_eq!((answer.status, answer.body["version"].clone()), (StatusCode::OK, json!(3)), "{}", answer.body);
    }
    println!("every partition served again {:?} after the instance stopped", started.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_an_owner_during_5000_commands_loses_and_doubles_nothing() {
    const COMMANDS: usize = 5000;
    const CLIENTS: usize = 48;
    let mut platform = Platform::start().await;
    let client = reqwest::Client::new();
    let gateway = platform.gateway_url.clone();
    let next = Arc::new(AtomicUsize::new(0));
    let acknowledged: Arc<Mutex<HashMap<usize, String>>> = Arc::default();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (client, gateway, next, acknowledged) =
                (client.clone(), gateway.clone(), next.clone(), acknowledged.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= COMMANDS {
                        return;
                    }
                    let body = registration(&format!("user{n}@example.com"), &format!("User {n}"));
                    let request = || client.post(format!("{gateway}/v1/users")).json(&body);
                    let answer = until_answered(request, &format!("kill-test-{n}")).await;
                    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
                    let id = answer.body["id"].as_str().unwrap().to_owned();
                    acknowledged.lock().unwrap().insert(n, id);
                }
            })
        })
        .collect();
    eventually(Duration::from_secs(120), "a fifth of the commands acknowledged", || async {
        (acknowledged.lock().unwrap().len() >= COMMANDS / 5).then_some(())
    })
    .await;
    let at_kill = acknowledged.lock().unwrap().len();
    platform.kill9(Role::Identity);
    for client in clients {
        client.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(at_kill < COMMANDS, "the owner died while commands were still coming");
    assert_eq!(acknowledged.len(), COMMANDS);
    let ids: HashSet<&String> = acknowledged.values().collect();
    assert_eq!(ids.len(), COMMANDS, "every command has its own user, retries included");

    let pool = platform.database.pool().await;
    eventually(Duration::from_secs(120), "every acknowledged user in the read model", || async {
        (count(&pool, "users").await == COMMANDS as i64).then_some(())
    })
    .await;
    let ids: Vec<uuid::Uuid> = ids.iter().map(|id| id.parse().unwrap()).collect();
    let present: i64 = sqlx::query_scalar("SELECT count(DISTINCT id) FROM users WHERE id = ANY($1)")
        .bind(&ids)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(present, COMMANDS as i64);
    let emails: i64 = sqlx::query_scalar("SELECT count(DISTINCT email) FROM users").fetch_one(&pool).await.unwrap();
    assert_eq!(emails, COMMANDS as i64);
    eventually(Duration::from_secs(60), "one audit entry per acknowledged command", || async {
        let audited: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE event_type = 'UserRegistered'")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(audited <= COMMANDS as i64, "an event was applied twice");
        (audited == COMMANDS as i64).then_some(())
    })
    .await;
    let records = platform.broker.record_count(USERS_TOPIC);
    println!("killed the owner after {at_kill} of {COMMANDS} acknowledgements; {records} records in the topic");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_zombie_writer_never_forks_the_state_and_loses_no_acknowledged_command() {
    const USERS: usize = 10;
    const CLIENTS: usize = 40;
    const PER_CLIENT: usize = 20;
    let mut platform = Platform::prepare().await;
    platform.spawn(Role::Registry);
    platform.wait_ready(Role::Registry, Duration::from_secs(60)).await;
    platform.spawn(Role::Identity);
    platform.spawn_with(Role::SecondIdentity, &[("KEEL_IDENTITY__UNSAFE_IGNORE_OWNERSHIP", "true")]);
    for role in [Role::Identity, Role::SecondIdentity, Role::Auth, Role::Authz, Role::Projector, Role::Gateway] {
        match role {
            Role::Identity | Role::SecondIdentity => {}
            // Commands go to either instance, the zombie included, as a stale routing table would
            // send them.
            Role::Gateway => platform.spawn_with(role, FORWARD_EVERYTHING),
            _ => platform.spawn(role),
        }
        platform.wait_ready(role, Duration::from_secs(60)).await;
    }
    let client = reqwest::Client::new();
    let gateway = platform.gateway_url.clone();
    let admin = platform.admin(&client).await;
    let token = admin.access_token.clone();
    let mut ids = Vec::new();
    for user in 0..USERS {
        let request = || {
            let body = registration(&format!("z{user}@example.com"), &format!("Z {user}"));
            client.post(format!("{gateway}/v1/users")).json(&body)
        };
        let answer = until_answered(request, &format!("zombie-register-{user}")).await;
        assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
        ids.push(answer.body["id"].as_str().unwrap().to_owned());
    }

    // Unconditional renames from many clients, through both writers of every partition.
    let acknowledged: Vec<Vec<(String, u64, String, Value)>> = join_all((0..CLIENTS).map(|client_index| {
        let (client, gateway, ids, token) = (client.clone(), gateway.clone(), ids.clone(), token.clone());
        async move {
            let mut acknowledged = Vec::new();
            for command in 0..PER_CLIENT {
                let id = &ids[(client_index + command) % ids.len()];
                let name = format!("name {client_index}-{command}");
                let answer = until_answered(
                    || patch(&client, &gateway, &token, id, None, &name),
                    &format!("zombie-{client_index}-{command}"),
                )
                .await;
                assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
                let version = answer.body["version"].as_u64().unwrap();
                acknowledged.push((id.clone(), version, name, answer.body["position"].clone()));
            }
            acknowledged
        }
    }))
    .await;
    let acknowledged: Vec<_> = acknowledged.into_iter().flatten().collect();
    assert_eq!(acknowledged.len(), CLIENTS * PER_CLIENT);

    // Per user, the acknowledged commands hold distinct versions 2..=n+1: none lost, none doubled.
    let mut per_user: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    for (id, version, name, _) in &acknowledged {
        per_user.entry(id.clone()).or_default().push((*version, name.clone()));
    }
    let pool = platform.database.pool().await;
    for (id, mut commands) in per_user {
        commands.sort();
        let versions: Vec<u64> = commands.iter().map(|(version, _)| *version).collect();
        assert_eq!(versions, (2..commands.len() as u64 + 2).collect::<Vec<_>>(), "versions of {id}");
        let (last_version, last_name) = commands.last().unwrap().clone();
        let user: Value = eventually(Duration::from_secs(60), "the read model at the last version", || async {
            let user: Value = client
                .get(format!("{gateway}/v1/users/{id}"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            (user["version"] == last_version).then_some(user)
        })
        .await;
        assert_eq!(user["display_name"], last_name.as_str());
    }
    // Every acknowledged commit is one the readers applied.
    eventually(Duration::from_secs(60), "every acknowledged commit in the audit log", || async {
        let audited: i64 =
            sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE event_type = 'UserDisplayNameChanged'")
                .fetch_one(&pool)
                .await
                .unwrap();
        (audited == acknowledged.len() as i64).then_some(())
    })
    .await;
    for (_, version, _, position) in &acknowledged {
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT aggregate_version FROM audit_log WHERE topic = $1 AND partition = $2 AND \"offset\" = $3",
        )
        .bind(position["topic"].as_str().unwrap())
        .bind(position["partition"].as_i64().unwrap() as i32)
        .bind(position["offset"].as_i64().unwrap())
        .fetch_optional(&pool)
        .await
        .unwrap();
        assert_eq!(found, Some(*version as i64), "the commit at {position} is valid for readers");
    }
    // If-Match raced across both writers of the user's partition: one of 100 renames decided
    // against the current version wins, whichever writer decided it; the others are conflicts,
    // and the log holds the one change.
    let raced = &ids[0];
    let current: Value = client
        .get(format!("{gateway}/v1/users/{raced}"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let base = current["version"].as_u64().unwrap();
    let answers = join_all((0..100).map(|attempt| {
        let (client, gateway, token) = (client.clone(), gateway.clone(), token.clone());
        async move {
            let name = format!("raced {attempt}");
            let request = || patch(&client, &gateway, &token, raced, Some(base), &name);
            (name.clone(), until_answered(request, &format!("zombie-race-{attempt}")).await)
        }
    }))
    .await;
    let winners: Vec<&(String, Answer)> =
        answers.iter().filter(|(_, answer)| answer.status == StatusCode::OK).collect();
    assert_eq!(winners.len(), 1, "exactly one rename decided against version {base} wins");
    assert_eq!(winners[0].1.body["version"], base + 1);
    for (_, answer) in answers.iter().filter(|(_, answer)| answer.status != StatusCode::OK) {
        assert_eq!(answer.status, StatusCode::CONFLICT, "{}", answer.body);
        assert_eq!(answer.body["current_version"], base + 1, "{}", answer.body);
    }
    let winner = winners[0].0.clone();
    let user: Value = eventually(Duration::from_secs(60), "the raced rename in the read model", || async {
        let user: Value = client
            .get(format!("{gateway}/v1/users/{raced}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (user["version"] == base + 1).then_some(user)
    })
    .await;
    assert_eq!(user["display_name"], winner.as_str());
    let audited_above = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT aggregate_version FROM audit_log WHERE aggregate_id = $1::uuid AND aggregate_version > $2
             ORDER BY aggregate_version",
        )
        .bind(raced)
        .bind(base as i64 - 1)
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    eventually(Duration::from_secs(120), "the raced change in the audit log", || async {
        audited_above().await.contains(&(base as i64 + 1)).then_some(())
    })
    .await;
    assert_eq!(audited_above().await, [base as i64, base as i64 + 1], "one audited change at the raced version");

    // One email registered at once, through both writers: one user (the reservation decides).
    let registrations = join_all((0..20).map(|attempt| {
        let (client, gateway) = (client.clone(), gateway.clone());
        async move {
            let body = registration("twice@example.com", &format!("Twice {attempt}"));
            until_answered(|| client.post(format!("{gateway}/v1/users")).json(&body), &format!("twice-{attempt}"))
                .await
                .status
        }
    }))
    .await;
    let created = registrations.iter().filter(|status| **status == StatusCode::CREATED).count();
    assert_eq!(created, 1, "{registrations:?}");
    assert!(registrations.iter().all(|status| matches!(status.as_u16(), 201 | 409)), "{registrations:?}");
    eventually(Duration::from_secs(60), "the registered email in the read model", || async {
        let holders: i64 = sqlx::query_scalar("SELECT count(*) FROM users WHERE email = 'twice@example.com'")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(holders <= 1, "{holders} users hold one email");
        (holders == 1).then_some(())
    })
    .await;

    let skipped = platform
        .metric(Role::Projector, "keel_projection_skipped_total{projection=\"users\",reason=\"invalid\"}")
        .await
        .unwrap_or(0.0);
    let records = platform.broker.record_count(USERS_TOPIC);
    println!(
        "zombie run: {} acknowledged, {records} records, {skipped} skipped by the users projection",
        acknowledged.len()
    );
    assert!(skipped > 0.0, "the zombie raced the owner (else this test shows nothing)");
}

/// What a restart of `role` cost: time until ready (a killed member's partitions wait for its
/// group session to expire), seconds spent loading partitions, and records replayed.
async fn restart(platform: &mut Platform, role: Role) -> (Duration, f64, f64) {
    platform.kill9(role);
    let started = Instant::now();
    platform.spawn(role);
    platform.wait_ready(role, Duration::from_secs(120)).await;
    let elapsed = started.elapsed();
    let metric = |name: &str| format!("{name}{{topic=\"identity.users\"}}");
    // Both are reported once the partitions are loaded, which readiness waits for: a missing
    // one is a failure, never a zero.
    let loading = platform.metric(role, &metric("keel_command_partition_load_seconds_sum")).await;
    let replayed = platform.metric(role, &metric("keel_command_replayed_records_total")).await;
    let loading = loading.expect("the restarted owner reports how long its partitions took to load");
    let replayed = replayed.expect("the restarted owner reports how many records it replayed");
    (elapsed, loading, replayed)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_owner_restarts_from_snapshots_and_replays_only_the_tail() {
    const USERS: usize = 1000;
    const EVENTS: usize = 100_000;
    const SNAPSHOT_EVERY: u64 = 1000;
    const PARTITIONS: u64 = 8;
    let mut platform = Platform::prepare().await;
    for role in [Role::Registry, Role::Identity, Role::Auth, Role::Authz, Role::Projector, Role::Gateway] {
        // One access token serves the whole test, which may outlast the default lifetime.
        match role {
            Role::Auth => platform.spawn_with(role, &[("KEEL_AUTH__ACCESS_TOKEN_TTL_SECS", "3600")]),
            _ => platform.spawn(role),
        }
        platform.wait_ready(role, Duration::from_secs(60)).await;
    }
    let client = reqwest::Client::new();
    let gateway = platform.gateway_url.clone();
    // The admin renames everyone (one token for 100,000 commands).
    let admin = platform.admin(&client).await;
    let token = admin.access_token.clone();
    let ids: Vec<String> = join_all((0..USERS).map(|user| {
        let (client, gateway) = (client.clone(), gateway.clone());
        async move {
            let body = registration(&format!("s{user}@example.com"), "S");
            let answer =
                until_answered(|| client.post(format!("{gateway}/v1/users")).json(&body), &format!("s-{user}")).await;
            assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
            answer.body["id"].as_str().unwrap().to_owned()
        }
    }))
    .await;
    let mut restarts = Vec::new();
    // The admin's registration is one of the records.
    let mut written = USERS + 1;
    for target in [EVENTS / 10, EVENTS] {
        let renames = target - written;
        let next = Arc::new(AtomicUsize::new(0));
        join_all((0..64).map(|_| {
            let (client, gateway, next, ids, token) =
                (client.clone(), gateway.clone(), next.clone(), ids.clone(), token.clone());
            async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= renames {
                        return;
                    }
                    let (id, name) = (&ids[n % ids.len()], format!("S {written}-{n}"));
                    let answer = until_answered(
                        || patch(&client, &gateway, &token, id, None, &name),
                        &format!("r-{written}-{n}"),
                    )
                    .await;
                    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
                }
            }
        }))
        .await;
        written = target;
        assert_eq!(platform.broker.record_count(USERS_TOPIC), written as i64);
        let (elapsed, loading, replayed) = restart(&mut platform, Role::Identity).await;
        println!(
            "restart with {written} events in the topic: ready in {elapsed:?}, {loading:.3}s loading 8 partitions, \
             {replayed} records replayed"
        );
        assert!(
            replayed <= (PARTITIONS * SNAPSHOT_EVERY) as f64,
            "only the tails after the snapshots are replayed ({replayed} records)"
        );
        restarts.push((written, elapsed, loading, replayed));
    }
    // The restarted owner serves: a command goes through and sees the whole history.
    let answer = send(patch(&client, &gateway, &token, &ids[0], None, "After restart")).await.unwrap();
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.body["version"].as_u64().unwrap(), (EVENTS / USERS) as u64 + 1);
    println!("restart times by history: {restarts:?}");
}
