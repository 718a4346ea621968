//! kill -9 the projector while it applies a burst of registrations: after a restart the read
//! model and the audit log hold every registration exactly once.

mod support;

use std::{sync::Arc, time::Duration};

use futures::{StreamExt, stream};
use sqlx::PgPool;
use support::{Platform, Role, eventually};

const REGISTRATIONS: usize = 1_000;
const CONCURRENCY: usize = 32;

async fn count(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}"))).fetch_one(pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_projector_loses_and_doubles_nothing() {
    let mut platform = Platform::start().await;
    let pool = platform.database.pool().await;
    let client = reqwest::Client::new();
    let url = Arc::new(format!("{}/v1/users", platform.gateway_url));

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

    // Kill the projector three times while it is applying the burst.
    let mut killed_at = Vec::new();
    for threshold in [50_i64, 300, 600] {
        let seen = eventually(Duration::from_secs(60), "the projector to make progress", || async {
            let users = count(&pool, "users").await;
            (users >= threshold).then_some(users)
        })
        .await;
        platform.kill9(Role::Projector);
        killed_at.push(seen);
        platform.spawn(Role::Projector);
        platform.wait_ready(Role::Projector, Duration::from_secs(30)).await;
    }
    burst.await.unwrap();
    eprintln!("projector killed with {killed_at:?} users projected");
    assert!(killed_at.iter().any(|seen| *seen < REGISTRATIONS as i64), "a kill landed mid-burst: {killed_at:?}");

    let expected = REGISTRATIONS as i64;
    eventually(Duration::from_secs(60), "every registration to be projected", || async {
        (count(&pool, "users").await >= expected && count(&pool, "audit_log").await >= expected).then_some(())
    })
    .await;
    // Let any straggling batch land before the exact comparison.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(&pool, "users").await, expected);
    assert_eq!(count(&pool, "audit_log").await, expected);
    let distinct: i64 = sqlx::query_scalar("SELECT count(DISTINCT email) FROM users").fetch_one(&pool).await.unwrap();
    assert_eq!(distinct, expected);
    assert_eq!(platform.broker.record_count("identity.users"), expected);

    let verify = platform.keel(&["audit", "verify"]).output().unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
}
