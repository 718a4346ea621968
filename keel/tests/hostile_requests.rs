//! Generated hostile requests: Schemathesis (PyPI, installed by `scripts/infra ensure`) reads the
//! gateway's `/openapi.json` and sends what it derives from it — valid, boundary and invalid
//! inputs, and sequences that follow the document's links — as anonymous, as a user and as an
//! admin. No answer may be a 5xx or contradict the document (status, content type, body schema),
//! and what an anonymous caller or a user sends must change nothing they do not own.

mod support;

use std::{path::PathBuf, process::Command};

use serde_json::{Value, json};
use support::{Platform, eventually};

/// `st` as `scripts/infra ensure` installs it, or `SCHEMATHESIS`.
fn schemathesis() -> PathBuf {
    std::env::var("SCHEMATHESIS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/keel/venv/bin/st"))
}

/// Runs Schemathesis against the gateway with `token` (none: anonymous); panics with its report
/// when a check fails.
fn run(gateway: &str, token: Option<&str>, who: &str) {
    let mut command = Command::new(schemathesis());
    command
        .args(["run", &format!("{gateway}/openapi.json")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        ])
        .args(["--max-examples", "25", "--workers", "2", "--seed", "20261207"])
        // Ending the caller's own session would turn the rest of the run into 401s.
        .args(["--exclude-path-regex", "/v1/auth/logout"])
        .env("NO_COLOR", "1")
        .current_dir(std::env::temp_dir());
    if let Some(token) = token {
        command.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    let output = command.output().expect("Schemathesis is installed (scripts/infra ensure)");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "Schemathesis as {who} found failures:\n{report}");
    assert!(report.contains("API Operations"), "Schemathesis ran as {who}:\n{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn generated_requests_get_no_5xx_and_no_answer_the_document_does_not_describe() {
    let platform = Platform::start().await;
    let client = reqwest::Client::new();
    let gateway = platform.gateway_url.clone();
    // What someone else owns: an author's published post, and the roles.
    let author = platform.signup(&client, "author@example.com", "Author").await;
    let drafted: Value = client
        .post(format!("{gateway}/v1/posts"))
        .bearer_auth(&author.access_token)
        .json(&json!({"title": "Owned", "body": "Not yours to change."}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let post = drafted["id"].as_str().unwrap().to_owned();
    let published = client
        .post(format!("{gateway}/v1/posts/{post}/publish"))
        .bearer_auth(&author.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(published.status(), 200);
    let admin = platform.admin(&client).await;
    let snapshot = || async {
        let post: Value = client.get(format!("{gateway}/v1/posts/{post}")).send().await.unwrap().json().await.unwrap();
        let user: Value = client
            .get(format!("{gateway}/v1/users/{}", author.id))
            .bearer_auth(&admin.access_token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let roles: Value = client
            .get(format!("{gateway}/v1/roles"))
            .bearer_auth(&admin.access_token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (post["version"].clone(), post["title"].clone(), user["version"].clone(), user["status"].clone(), roles)
    };
    let before = eventually(std::time::Duration::from_secs(30), "the fixture in the read models", || async {
        let state = snapshot().await;
        (state.0 == 2).then_some(state)
    })
    .await;

    let user = platform.signup(&client, "fuzzer@example.com", "Fuzzer").await;
    let blocking = {
        let gateway = gateway.clone();
        tokio::task::spawn_blocking(move || {
            run(&gateway, None, "anonymous");
            run(&gateway, Some(&user.access_token), "a user");
        })
    };
    blocking.await.unwrap();
    assert_eq!(snapshot().await, before, "anonymous callers and a user changed nothing of someone else's");

    let admin_token = platform.login(&client, support::ADMIN_EMAIL, None).await.access_token;
    let gateway_for_admin = gateway.clone();
    tokio::task::spawn_blocking(move || run(&gateway_for_admin, Some(&admin_token), "an admin")).await.unwrap();
    // Every role survived it.
    for role in support::ALL_ROLES {
        let url = format!("{}/readyz", platform.admin_url(*role));
        assert_eq!(reqwest::get(&url).await.unwrap().status(), 200, "{role:?} is still ready");
    }
}
