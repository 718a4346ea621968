//! Projections: zero-downtime rebuilds, dead letters, poison policies, crash safety at scale.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::{StreamExt, stream};
use serde_json::Value;
use support::{Platform, Role, audited_user_events, count, eventually, users_checksum};

async fn wait_for_users(pool: &sqlx::PgPool, expected: i64) {
    eventually(Duration::from_secs(90), &format!("{expected} users projected"), || async {
        (count(pool, "users").await >= expected).then_some(())
    })
    .await;
}

/// Makes the users table refuse the display name `Poison` (a handler failure the projection
/// cannot get past), or lifts that again: the fix.
async fn poison_display_names(pool: &sqlx::PgPool, refuse: bool) {
    let statement = if refuse {
        "ALTER TABLE users_v1 ADD CONSTRAINT no_poison CHECK (display_name <> 'Poison')"
    } else {
        "ALTER TABLE users_v1 DROP CONSTRAINT no_poison"
    };
    sqlx::query(statement).execute(pool).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_swaps_in_without_a_failed_query_while_commands_flow() {
    let platform = Arc::new(Platform::start().await);
    let pool = platform.database.pool().await;
    let client = reqwest::Client::new();
    // The reader reads as an admin, who may read any user.
    let admin = platform.admin(&client).await;
    let mut ids = Vec::new();
    for index in 0..200 {
        ids.push(platform.register(&client, &format!("before{index}@example.com"), "Before").await);
    }
    wait_for_users(&pool, 201).await;

    // Version 1 as if older code had built it: the status says it needs a rebuild.
    sqlx::query("UPDATE projection_versions SET code_version = 0 WHERE name = 'users' AND version = 1")
        .execute(&pool)
        .await
        .unwrap();
    let status: Value = serde_json::from_str(&platform.keel_ok(&["projections", "status"])).unwrap();
    let users = status.as_array().unwrap().iter().find(|p| p["name"] == "users").unwrap();
    assert_eq!(users["needs_rebuild"], true, "{users}");
    let metrics_url = format!("{}/metrics", platform.admin_url(Role::Projector));
    eventually(Duration::from_secs(15), "lag per partition on /metrics", || async {
        let metrics = reqwest::get(&metrics_url).await.unwrap().text().await.unwrap();
        metrics
            .contains(r#"keel_projection_lag{projection="users",topic="identity.users",partition="0"}"#)
            .then_some(())
    })
    .await;

    // Writers keep registering and readers keep reading while the rebuild runs.
    let running = Arc::new(AtomicBool::new(true));
    let written = Arc::new(AtomicU64::new(0));
    let failed_reads = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn({
        let (platform, client, running, written) = (platform.clone(), client.clone(), running.clone(), written.clone());
        async move {
            let mut index = 0;
            while running.load(Ordering::Relaxed) {
                platform.register(&client, &format!("during{index}@example.com"), "During").await;
                written.fetch_add(1, Ordering::Relaxed);
                index += 1;
            }
        }
    });
    let reader = tokio::spawn({
        let (gateway, client, running) = (platform.gateway_url.clone(), client.clone(), running.clone());
        let (failed_reads, reads, ids) = (failed_reads.clone(), reads.clone(), ids.clone());
        let token = admin.access_token.clone();
        async move {
            while running.load(Ordering::Relaxed) {
                for id in ids.iter().step_by(7) {
                    let response =
                        client.get(format!("{gateway}/v1/users/{id}")).bearer_auth(&token).send().await.unwrap();
                    reads.fetch_add(1, Ordering::Relaxed);
                    if response.status() != 200 {
                        failed_reads.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    });

    let output = platform.keel_ok(&["projections", "rebuild", "users"]);
    assert!(output.contains("version 2 is live"), "{output}");
    // Reads go on against version 2 for a while before the load stops.
    let swapped = reads.load(Ordering::Relaxed);
    eventually(Duration::from_secs(30), "reads after the swap", || async {
        (reads.load(Ordering::Relaxed) >= swapped + 20).then_some(())
    })
    .await;
    running.store(false, Ordering::Relaxed);
    writer.await.unwrap();
    reader.await.unwrap();
    assert!(reads.load(Ordering::Relaxed) > 0);
    assert_eq!(failed_reads.load(Ordering::Relaxed), 0, "no query failed during the swap");

    // The admin, the 200 before and those registered during the rebuild.
    let expected = 201 + written.load(Ordering::Relaxed) as i64;
    wait_for_users(&pool, expected).await;
    platform.caught_up(&["users"]).await;
    let live = users_checksum(&pool, "users").await;
    assert_eq!(live.0, expected);
    assert_eq!(users_checksum(&pool, "users_v2").await, live, "the view reads version 2");

    // A second, quiet rebuild from scratch builds exactly the same rows; without a grace period
    // the version it replaces is dropped at once.
    let output = platform
        .keel(&["projections", "rebuild", "users"])
        .env("KEEL_PROJECTOR__RETIRED_GRACE_SECS", "0")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stdout).contains("version 3 is live"), "{output:?}");
    assert_eq!(users_checksum(&pool, "users_v3").await, live);
    eventually(Duration::from_secs(20), "version 2's tables to be dropped", || async {
        let exists: Option<String> =
            sqlx::query_scalar("SELECT to_regclass('users_v2')::text").fetch_one(&pool).await.unwrap();
        exists.is_none().then_some(())
    })
    .await;

    let status: Value = reqwest::get(format!("{}/admin/projections", platform.admin_url(Role::Projector)))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let users = status.as_array().unwrap().iter().find(|p| p["name"] == "users").unwrap();
    assert_eq!(users["live_version"], 3);
    assert_eq!(users["needs_rebuild"], false);
    let states: Vec<(i64, String)> = users["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["version"].as_i64().unwrap(), v["state"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(states, vec![(1, "retired".into()), (3, "live".into())], "version 2 is dropped");
    let live_version = users["versions"].as_array().unwrap().iter().find(|v| v["version"] == 3).unwrap();
    assert_eq!(live_version["partitions"].as_array().unwrap().len(), 8);

    // The live projector follows the new version: new registrations land in version 3.
    let id = platform.register(&client, "after@example.com", "After").await;
    eventually(Duration::from_secs(20), "the new user in version 3", || async {
        let found: Option<i64> = sqlx::query_scalar("SELECT version FROM users_v3 WHERE id = $1::uuid")
            .bind(&id)
            .fetch_optional(&pool)
            .await
            .unwrap();
        found.map(|_| ())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poison_commit_is_dead_lettered_and_a_retry_after_the_fix_applies_it() {
    let platform = Platform::start().await;
    let pool = platform.database.pool().await;
    let client = reqwest::Client::new();
    poison_display_names(&pool, true).await;
    let first = platform.register(&client, "first@example.com", "First").await;
    let poison = platform.register(&client, "poison@example.com", "Poison").await;
    let last = platform.register(&client, "last@example.com", "Last").await;

    wait_for_users(&pool, 2).await;
    let letters = eventually(Duration::from_secs(20), "a dead letter", || async {
        let listed = platform.keel_ok(&["projections", "dlq", "list", "--projection", "users"]);
        let letters: Vec<Value> = listed.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
        (!letters.is_empty()).then_some(letters)
    })
    .await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(letters[0]["error"].as_str().unwrap().contains("no_poison"), "{letters:?}");
    for id in [&first, &last] {
        let found: i64 = sqlx::query_scalar("SELECT count(*) FROM users WHERE id = $1::uuid")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(found, 1, "the other commits are applied");
    }
    assert_eq!(platform.broker.record_count_in("keel.dead-letters", 1), 1);
    eventually(Duration::from_secs(20), "every audit entry", || async {
        (audited_user_events(&pool).await == 3).then_some(())
    })
    .await;

    // Before the fix a retry fails and says why; after it, the commit is applied.
    let output = platform.keel(&["projections", "dlq", "retry", "users"]).output().unwrap();
    assert!(!output.status.success());
    poison_display_names(&pool, false).await;
    platform.keel_ok(&["projections", "dlq", "retry", "users"]);
    let name: String = sqlx::query_scalar("SELECT display_name FROM users WHERE id = $1::uuid")
        .bind(&poison)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(name, "Poison");
    assert_eq!(platform.keel_ok(&["projections", "dlq", "list"]).trim(), "");
}

#[tokio::test(flavor = "multi_thread")]
async fn under_the_stop_policy_a_poison_commit_stops_the_projection_until_resumed() {
    let mut platform = Platform::prepare().await;
    for role in [Role::Registry, Role::Identity, Role::Auth] {
        platform.spawn(role);
        platform.wait_ready(role, Duration::from_secs(60)).await;
    }
    platform.spawn_with(Role::Projector, &[("KEEL_PROJECTOR__ON_POISON_OVERRIDES__USERS", "stop")]);
    platform.wait_ready(Role::Projector, Duration::from_secs(60)).await;
    platform.spawn(Role::Gateway);
    platform.wait_ready(Role::Gateway, Duration::from_secs(60)).await;
    let pool = platform.database.pool().await;
    let client = reqwest::Client::new();
    poison_display_names(&pool, true).await;
    platform.register(&client, "first@example.com", "First").await;
    wait_for_users(&pool, 1).await;
    platform.register(&client, "poison@example.com", "Poison").await;
    platform.register(&client, "last@example.com", "Last").await;

    let status_url = format!("{}/admin/projections", platform.admin_url(Role::Projector));
    let stopped = eventually(Duration::from_secs(20), "the users projection to stop", || async {
        let status: Value = reqwest::get(&status_url).await.unwrap().json().await.unwrap();
        let users = status.as_array().unwrap().iter().find(|p| p["name"] == "users").unwrap().clone();
        let live = users["versions"].as_array().unwrap().iter().find(|v| v["state"] == "live").unwrap().clone();
        (live["stopped"] == true).then_some(live)
    })
    .await;
    assert!(stopped["last_error"].as_str().unwrap().contains("no_poison"), "{stopped}");
    assert!(stopped["lag"].as_i64().unwrap() >= 2, "the poison commit and the one after wait in the log: {stopped}");
    assert_eq!(count(&pool, "users").await, 1, "nothing after the poison commit is applied while stopped");

    poison_display_names(&pool, false).await;
    let output = platform.keel_ok(&["projections", "resume", "users"]);
    assert!(output.contains("resumed"), "{output}");
    wait_for_users(&pool, 3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_projector_at_random_points_matches_a_rebuild_from_scratch() {
    const ROUNDS: usize = 4;
    const PER_ROUND: usize = 2_500;
    const REGISTRATIONS: usize = ROUNDS * PER_ROUND;
    let mut platform = Platform::start().await;
    let pool = platform.database.pool().await;
    let client = reqwest::Client::new();
    let url = Arc::new(format!("{}/v1/users", platform.gateway_url));
    // Each round registers a burst and kills the projector once while the burst runs, after it
    // made progress and a pause taken from the clock: every kill lands mid-stream, however fast
    // the machine is.
    let mut kills = Vec::new();
    let assigned = r#"keel_projector_assigned_partitions{projection="users"}"#;
    for round in 0..ROUNDS {
        let platform_ref = &platform;
        eventually(Duration::from_secs(30), "the projector to own every partition", || async move {
            (platform_ref.metric(Role::Projector, assigned).await == Some(8.0)).then_some(())
        })
        .await;
        let burst = tokio::spawn({
            let (client, url) = (client.clone(), url.clone());
            async move {
                stream::iter(round * PER_ROUND..(round + 1) * PER_ROUND)
                    .map(|index| {
                        let (client, url) = (client.clone(), url.clone());
                        async move {
                            let (email, name) = (format!("u{index}@example.com"), format!("U {index}"));
                            support::register_retrying(&client, &url, &email, &name).await;
                        }
                    })
                    .buffer_unordered(32)
                    .collect::<Vec<()>>()
                    .await
            }
        });
        let before = count(&pool, "users").await;
        eventually(Duration::from_secs(60), "the projector to make progress", || async {
            (count(&pool, "users").await > before).then_some(())
        })
        .await;
        // A few more, as many as the clock says: the kill lands at a different point each round.
        let more = 1 + i64::from(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() % 200,
        );
        eventually(Duration::from_secs(60), "the projector to apply a few more", || async {
            (count(&pool, "users").await >= before + more).then_some(())
        })
        .await;
        let running = !burst.is_finished();
        kills.push(count(&pool, "users").await);
        platform.kill9(Role::Projector);
        assert!(running, "round {round}: the kill landed while the burst was still running");
        platform.spawn(Role::Projector);
        platform.wait_ready(Role::Projector, Duration::from_secs(30)).await;
        burst.await.unwrap();
    }
    eprintln!("projector killed {} times, with {kills:?} users projected", kills.len());
    assert!(kills.iter().all(|seen| *seen > 0 && *seen < REGISTRATIONS as i64), "{kills:?}");

    wait_for_users(&pool, REGISTRATIONS as i64).await;
    eventually(Duration::from_secs(60), "every audit entry", || async {
        (audited_user_events(&pool).await >= REGISTRATIONS as i64).then_some(())
    })
    .await;
    platform.caught_up(&["users", "audit"]).await;
    let survived = users_checksum(&pool, "users").await;
    assert_eq!(survived.0, REGISTRATIONS as i64);
    assert_eq!(audited_user_events(&pool).await, REGISTRATIONS as i64);
    platform.keel_ok(&["audit", "verify"]);
    // The last restarted projector re-applied nothing and dead-lettered nothing.
    platform.assert_nothing_skipped_or_dead_lettered().await;

    let output = platform.keel_ok(&["projections", "rebuild", "users"]);
    assert!(output.contains("version 2 is live"), "{output}");
    assert_eq!(users_checksum(&pool, "users_v2").await, survived, "no gap, no double");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_projectors_split_the_partitions_and_one_takes_over_when_the_other_dies() {
    const EACH: usize = 400;
    let mut platform = Platform::start().await;
    platform.spawn(Role::SecondProjector);
    platform.wait_ready(Role::SecondProjector, Duration::from_secs(60)).await;
    let assigned = r#"keel_projector_assigned_partitions{projection="users"}"#;
    for role in [Role::Projector, Role::SecondProjector] {
        let platform = &platform;
        eventually(Duration::from_secs(30), "each instance to own half the partitions", || async move {
            (platform.metric(role, assigned).await == Some(4.0)).then_some(())
        })
        .await;
    }
    let pool = platform.database.pool().await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/users", platform.gateway_url);
    for index in 0..EACH {
        support::register_retrying(&client, &url, &format!("first{index}@example.com"), "First").await;
    }
    wait_for_users(&pool, EACH as i64).await;
    let applied = r#"keel_projection_events_total{projection="users"}"#;
    let first = platform.metric(Role::Projector, applied).await.unwrap_or(0.0);
    let second = platform.metric(Role::SecondProjector, applied).await.unwrap_or(0.0);
    assert!(first > 0.0 && second > 0.0, "both instances applied events: {first} and {second}");
    assert_eq!(first + second, EACH as f64, "each event was applied by exactly one instance");

    // The survivor takes over the dead instance's partitions after the session timeout.
    platform.kill9(Role::Projector);
    for index in 0..EACH {
        support::register_retrying(&client, &url, &format!("second{index}@example.com"), "Second").await;
    }
    wait_for_users(&pool, 2 * EACH as i64).await;
    assert_eq!(platform.metric(Role::SecondProjector, assigned).await, Some(8.0));
    platform.caught_up(&["users"]).await;
    let survived = users_checksum(&pool, "users").await;
    assert_eq!(survived.0, 2 * EACH as i64);
    let output = platform.keel_ok(&["projections", "rebuild", "users"]);
    assert!(output.contains("version 2 is live"), "{output}");
    assert_eq!(users_checksum(&pool, "users_v2").await, survived, "no gap, no double across the hand-over");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_from_a_time_applies_only_the_records_since_then() {
    let platform = Platform::start().await;
    let pool = platform.database.pool().await;
    let client = reqwest::Client::new();
    for index in 0..5 {
        platform.register(&client, &format!("early{index}@example.com"), "Early").await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let since = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut late = Vec::new();
    for index in 0..5 {
        late.push(platform.register(&client, &format!("late{index}@example.com"), "Late").await);
    }
    eventually(Duration::from_secs(20), "ten registrations audited", || async {
        (audited_user_events(&pool).await == 10).then_some(())
    })
    .await;

    let output = platform.keel_ok(&["projections", "rebuild", "audit", "--from-time", &since]);
    assert!(output.contains("version 2 is live"), "{output}");
    // A registration and its password share the user's id.
    let ids: Vec<String> = sqlx::query_scalar("SELECT DISTINCT aggregate_id::text FROM audit_log ORDER BY 1")
        .fetch_all(&pool)
        .await
        .unwrap();
    late.sort();
    assert_eq!(ids, late, "only the registrations since the start time are applied");
    platform.keel_ok(&["audit", "verify"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_outage_delays_projections_and_dead_letters_nothing() {
    let mut platform = Platform::start().await;
    let pool = platform.database.pool().await;
    let client = reqwest::Client::new();
    // The identity service caches the schema id of what it writes; a restarted projector has
    // nothing cached and must ask the registry.
    platform.register(&client, "before@example.com", "Before").await;
    wait_for_users(&pool, 1).await;
    // The registry answers 500 while its storage fails (here: its table is gone).
    sqlx::query("ALTER TABLE registry_schemas RENAME TO registry_schemas_away").execute(&pool).await.unwrap();
    platform.kill9(Role::Projector);
    platform.spawn(Role::Projector);
    platform.wait_ready(Role::Projector, Duration::from_secs(30)).await;
    // The restarted projector reads every partition before the records it cannot decode arrive,
    // so what follows shows it reading them, not waiting for an assignment.
    let assigned = r#"keel_projector_assigned_partitions{projection="users"}"#;
    eventually(Duration::from_secs(30), "the restarted projector to own every partition", || async {
        (platform.metric(Role::Projector, assigned).await == Some(8.0)).then_some(())
    })
    .await;
    for index in 0..3 {
        platform.register(&client, &format!("during{index}@example.com"), "During").await;
    }
    let retries = "keel_projector_read_retries_total";
    eventually(Duration::from_secs(30), "the projector to retry reading what it cannot decode yet", || async {
        (platform.metric_sum(Role::Projector, retries).await.unwrap_or(0.0) >= 3.0).then_some(())
    })
    .await;
    assert_eq!(count(&pool, "users").await, 1, "nothing is applied while the schema cannot be fetched");
    assert_eq!(platform.keel_ok(&["projections", "dlq", "list"]).trim(), "", "and nothing is dead-lettered");

    sqlx::query("ALTER TABLE registry_schemas_away RENAME TO registry_schemas").execute(&pool).await.unwrap();
    wait_for_users(&pool, 4).await;
    assert_eq!(platform.keel_ok(&["projections", "dlq", "list"]).trim(), "");
}
