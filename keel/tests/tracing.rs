//! One trace per command, from the HTTP request to the read model, as a real OTLP receiver
//! (oteltest's sink, `scripts/otlp-receiver`) gets it from every role: the gateway continues the
//! caller's W3C `traceparent`, the identity service's span is its child through the gRPC
//! metadata, the commit's producer span (`publish identity.users`) is the service's child and
//! rides in the record's headers, and the projector's batch spans link to it. The response, the
//! problem bodies and the audit entry name the same trace.

mod support;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::{Value, json};
use support::{IDENTITY_ROLES, Platform, Setup, eventually, reserve_port};

/// The OTLP receiver, storing every span it gets as a JSON line; stopped on drop.
struct Receiver {
    child: Child,
    spans: PathBuf,
    endpoint: String,
    _port: support::Port,
}

impl Receiver {
    fn start(dir: &Path) -> Self {
        let port = reserve_port();
        let spans = dir.join("spans.jsonl");
        let python = PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/keel/venv/bin/python");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/otlp-receiver");
        let log = std::fs::File::create(dir.join("otlp-receiver.log")).unwrap();
        let child = Command::new(python)
            .arg(script)
            .args(["--port", &port.number.to_string(), "--out"])
            .arg(&spans)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("the venv of scripts/infra ensure has oteltest");
        let endpoint = format!("http://127.0.0.1:{}", port.number);
        Self { child, spans, endpoint, _port: port }
    }

    async fn wait_listening(&self) {
        let address = self.endpoint.trim_start_matches("http://").to_owned();
        eventually(Duration::from_secs(30), "the OTLP receiver to listen", || async {
            tokio::net::TcpStream::connect(&address).await.ok()
        })
        .await;
    }

    /// Every span received so far.
    fn spans(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.spans)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn named<'a>(spans: &'a [Value], service: &str, name: &str) -> Vec<&'a Value> {
    spans.iter().filter(|span| span["service"] == service && span["name"] == name).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_patch_is_one_connected_trace_from_the_gateway_to_the_projector() {
    let dir = support::test_dir();
    let receiver = Receiver::start(&dir);
    receiver.wait_listening().await;
    let env = [
        ("KEEL_TRACING__OTLP_ENDPOINT", receiver.endpoint.clone()),
        ("KEEL_TRACING__EXPORT_EVERY_MS", "200".to_owned()),
    ];
    let setup = Setup {
        dir: Some(dir),
        env: env.iter().map(|(key, value)| ((*key).to_owned(), value.clone())).collect(),
        ..Setup::default()
    };
    let platform = Platform::start_with(setup, IDENTITY_ROLES).await;
    let client = reqwest::Client::new();
    let ada = platform.signup(&client, "ada@example.com", "Ada").await;

    // The caller's own trace, continued by the gateway.
    let (trace_id, caller_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let response = client
        .patch(format!("{}/v1/users/{}", platform.gateway_url, ada.id))
        .bearer_auth(&ada.access_token)
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .header("if-match", "\"1\"")
        .json(&json!({"display_name": "Ada Lovelace"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answered = response.headers()["traceparent"].to_str().unwrap().to_owned();
    assert!(answered.starts_with(&format!("00-{trace_id}-")), "the response names the caller's trace: {answered}");

    let trace = eventually(Duration::from_secs(60), "the command's spans from every hop", || async {
        let spans: Vec<Value> = receiver.spans().into_iter().filter(|span| span["trace_id"] == trace_id).collect();
        let complete = !named(&spans, "keel-gateway", "PATCH /v1/users/{id}").is_empty()
            && !named(&spans, "keel-identity", "keel.identity.v1.IdentityCommands/UpdateProfile").is_empty()
            && !named(&spans, "keel-identity", "publish identity.users").is_empty();
        complete.then_some(spans)
    })
    .await;
    let by_id: HashMap<&str, &Value> = trace.iter().map(|span| (span["span_id"].as_str().unwrap(), span)).collect();
    // Each span's parent is in the trace (or is the caller's): one connected tree.
    for span in &trace {
        let parent = span["parent_span_id"].as_str().unwrap();
        assert!(parent == caller_span || by_id.contains_key(parent), "a span outside the tree: {span}");
    }
    let ancestors = |span: &Value| {
        let mut chain = Vec::new();
        let mut parent = span["parent_span_id"].as_str().unwrap().to_owned();
        while let Some(next) = by_id.get(parent.as_str()) {
            chain.push(format!("{} {}", next["service"].as_str().unwrap(), next["name"].as_str().unwrap()));
            parent = next["parent_span_id"].as_str().unwrap().to_owned();
        }
        chain
    };

    let http = named(&trace, "keel-gateway", "PATCH /v1/users/{id}")[0];
    assert_eq!(http["kind"], "server");
    assert_eq!(http["parent_span_id"], caller_span, "the gateway continues the caller's span");
    assert_eq!(http["attributes"]["http.response.status_code"], 200);
    assert_eq!(answered, format!("00-{trace_id}-{}-01", http["span_id"].as_str().unwrap()));

    let rpc = named(&trace, "keel-identity", "keel.identity.v1.IdentityCommands/UpdateProfile");
    assert!(rpc.iter().all(|span| span["kind"] == "server" && span["attributes"]["rpc.system"] == "grpc"));
    assert!(
        rpc.iter().any(|span| ancestors(span).contains(&"keel-gateway PATCH /v1/users/{id}".to_owned())),
        "the service's span descends from the gateway's through the call's metadata"
    );

    let publish = named(&trace, "keel-identity", "publish identity.users");
    assert_eq!(publish.len(), 1, "one commit, one producer span");
    let publish = publish[0];
    assert_eq!(publish["kind"], "producer");
    let attributes = &publish["attributes"];
    assert_eq!(attributes["messaging.system"], "kafka");
    assert_eq!(attributes["messaging.destination.name"], "identity.users");
    assert!(attributes["messaging.destination.partition.id"].is_string(), "{publish}");
    assert!(attributes["messaging.kafka.offset"].is_i64(), "the offset the broker acknowledged: {publish}");
    assert!(
        ancestors(publish).iter().any(|name| name.starts_with("keel-identity keel.identity.v1.IdentityCommands/")),
        "the commit is produced under the command's span: {:?}",
        ancestors(publish)
    );

    // The projectors' batches that applied the commit link to its producer span.
    let publish_id = publish["span_id"].as_str().unwrap().to_owned();
    let consumers = eventually(Duration::from_secs(60), "the projector's spans linked to the commit", || async {
        let linked: Vec<Value> = receiver
            .spans()
            .into_iter()
            .filter(|span| {
                span["service"] == "keel-projector"
                    && span["links"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|link| link["trace_id"] == trace_id && link["span_id"] == publish_id.as_str())
            })
            .collect();
        let groups: Vec<&str> =
            linked.iter().filter_map(|span| span["attributes"]["messaging.consumer.group.name"].as_str()).collect();
        (groups.contains(&"users") && groups.contains(&"audit")).then_some(linked)
    })
    .await;
    for span in &consumers {
        assert_eq!(span["kind"], "consumer");
        assert_eq!(span["name"], "process identity.users", "{span}");
        assert!(span["attributes"]["messaging.batch.message_count"].as_i64().unwrap() >= 1);
    }

    // The audit entry of the change keeps the trace.
    let pool = platform.database.pool().await;
    let audited: Option<String> = eventually(Duration::from_secs(30), "the change audited", || async {
        sqlx::query_scalar::<_, Option<String>>(
            "SELECT trace_id FROM audit_log WHERE aggregate_id = $1::uuid AND event_type = 'UserDisplayNameChanged'",
        )
        .bind(&ada.id)
        .fetch_optional(&pool)
        .await
        .unwrap()
    })
    .await;
    assert_eq!(audited.as_deref(), Some(trace_id));

    // A request without a traceparent starts a trace, and a problem names it.
    let missing = client
        .get(format!("{}/v1/users/{}", platform.gateway_url, uuid::Uuid::new_v4()))
        .bearer_auth(&ada.access_token)
        .send()
        .await
        .unwrap();
    let started = missing.headers()["traceparent"].to_str().unwrap().to_owned();
    let problem: Value = missing.json().await.unwrap();
    let started_trace = started.split('-').nth(1).unwrap();
    assert_ne!(started_trace, trace_id);
    assert_eq!(problem["trace_id"], started_trace, "{problem}");
}
