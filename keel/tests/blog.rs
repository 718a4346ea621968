//! The blog through the gateway, as its users meet it: a writer signs up, drafts, publishes and
//! edits with optimistic concurrency; readers list and read; comments come and go.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{Account, Platform, eventually};

fn token(response: &reqwest::Response) -> String {
    response.headers()["keel-position"].to_str().unwrap().to_owned()
}

async fn json_of(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_writer_drafts_publishes_and_edits_and_readers_see_it() {
    let platform = Platform::start().await;
    let client = reqwest::Client::new();
    let gateway = platform.gateway_url.clone();
    let author: Account = platform.signup(&client, "writer@example.com", "Writer").await;

    let drafted = client
        .post(format!("{gateway}/v1/posts"))
        .bearer_auth(&author.access_token)
        .json(&json!({"title": "Hello, Keel", "body": "Kafka is the source of truth.", "tags": ["Kafka", "intro"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(drafted.status(), StatusCode::CREATED, "{}", drafted.text().await.unwrap());
    let location = drafted.headers()["location"].to_str().unwrap().to_owned();
    let drafted_at = token(&drafted);
    let post: Value = drafted.json().await.unwrap();
    let id = post["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/v1/posts/{id}"));
    assert_eq!(post["version"], 1);

    // A draft is the author's: an anonymous reader does not see it, the author does.
    let hidden =
        client.get(format!("{gateway}/v1/posts/{id}")).header("keel-consistency", &drafted_at).send().await.unwrap();
    assert_eq!(hidden.status(), StatusCode::NOT_FOUND);
    let (status, own) = json_of(
        client
            .get(format!("{gateway}/v1/posts/{id}"))
            .bearer_auth(&author.access_token)
            .header("keel-consistency", &drafted_at)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, own["status"].clone()), (StatusCode::OK, json!("draft")));
    assert_eq!(own["tags"], json!(["intro", "kafka"]));
    let (_, drafts) =
        json_of(client.get(format!("{gateway}/v1/me/drafts")).bearer_auth(&author.access_token).send().await.unwrap())
            .await;
    assert_eq!(drafts["items"][0]["id"], id.as_str());

    let published = client
        .post(format!("{gateway}/v1/posts/{id}/publish"))
        .bearer_auth(&author.access_token)
        .header("if-match", "\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(published.status(), StatusCode::OK);
    assert_eq!(published.headers()["etag"], "\"2\"");
    let published_at = token(&published);

    // An anonymous reader lists it (the list waits for the projection with the token).
    let (status, list) = json_of(
        client
            .get(format!("{gateway}/v1/posts?tag=kafka"))
            .header("keel-consistency", &published_at)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["items"][0]["title"], "Hello, Keel");
    assert_eq!(list["items"][0]["author"]["display_name"], "Writer");
    // Without a token, the public list eventually shows it too (and is cached from then on).
    eventually(Duration::from_secs(10), "the post in the public list", || async {
        let (_, list) = json_of(client.get(format!("{gateway}/v1/posts")).send().await.unwrap()).await;
        (list["items"].as_array().unwrap().len() == 1).then_some(())
    })
    .await;

    // Editing against a stale version is a conflict naming the current one; the fresh one wins.
    let stale = client
        .patch(format!("{gateway}/v1/posts/{id}"))
        .bearer_auth(&author.access_token)
        .header("if-match", "\"1\"")
        .json(&json!({"title": "Hello again"}))
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), StatusCode::CONFLICT);
    assert_eq!(stale.headers()["etag"], "\"2\"");
    let (_, problem) = json_of(stale).await;
    assert_eq!(problem["type"], "urn:keel:problem:version-conflict");
    assert_eq!(problem["current_version"], 2);
    let fresh = client
        .patch(format!("{gateway}/v1/posts/{id}"))
        .bearer_auth(&author.access_token)
        .header("if-match", "\"2\"")
        .json(&json!({"title": "Hello again"}))
        .send()
        .await
        .unwrap();
    assert_eq!(fresh.status(), StatusCode::OK);
    let edited_at = token(&fresh);
    // The cached list drops the old title as soon as the projection commits the edit.
    let (_, post) = json_of(
        client.get(format!("{gateway}/v1/posts/{id}")).header("keel-consistency", &edited_at).send().await.unwrap(),
    )
    .await;
    assert_eq!((post["title"].clone(), post["version"].clone()), (json!("Hello again"), json!(3)));
    eventually(Duration::from_secs(10), "the edit in the cached public list", || async {
        let (_, list) = json_of(client.get(format!("{gateway}/v1/posts")).send().await.unwrap()).await;
        (list["items"][0]["title"] == "Hello again").then_some(())
    })
    .await;

    // A reader comments; the comment appears; the reader deletes it.
    let reader = platform.signup(&client, "reader@example.com", "Reader").await;
    let commented = client
        .post(format!("{gateway}/v1/posts/{id}/comments"))
        .bearer_auth(&reader.access_token)
        .json(&json!({"body": "Well said."}))
        .send()
        .await
        .unwrap();
    assert_eq!(commented.status(), StatusCode::CREATED, "{}", commented.text().await.unwrap());
    let commented_at = token(&commented);
    let comment: Value = commented.json().await.unwrap();
    let (_, comments) = json_of(
        client
            .get(format!("{gateway}/v1/posts/{id}/comments"))
            .header("keel-consistency", &commented_at)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(comments["items"][0]["body"], "Well said.");
    assert_eq!(comments["items"][0]["author"]["display_name"], "Reader");
    // Not the reader's post: editing it is refused by the blog service, which knows the author.
    let foreign = client
        .patch(format!("{gateway}/v1/posts/{id}"))
        .bearer_auth(&reader.access_token)
        .json(&json!({"title": "Mine now"}))
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), StatusCode::FORBIDDEN);
    let deleted = client
        .delete(format!("{gateway}/v1/comments/{}", comment["id"].as_str().unwrap()))
        .bearer_auth(&reader.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::OK);
    let (_, comments) = json_of(
        client
            .get(format!("{gateway}/v1/posts/{id}/comments"))
            .header("keel-consistency", token(&deleted))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(comments["items"], json!([]));

    // Unpublished, the post leaves the public list; deleted, it is gone.
    let unpublished = client
        .post(format!("{gateway}/v1/posts/{id}/unpublish"))
        .bearer_auth(&author.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(unpublished.status(), StatusCode::OK);
    let (_, list) = json_of(
        client.get(format!("{gateway}/v1/posts")).header("keel-consistency", token(&unpublished)).send().await.unwrap(),
    )
    .await;
    assert_eq!(list["items"], json!([]));
    let removed =
        client.delete(format!("{gateway}/v1/posts/{id}")).bearer_auth(&author.access_token).send().await.unwrap();
    assert_eq!(removed.status(), StatusCode::OK);
    let gone = client
        .get(format!("{gateway}/v1/posts/{id}"))
        .bearer_auth(&author.access_token)
        .header("keel-consistency", token(&removed))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);
}
