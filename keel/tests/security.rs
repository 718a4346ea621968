//! The gateway's security pipeline on real servers: forged and stale tokens, refresh-token reuse,
//! logout and deactivation, key rotation, and rate limits shared by two gateways through Redis.

mod support;

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use ed25519_dalek::SigningKey;
use futures::future::join_all;
use hmac::{Hmac, KeyInit, Mac};
use keel_proto::token::{self, AccessClaims};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::Sha256;
use support::{IDENTITY_ROLES, KEY_ENCRYPTION_KEY, Platform, Role, eventually};
use uuid::Uuid;

fn now() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// The key auth signs with now, read from the database the way auth reads it.
async fn signing_key(pool: &sqlx::PgPool) -> (String, SigningKey) {
    let (kid, wrapped): (String, Vec<u8>) = sqlx::query_as(
        "SELECT kid, wrapped_private_key FROM auth_signing_keys WHERE activates_at <= now() ORDER BY activates_at DESC LIMIT 1",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let kek = keel_topics::sealing::DataKey::from_base64(KEY_ENCRYPTION_KEY).unwrap();
    let private: [u8; 32] = kek.open(kid.as_bytes(), &wrapped).unwrap().try_into().unwrap();
    (kid, SigningKey::from_bytes(&private))
}

fn part(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

async fn status_with(client: &reqwest::Client, url: &str, token: &str) -> StatusCode {
    client.get(url).bearer_auth(token).send().await.unwrap().status()
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_expired_and_foreign_tokens_are_refused() {
    let platform = Platform::start_roles(IDENTITY_ROLES).await;
    let client = reqwest::Client::new();
    let gateway = platform.gateway_url.clone();
    let ada = platform.signup(&client, "ada@example.com", "Ada").await;
    let url = format!("{gateway}/v1/users/{}", ada.id);
    assert_eq!(status_with(&client, &url, &ada.access_token).await, StatusCode::OK);

    let pool = platform.database.pool().await;
    let (kid, key) = signing_key(&pool).await;
    let claims = |exp: i64, nbf: i64| AccessClaims {
        iss: "keel".into(),
        aud: "keel".into(),
        sub: Uuid::parse_str(&ada.id).unwrap(),
        sid: Uuid::parse_str(&ada.session_id).unwrap(),
        iat: now(),
        nbf,
        exp,
        jti: Uuid::new_v4(),
    };
    let valid = claims(now() + 300, now());
    // A token signed with the real key, made by the test: the baseline that the key is right.
    assert_eq!(status_with(&client, &url, &token::sign(&valid, &kid, &key)).await, StatusCode::OK);

    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&valid).unwrap());
    let none = format!("{}.{payload}.", part(&json!({"alg": "none", "typ": "JWT", "kid": kid})));
    // HS256 with the public key as the HMAC secret: the classic algorithm confusion.
    let hs256_input = format!("{}.{payload}", part(&json!({"alg": "HS256", "typ": "JWT", "kid": kid})));
    let mut mac = Hmac::<Sha256>::new_from_slice(key.verifying_key().as_bytes()).unwrap();
    mac.update(hs256_input.as_bytes());
    let hs256 = format!("{hs256_input}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()));
    let unknown_kid = token::sign(&valid, "k-nobody-knows", &SigningKey::from_bytes(&[7; 32]));
    let expired = token::sign(&claims(now() - 120, now() - 420), &kid, &key);
    let not_yet_valid = token::sign(&claims(now() + 600, now() + 300), &kid, &key);
    let genuine = ada.access_token.clone();
    let parts: Vec<&str> = genuine.split('.').collect();
    let mut raised: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    raised["sub"] = json!(Uuid::now_v7().to_string());
    let tampered = format!("{}.{}.{}", parts[0], part(&raised), parts[2]);
    for (attack, forged) in [
        ("alg none", none),
        ("HS256 signed with the public key", hs256),
        ("unknown kid", unknown_kid),
        ("expired", expired),
        ("not yet valid", not_yet_valid),
        ("tampered payload", tampered),
        ("not a JWT", "garbage".to_owned()),
    ] {
        let response = client.get(&url).bearer_auth(&forged).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{attack}");
        assert!(response.headers()["www-authenticate"].to_str().unwrap().starts_with("Bearer"), "{attack}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["type"], "urn:keel:problem:unauthenticated", "{attack}");
    }
    let basic = client.get(&url).header("authorization", "Basic YWRhOnB3").send().await.unwrap();
    assert_eq!(basic.status(), StatusCode::UNAUTHORIZED);

    // A deactivated user's token stops working, on this gateway at once.
    let bo = platform.signup(&client, "bo@example.com", "Bo").await;
    let bo_url = format!("{gateway}/v1/users/{}", bo.id);
    assert_eq!(status_with(&client, &bo_url, &bo.access_token).await, StatusCode::OK);
    let deactivated = client
        .post(format!("{gateway}/v1/users/{}/deactivate", bo.id))
        .bearer_auth(&bo.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(deactivated.status(), StatusCode::OK);
    let started = Instant::now();
    eventually(Duration::from_secs(10), "the deactivated user's token to stop working", || async {
        (status_with(&client, &bo_url, &bo.access_token).await == StatusCode::UNAUTHORIZED).then_some(())
    })
    .await;
    eprintln!("a deactivated user's token stopped working after {:?}", started.elapsed());
    let login = client
        .post(format!("{gateway}/v1/auth/login"))
        .json(&json!({"email": "bo@example.com", "password": support::PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::UNAUTHORIZED, "a deactivated account cannot log in");
    let refresh = client
        .post(format!("{gateway}/v1/auth/refresh"))
        .json(&json!({"refresh_token": bo.refresh_token}))
        .send()
        .await
        .unwrap();
    assert_eq!(refresh.status(), StatusCode::UNAUTHORIZED, "nor refresh");

    // Wrong passwords and unknown emails get the same answer.
    for (email, password) in
        [("ada@example.com", "wrong password, long enough"), ("nobody@example.com", support::PASSWORD)]
    {
        let response = client
            .post(format!("{gateway}/v1/auth/login"))
            .json(&json!({"email": email, "password": password}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["detail"], "invalid email or password");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reused_refresh_token_revokes_its_family_and_logout_ends_access_everywhere() {
    let mut platform = Platform::start_roles(IDENTITY_ROLES).await;
    platform.spawn(Role::SecondGateway);
    platform.wait_ready(Role::SecondGateway, Duration::from_secs(60)).await;
    let client = reqwest::Client::new();
    let gateway = platform.gateway_url.clone();
    let other_gateway = platform.admin_url(Role::SecondGateway).to_owned();
    let ada = platform.signup(&client, "ada@example.com", "Ada").await;
    let refresh = |token: String| {
        let client = client.clone();
        let url = format!("{gateway}/v1/auth/refresh");
        async move { client.post(url).json(&json!({"refresh_token": token})).send().await.unwrap() }
    };

    let first = refresh(ada.refresh_token.clone()).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(first.headers()["cache-control"], "no-store");
    let rotated: Value = first.json().await.unwrap();
    let second_token = rotated["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(second_token, ada.refresh_token);
    assert_eq!(rotated["session_id"], ada.session_id.as_str());
    let access = rotated["access_token"].as_str().unwrap().to_owned();
    let me = format!("{gateway}/v1/users/{}", ada.id);
    assert_eq!(status_with(&client, &me, &access).await, StatusCode::OK);

    // The spent token again: reuse. The whole family is revoked, the newest token included.
    let reused = refresh(ada.refresh_token.clone()).await;
    assert_eq!(reused.status(), StatusCode::UNAUTHORIZED);
    let problem: Value = reused.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("reuse"), "{problem}");
    assert_eq!(refresh(second_token).await.status(), StatusCode::UNAUTHORIZED);
    eventually(Duration::from_secs(10), "the revoked family's access token to stop working", || async {
        (status_with(&client, &me, &access).await == StatusCode::UNAUTHORIZED).then_some(())
    })
    .await;

    // Logout: at once on the gateway that logged out, within the status bound on the other.
    let bo = platform.signup(&client, "bo@example.com", "Bo").await;
    let bo_here = format!("{gateway}/v1/users/{}", bo.id);
    let bo_there = format!("{other_gateway}/v1/users/{}", bo.id);
    assert_eq!(status_with(&client, &bo_there, &bo.access_token).await, StatusCode::OK, "cached as valid there");
    let logout = client.post(format!("{gateway}/v1/auth/logout")).bearer_auth(&bo.access_token).send().await.unwrap();
    assert_eq!(logout.status(), StatusCode::NO_CONTENT);
    let logged_out = Instant::now();
    assert_eq!(status_with(&client, &bo_here, &bo.access_token).await, StatusCode::UNAUTHORIZED);
    loop {
        if status_with(&client, &bo_there, &bo.access_token).await == StatusCode::UNAUTHORIZED {
            break;
        }
        // gateway.auth.status_cache_ms (5 s) is the bound; notifications normally beat it.
        assert!(logged_out.elapsed() < Duration::from_millis(5_500), "access outlived the stated bound");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("after logout, the other gateway refused the token within {:?}", logged_out.elapsed());
    assert_eq!(refresh(bo.refresh_token.clone()).await.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread")]
async fn signing_keys_rotate_without_downtime() {
    let mut platform = Platform::prepare().await;
    for role in IDENTITY_ROLES {
        match role {
            Role::Auth => platform.spawn_with(*role, &[("KEEL_AUTH__KEY_PUBLISH_AHEAD_SECS", "3")]),
            Role::Gateway => platform.spawn_with(*role, &[("KEEL_GATEWAY__AUTH__JWKS_REFRESH_SECS", "1")]),
            _ => platform.spawn(*role),
        }
        platform.wait_ready(*role, Duration::from_secs(90)).await;
    }
    let client = reqwest::Client::new();
    let gateway = platform.gateway_url.clone();
    let ada = platform.signup(&client, "ada@example.com", "Ada").await;
    let old_kid = token::key_id(&ada.access_token).unwrap();
    let me = format!("{gateway}/v1/users/{}", ada.id);

    // Requests with the old token run the whole time: not one may fail.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = tokio::spawn({
        let (client, me, token, stop) = (client.clone(), me.clone(), ada.access_token.clone(), stop.clone());
        async move {
            let mut statuses = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(response) = client.get(&me).bearer_auth(&token).send().await else { break };
                statuses.push(response.status());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            statuses
        }
    });
    let output = platform.keel(&["keys", "rotate"]).env("KEEL_AUTH__KEY_PUBLISH_AHEAD_SECS", "3").output().unwrap();
    let output = String::from_utf8(output.stdout).unwrap();
    assert!(output.lines().any(|line| line.starts_with("made key")), "{output}");
    let jwks_url = format!("{gateway}/.well-known/jwks.json");
    eventually(Duration::from_secs(15), "the next key in the gateway's key set", || async {
        let jwks: Value = client.get(&jwks_url).send().await.unwrap().json().await.unwrap();
        (jwks["keys"].as_array().unwrap().len() == 2).then_some(())
    })
    .await;
    let new_token = eventually(Duration::from_secs(20), "a token signed by the new key", || async {
        let account = platform.login(&client, "ada@example.com", None).await;
        (token::key_id(&account.access_token).unwrap() != old_kid).then_some(account.access_token)
    })
    .await;
    assert_eq!(status_with(&client, &me, &new_token).await, StatusCode::OK, "the new key verifies");
    assert_eq!(status_with(&client, &me, &ada.access_token).await, StatusCode::OK, "the old key still verifies");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let statuses = prober.await.unwrap();
    assert!(statuses.len() > 10, "the prober ran ({} requests)", statuses.len());
    assert!(statuses.iter().all(|status| *status == StatusCode::OK), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_gateways_sharing_redis_admit_one_limit_together() {
    const BURST: usize = 10;
    let mut platform = Platform::prepare().await;
    // One request back every 100 s: while the test runs, the limit admits its burst and no more.
    let limits = [
        ("KEEL_GATEWAY__RATE_LIMIT__PER_USER", r#"{"per_second": 0.01, "burst": 10}"#),
        ("KEEL_GATEWAY__RATE_LIMIT__LOGIN_PER_ACCOUNT", r#"{"per_second": 0.1, "burst": 3}"#),
    ];
    for role in IDENTITY_ROLES.iter().copied().chain([Role::SecondGateway]) {
        match role {
            Role::Gateway | Role::SecondGateway => platform.spawn_with(role, &limits),
            _ => platform.spawn(role),
        }
        platform.wait_ready(role, Duration::from_secs(90)).await;
    }
    let client = reqwest::Client::new();
    let gateways = [platform.gateway_url.clone(), platform.admin_url(Role::SecondGateway).to_owned()];
    let ada = platform.signup(&client, "ada@example.com", "Ada").await;

    let answers = join_all((0..60).map(|index| {
        let url = format!("{}/v1/me/drafts", gateways[index % 2]);
        let (client, token) = (client.clone(), ada.access_token.clone());
        async move {
            let response = client.get(url).bearer_auth(token).send().await.unwrap();
            let retry_after = response.headers().get("retry-after").map(|value| value.to_str().unwrap().to_owned());
            (index % 2, response.status(), retry_after)
        }
    }))
    .await;
    let admitted: Vec<_> = answers.iter().filter(|(_, status, _)| *status == StatusCode::OK).collect();
    let limited: Vec<_> = answers.iter().filter(|(_, status, _)| *status == StatusCode::TOO_MANY_REQUESTS).collect();
    assert_eq!(admitted.len() + limited.len(), answers.len(), "{answers:?}");
    // Exactly the burst, across both gateways (30 requests each): had each limited on its own,
    // each would have admitted a burst, twice the limit.
    assert_eq!(admitted.len(), BURST, "{answers:?}");
    for (_, _, retry_after) in &limited {
        let seconds: u64 = retry_after.as_deref().expect("429 says when to retry").parse().unwrap();
        assert!((90..=100).contains(&seconds), "the next request is admitted in about 100 s: {seconds}");
    }

    // Login attempts of one account are throttled across both gateways too (an account that
    // never logged in, so its whole burst is left).
    platform.register(&client, "eve@example.com", "Eve").await;
    let mut statuses = Vec::new();
    for attempt in 0..6 {
        let response = client
            .post(format!("{}/v1/auth/login", gateways[attempt % 2]))
            .json(&json!({"email": "eve@example.com", "password": "a wrong password guess"}))
            .send()
            .await
            .unwrap();
        statuses.push(response.status());
    }
    assert_eq!(statuses[..3], [StatusCode::UNAUTHORIZED; 3], "{statuses:?}");
    assert_eq!(statuses[3..], [StatusCode::TOO_MANY_REQUESTS; 3], "{statuses:?}");
}
