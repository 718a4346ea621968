//! Read-your-writes: a query carrying the consistency token of a command sees that command.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{Platform, Role};

/// A command's consistency token (`Keel-Position`).
fn token(response: &reqwest::Response) -> String {
    response.headers()["keel-position"].to_str().unwrap().to_owned()
}

async fn read(client: &reqwest::Client, url: &str, access: &str, token: &str) -> (StatusCode, Option<String>, Value) {
    let response = client.get(url).bearer_auth(access).header("keel-consistency", token).send().await.unwrap();
    let stale = response.headers().get("keel-stale").map(|value| value.to_str().unwrap().to_owned());
    (response.status(), stale, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_query_with_the_token_of_a_command_sees_it_and_says_when_it_cannot() {
    const ITERATIONS: u64 = 1000;
    let mut platform = Platform::prepare().await;
    for role in [Role::Registry, Role::Identity, Role::Auth, Role::Authz, Role::Projector, Role::Gateway] {
        match role {
            Role::Projector => platform.spawn_with(role, &[("KEEL_PROJECTOR__BATCH_TIMEOUT_MS", "5")]),
            Role::Gateway => platform.spawn_with(role, &[("KEEL_GATEWAY__CONSISTENCY_TIMEOUT_MS", "1000")]),
            _ => platform.spawn(role),
        }
        platform.wait_ready(role, Duration::from_secs(60)).await;
    }
    let client = reqwest::Client::new();
    let gateway = platform.gateway_url.clone();
    // The user reads and changes themselves; the audit log is the admin's to read.
    let admin = platform.admin(&client).await;
    let ryw = platform.signup(&client, "ryw@example.com", "n0").await;
    let (id, access) = (ryw.id.clone(), ryw.access_token.clone());
    let url = format!("{gateway}/v1/users/{id}");
    // The sign-up waited for the users projection to have the registration.
    let user: Value = client.get(&url).bearer_auth(&access).send().await.unwrap().json().await.unwrap();
    assert_eq!(user["version"], 1);

    for iteration in 1..=ITERATIONS {
        let name = format!("n{iteration}");
        let sent_at = chrono::Utc::now() - chrono::Duration::seconds(1);
        let changed =
            client.patch(&url).bearer_auth(&access).json(&json!({"display_name": name})).send().await.unwrap();
        assert_eq!(changed.status(), StatusCode::OK);
        let token = token(&changed);
        let (status, stale, user) = read(&client, &url, &access, &token).await;
        assert_eq!((status, stale.as_deref()), (StatusCode::OK, Some("false")), "iteration {iteration}");
        assert_eq!(user["display_name"], name.as_str(), "iteration {iteration} reads its own write");
        assert_eq!(user["version"], iteration + 1);
        if iteration % 100 == 0 {
            // The audit log is a projection of its own, with its own checkpoints.
            let from = sent_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            let audit_url = format!("{gateway}/v1/audit?aggregate={id}&limit=500&from={from}");
            let (status, stale, page) = read(&client, &audit_url, &admin.access_token, &token).await;
            assert_eq!((status, stale.as_deref()), (StatusCode::OK, Some("false")));
            let versions: Vec<u64> = page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|item| item["aggregate_version"].as_u64().unwrap())
                .collect();
            assert!(versions.contains(&(iteration + 1)), "the audit entry of iteration {iteration}");
        }
    }

    // Tokens name the route's topics, in the documented form.
    for bad in ["identity.users/1", "other.topic/0/1", "identity.users/0/-3"] {
        let response = client.get(&url).bearer_auth(&access).header("keel-consistency", bad).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(response.headers()["content-type"], "application/problem+json");
    }

    // With no projector to pass the token, the answer comes after the bound, with what there is.
    assert!(platform.terminate(Role::Projector, Duration::from_secs(15)).success());
    let changed =
        client.patch(&url).bearer_auth(&access).json(&json!({"display_name": "unseen"})).send().await.unwrap();
    assert_eq!(changed.status(), StatusCode::OK);
    let started = std::time::Instant::now();
    let (status, stale, user) = read(&client, &url, &access, &token(&changed)).await;
    assert!(started.elapsed() >= Duration::from_secs(1), "it waited for the bound");
    assert_eq!((status, stale.as_deref()), (StatusCode::OK, Some("true")));
    assert_eq!(user["display_name"], format!("n{ITERATIONS}"));
}
