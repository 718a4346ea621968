//! Compatibility levels, deduplication and concurrent registration.

use std::collections::BTreeSet;

use serde_json::json;

use crate::support::{record, with_registry};

fn v1() -> String {
    record("User", r#"[{"name":"name","type":"string"}]"#)
}

#[tokio::test]
async fn backward_refuses_a_field_without_default_and_accepts_one_with_default() {
    with_registry(|registry| async move {
        let first = registry.register_ok("users-value", &v1()).await;

        let breaking = record("User", r#"[{"name":"name","type":"string"},{"name":"email","type":"string"}]"#);
        let refused = registry.register("users-value", &breaking).await;
        assert_eq!(refused.status, 409, "{refused:?}");
        assert_eq!(refused.error_code(), 409);
        let message = refused.body["message"].as_str().expect("a message");
        assert!(message.contains("'email'"), "names the field: {message}");
        assert!(message.contains("BACKWARD"), "names the level: {message}");
        assert_eq!(registry.versions("users-value").await, vec![1]);

        let evolving =
            record("User", r#"[{"name":"name","type":"string"},{"name":"email","type":"string","default":""}]"#);
        let second = registry.register_ok("users-value", &evolving).await;
        assert_ne!(second, first);
        assert_eq!(registry.versions("users-value").await, vec![1, 2]);
        let latest = registry.get("/subjects/users-value/versions/latest").await;
        assert_eq!(latest.body["id"], json!(second));
        assert_eq!(latest.body["version"], json!(2));
    })
    .await;
}

#[tokio::test]
async fn reregistering_returns_the_same_id_without_a_new_version() {
    with_registry(|registry| async move {
        let id = registry.register_ok("users-value", &v1()).await;
        assert_eq!(registry.register_ok("users-value", &v1()).await, id);
        // Formatting and JSON key order do not make a different schema.
        let reformatted = r#"{ "namespace": "keel.test", "name": "User",
            "fields": [ { "type": "string", "name": "name" } ], "type": "record" }"#;
        assert_eq!(registry.register_ok("users-value", reformatted).await, id);
        assert_eq!(registry.versions("users-value").await, vec![1]);

        // The same schema under another subject shares the id but is that subject's version 1.
        assert_eq!(registry.register_ok("admins-value", &v1()).await, id);
        let usages = registry.get(&format!("/schemas/ids/{id}/versions")).await;
        assert_eq!(
            usages.body,
            json!([
                {"subject": "admins-value", "version": 1},
                {"subject": "users-value", "version": 1},
            ])
        );
        let subjects = registry.get("/subjects").await;
        assert_eq!(subjects.body, json!(["admins-value", "users-value"]));

        // Lookup finds it; a default makes a different schema that is not registered.
        let found = registry.post("/subjects/users-value", &json!({ "schema": v1() })).await;
        assert_eq!(found.status, 200, "{found:?}");
        assert_eq!(found.body["id"], json!(id));
        assert_eq!(found.body["version"], json!(1));
        assert_eq!(found.body["subject"], json!("users-value"));
        let with_default = record("User", r#"[{"name":"name","type":"string","default":"anonymous"}]"#);
        let missing = registry.post("/subjects/users-value", &json!({ "schema": with_default })).await;
        assert_eq!(missing.status, 404, "{missing:?}");
        assert_eq!(missing.error_code(), 40403);
    })
    .await;
}

/// v1 has `score: string`; v2 drops it; v3 brings it back as `int` with a default. v3 reads v2
/// data (default) but not v1 data (string is not int): BACKWARD passes, BACKWARD_TRANSITIVE not.
fn transitive_case() -> [String; 3] {
    [
        record("Player", r#"[{"name":"id","type":"string"},{"name":"score","type":"string"}]"#),
        record("Player", r#"[{"name":"id","type":"string"}]"#),
        record("Player", r#"[{"name":"id","type":"string"},{"name":"score","type":"int","default":0}]"#),
    ]
}

#[tokio::test]
async fn transitive_levels_check_every_version() {
    with_registry(|registry| async move {
        let [first, second, third] = transitive_case();

        registry.set_level("plain-value", "BACKWARD").await;
        registry.set_level("strict-value", "BACKWARD_TRANSITIVE").await;
        for subject in ["plain-value", "strict-value"] {
            registry.register_ok(subject, &first).await;
            registry.register_ok(subject, &second).await;
        }

        registry.register_ok("plain-value", &third).await;
        assert_eq!(registry.versions("plain-value").await, vec![1, 2, 3]);

        let refused = registry.register("strict-value", &third).await;
        assert_eq!(refused.status, 409, "{refused:?}");
        assert_eq!(refused.error_code(), 409);
        let message = refused.body["message"].as_str().expect("a message");
        assert!(message.contains("version 1"), "{message}");
        assert!(!message.contains("version 2"), "v2 is compatible: {message}");
        assert_eq!(registry.versions("strict-value").await, vec![1, 2]);

        // The compatibility endpoints agree: fine against the latest, not against v1 or all.
        let body = json!({ "schema": third });
        let latest = registry.post("/compatibility/subjects/strict-value/versions/latest", &body).await;
        assert_eq!(latest.body, json!({"is_compatible": true}), "{latest:?}");
        let against_first = registry.post("/compatibility/subjects/strict-value/versions/1", &body).await;
        assert_eq!(against_first.body["is_compatible"], json!(false));
        let all = registry.post("/compatibility/subjects/strict-value/versions?verbose=true", &body).await;
        assert_eq!(all.body["is_compatible"], json!(false), "{all:?}");
        let messages = all.body["messages"].as_array().expect("verbose messages");
        assert_eq!(messages.len(), 1, "{messages:?}");
        let all_plain = registry.post("/compatibility/subjects/plain-value/versions", &body).await;
        assert_eq!(all_plain.body, json!({"is_compatible": true}));
    })
    .await;
}

#[tokio::test]
async fn forward_and_full_levels_check_the_other_direction() {
    with_registry(|registry| async move {
        let base = record("Item", r#"[{"name":"id","type":"string"},{"name":"label","type":"string"}]"#);
        let dropped_label = record("Item", r#"[{"name":"id","type":"string"}]"#);
        let added_price = record(
            "Item",
            r#"[{"name":"id","type":"string"},{"name":"label","type":"string"},{"name":"price","type":"long"}]"#,
        );

        registry.set_level("forward-value", "FORWARD").await;
        registry.register_ok("forward-value", &base).await;
        // The old schema cannot read new data without `label` (it has no default).
        let refused = registry.register("forward-value", &dropped_label).await;
        assert_eq!(refused.status, 409, "{refused:?}");
        // The old schema ignores an added field, default or not.
        registry.register_ok("forward-value", &added_price).await;

        registry.set_level("full-value", "FULL").await;
        registry.register_ok("full-value", &base).await;
        let refused = registry.register("full-value", &added_price).await;
        assert_eq!(refused.status, 409, "FULL also checks backward: {refused:?}");

        registry.set_level("none-value", "NONE").await;
        registry.register_ok("none-value", &base).await;
        registry.register_ok("none-value", &record("Item", r#"[{"name":"id","type":"long"}]"#)).await;
        assert_eq!(registry.versions("none-value").await, vec![1, 2]);
    })
    .await;
}

#[tokio::test]
async fn concurrent_registrations_get_distinct_versions() {
    with_registry(|registry| async move {
        registry.set_level("race-value", "NONE").await;
        let mut tasks = Vec::new();
        for n in 0..12 {
            let registry = registry.clone();
            tasks.push(tokio::spawn(async move {
                let schema = record(&format!("Racer{n}"), r#"[{"name":"id","type":"string"}]"#);
                registry.register_ok("race-value", &schema).await
            }));
        }
        let mut ids = BTreeSet::new();
        for task in tasks {
            ids.insert(task.await.expect("registration task"));
        }
        assert_eq!(ids.len(), 12, "distinct schemas get distinct ids");
        assert_eq!(registry.versions("race-value").await, (1..=12).collect::<Vec<_>>());

        // The same new schema registered concurrently makes one version and one id.
        let shared = record("Shared", r#"[{"name":"id","type":"string"}]"#);
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let registry = registry.clone();
            let shared = shared.clone();
            tasks.push(tokio::spawn(async move { registry.register_ok("race-value", &shared).await }));
        }
        let mut shared_ids = BTreeSet::new();
        for task in tasks {
            shared_ids.insert(task.await.expect("registration task"));
        }
        assert_eq!(shared_ids.len(), 1, "{shared_ids:?}");
        assert_eq!(registry.versions("race-value").await.len(), 13);
    })
    .await;
}
