//! Register a user over HTTP and read it back from the read model, on real servers; bad input is
//! refused with problem+json and appends nothing; every role stops cleanly on SIGTERM.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::Row;
use support::{ALL_ROLES, PASSWORD, Platform, eventually};

const USERS_TOPIC: &str = "identity.users";
const CREDENTIALS_TOPIC: &str = "auth.credentials";

async fn post_user(client: &reqwest::Client, gateway: &str, body: Value) -> reqwest::Response {
    client.post(format!("{gateway}/v1/users")).json(&body).send().await.unwrap()
}

async fn problem(response: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(response.status(), status);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert_eq!(content_type, "application/problem+json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], status.as_u16());
    assert!(body["type"].as_str().unwrap().starts_with("urn:keel:problem:"), "{body}");
    body
}

/// The consistency token of a command reply's `position`.
fn position_token(position: &serde_json::Map<String, Value>) -> String {
    format!("{}/{}/{}", position["topic"].as_str().unwrap(), position["partition"], position["offset"])
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registered_user_can_be_read_back_and_is_audited() {
    let mut platform = Platform::start().await;
    let client = reqwest::Client::new();
    let gateway = platform.gateway_url.clone();

    let response = post_user(
        &client,
        &gateway,
        json!({"email": " Ada@Example.com ", "display_name": "Ada", "password": PASSWORD}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let created: Value = response.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/v1/users/{id}"));
    assert_eq!(created["position"]["topic"], USERS_TOPIC);
    assert!(created["position"]["partition"].as_i64().unwrap() < 8);
    assert!(created["position"]["offset"].as_i64().unwrap() >= 0);

    // Read back by Ada herself, signed in (the login waits for the read model to have her).
    let ada = eventually(Duration::from_secs(30), "Ada's login", || async {
        let response = client
            .post(format!("{gateway}/v1/auth/login"))
            .header("keel-consistency", created["position"].as_object().map(position_token).unwrap())
            .json(&json!({"email": "ada@example.com", "password": PASSWORD}))
            .send()
            .await
            .unwrap();
        if response.status() != StatusCode::OK {
            return None;
        }
        let tokens: Value = response.json().await.unwrap();
        Some(tokens["access_token"].as_str().unwrap().to_owned())
    })
    .await;
    let user: Value =
        client.get(format!("{gateway}/v1/users/{id}")).bearer_auth(&ada).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        user,
        json!({"id": id, "email": "ada@example.com", "display_name": "Ada", "bio": "", "status": "active", "version": 1})
    );
    let anonymous = client.get(format!("{gateway}/v1/users/{id}")).send().await.unwrap();
    problem(anonymous, StatusCode::UNAUTHORIZED).await;

    let pool = platform.database.pool().await;
    let audit = eventually(Duration::from_secs(20), "the audit entry", || async {
        sqlx::query(
            "SELECT event_type, actor, aggregate_version, payload, topic FROM audit_log
             WHERE aggregate_id = $1::uuid AND topic = 'identity.users'",
        )
        .bind(&id)
        .fetch_optional(&pool)
        .await
        .unwrap()
    })
    .await;
    assert_eq!(audit.get::<String, _>("event_type"), "UserRegistered");
    assert_eq!(audit.get::<String, _>("actor"), "anonymous");
    assert_eq!(audit.get::<String, _>("topic"), USERS_TOPIC);
    assert_eq!(audit.get::<i64, _>("aggregate_version"), 1);
    assert_eq!(
        audit.get::<Value, _>("payload"),
        json!({"user_id": id, "email": "[redacted]", "display_name": "[redacted]"}),
        "personal data never reaches the audit log"
    );

    // The same mailbox, spelled differently, is taken.
    let duplicate = post_user(
        &client,
        &gateway,
        json!({"email": "ADA@example.COM", "display_name": "Other", "password": PASSWORD}),
    )
    .await;
    let body = problem(duplicate, StatusCode::CONFLICT).await;
    assert_eq!(body["type"], "urn:keel:problem:conflict");

    let admin = platform.admin(&client).await;
    let missing = client
        .get(format!("{gateway}/v1/users/{}", uuid::Uuid::new_v4()))
        .bearer_auth(&admin.access_token)
        .send()
        .await
        .unwrap();
    problem(missing, StatusCode::NOT_FOUND).await;
    let malformed_id =
        client.get(format!("{gateway}/v1/users/not-a-uuid")).bearer_auth(&admin.access_token).send().await.unwrap();
    problem(malformed_id, StatusCode::BAD_REQUEST).await;

    let verify = platform.keel(&["audit", "verify"]).output().unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));

    let metrics = client.get(format!("{gateway}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("keel_http_requests_total"), "{metrics}");
    assert_eq!(
        platform.broker.record_count(USERS_TOPIC),
        2,
        "only the accepted registrations (Ada, the admin) were appended"
    );

    for role in ALL_ROLES.iter().rev().copied() {
        let status = platform.terminate(role, Duration::from_secs(15));
        assert!(status.success(), "{role:?} exited with {status} on SIGTERM");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_problem_json_and_appends_nothing() {
    let platform = Platform::start().await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/users", platform.gateway_url);

    let malformed =
        client.post(&url).header("content-type", "application/json").body("{\"email\": ").send().await.unwrap();
    problem(malformed, StatusCode::BAD_REQUEST).await;

    let missing_field = post_user(&client, &platform.gateway_url, json!({"email": "a@example.com"})).await;
    let body = problem(missing_field, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert!(body["detail"].as_str().unwrap().contains("display_name"), "{body}");

    let wrong_type = post_user(&client, &platform.gateway_url, json!({"email": 42, "display_name": "A"})).await;
    problem(wrong_type, StatusCode::UNPROCESSABLE_ENTITY).await;

    let unknown_field = post_user(
        &client,
        &platform.gateway_url,
        json!({"email": "a@example.com", "display_name": "A", "admin": true}),
    )
    .await;
    problem(unknown_field, StatusCode::UNPROCESSABLE_ENTITY).await;

    let invalid_email = post_user(
        &client,
        &platform.gateway_url,
        json!({"email": "not-an-email", "display_name": "A", "password": PASSWORD}),
    )
    .await;
    let body = problem(invalid_email, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert!(body["detail"].as_str().unwrap().starts_with("email:"), "{body}");

    let blank_name = post_user(
        &client,
        &platform.gateway_url,
        json!({"email": "b@example.com", "display_name": "   ", "password": PASSWORD}),
    )
    .await;
    problem(blank_name, StatusCode::UNPROCESSABLE_ENTITY).await;

    for (password, reason) in [("short", "at least 10"), ("1234567890", "too common"), ("b@example.com!!", "email")] {
        let weak = post_user(
            &client,
            &platform.gateway_url,
            json!({"email": "b@example.com", "display_name": "B", "password": password}),
        )
        .await;
        let body = problem(weak, StatusCode::UNPROCESSABLE_ENTITY).await;
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.starts_with("password:") && detail.contains(reason), "{detail}");
    }

    let huge = json!({"email": "c@example.com", "display_name": "x".repeat(2 * 1024 * 1024), "password": PASSWORD});
    let too_large = client.post(&url).json(&huge).send().await.unwrap();
    assert_eq!(too_large.headers()["connection"], "close", "the unread body spoils the connection");
    problem(too_large, StatusCode::PAYLOAD_TOO_LARGE).await;

    let not_json = client.post(&url).header("content-type", "text/plain").body("hello").send().await.unwrap();
    problem(not_json, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;

    let no_route = client.get(format!("{}/v1/nothing-here", platform.gateway_url)).send().await.unwrap();
    problem(no_route, StatusCode::NOT_FOUND).await;
    let wrong_method = client.delete(&url).send().await.unwrap();
    problem(wrong_method, StatusCode::METHOD_NOT_ALLOWED).await;

    assert_eq!(platform.broker.record_count(USERS_TOPIC), 0, "rejected commands append nothing");
    assert_eq!(platform.broker.record_count(CREDENTIALS_TOPIC), 0, "not even a password");
}
