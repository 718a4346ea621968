//! The registry as `schema_registry_converter` (Keel's client) uses it.

use apache_avro::types::Value;
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::schema_registry_common::{SchemaType, SubjectNameStrategy, SuppliedSchema};
use serde_json::json;

use crate::support::{Registry, record, with_registry};

const HEARTBEAT_V1: &str = r#"{"type":"record","name":"Heartbeat","namespace":"keel.test","fields":[{"name":"beat","type":"long"},{"name":"source","type":"string"}]}"#;
const HEARTBEAT_V2: &str = r#"{"type":"record","name":"Heartbeat","namespace":"keel.test","fields":[{"name":"beat","type":"long"},{"name":"source","type":"string"},{"name":"region","type":"string","default":"eu"}]}"#;

fn supplied(schema: &str) -> SuppliedSchema {
    SuppliedSchema::new(Some("keel.test.Heartbeat".to_owned()), SchemaType::Avro, schema.to_owned())
}

fn with_schema(topic: &str, schema: &str) -> SubjectNameStrategy {
    SubjectNameStrategy::TopicNameStrategyWithSchema(topic.to_owned(), false, supplied(schema))
}

/// The schema id of a Confluent-framed payload, checking the magic byte.
fn framed_id(bytes: &[u8]) -> u32 {
    assert!(bytes.len() > 5, "payload too short: {bytes:?}");
    assert_eq!(bytes[0], 0, "magic byte");
    u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]])
}

fn settings(registry: &Registry) -> SrSettings {
    SrSettings::new(registry.url.clone())
}

#[tokio::test]
async fn converter_round_trips_values_through_the_registry() {
    with_registry(|registry| async move {
        let encoder = AvroEncoder::new(settings(&registry));
        let decoder = AvroDecoder::new(settings(&registry));

        let bytes = encoder
            .encode(
                vec![("beat", Value::Long(3)), ("source", Value::String("gateway".into()))],
                with_schema("heartbeat", HEARTBEAT_V1),
            )
            .await
            .expect("encode registers the schema");
        let id = framed_id(&bytes);
        // beat = 3 (zigzag 6), then "gateway" (length 7, zigzag 14).
        assert_eq!(&bytes[5..], &[6, 14, b'g', b'a', b't', b'e', b'w', b'a', b'y']);

        let latest = registry.get("/subjects/heartbeat-value/versions/latest").await;
        assert_eq!(latest.status, 200, "{latest:?}");
        assert_eq!(latest.body["id"], json!(id));
        assert_eq!(latest.body["version"], json!(1));
        assert_eq!(latest.body["subject"], json!("heartbeat-value"));
        assert!(latest.body.get("schemaType").is_none(), "{latest:?}");

        let decoded = decoder.decode(Some(&bytes)).await.expect("decode");
        assert_eq!(
            decoded.value,
            Value::Record(vec![("beat".into(), Value::Long(3)), ("source".into(), Value::String("gateway".into())),])
        );
        let name = decoded.name.expect("a named record");
        assert_eq!(name.fullname(None), "keel.test.Heartbeat");
    })
    .await;
}

#[tokio::test]
async fn converter_sees_stable_ids_and_evolves_schemas() {
    with_registry(|registry| async move {
        let v1 = vec![("beat", Value::Long(1)), ("source", Value::String("a".into()))];
        let first = AvroEncoder::new(settings(&registry))
            .encode(v1.clone(), with_schema("heartbeat", HEARTBEAT_V1))
            .await
            .expect("first encode");
        // A fresh client (no cache) registering the same schema gets the same id, no new version.
        let again = AvroEncoder::new(settings(&registry))
            .encode(v1.clone(), with_schema("heartbeat", HEARTBEAT_V1))
            .await
            .expect("second encode");
        assert_eq!(framed_id(&first), framed_id(&again));
        assert_eq!(registry.versions("heartbeat-value").await, vec![1]);

        // The same schema on another topic shares the id (schemas are global).
        let other = AvroEncoder::new(settings(&registry))
            .encode(v1, with_schema("pulse", HEARTBEAT_V1))
            .await
            .expect("encode on another topic");
        assert_eq!(framed_id(&other), framed_id(&first));

        // A compatible evolution gets a new id and version; old payloads stay readable.
        let evolved = AvroEncoder::new(settings(&registry))
            .encode(
                vec![
                    ("beat", Value::Long(2)),
                    ("source", Value::String("b".into())),
                    ("region", Value::String("us".into())),
                ],
                with_schema("heartbeat", HEARTBEAT_V2),
            )
            .await
            .expect("encode with the evolved schema");
        assert_ne!(framed_id(&evolved), framed_id(&first));
        assert_eq!(registry.versions("heartbeat-value").await, vec![1, 2]);

        // Without a supplied schema the client asks for the latest version.
        let by_latest = AvroEncoder::new(settings(&registry))
            .encode(
                vec![
                    ("beat", Value::Long(4)),
                    ("source", Value::String("c".into())),
                    ("region", Value::String("ap".into())),
                ],
                SubjectNameStrategy::TopicNameStrategy("heartbeat".into(), false),
            )
            .await
            .expect("encode with the latest schema");
        assert_eq!(framed_id(&by_latest), framed_id(&evolved));

        let decoder = AvroDecoder::new(settings(&registry));
        let old = decoder.decode(Some(&first)).await.expect("decode v1");
        assert_eq!(
            old.value,
            Value::Record(vec![("beat".into(), Value::Long(1)), ("source".into(), Value::String("a".into())),])
        );
        let new = decoder.decode(Some(&evolved)).await.expect("decode v2");
        assert_eq!(
            new.value,
            Value::Record(vec![
                ("beat".into(), Value::Long(2)),
                ("source".into(), Value::String("b".into())),
                ("region".into(), Value::String("us".into())),
            ])
        );
    })
    .await;
}

#[tokio::test]
async fn converter_refuses_an_incompatible_schema() {
    with_registry(|registry| async move {
        AvroEncoder::new(settings(&registry))
            .encode(
                vec![("beat", Value::Long(1)), ("source", Value::String("a".into()))],
                with_schema("heartbeat", HEARTBEAT_V1),
            )
            .await
            .expect("first encode");
        let breaking = record(
            "Heartbeat",
            r#"[{"name":"beat","type":"long"},{"name":"source","type":"string"},{"name":"zone","type":"string"}]"#,
        );
        let error = AvroEncoder::new(settings(&registry))
            .encode(
                vec![
                    ("beat", Value::Long(1)),
                    ("source", Value::String("a".into())),
                    ("zone", Value::String("z".into())),
                ],
                with_schema("heartbeat", &breaking),
            )
            .await
            .expect_err("an incompatible schema is refused");
        let text = error.to_string();
        assert!(text.contains("409"), "{text}");
        assert!(text.contains("zone"), "the reason names the field: {text}");
        assert_eq!(registry.versions("heartbeat-value").await, vec![1]);
    })
    .await;
}

#[tokio::test]
async fn converter_resolves_schema_references() {
    with_registry(|registry| async move {
        let money = r#"{"type":"record","name":"Money","namespace":"keel.test","fields":[{"name":"cents","type":"long"}]}"#;
        registry.register_ok("money-value", money).await;
        // The converter inlines a reference only where it is named as it declares it: here the
        // short name, within the same namespace. Such schemas are served as submitted.
        let order_schema = r#"{"type":"record","name":"Order","namespace":"keel.test","fields":[{"name":"total","type":"Money"}]}"#;
        let register = |schema: &'static str| {
            let registry = registry.clone();
            async move {
                registry
                    .post(
                        "/subjects/order-value/versions",
                        &json!({
                            "schema": schema,
                            "schemaType": "AVRO",
                            "references": [{"name": "keel.test.Money", "subject": "money-value", "version": -1}],
                        }),
                    )
                    .await
            }
        };
        let order = register(order_schema).await;
        assert_eq!(order.status, 200, "{order:?}");
        let id = u32::try_from(order.body["id"].as_i64().expect("id")).expect("positive id");
        // The same schema naming the type in full is the same schema.
        let full_name = register(
            r#"{"type":"record","name":"Order","namespace":"keel.test","fields":[{"name":"total","type":"keel.test.Money"}]}"#,
        )
        .await;
        assert_eq!(full_name.body["id"], json!(id), "{full_name:?}");
        assert_eq!(registry.versions("order-value").await, vec![1]);

        let fetched = registry.get(&format!("/schemas/ids/{id}")).await;
        assert_eq!(fetched.body["schema"], json!(order_schema));
        // "version": -1 (latest) was pinned to the concrete version at registration.
        assert_eq!(
            fetched.body["references"],
            json!([{"name": "keel.test.Money", "subject": "money-value", "version": 1}])
        );

        // Order { total: Money { cents: 5 } }: the long 5 is zigzag 10.
        let mut payload = vec![0];
        payload.extend_from_slice(&id.to_be_bytes());
        payload.push(10);
        let decoded = AvroDecoder::new(settings(&registry))
            .decode(Some(&payload))
            .await
            .expect("the client inlines the reference and decodes");
        assert_eq!(
            decoded.value,
            Value::Record(vec![(
                "total".into(),
                Value::Record(vec![("cents".into(), Value::Long(5))]),
            )])
        );
    })
    .await;
}
