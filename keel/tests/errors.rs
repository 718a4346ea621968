//! The error bus against a real Sentry-protocol tracker (Bugsink, `scripts/error-tracker`): a
//! handler that panics and a dead-lettered record each arrive with the service, the release and
//! environment, the trace id, the route, and the user's id (no personal data); a second request's
//! report never carries the first one's user; business errors are counted and never sent.

mod support;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use support::{IDENTITY_ROLES, Platform, Role, Setup, eventually, reserve_port};

/// The tracker, serving until dropped.
struct Tracker {
    child: Child,
    dir: PathBuf,
    _port: support::Port,
}

impl Tracker {
    fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/error-tracker")
    }

    async fn start(dir: &Path) -> (Self, String) {
        let port = reserve_port();
        let dir = dir.join("tracker");
        let log = std::fs::File::create(dir.with_extension("log")).unwrap();
        let child = Command::new(Self::script())
            .arg("serve")
            .arg(&dir)
            .arg(port.number.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let address = format!("127.0.0.1:{}", port.number);
        let tracker = Self { child, dir, _port: port };
        let dsn = eventually(Duration::from_secs(90), "the tracker to serve", || async {
            let dsn = std::fs::read_to_string(tracker.dir.join("dsn")).ok()?;
            tokio::net::TcpStream::connect(&address).await.ok()?;
            Some(dsn.trim().to_owned())
        })
        .await;
        (tracker, dsn)
    }

    /// Every event the tracker received, as sent.
    fn events(&self) -> Vec<Value> {
        let output = Command::new(Self::script()).arg("events").arg(&self.dir).output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).lines().filter_map(|line| serde_json::from_str(line).ok()).collect()
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tag<'a>(event: &'a Value, name: &str) -> Option<&'a str> {
    event["tags"][name].as_str()
}

#[tokio::test(flavor = "multi_thread")]
async fn panics_and_dead_letters_reach_the_tracker_and_refusals_do_not() {
    let dir = support::test_dir();
    let (tracker, dsn) = Tracker::start(&dir).await;
    let env = [("KEEL_ERRORS__SENTRY_DSN", dsn), ("KEEL_GATEWAY__UNSAFE_PANIC_ROUTE", "true".to_owned())];
    let setup = Setup {
        dir: Some(dir),
        env: env.iter().map(|(key, value)| ((*key).to_owned(), value.clone())).collect(),
        ..Setup::default()
    };
    let platform = Platform::start_with(setup, IDENTITY_ROLES).await;
    let client = reqwest::Client::new();
    let admin = platform.admin(&client).await;
    let gateway = &platform.gateway_url;

    // A panic with a signed-in caller and a trace of the caller's; then one without either.
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let panicked = client
        .get(format!("{gateway}/v1/test/panic"))
        .bearer_auth(&admin.access_token)
        .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(panicked.status(), 500);
    assert_eq!(client.get(format!("{gateway}/v1/test/panic")).send().await.unwrap().status(), 500);
    // A refusal: counted as business, never sent.
    let missing = client
        .get(format!("{gateway}/v1/users/{}", uuid::Uuid::new_v4()))
        .bearer_auth(&admin.access_token)
        .send()
        .await
        .unwrap();
    assert!(missing.status().is_client_error());
    let refused = missing.status().as_u16().to_string();
    // A record nobody can read: every projection of the topic dead-letters it.
    {
        use rdkafka::producer::{FutureProducer, FutureRecord};
        let producer: FutureProducer =
            rdkafka::ClientConfig::new().set("bootstrap.servers", &platform.broker.bootstrap).create().unwrap();
        let record = FutureRecord::to("identity.users").key("poison").payload("not a commit").partition(0);
        producer.send(record, Duration::from_secs(10)).await.map_err(|(error, _)| error).unwrap();
    }

    let events = eventually(Duration::from_secs(120), "the panics and the dead letters at the tracker", || async {
        let events = tracker.events();
        let panics = events.iter().filter(|event| tag(event, "service") == Some("gateway")).count();
        let dead = events.iter().filter(|event| tag(event, "kind") == Some("dead_letter")).count();
        (panics >= 2 && dead >= 2).then_some(events)
    })
    .await;

    let panics: Vec<&Value> = events.iter().filter(|event| tag(event, "service") == Some("gateway")).collect();
    assert_eq!(panics.len(), 2, "one report per panic: {panics:#?}");
    for event in &panics {
        assert_eq!(event["release"], env!("CARGO_PKG_VERSION"));
        assert_eq!(event["environment"], "development");
        assert_eq!(tag(event, "route"), Some("/v1/test/panic"), "{event}");
        let exception = event["exception"]["values"][0]["value"].as_str().unwrap_or_default();
        assert!(exception.contains("the test route panicked"), "{event}");
        assert!(!event.to_string().contains("authorization") && !event.to_string().contains(&admin.access_token));
    }
    let signed_in: Vec<&&Value> = panics.iter().filter(|event| event["user"]["id"] == admin.id.as_str()).collect();
    assert_eq!(signed_in.len(), 1, "the signed-in caller's report names them, by id: {panics:#?}");
    assert_eq!(tag(signed_in[0], "trace_id"), Some(trace_id));
    assert!(!signed_in[0]["user"].to_string().contains("admin@"), "no email: {}", signed_in[0]["user"]);
    let anonymous: Vec<&&Value> = panics.iter().filter(|event| event["user"]["id"].is_null()).collect();
    assert_eq!(anonymous.len(), 1, "the other request's report does not inherit the user");
    assert_ne!(tag(anonymous[0], "trace_id"), Some(trace_id), "nor the trace");

    let dead: Vec<&Value> = events.iter().filter(|event| tag(event, "kind") == Some("dead_letter")).collect();
    let projections: std::collections::BTreeSet<&str> =
        dead.iter().filter_map(|event| tag(event, "projection")).collect();
    assert!(projections.contains("users") && projections.contains("audit"), "{dead:#?}");
    for event in &dead {
        assert_eq!(tag(event, "service"), Some("projector"));
        assert_eq!(tag(event, "topic"), Some("identity.users"));
        assert_eq!(tag(event, "partition"), Some("0"));
    }
    assert!(
        events.iter().all(|event| tag(event, "kind") != Some(refused.as_str())),
        "no business error is sent: {events:#?}"
    );

    let sample =
        |class: &str, kind: &str| format!(r#"keel_errors_total{{service="gateway",class="{class}",kind="{kind}"}}"#);
    assert_eq!(platform.metric(Role::Gateway, &sample("system", "panic")).await, Some(2.0));
    assert!(platform.metric(Role::Gateway, &sample("business", &refused)).await.unwrap_or(0.0) >= 1.0);
    let dead_counted = r#"keel_errors_total{service="projector",class="system",kind="dead_letter"}"#;
    assert!(platform.metric(Role::Projector, dead_counted).await.unwrap_or(0.0) >= 2.0);
}
