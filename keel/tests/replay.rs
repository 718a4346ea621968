//! `keel replay` on real servers: every commit printed once, decoded, sensitive fields redacted
//! unless asked for; `--from` / `--to` by offset and by time; unknown topics and undecodable
//! records reported.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader},
    process::{Command, Output, Stdio},
    time::Duration,
};

use chrono::{SecondsFormat, Utc};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use support::Platform;

const USERS_TOPIC: &str = "identity.users";
/// More users than partitions: some partition holds at least two commits.
const USERS: usize = 12;

fn replay(platform: &Platform, args: &[&str]) -> Output {
    let mut all = vec!["replay", "--topic", USERS_TOPIC];
    all.extend_from_slice(args);
    platform.keel(&all).output().unwrap()
}

/// The JSON lines of a successful `--format json` replay.
fn records(platform: &Platform, args: &[&str]) -> Vec<Value> {
    let output = replay(platform, &[&["--format", "json"], args].concat());
    assert!(output.status.success(), "keel replay {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|error| panic!("not a JSON line ({error}): {line}")))
        .collect()
}

fn positions(records: &[Value]) -> BTreeSet<(i64, i64)> {
    records.iter().map(|record| (record["partition"].as_i64().unwrap(), record["offset"].as_i64().unwrap())).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_prints_every_commit_decoded_and_redacted() {
    let platform = Platform::start().await;
    let client = reqwest::Client::new();
    let mut registered = BTreeMap::new();
    for index in 0..USERS {
        let email = format!("user{index}@example.com");
        let response = client
            .post(format!("{}/v1/users", platform.gateway_url))
            .json(&json!({"email": email, "display_name": format!("User {index}"), "password": support::PASSWORD}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.unwrap();
        registered.insert(body["id"].as_str().unwrap().to_owned(), (email, body["position"].clone()));
    }

    let all = records(&platform, &[]);
    assert_eq!(all.len(), USERS, "one record per registration");
    for record in &all {
        let id = record["aggregate_id"].as_str().unwrap();
        let (_, position) = &registered[id];
        assert_eq!(record["topic"], USERS_TOPIC);
        assert_eq!((&record["partition"], &record["offset"]), (&position["partition"], &position["offset"]));
        assert_eq!(record["expected_version"], 0);
        assert_eq!(record["actor"], "anonymous");
        assert!(record["command_id"].is_string() && record["correlation_id"].is_string(), "{record}");
        assert!(record["timestamp"].is_string(), "{record}");
        let events = record["events"].as_array().unwrap();
        assert_eq!(events.len(), 1, "{record}");
        assert_eq!(events[0]["event_type"], "UserRegistered");
        assert_eq!(events[0]["schema_version"], 1);
        assert_eq!(events[0]["aggregate_version"], 1);
        assert!(events[0]["event_id"].is_string());
        assert_eq!(events[0]["data"], json!({"user_id": id, "email": "[redacted]", "display_name": "[redacted]"}));
    }
    let mut by_partition: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for (partition, offset) in all.iter().map(|r| (r["partition"].as_i64().unwrap(), r["offset"].as_i64().unwrap())) {
        by_partition.entry(partition).or_default().push(offset);
    }
    for offsets in by_partition.values() {
        assert!(offsets.windows(2).all(|pair| pair[0] < pair[1]), "offset order within a partition: {offsets:?}");
    }

    for record in records(&platform, &["--show-sensitive"]) {
        let (email, _) = &registered[record["aggregate_id"].as_str().unwrap()];
        assert_eq!(&record["events"][0]["data"]["email"], email, "--show-sensitive prints stored values");
    }

    // Offsets apply per partition, half-open.
    let (partition, offsets) = by_partition.iter().max_by_key(|(_, offsets)| offsets.len()).unwrap();
    assert!(offsets.len() >= 2);
    let partition = partition.to_string();
    let later = records(&platform, &["--partition", &partition, "--from", "1"]);
    assert_eq!(later.iter().map(|r| r["offset"].as_i64().unwrap()).collect::<Vec<_>>(), offsets[1..]);
    let first = records(&platform, &["--partition", &partition, "--to", "1"]);
    assert_eq!(first.iter().map(|r| r["offset"].as_i64().unwrap()).collect::<Vec<_>>(), [0]);

    // A time selects the records stamped at or after it, in every partition.
    let mut stamps: Vec<&str> = all.iter().map(|record| record["timestamp"].as_str().unwrap()).collect();
    stamps.sort();
    let middle = stamps[USERS / 2];
    let expected = positions(
        &all.iter().filter(|record| record["timestamp"].as_str().unwrap() >= middle).cloned().collect::<Vec<_>>(),
    );
    assert_eq!(positions(&records(&platform, &["--from", middle])), expected);
    let before = positions(&records(&platform, &["--to", middle]));
    assert_eq!(before.len() + expected.len(), USERS);
    assert!(before.is_disjoint(&expected));

    tokio::time::sleep(Duration::from_millis(20)).await;
    let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
    assert!(records(&platform, &["--from", &now]).is_empty(), "nothing was appended after {now}");

    let pretty = replay(&platform, &[]);
    assert!(pretty.status.success());
    let text = String::from_utf8(pretty.stdout).unwrap();
    let (id, (email, position)) = registered.iter().next().unwrap();
    assert!(text.contains(&format!("{USERS_TOPIC}/{}@{}", position["partition"], position["offset"])), "{text}");
    assert!(text.contains(id.as_str()) && text.contains("UserRegistered v1"), "{text}");
    assert!(!text.contains(email.as_str()), "pretty output is redacted too");
    let summary = String::from_utf8(pretty.stderr).unwrap();
    assert!(summary.contains(&format!("{USERS} records, {USERS} events, 0 undecodable")), "{summary}");

    let unknown = platform.keel(&["replay", "--topic", "identity.nothing"]).output().unwrap();
    assert_eq!(unknown.status.code(), Some(2), "unknown topic is a usage error");
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("identity.users"), "the known topics are listed");
    let no_partition = replay(&platform, &["--partition", "8"]);
    assert_eq!(no_partition.status.code(), Some(2));

    // Following prints what is appended after the start, until a signal.
    let mut follow = platform
        .keel(&["replay", "--topic", USERS_TOPIC, "--format", "json", "--follow", "--from", &now])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(follow.stdout.take().unwrap());
    let (line_tx, line_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        line_tx.send(line).unwrap();
    });
    // The replay may still be assigning its partitions: whatever it misses of this commit, it
    // would have to print it anyway, since it starts at `now`.
    let response = client
        .post(format!("{}/v1/users", platform.gateway_url))
        .json(&json!({"email": "late@example.com", "display_name": "Late", "password": support::PASSWORD}))
        .send()
        .await
        .unwrap();
    let late: Value = response.json().await.unwrap();
    let line = line_rx.recv_timeout(Duration::from_secs(20)).expect("the followed commit is printed");
    let followed: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(followed["aggregate_id"], late["id"]);
    assert!(Command::new("kill").args(["-INT", &follow.id().to_string()]).status().unwrap().success());
    let output = follow.wait_with_output().unwrap();
    assert!(output.status.success(), "Ctrl-C ends a followed replay cleanly");
    assert!(String::from_utf8_lossy(&output.stderr).contains("1 records, 1 events, 0 undecodable"));

    // A record nobody can decode is printed where it is, with its error, and counted.
    let producer: FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &platform.broker.bootstrap).create().unwrap();
    let delivered = producer
        .send(
            FutureRecord::to(USERS_TOPIC).partition(0).key("garbage").payload(&b"not avro"[..]),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let output = replay(&platform, &["--format", "json", "--partition", "0"]);
    assert_eq!(output.status.code(), Some(1), "undecodable records fail the replay");
    let last: Value = serde_json::from_str(String::from_utf8(output.stdout).unwrap().lines().last().unwrap()).unwrap();
    assert_eq!((last["partition"].as_i64(), last["offset"].as_i64()), (Some(0), Some(delivered.offset)));
    assert!(last["error"].as_str().unwrap().contains("envelope"), "{last}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("1 undecodable"));
}
