//! Identity on real servers: profiles, unique email addresses across changes, and the erasure of
//! personal data from everything that can be read.

mod support;

use std::time::Duration;

use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{IDENTITY_ROLES, Platform, eventually};

fn token(response: &reqwest::Response) -> String {
    response.headers()["keel-position"].to_str().unwrap().to_owned()
}

async fn change_email(
    client: &reqwest::Client,
    gateway: &str,
    account: &support::Account,
    email: &str,
) -> reqwest::Response {
    client
        .put(format!("{gateway}/v1/users/{}/email", account.id))
        .bearer_auth(&account.access_token)
        .json(&json!({"email": email}))
        .send()
        .await
        .unwrap()
}

async fn login_status(client: &reqwest::Client, gateway: &str, email: &str) -> StatusCode {
    client
        .post(format!("{gateway}/v1/auth/login"))
        .json(&json!({"email": email, "password": support::PASSWORD}))
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_email_address_belongs_to_one_user_across_changes() {
    let platform = Platform::start_roles(IDENTITY_ROLES).await;
    let client = reqwest::Client::new();
    let gateway = platform.gateway_url.clone();
    let ada = platform.signup(&client, "ada@example.com", "Ada").await;
    let bo = platform.signup(&client, "bo@example.com", "Bo").await;

    let moved = change_email(&client, &gateway, &ada, "ada@lovelace.org").await;
    assert_eq!(moved.status(), StatusCode::OK);
    let moved_at = token(&moved);
    let me: Value = client
        .get(format!("{gateway}/v1/users/{}", ada.id))
        .bearer_auth(&ada.access_token)
        .header("keel-consistency", &moved_at)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["email"], "ada@lovelace.org");

    // Taken, whether by a change or by a registration, in any spelling.
    let taken = change_email(&client, &gateway, &bo, "ADA@Lovelace.org").await;
    assert_eq!(taken.status(), StatusCode::CONFLICT);
    let again = client
        .post(format!("{gateway}/v1/users"))
        .json(&json!({"email": "ada@lovelace.org", "display_name": "Imposter", "password": support::PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::CONFLICT);
    // The address Ada left is free again.
    let reused = platform.signup(&client, "ada@example.com", "Another Ada").await;
    assert_ne!(reused.id, ada.id);
    // Ada logs in with her new address, not with the old one (now someone else's).
    assert_eq!(login_status(&client, &gateway, "ada@lovelace.org").await, StatusCode::OK);
    let old = platform.login(&client, "ada@example.com", None).await;
    assert_eq!(old.id, reused.id);

    // Twenty users race for one free address: exactly one gets it.
    let racers: Vec<support::Account> = join_all((0..20).map(|index| {
        let (platform, client) = (&platform, &client);
        async move { platform.signup(client, &format!("racer{index}@example.com"), "Racer").await }
    }))
    .await;
    let answers =
        join_all(racers.iter().map(|racer| change_email(&client, &gateway, racer, "prize@example.com"))).await;
    let statuses: Vec<u16> = answers.iter().map(|answer| answer.status().as_u16()).collect();
    assert_eq!(statuses.iter().filter(|status| **status == 200).count(), 1, "{statuses:?}");
    assert!(statuses.iter().all(|status| matches!(status, 200 | 409)), "{statuses:?}");
    let pool = platform.database.pool().await;
    eventually(Duration::from_secs(20), "one user with the prize address", || async {
        let holders: i64 = sqlx::query_scalar("SELECT count(*) FROM users WHERE email = 'prize@example.com'")
            .fetch_one(&pool)
            .await
            .unwrap();
        (holders == 1).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn erased_personal_data_is_unreadable_everywhere_and_the_log_keeps_ciphertext() {
    let platform = Platform::start().await;
    let client = reqwest::Client::new();
    let gateway = platform.gateway_url.clone();
    let email = "grace.hopper@example.com";
    let grace = platform.signup(&client, email, "Grace Hopper").await;
    let profile = client
        .patch(format!("{gateway}/v1/users/{}", grace.id))
        .bearer_auth(&grace.access_token)
        .json(&json!({"bio": "Rear admiral; wrote the first compiler."}))
        .send()
        .await
        .unwrap();
    assert_eq!(profile.status(), StatusCode::OK);
    let post = client
        .post(format!("{gateway}/v1/posts"))
        .bearer_auth(&grace.access_token)
        .json(&json!({"title": "Nanoseconds", "body": "A foot of wire."}))
        .send()
        .await
        .unwrap();
    let post: Value = post.json().await.unwrap();
    let post_id = post["id"].as_str().unwrap().to_owned();
    let published = client
        .post(format!("{gateway}/v1/posts/{post_id}/publish"))
        .bearer_auth(&grace.access_token)
        .send()
        .await
        .unwrap();
    let listed: Value = client
        .get(format!("{gateway}/v1/posts/{post_id}"))
        .header("keel-consistency", token(&published))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["author"]["display_name"], "Grace Hopper");
    // Before: the log holds her data sealed, never in the clear.
    let pool = platform.database.pool().await;
    let users_topic = "identity.users";
    for needle in [email, "Grace Hopper", "Rear admiral"] {
        assert!(!platform.broker.topic_contains(users_topic, needle.as_bytes()), "{needle:?} is sealed in the log");
    }
    // A rebuild leaves the replaced version's tables behind (for `projector.retired_grace_secs`):
    // they must forget her too.
    let rebuilt = platform.keel_ok(&["projections", "rebuild", "users"]);
    assert!(rebuilt.contains("version 2 is live"), "{rebuilt}");

    let erased = client
        .delete(format!("{gateway}/v1/users/{}/personal-data", grace.id))
        .bearer_auth(&grace.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(erased.status(), StatusCode::OK);
    let erased_at = token(&erased);

    // Read models: the user row is empty of personal data; the post names no one.
    let admin = platform.admin(&client).await;
    let user: Value = client
        .get(format!("{gateway}/v1/users/{}", grace.id))
        .bearer_auth(&admin.access_token)
        .header("keel-consistency", &erased_at)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(user["status"], "erased");
    assert_eq!(
        (user["email"].clone(), user["display_name"].clone(), user["bio"].clone()),
        (json!(null), json!(null), json!(""))
    );
    let listed: Value = eventually(Duration::from_secs(10), "the post without its author's name", || async {
        let post: Value =
            client.get(format!("{gateway}/v1/posts/{post_id}")).send().await.unwrap().json().await.unwrap();
        post["author"]["display_name"].is_null().then_some(post)
    })
    .await;
    assert_eq!(listed["title"], "Nanoseconds", "what she wrote stays; who she was does not");

    // Nothing readable holds her data.
    // Every table: read models of every kept version, the audit log, snapshots, dead letters,
    // process records, sessions, keys.
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(tables.iter().any(|table| table == "users_v1"), "the retired version is still there: {tables:?}");
    for needle in [email, "Grace Hopper", "Rear admiral"] {
        for table in &tables {
            let statement = format!("SELECT count(*) FROM {table} t WHERE t::text LIKE '%' || $1 || '%'");
            let what = format!("{table} to forget {needle:?}");
            let found: i64 = eventually(Duration::from_secs(20), &what, || async {
                let found: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(statement.clone()))
                    .bind(needle)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                (found == 0).then_some(found)
            })
            .await;
            assert_eq!(found, 0, "{needle:?} in {table}");
        }
    }
    let audit: Value = client
        .get(format!("{gateway}/v1/audit?aggregate={}", grace.id))
        .bearer_auth(&admin.access_token)
        .header("keel-consistency", &erased_at)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let types: Vec<&str> =
        audit["items"].as_array().unwrap().iter().map(|item| item["event_type"].as_str().unwrap()).collect();
    // Her credentials share her id: the audit log keeps what happened to both.
    assert_eq!(
        types,
        ["PasswordSet", "UserRegistered", "UserBioChanged", "UserPersonalDataErased", "CredentialsRemoved"],
        "the audit log keeps what happened"
    );
    // Her key is gone: what the log keeps is ciphertext nobody can open, an operator included.
    let key: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT wrapped_key FROM personal_data_keys WHERE subject = $1::uuid")
            .bind(&grace.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(key, None);
    for needle in [email, "Grace Hopper", "Rear admiral"] {
        assert!(!platform.broker.topic_contains(users_topic, needle.as_bytes()), "{needle:?} in the log");
    }
    // Nor any role's log.
    for entry in std::fs::read_dir(&platform.dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for needle in [email, "Grace Hopper", "Rear admiral"] {
            assert!(!text.contains(needle), "{needle:?} in {}", path.display());
        }
    }
    let replay = platform.keel_ok(&["replay", "--topic", users_topic, "--format", "json", "--show-sensitive"]);
    let hers: Vec<Value> = replay
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|record| record["aggregate_id"] == grace.id.as_str())
        .collect();
    assert_eq!(hers.len(), 3, "{replay}");
    assert_eq!(hers[0]["events"][0]["data"]["email"], "[erased]");
    assert!(!replay.contains(email));

    // The account is closed; the address is free for someone new.
    assert_eq!(login_status(&client, &gateway, email).await, StatusCode::UNAUTHORIZED);
    let newcomer = platform.signup(&client, email, "Another Grace").await;
    assert_ne!(newcomer.id, grace.id);
}
