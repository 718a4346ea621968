//! `GET /v1/audit` on real servers: keyset pages in a stable order, filters, problem+json for bad
//! parameters; and `keel audit verify` names an entry changed behind the projector's back.

mod support;

use std::{collections::BTreeSet, time::Duration};

use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::Row;
use support::{Account, Platform, eventually};

const USERS: usize = 7;
const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// The audit log is the admin's to read; a test's queries look only at the registrations it
/// makes after the admin's.
struct Reader {
    admin: Account,
    /// `event_type=UserRegistered&from=<after the admin's registration>`.
    scope: String,
}

/// Registers `count` users (the first with a `traceparent`) and waits until each is audited.
async fn register(platform: &Platform, count: usize) -> (Reader, Vec<String>) {
    let client = reqwest::Client::new();
    let admin = platform.admin(&client).await;
    let from = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let scope = format!("event_type=UserRegistered&from={from}");
    let mut ids = Vec::new();
    for index in 0..count {
        let mut request = client.post(format!("{}/v1/users", platform.gateway_url)).json(&json!({
            "email": format!("audited{index}@example.com"),
            "display_name": format!("Audited {index}"),
            "password": support::PASSWORD,
        }));
        if index == 0 {
            request = request.header("traceparent", TRACEPARENT);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        ids.push(response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned());
    }
    let pool = platform.database.pool().await;
    eventually(Duration::from_secs(30), "every registration in the audit log", || async {
        let count: i64 = sqlx::query("SELECT count(*) FROM audit_log WHERE aggregate_id = ANY($1::uuid[])")
            .bind(ids.iter().map(|id| uuid::Uuid::parse_str(id).unwrap()).collect::<Vec<_>>())
            .fetch_one(&pool)
            .await
            .unwrap()
            .get(0);
        // A registration and its password.
        (count == 2 * ids.len() as i64).then_some(())
    })
    .await;
    (Reader { admin, scope }, ids)
}

async fn get(platform: &Platform, reader: &Reader, query: &str) -> reqwest::Response {
    let url = format!("{}/v1/audit{query}", platform.gateway_url);
    reqwest::Client::new().get(url).bearer_auth(&reader.admin.access_token).send().await.unwrap()
}

async fn page(platform: &Platform, reader: &Reader, query: &str) -> Value {
    let response = get(platform, reader, query).await;
    assert_eq!(response.status(), StatusCode::OK, "GET /v1/audit{query}");
    response.json().await.unwrap()
}

fn items(page: &Value) -> Vec<Value> {
    page["items"].as_array().unwrap().clone()
}

async fn bad_request(platform: &Platform, reader: &Reader, query: &str, parameter: &str) {
    let response = get(platform, reader, query).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST, "GET /v1/audit{query}");
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["status"], 400);
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains(&format!("`{parameter}`")), "the detail names `{parameter}`: {detail}");
}

/// The route's order: (occurred_at, topic, partition, offset, event_index). `occurred_at` is
/// always rendered with microseconds and `Z`, so its text sorts like the time.
fn sort_key(item: &Value) -> (String, String, i64, i64, i64) {
    (
        item["occurred_at"].as_str().unwrap().to_owned(),
        item["topic"].as_str().unwrap().to_owned(),
        item["partition"].as_i64().unwrap(),
        item["offset"].as_i64().unwrap(),
        item["event_index"].as_i64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_audit_log_is_served_in_pages_and_filtered() {
    let platform = Platform::start().await;
    let (reader, ids) = register(&platform, USERS).await;
    let scope = reader.scope.replace('+', "%2B");

    let mut pages = Vec::new();
    let mut query = format!("?limit=3&{scope}");
    loop {
        let body = page(&platform, &reader, &query).await;
        pages.push(items(&body));
        match body["next_cursor"].as_str() {
            Some(cursor) => query = format!("?limit=3&{scope}&cursor={cursor}"),
            None => break,
        }
        assert!(pages.len() < 10, "pagination ends");
    }
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3, 1]);
    let all: Vec<Value> = pages.concat();
    let event_ids: BTreeSet<&str> = all.iter().map(|item| item["event_id"].as_str().unwrap()).collect();
    assert_eq!(event_ids.len(), USERS, "every entry exactly once");
    let aggregates: BTreeSet<&str> = all.iter().map(|item| item["aggregate_id"].as_str().unwrap()).collect();
    assert_eq!(aggregates, ids.iter().map(String::as_str).collect());
    assert!(all.windows(2).all(|pair| sort_key(&pair[0]) < sort_key(&pair[1])), "ascending order");
    assert_eq!(
        items(&page(&platform, &reader, &format!("?{scope}")).await),
        all,
        "one page of the default size holds the same entries"
    );

    for item in &all {
        assert_eq!(item["topic"], "identity.users");
        assert_eq!(item["event_type"], "UserRegistered");
        assert_eq!(item["schema_version"], 1);
        assert_eq!(item["aggregate_version"], 1);
        assert_eq!(item["actor"], "anonymous");
        assert!(item["sequence"].as_i64().unwrap() >= 1);
        assert!(item["command_id"].is_string() && item["correlation_id"].is_string());
        assert_eq!(item["payload"]["email"], "[redacted]");
        // The caller's trace where it sent one; else the one the gateway started.
        let trace = item["trace_id"].as_str().expect("every command has a trace");
        assert!(trace.len() == 32 && trace.chars().all(|c| c.is_ascii_hexdigit()), "{trace}");
        assert_eq!(trace == &TRACEPARENT[3..35], item["aggregate_id"] == ids[0].as_str(), "{item}");
    }

    let one = items(&page(&platform, &reader, &format!("?aggregate={}", ids[3])).await);
    let types: Vec<&str> = one.iter().map(|item| item["event_type"].as_str().unwrap()).collect();
    assert_eq!(types, ["PasswordSet", "UserRegistered"], "a user's credentials share its id");
    assert!(one.iter().all(|item| item["aggregate_id"] == ids[3].as_str()));
    assert_eq!(items(&page(&platform, &reader, &format!("?actor=anonymous&{scope}")).await), all);
    let nobody = page(&platform, &reader, "?actor=nobody").await;
    assert_eq!(nobody, json!({"items": [], "next_cursor": null}));
    assert!(items(&page(&platform, &reader, "?event_type=UserDeleted").await).is_empty());

    // from is inclusive, to exclusive; both on occurred_at.
    let middle = all[3]["occurred_at"].as_str().unwrap();
    let encoded = middle.replace('+', "%2B");
    let since = items(&page(&platform, &reader, &format!("?event_type=UserRegistered&from={encoded}")).await);
    let until = items(&page(&platform, &reader, &format!("?{scope}&to={encoded}")).await);
    assert_eq!(
        since,
        all.iter().filter(|item| item["occurred_at"].as_str().unwrap() >= middle).cloned().collect::<Vec<_>>()
    );
    assert_eq!(
        until,
        all.iter().filter(|item| item["occurred_at"].as_str().unwrap() < middle).cloned().collect::<Vec<_>>()
    );

    bad_request(&platform, &reader, "?aggregate=not-a-uuid", "aggregate").await;
    bad_request(&platform, &reader, "?cursor=bm90LWEtY3Vyc29y", "cursor").await;
    bad_request(&platform, &reader, "?cursor=%%%", "cursor").await;
    bad_request(&platform, &reader, "?limit=0", "limit").await;
    bad_request(&platform, &reader, "?limit=501", "limit").await;
    bad_request(&platform, &reader, "?from=yesterday", "from").await;
    bad_request(&platform, &reader, "?to=2026-13-01T00:00:00Z", "to").await;
    bad_request(&platform, &reader, "?actr=anonymous", "actr").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn keel_audit_verify_names_a_tampered_entry() {
    let platform = Platform::start().await;
    let (_, ids) = register(&platform, 3).await;

    let verify = platform.keel(&["audit", "verify"]).output().unwrap();
    assert!(verify.status.success(), "an untouched log verifies: {}", String::from_utf8_lossy(&verify.stdout));

    let pool = platform.database.pool().await;
    let row = sqlx::query(
        "UPDATE audit_log SET payload = jsonb_set(payload, '{display_name}', '\"Mallory\"')
         WHERE aggregate_id = $1::uuid AND topic = 'identity.users' RETURNING topic, partition, \"offset\"",
    )
    .bind(&ids[1])
    .fetch_one(&pool)
    .await
    .unwrap();
    let (topic, partition, offset): (String, i32, i64) = (row.get(0), row.get(1), row.get(2));

    let verify = platform.keel(&["audit", "verify"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&verify.stdout);
    assert!(!verify.status.success(), "a tampered log fails verification: {stdout}");
    assert!(stdout.contains(&format!("topic {topic} partition {partition} offset {offset}")), "{stdout}");
}
