//! The runtime every role shares: readiness follows its dependencies, config is strict and
//! never prints secrets.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{Platform, Role, eventually, reserve_port};

#[tokio::test(flavor = "multi_thread")]
async fn readiness_is_503_while_the_database_is_unreachable() {
    let mut platform = Platform::prepare().await;
    // A port reserved for the test, where nothing listens.
    let nowhere = reserve_port();
    let dead_database = format!("postgres://postgres@127.0.0.1:{}/nowhere", nowhere.number);
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
    assert!(body["checks"]["database"]["latency_ms"].is_number(), "each check says how long it took: {body}");
    // No schema registry runs in this test: reported, but not what keeps the gateway from
    // serving (known schemas are cached); the shared Redis runs.
    assert_eq!(body["checks"]["schema-registry"]["status"], "degraded", "{body}");
    assert_eq!(body["checks"]["rate-limit-store"]["status"], "up", "{body}");
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

#[tokio::test(flavor = "multi_thread")]
async fn a_command_service_describes_itself_over_grpc_reflection() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };

    let platform = Platform::start_roles(&[Role::Registry, Role::Identity]).await;
    let address = platform.setting("KEEL_IDENTITY__GRPC_LISTEN").unwrap();
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let ask = |message| ServerReflectionRequest { host: String::new(), message_request: Some(message) };
    let requests = vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol("keel.identity.v1.IdentityCommands".into())),
    ];
    let mut answers = client.server_reflection_info(tokio_stream::iter(requests)).await.unwrap().into_inner();

    let Some(MessageResponse::ListServicesResponse(list)) = answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("no list of services")
    };
    let names: Vec<&str> = list.service.iter().map(|service| service.name.as_str()).collect();
    for expected in
        ["keel.identity.v1.IdentityCommands", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"]
    {
        assert!(names.contains(&expected), "{expected} in {names:?}");
    }
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("no descriptor of the identity service")
    };
    assert!(!files.file_descriptor_proto.is_empty(), "its file, with its messages, to call it by");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_role_stops_phase_by_phase_in_the_platform_s_order() {
    let mut platform = Platform::start_roles(&[Role::Registry, Role::Identity]).await;
    let status = platform.terminate(Role::Identity, Duration::from_secs(30));
    assert!(status.success(), "a drained role exits 0: {status}");
    let log = platform.log_tail(Role::Identity);
    let phases: Vec<String> = log
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|entry| entry["message"] == "shutdown phase done")
        .map(|entry| entry["phase"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(phases, ["deregister", "http", "grpc", "workers", "hooks"], "{log}");
    assert!(log.contains("shutting down: not ready"), "{log}");
}
