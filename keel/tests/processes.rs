//! Commands of two services (registration: auth stores the password, identity registers the user;
//! erasure: identity erases, auth removes the password) killed between their steps: the owner of
//! the user's partition completes them, with no client retrying, and a retry later gets the first
//! result.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{PASSWORD, Platform, Role, count, eventually};

/// Registry, an identity instance that stops between a process's steps, auth, authz, projector,
/// and a gateway that gives up on a command after two seconds, so that nothing but the identity
/// service can complete what it interrupted.
async fn platform_that_pauses_between_steps() -> Platform {
    let mut platform = Platform::prepare().await;
    platform.spawn(Role::Registry);
    platform.wait_ready(Role::Registry, Duration::from_secs(90)).await;
    platform.spawn_with(Role::Identity, &[("KEEL_IDENTITY__UNSAFE_PAUSE_BETWEEN_STEPS", "true")]);
    for role in [Role::Auth, Role::Authz, Role::Projector] {
        platform.spawn(role);
    }
    platform.spawn_with(Role::Gateway, &[("KEEL_GATEWAY__COMMAND_TIMEOUT_MS", "2000")]);
    for role in [Role::Identity, Role::Auth, Role::Authz, Role::Projector, Role::Gateway] {
        platform.wait_ready(role, Duration::from_secs(90)).await;
    }
    platform
}

/// Waits until the identity instance stands between the two steps of a `kind` process.
async fn paused_between_steps(platform: &Platform, kind: &str) {
    let sample = format!("keel_processes_paused{{kind=\"{kind}\"}}");
    eventually(Duration::from_secs(30), "identity to stop between the steps", || async {
        (platform.metric(Role::Identity, &sample).await == Some(1.0)).then_some(())
    })
    .await;
}

/// Kills the paused identity instance and starts one that does not pause.
async fn replace_identity(platform: &mut Platform) {
    platform.kill9(Role::Identity);
    platform.spawn(Role::Identity);
    platform.wait_ready(Role::Identity, Duration::from_secs(90)).await;
}

async fn processes_stored(platform: &Platform, kind: &str) -> i64 {
    let pool = platform.database.pool().await;
    sqlx::query_scalar("SELECT count(*) FROM command_processes WHERE kind = $1")
        .bind(kind)
        .fetch_one(&pool)
        .await
        .unwrap()
}

async fn login_status(client: &reqwest::Client, gateway: &str, email: &str) -> StatusCode {
    client
        .post(format!("{gateway}/v1/auth/login"))
        .json(&json!({"email": email, "password": PASSWORD}))
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registration_killed_between_its_steps_is_completed_by_the_owner_of_the_user() {
    let mut platform = platform_that_pauses_between_steps().await;
    let client = reqwest::Client::new();
    let gateway = platform.gateway_url.clone();
    let email = "ada@example.com";
    let register = || {
        client
            .post(format!("{gateway}/v1/users"))
            .header("idempotency-key", "register-ada")
            .json(&json!({"email": email, "display_name": "Ada", "password": PASSWORD}))
            .send()
    };

    // The password is stored; identity stops before registering the user, and the gateway gives
    // up: the outcome is unknown to the client.
    let first = tokio::spawn(register());
    paused_between_steps(&platform, "registration").await;
    let first = first.await.unwrap().unwrap();
    assert!(
        matches!(first.status(), StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT),
        "the gateway gives up on a command that does not answer: {}",
        first.status()
    );
    assert_eq!(processes_stored(&platform, "registration").await, 1, "the process is recorded before its steps");
    assert_eq!(platform.broker.record_count("identity.users"), 0, "half-done: no user in the log yet");
    assert!(platform.broker.topic_contains("auth.credentials", b"PasswordSet"), "but the password is stored");

    // Killed between the steps. Its successor owns the user's partition and completes the
    // registration: nobody retries the request.
    replace_identity(&mut platform).await;
    eventually(Duration::from_secs(60), "the interrupted registration to be completed", || async {
        (login_status(&client, &gateway, email).await == StatusCode::OK).then_some(())
    })
    .await;
    assert_eq!(processes_stored(&platform, "registration").await, 0, "a complete process is forgotten");
    let recovered = "keel_processes_recovered_total{kind=\"registration\",outcome=\"completed\",service=\"identity\"}";
    assert_eq!(platform.metric(Role::Identity, recovered).await, Some(1.0), "completed by the recovery, once");
    let pool = platform.database.pool().await;
    assert_eq!(count(&pool, "users").await, 1);
    assert_eq!(platform.broker.record_count("identity.users"), 1, "registered once");

    // The client's retry, whenever it comes, gets the first result and changes nothing.
    let retry = register().await.unwrap();
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let body: Value = retry.json().await.unwrap();
    assert_eq!(body["version"], 1);
    assert_eq!(platform.broker.record_count("identity.users"), 1, "the retry appended nothing");
    assert_eq!(processes_stored(&platform, "registration").await, 0);
    assert_eq!(login_status(&client, &gateway, email).await, StatusCode::OK);

    // Later, Ada moves to another address and someone else takes her old one. A retry of her
    // registration now still gets its first result, and undoes nothing of a user who exists.
    let ada = platform.login(&client, email, None).await;
    let moved = client
        .put(format!("{gateway}/v1/users/{}/email", ada.id))
        .bearer_auth(&ada.access_token)
        .json(&json!({"email": "ada@lovelace.org"}))
        .send()
        .await
        .unwrap();
    assert_eq!(moved.status(), StatusCode::OK);
    platform.signup(&client, email, "Someone else").await;
    let late = register().await.unwrap();
    assert_eq!(late.status(), StatusCode::CREATED);
    assert_eq!(late.headers()["idempotent-replayed"], "true");
    assert_eq!(processes_stored(&platform, "registration").await, 0);
    eventually(Duration::from_secs(30), "Ada's login at her new address", || async {
        (login_status(&client, &gateway, "ada@lovelace.org").await == StatusCode::OK).then_some(())
    })
    .await;
    assert_eq!(login_status(&client, &gateway, email).await, StatusCode::OK, "the other user keeps the old address");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_erasure_killed_between_its_steps_still_removes_the_password() {
    let mut platform = platform_that_pauses_between_steps().await;
    let client = reqwest::Client::new();
    let gateway = platform.gateway_url.clone();
    // Registering pauses too: complete it through the recovery first.
    let register = client
        .post(format!("{gateway}/v1/users"))
        .json(&json!({"email": "bo@example.com", "display_name": "Bo", "password": PASSWORD}))
        .send();
    let registration = tokio::spawn(register);
    paused_between_steps(&platform, "registration").await;
    registration.await.unwrap().unwrap();
    replace_identity(&mut platform).await;
    eventually(Duration::from_secs(60), "the registration to be completed", || async {
        (login_status(&client, &gateway, "bo@example.com").await == StatusCode::OK).then_some(())
    })
    .await;
    let bo = platform.login(&client, "bo@example.com", None).await;

    // Now an instance that pauses again, for the erasure.
    platform.kill9(Role::Identity);
    platform.spawn_with(Role::Identity, &[("KEEL_IDENTITY__UNSAFE_PAUSE_BETWEEN_STEPS", "true")]);
    platform.wait_ready(Role::Identity, Duration::from_secs(90)).await;
    let erase =
        client.delete(format!("{gateway}/v1/users/{}/personal-data", bo.id)).bearer_auth(&bo.access_token).send();
    let erasure = tokio::spawn(erase);
    paused_between_steps(&platform, "erasure").await;
    erasure.await.unwrap().unwrap();
    assert_eq!(processes_stored(&platform, "erasure").await, 1);

    replace_identity(&mut platform).await;
    // The password's removal is a commit of the credentials topic, after the password's.
    let removed = |platform: &Platform| platform.broker.topic_contains("auth.credentials", b"CredentialsRemoved");
    eventually(Duration::from_secs(60), "the interrupted erasure to be completed", || async {
        (processes_stored(&platform, "erasure").await == 0 && removed(&platform)).then_some(())
    })
    .await;
    let recovered = "keel_processes_recovered_total{kind=\"erasure\",outcome=\"completed\",service=\"identity\"}";
    assert_eq!(platform.metric(Role::Identity, recovered).await, Some(1.0));
    let status: String = sqlx::query_scalar("SELECT status FROM users WHERE id = $1::uuid")
        .bind(&bo.id)
        .fetch_one(&platform.database.pool().await)
        .await
        .unwrap();
    assert_eq!(status, "erased");
}
