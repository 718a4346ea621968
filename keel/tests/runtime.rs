//! The runtime every role shares: readiness follows its dependencies, config is strict and
//! never prints secrets.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{Platform, Role, eventually, free_port};

#[tokio::test(flavor = "multi_thread")]
async fn readiness_is_503_while_the_database_is_unreachable() {
    let mut platform = Platform::prepare().await;
    let dead_database = format!("postgres://postgres@127.0.0.1:{}/nowhere", free_port());
    platform.spawn_with(
        Role::Gateway,
        &[("KEEL_DATABASE__URL", dead_database.as_str()), ("KEEL_DATABASE__MIGRATE_ON_START", "false")],
    );
    let client = reqwest::Client::new();
    let base = platform.admin_url(Role::Gateway).to_owned();
    let live = eventually(Duration::from_secs(20), "the gateway to listen", || async {
        client.get(format!("{base}/livez")).send().await.ok()
    })
    .await;
    assert_eq!(live.status(), 200);
    let ready = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["checks"]["database"]["status"], "down", "{body}");
    let status = platform.terminate(Role::Gateway, Duration::from_secs(15));
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn config_dump_redacts_secrets_and_unknown_keys_are_refused() {
    let platform = Platform::prepare().await;
    let output = platform
        .keel(&["config", "dump"])
        .env("KEEL_DATABASE__PASSWORD", "hunter2")
        .env("KEEL_GATEWAY__MAX_BODY_BYTES", "1024")
        .output()
        .unwrap();
    assert!(output.status.success());
    let dump = String::from_utf8(output.stdout).unwrap();
    assert!(!dump.contains("hunter2") && dump.contains("[redacted]"), "{dump}");
    assert!(dump.contains("max_body_bytes: 1024"), "{dump}");

    let output = platform.keel(&["config", "dump"]).env("KEEL_GATEWAY__LISTN", "x").output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let error = String::from_utf8(output.stderr).unwrap();
    assert!(error.contains("gateway") && error.contains("listn"), "{error}");
}
