//! kill -9 the projector while it applies a burst of registrations: after a restart the read
//! model and the audit log hold every registration exactly once.

mod support;

use std::{sync::Arc, time::Duration};

use futures::{StreamExt, stream};
use support::{Platform, Role, audited_user_events, count, eventually};

const REGISTRATIONS: usize = 1_000;
const CONCURRENCY: usize = 16;

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_projector_loses_and_doubles_nothing() {
    let mut platform = Platform::start().await;
    let pool = platform.database.pool().await;
    let client = reqwest::Client::new();
    let url = Arc::new(format!("{}/v1/users", platform.gateway_url));

    // The projector must be consuming before the burst starts, so that it is applying when killed.
    let assigned = r#"keel_projector_assigned_partitions{projection="users"}"#;
    eventually(Duration::from_secs(30), "the projector to own every partition", || async {
        (platform.metric(Role::Projector, assigned).await == Some(8.0)).then_some(())
    })
    .await;
    let burst = tokio::spawn({
        let client = client.clone();
        let url = url.clone();
        async move {
            stream::iter(0..REGISTRATIONS)
                .map(|index| {
                    let client = client.clone();
                    let url = url.clone();
                    async move {
                        let (email, name) = (format!("user{index}@example.com"), format!("User {index}"));
                        support::register_retrying(&client, &url, &email, &name).await;
                    }
                })
                .buffer_unordered(CONCURRENCY)
                .collect::<Vec<()>>()
                .await
        }
    });

    let seen = eventually(Duration::from_secs(60), "the projector to apply part of the burst", || async {
        let users = count(&pool, "users").await;
        (users > 0).then_some(users)
    })
    .await;
    let running = !burst.is_finished();
    platform.kill9(Role::Projector);
    assert!(running && seen < REGISTRATIONS as i64, "the kill landed mid-burst ({seen} projected)");
    eprintln!("projector killed with {seen} of {REGISTRATIONS} users projected");
    platform.spawn(Role::Projector);
    platform.wait_ready(Role::Projector, Duration::from_secs(30)).await;
    burst.await.unwrap();

    let expected = REGISTRATIONS as i64;
    eventually(Duration::from_secs(60), "every registration to be projected", || async {
        (count(&pool, "users").await >= expected && audited_user_events(&pool).await >= expected).then_some(())
    })
    .await;
    // Every record applied: no straggling batch can change the exact comparison.
    platform.caught_up(&["users", "audit"]).await;
    assert_eq!(count(&pool, "users").await, expected);
    assert_eq!(audited_user_events(&pool).await, expected);
    let distinct: i64 = sqlx::query_scalar("SELECT count(DISTINCT email) FROM users").fetch_one(&pool).await.unwrap();
    assert_eq!(distinct, expected);
    assert_eq!(platform.broker.record_count("identity.users"), expected);

    let verify = platform.keel(&["audit", "verify"]).output().unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    platform.assert_nothing_skipped_or_dead_lettered().await;
}
