//! Who may call what: every route of the gateway × {anonymous, user, author, admin, moderator,
//! forged}, one table of expected statuses, sent to the real platform. The table must name every route the gateway
//! serves (checked against its route table), so a new route cannot go untested.
//!
//! "author" owns what the route acts on (the user of `{user}`, the post of `{post}`, the comment
//! of `{comment}`); "user" is anyone else signed in; "admin" holds the bootstrap `admin` role;
//! "moderator" holds a role of `:any` grants (`posts:update:any`, `comments:delete:any`) and
//! nothing else; "forged" sends a token whose signature does not verify — refused with 401 on
//! every route, public ones included, since the caller claims to be someone it cannot prove.
//! Routes that destroy what they act on (or the caller's session) get fresh fixtures per cell.

mod support;

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Account, Platform, eventually};

const ANONYMOUS: usize = 0;
const USER: usize = 1;
const AUTHOR: usize = 2;
const ADMIN: usize = 3;
const MODERATOR: usize = 4;
const FORGED: usize = 5;
const CALLERS: [&str; 6] = ["anonymous", "user", "author", "admin", "moderator", "forged"];
const MODERATOR_EMAIL: &str = "moderator@example.com";

/// What an author owns, made fresh where a route destroys it.
struct Fixture {
    author: Account,
    email: String,
    /// Published, with `comment` on it.
    post: String,
    draft: String,
    comment: String,
}

struct Row {
    method: Method,
    /// The route template, as the gateway's route table has it.
    route: &'static str,
    /// The path sent: the template with `{user}`, `{post}`, `{draft}`, `{comment}` for the
    /// fixture's ids.
    path: &'static str,
    body: fn(&Fixture, usize) -> Option<Value>,
    /// The status expected of anonymous, user, author, admin, moderator, forged.
    expect: [u16; 6],
    /// Whether each cell needs its own fixture (and its own caller sessions).
    fresh: bool,
}

fn none(_: &Fixture, _: usize) -> Option<Value> {
    None
}

/// A value unique to the cell, so that commands that must not collide (emails, role names) do not.
fn unique(caller: usize) -> String {
    format!("{}{caller}", uuid::Uuid::new_v4().simple())
}

const fn row(method: Method, route: &'static str, path: &'static str, expect: [u16; 6]) -> Row {
    Row { method, route, path, body: none, expect, fresh: false }
}

fn table() -> Vec<Row> {
    vec![
        Row {
            body: |_, caller| {
                Some(
                    json!({"email": format!("new{}@example.com", unique(caller)), "display_name": "New", "password": support::PASSWORD}),
                )
            },
            ..row(Method::POST, "/v1/users", "/v1/users", [201, 201, 201, 201, 201, 401])
        },
        row(Method::GET, "/v1/users/{id}", "/v1/users/{user}", [401, 403, 200, 200, 403, 401]),
        Row {
            body: |_, _| Some(json!({"bio": "Writes about Kafka."})),
            ..row(Method::PATCH, "/v1/users/{id}", "/v1/users/{user}", [401, 403, 200, 200, 403, 401])
        },
        Row {
            body: |_, caller| Some(json!({"email": format!("moved{}@example.com", unique(caller))})),
            fresh: true,
            ..row(Method::PUT, "/v1/users/{id}/email", "/v1/users/{user}/email", [401, 403, 200, 200, 403, 401])
        },
        Row {
            fresh: true,
            ..row(
                Method::POST,
                "/v1/users/{id}/deactivate",
                "/v1/users/{user}/deactivate",
                [401, 403, 200, 200, 403, 401],
            )
        },
        Row {
            fresh: true,
            ..row(
                Method::DELETE,
                "/v1/users/{id}/personal-data",
                "/v1/users/{user}/personal-data",
                [401, 403, 200, 200, 403, 401],
            )
        },
        row(Method::GET, "/v1/users/{id}/roles", "/v1/users/{user}/roles", [401, 403, 403, 200, 403, 401]),
        Row {
            body: |_, _| Some(json!({"role": "editor"})),
            ..row(Method::POST, "/v1/users/{id}/roles", "/v1/users/{user}/roles", [401, 403, 403, 200, 403, 401])
        },
        row(
            Method::DELETE,
            "/v1/users/{id}/roles/{role}",
            "/v1/users/{user}/roles/editor",
            [401, 403, 403, 200, 403, 401],
        ),
        Row {
            body: |fixture, _| Some(json!({"email": fixture.email, "password": support::PASSWORD})),
            ..row(Method::POST, "/v1/auth/login", "/v1/auth/login", [200, 200, 200, 200, 200, 401])
        },
        Row {
            // The author's own refresh token, whoever presents it: a bearer secret.
            body: |fixture, _| Some(json!({"refresh_token": fixture.author.refresh_token})),
            fresh: true,
            ..row(Method::POST, "/v1/auth/refresh", "/v1/auth/refresh", [200, 200, 200, 200, 200, 401])
        },
        Row { fresh: true, ..row(Method::POST, "/v1/auth/logout", "/v1/auth/logout", [401, 204, 204, 204, 204, 401]) },
        row(Method::GET, "/.well-known/jwks.json", "/.well-known/jwks.json", [200, 200, 200, 200, 200, 401]),
        Row {
            body: |_, caller| {
                Some(json!({"name": format!("r{}", unique(caller)), "permissions": ["posts:update:any"]}))
            },
            ..row(Method::POST, "/v1/roles", "/v1/roles", [401, 403, 403, 201, 403, 401])
        },
        row(Method::GET, "/v1/roles", "/v1/roles", [401, 403, 403, 200, 403, 401]),
        Row {
            body: |_, _| Some(json!({"permissions": ["posts:update:any", "posts:publish:any"]})),
            ..row(Method::PUT, "/v1/roles/{name}", "/v1/roles/editor", [401, 403, 403, 200, 403, 401])
        },
        Row {
            body: |_, _| Some(json!({"title": "Another"})),
            ..row(Method::POST, "/v1/posts", "/v1/posts", [401, 201, 201, 201, 201, 401])
        },
        row(Method::GET, "/v1/posts", "/v1/posts", [200, 200, 200, 200, 200, 401]),
        row(Method::GET, "/v1/posts/{id}", "/v1/posts/{post}", [200, 200, 200, 200, 200, 401]),
        row(Method::GET, "/v1/posts/{id}", "/v1/posts/{draft}", [404, 404, 200, 200, 404, 401]),
        Row {
            body: |_, caller| Some(json!({"body": format!("Edited by {}", CALLERS[caller])})),
            ..row(Method::PATCH, "/v1/posts/{id}", "/v1/posts/{post}", [401, 403, 200, 200, 200, 401])
        },
        Row {
            fresh: true,
            ..row(Method::DELETE, "/v1/posts/{id}", "/v1/posts/{post}", [401, 403, 200, 200, 403, 401])
        },
        Row {
            fresh: true,
            ..row(Method::POST, "/v1/posts/{id}/publish", "/v1/posts/{draft}/publish", [401, 403, 200, 200, 403, 401])
        },
        Row {
            fresh: true,
            ..row(
                Method::POST,
                "/v1/posts/{id}/unpublish",
                "/v1/posts/{post}/unpublish",
                [401, 403, 200, 200, 403, 401],
            )
        },
        row(Method::GET, "/v1/posts/{id}/comments", "/v1/posts/{post}/comments", [200, 200, 200, 200, 200, 401]),
        Row {
            body: |_, _| Some(json!({"body": "Me too."})),
            ..row(Method::POST, "/v1/posts/{id}/comments", "/v1/posts/{post}/comments", [401, 201, 201, 201, 201, 401])
        },
        Row {
            fresh: true,
            ..row(Method::DELETE, "/v1/comments/{id}", "/v1/comments/{comment}", [401, 403, 200, 200, 200, 401])
        },
        row(Method::GET, "/v1/me/drafts", "/v1/me/drafts", [401, 200, 200, 200, 200, 401]),
        row(Method::GET, "/v1/audit", "/v1/audit", [401, 403, 403, 200, 403, 401]),
        row(Method::GET, "/v1/streams/{stream}", "/v1/streams/posts", [401, 403, 403, 200, 403, 401]),
        row(Method::GET, "/v1/streams/audit", "/v1/streams/audit", [401, 403, 403, 200, 403, 401]),
        row(Method::GET, "/v1/streams/{stream}/{id}", "/v1/streams/posts/{post}", [401, 403, 200, 200, 403, 401]),
        row(Method::GET, "/v1/streams/{stream}/{id}", "/v1/streams/users/{user}", [401, 403, 200, 200, 403, 401]),
        row(Method::GET, "/v1/projections", "/v1/projections", [401, 403, 403, 200, 403, 401]),
        row(Method::GET, "/console", "/console", [200, 200, 200, 200, 200, 401]),
        row(Method::GET, "/console/{file}", "/console/console.js", [200, 200, 200, 200, 200, 401]),
        row(Method::GET, "/openapi.json", "/openapi.json", [200, 200, 200, 200, 200, 401]),
    ]
}

/// A user who holds the `moderator` role (`:any` grants only), once the grant is in force.
async fn moderator(platform: &Platform, client: &reqwest::Client, admin: &Account, shared: &Fixture) -> Account {
    let gateway = &platform.gateway_url;
    let role = client
        .post(format!("{gateway}/v1/roles"))
        .bearer_auth(&admin.access_token)
        .json(&json!({"name": "moderator", "permissions": ["posts:update:any", "comments:delete:any"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(role.status(), StatusCode::CREATED);
    let moderator = platform.signup(client, MODERATOR_EMAIL, "Moderator").await;
    let granted = client
        .post(format!("{gateway}/v1/users/{}/roles", moderator.id))
        .bearer_auth(&admin.access_token)
        .json(&json!({"role": "moderator"}))
        .send()
        .await
        .unwrap();
    assert_eq!(granted.status(), StatusCode::OK);
    // In force once the moderator may edit a post that is not theirs.
    eventually(Duration::from_secs(30), "the moderator's grant", || async {
        let response = client
            .patch(format!("{gateway}/v1/posts/{}", shared.post))
            .bearer_auth(&moderator.access_token)
            .json(&json!({"body": "Moderated."}))
            .send()
            .await
            .unwrap();
        (response.status() == StatusCode::OK).then_some(())
    })
    .await;
    moderator
}

/// A signed-in author with a published post carrying a comment, and a draft, all projected.
async fn fixture(platform: &Platform, client: &reqwest::Client) -> Fixture {
    let gateway = &platform.gateway_url;
    let email = format!("author{}@example.com", uuid::Uuid::new_v4().simple());
    let author = platform.signup(client, &email, "Author").await;
    let command = |method: Method, path: String, body: Value| {
        let request = client.request(method, format!("{gateway}{path}")).bearer_auth(&author.access_token).json(&body);
        async move {
            let response = request.send().await.unwrap();
            assert!(response.status().is_success(), "{path}: {}", response.status());
            let token = response.headers()["keel-position"].to_str().unwrap().to_owned();
            let body: Value = response.json().await.unwrap();
            (body["id"].as_str().unwrap().to_owned(), token)
        }
    };
    let (post, _) = command(Method::POST, "/v1/posts".into(), json!({"title": "Mine"})).await;
    command(Method::POST, format!("/v1/posts/{post}/publish"), json!({})).await;
    let (comment, _) = command(Method::POST, format!("/v1/posts/{post}/comments"), json!({"body": "First."})).await;
    let (draft, token) = command(Method::POST, "/v1/posts".into(), json!({"title": "Draft"})).await;
    // Wait until the blog projection has all of it (one partition's token does not cover the
    // others': poll the reads the rows rely on).
    eventually(Duration::from_secs(30), "the fixture in the blog read model", || async {
        let published = client.get(format!("{gateway}/v1/posts/{post}")).send().await.unwrap().status() == 200;
        let drafted = client
            .get(format!("{gateway}/v1/posts/{draft}"))
            .bearer_auth(&author.access_token)
            .header("keel-consistency", &token)
            .send()
            .await
            .unwrap()
            .status()
            == 200;
        (published && drafted).then_some(())
    })
    .await;
    Fixture { author, email, post, draft, comment }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_answers_each_kind_of_caller_as_the_table_says() {
    let table = table();
    for route in keel_gateway::routes::ROUTES {
        assert!(
            table.iter().any(|row| row.method.as_str() == route.method.as_str() && row.route == route.path),
            "{} {} is not in the matrix",
            route.method,
            route.path
        );
    }

    let platform = Platform::start().await;
    let client = reqwest::Client::new();
    let gateway = platform.gateway_url.clone();
    let admin = platform.admin(&client).await;
    let editor = client
        .post(format!("{gateway}/v1/roles"))
        .bearer_auth(&admin.access_token)
        .json(&json!({"name": "editor", "permissions": ["posts:update:any"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(editor.status(), StatusCode::CREATED);
    let shared = fixture(&platform, &client).await;
    let user = platform.signup(&client, "someone@example.com", "Someone").await;
    let moderator = moderator(&platform, &client, &admin, &shared).await;
    // The admin's token with its signature's last byte changed.
    let forged = {
        let token = &admin.access_token;
        let last = if token.ends_with('A') { "B" } else { "A" };
        format!("{}{last}", &token[..token.len() - 1])
    };

    let mut mismatches = Vec::new();
    let mut cells = 0;
    for row in &table {
        for caller in [ANONYMOUS, USER, AUTHOR, ADMIN, MODERATOR, FORGED] {
            let own;
            let fixture = if row.fresh {
                own = fixture(&platform, &client).await;
                &own
            } else {
                &shared
            };
            // A row that ends the caller's session gets the caller a session of its own.
            let token = match caller {
                ANONYMOUS => None,
                USER if row.fresh => Some(platform.login(&client, "someone@example.com", None).await.access_token),
                USER => Some(user.access_token.clone()),
                AUTHOR => Some(fixture.author.access_token.clone()),
                MODERATOR if row.fresh => Some(platform.login(&client, MODERATOR_EMAIL, None).await.access_token),
                MODERATOR => Some(moderator.access_token.clone()),
                FORGED => Some(forged.clone()),
                _ if row.fresh => Some(platform.login(&client, support::ADMIN_EMAIL, None).await.access_token),
                _ => Some(admin.access_token.clone()),
            };
            let path = row
                .path
                .replace("{user}", &fixture.author.id)
                .replace("{post}", &fixture.post)
                .replace("{draft}", &fixture.draft)
                .replace("{comment}", &fixture.comment);
            let mut request = client.request(row.method.clone(), format!("{gateway}{path}"));
            if let Some(token) = &token {
                request = request.bearer_auth(token);
            }
            if let Some(body) = (row.body)(fixture, caller) {
                request = request.json(&body);
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            cells += 1;
            if status != row.expect[caller] {
                let body = response.text().await.unwrap_or_default();
                mismatches.push(format!(
                    "{} {} as {}: {status}, expected {} ({body})",
                    row.method, row.path, CALLERS[caller], row.expect[caller]
                ));
            }
        }
    }
    eprintln!("{cells} cells checked");
    assert!(mismatches.is_empty(), "{} of {cells} cells differ:\n{}", mismatches.len(), mismatches.join("\n"));
}
