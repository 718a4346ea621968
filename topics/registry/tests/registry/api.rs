//! Config, deletes and bad input: status codes, Confluent error codes, content type.

use serde_json::json;

use crate::support::{record, with_registry};

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

fn as_json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).expect("valid JSON")
}

fn user() -> String {
    record("User", r#"[{"name":"name","type":"string"}]"#)
}

#[tokio::test]
async fn config_is_read_set_and_validated() {
    with_registry(|registry| async move {
        let global = registry.get("/config").await;
        assert_eq!(global.status, 200);
        assert_eq!(global.content_type, CONTENT_TYPE);
        assert_eq!(global.body, json!({"compatibilityLevel": "BACKWARD"}));

        let set = registry.put("/config", &json!({"compatibility": "full_transitive"})).await;
        assert_eq!(set.status, 200, "{set:?}");
        assert_eq!(set.body, json!({"compatibility": "FULL_TRANSITIVE"}));
        assert_eq!(registry.get("/config").await.body, json!({"compatibilityLevel": "FULL_TRANSITIVE"}));

        let invalid = registry.put("/config", &json!({"compatibility": "SIDEWAYS"})).await;
        assert_eq!(invalid.status, 422, "{invalid:?}");
        assert_eq!(invalid.error_code(), 42203);
        let invalid = registry.put("/config/users-value", &json!({"compatibility": "BACK"})).await;
        assert_eq!(invalid.error_code(), 42203);

        let unset = registry.get("/config/users-value").await;
        assert_eq!(unset.status, 404, "{unset:?}");
        assert_eq!(unset.error_code(), 40408);
        let defaulted = registry.get("/config/users-value?defaultToGlobal=true").await;
        assert_eq!(defaulted.body, json!({"compatibilityLevel": "FULL_TRANSITIVE"}));

        registry.set_level("users-value", "NONE").await;
        assert_eq!(registry.get("/config/users-value").await.body, json!({"compatibilityLevel": "NONE"}));
        // The subject's level wins over the global one: an unrelated schema is accepted.
        registry.register_ok("users-value", &user()).await;
        registry.register_ok("users-value", &record("User", r#"[{"name":"id","type":"long"}]"#)).await;

        let removed = registry.delete("/config/users-value").await;
        assert_eq!(removed.body, json!({"compatibilityLevel": "NONE"}));
        assert_eq!(registry.get("/config/users-value").await.error_code(), 40408);
        // Back under the global FULL_TRANSITIVE: a third unrelated schema is refused.
        let refused = registry.register("users-value", &record("User", r#"[{"name":"x","type":"int"}]"#)).await;
        assert_eq!(refused.status, 409, "{refused:?}");

        let reset = registry.delete("/config").await;
        assert_eq!(reset.body, json!({"compatibilityLevel": "FULL_TRANSITIVE"}));
        assert_eq!(registry.get("/config").await.body, json!({"compatibilityLevel": "BACKWARD"}));
    })
    .await;
}

#[tokio::test]
async fn invalid_schemas_and_bodies_are_refused_with_confluent_codes() {
    with_registry(|registry| async move {
        let invalid =
            registry.register("users-value", r#"{"type":"record","name":"User","fields":[{"name":"a"}]}"#).await;
        assert_eq!(invalid.status, 422, "{invalid:?}");
        assert_eq!(invalid.error_code(), 42201);
        assert_eq!(invalid.content_type, CONTENT_TYPE);

        let not_json = registry.register("users-value", "{nope").await;
        assert_eq!(not_json.error_code(), 42201, "{not_json:?}");

        let empty = registry.register("users-value", "").await;
        assert_eq!(empty.error_code(), 42201, "{empty:?}");

        let protobuf = registry
            .post(
                "/subjects/users-value/versions",
                &json!({"schema": "syntax = \"proto3\";", "schemaType": "PROTOBUF"}),
            )
            .await;
        assert_eq!(protobuf.status, 422, "{protobuf:?}");
        assert_eq!(protobuf.error_code(), 42201);
        let message = protobuf.body["message"].as_str().expect("a message");
        assert!(message.contains("PROTOBUF") && message.contains("AVRO"), "{message}");

        let missing_reference = registry
            .post(
                "/subjects/users-value/versions",
                &json!({
                    "schema": record("User", r#"[{"name":"m","type":"keel.test.Money"}]"#),
                    "references": [{"name": "keel.test.Money", "subject": "money-value", "version": 1}],
                }),
            )
            .await;
        assert_eq!(missing_reference.error_code(), 42201, "{missing_reference:?}");

        let malformed = registry.post_raw("/subjects/users-value/versions", "{\"schema\": ", "application/json").await;
        assert_eq!(malformed.status, 400, "{malformed:?}");
        assert_eq!(malformed.error_code(), 400);

        let wrong_shape =
            registry.post_raw("/subjects/users-value/versions", r#"{"schemas": 1}"#, "application/json").await;
        assert_eq!(wrong_shape.status, 422, "{wrong_shape:?}");
        assert_eq!(wrong_shape.error_code(), 422);

        // Nothing above created the subject.
        assert_eq!(registry.get("/subjects").await.body, json!([]));

        // A plain application/json body is accepted too.
        let accepted = registry
            .post_raw("/subjects/users-value/versions", &json!({"schema": user()}).to_string(), "application/json")
            .await;
        assert_eq!(accepted.status, 200, "{accepted:?}");
        assert_eq!(accepted.content_type, CONTENT_TYPE);
    })
    .await;
}

#[tokio::test]
async fn unknown_subjects_versions_and_ids_are_not_found() {
    with_registry(|registry| async move {
        let id = registry.register_ok("users-value", &user()).await;

        let cases = [
            ("/subjects/nobody-value/versions", 404, 40401),
            ("/subjects/nobody-value/versions/latest", 404, 40401),
            ("/subjects/nobody-value/versions/1", 404, 40401),
            ("/subjects/users-value/versions/2", 404, 40402),
            ("/subjects/users-value/versions/latest/schema", 200, 0),
            ("/subjects/users-value/versions/abc", 422, 42202),
            ("/subjects/users-value/versions/0", 422, 42202),
            ("/subjects/users-value/versions/99999999999", 422, 42202),
            ("/schemas/ids/999", 404, 40403),
            ("/schemas/ids/not-a-number", 404, 40403),
            ("/schemas/ids/999/versions", 404, 40403),
            ("/no/such/route", 404, 404),
        ];
        for (path, status, code) in cases {
            let answer = registry.get(path).await;
            assert_eq!(answer.status, status, "{path}: {answer:?}");
            if code != 0 {
                assert_eq!(answer.error_code(), code, "{path}: {answer:?}");
                assert!(answer.body["message"].is_string(), "{path}: {answer:?}");
            }
        }

        let lookup = registry.post("/subjects/nobody-value", &json!({"schema": user()})).await;
        assert_eq!(lookup.error_code(), 40401, "{lookup:?}");
        let compatibility =
            registry.post("/compatibility/subjects/nobody-value/versions/latest", &json!({"schema": user()})).await;
        assert_eq!(compatibility.error_code(), 40401, "{compatibility:?}");
        let compatibility =
            registry.post("/compatibility/subjects/users-value/versions/7", &json!({"schema": user()})).await;
        assert_eq!(compatibility.error_code(), 40402, "{compatibility:?}");

        // What is there is served as registered: by id, by version, raw.
        let by_id = registry.get(&format!("/schemas/ids/{id}?subject=users-value")).await;
        assert_eq!(by_id.status, 200);
        assert_eq!(by_id.body.as_object().map(|body| body.len()), Some(1), "{by_id:?}");
        let served = by_id.body["schema"].as_str().expect("the schema as a string");
        assert_eq!(as_json(served), as_json(&user()));
        let raw = registry.get("/subjects/users-value/versions/1/schema").await;
        assert_eq!(raw.body, as_json(&user()));
        // Subjects may contain '/', which clients send percent-encoded.
        let slashed = registry.register_ok("team%2Fusers-value", &user()).await;
        assert_eq!(slashed, id);
        assert_eq!(registry.get("/subjects").await.body, json!(["team/users-value", "users-value"]));
        assert_eq!(registry.versions("team%2Fusers-value").await, vec![1]);

        let types = registry.get("/schemas/types").await;
        assert_eq!(types.body, json!(["AVRO"]));
    })
    .await;
}

#[tokio::test]
async fn subjects_are_soft_deleted_then_permanently_deleted() {
    with_registry(|registry| async move {
        let id = registry.register_ok("users-value", &user()).await;
        let evolved = record("User", r#"[{"name":"name","type":"string"},{"name":"age","type":"int","default":0}]"#);
        registry.register_ok("users-value", &evolved).await;

        let premature = registry.delete("/subjects/users-value?permanent=true").await;
        assert_eq!(premature.error_code(), 40405, "{premature:?}");

        let deleted = registry.delete("/subjects/users-value").await;
        assert_eq!(deleted.status, 200, "{deleted:?}");
        assert_eq!(deleted.body, json!([1, 2]));
        assert_eq!(registry.get("/subjects").await.body, json!([]));
        assert_eq!(registry.get("/subjects?deleted=true").await.body, json!(["users-value"]));
        assert_eq!(registry.get("/subjects/users-value/versions").await.error_code(), 40401);
        assert_eq!(registry.get("/subjects/users-value/versions/1?deleted=true").await.body["id"], json!(id));
        // Old payloads stay decodable: the id still resolves.
        assert_eq!(registry.get(&format!("/schemas/ids/{id}")).await.status, 200);
        assert_eq!(registry.delete("/subjects/users-value").await.error_code(), 40401);

        // Registering again starts a new version: numbers are never reused.
        assert_eq!(registry.register_ok("users-value", &user()).await, id);
        assert_eq!(registry.versions("users-value").await, vec![3]);

        let version = registry.delete("/subjects/users-value/versions/3").await;
        assert_eq!(version.body, json!(3));
        let permanent = registry.delete("/subjects/users-value?permanent=true").await;
        assert_eq!(permanent.body, json!([1, 2, 3]), "{permanent:?}");
        assert_eq!(registry.get("/subjects?deleted=true").await.body, json!([]));
    })
    .await;
}
