//! `/v1/posts`, `/v1/me/drafts` and `/v1/comments`: posts and comments (commands to blog, reads
//! from the blog read model).
//!
//! Published posts and their comments are public and cached ([`crate::cache`]); drafts are
//! visible to whoever may read the author's posts (the author, admins) and to nobody else,
//! who gets `404` as for a post that does not exist.

use axum::{
    Extension,
    extract::{Path, Query, State, rejection::QueryRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use keel_proto::blog::v1::{
    AddCommentRequest, DeleteCommentRequest, DraftPostRequest, EditPostRequest, PostCommandRequest, Tags,
};
use keel_read_models::blog::{self, Post};
use keel_topics::Topic;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    AppState,
    commands::{CommandRequest, command_response, created, parse_id, rejected},
    consistency::{self, Freshness},
    pagination::{self, Page, decode_cursor},
    precondition,
    problem::{JsonBody, Problem},
    security::{Caller, Decision},
};

const DEFAULT_LIMIT: i64 = 20;
const MAX_LIMIT: i64 = 100;
const EXCERPT_CHARS: usize = 280;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DraftBody {
    title: String,
    #[serde(default)]
    body: String,
    #[serde(default)]
    tags: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EditBody {
    title: Option<String>,
    body: Option<String>,
    tags: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CommentBody {
    body: String,
}

#[derive(Debug, Serialize)]
struct Author {
    id: Uuid,
    /// `null` once the author's personal data is erased.
    display_name: Option<String>,
}

#[derive(Debug, Serialize)]
struct PostBody {
    id: Uuid,
    author: Author,
    title: String,
    body: String,
    tags: Vec<String>,
    status: String,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    published_at: Option<DateTime<Utc>>,
}

/// A post in a list: its body cut to an excerpt.
#[derive(Debug, Serialize)]
struct PostItem {
    id: Uuid,
    author: Author,
    title: String,
    excerpt: String,
    tags: Vec<String>,
    status: String,
    version: i64,
    updated_at: DateTime<Utc>,
    published_at: Option<DateTime<Utc>>,
}

fn author(post: &Post) -> Author {
    Author { id: post.author_id, display_name: post.author_name.clone() }
}

/// A post in a list.
fn item(post: Post) -> PostItem {
    let excerpt: String = post.body.chars().take(EXCERPT_CHARS).collect();
    PostItem {
        author: author(&post),
        id: post.id,
        title: post.title,
        excerpt,
        tags: post.tags,
        status: post.status,
        version: post.version,
        updated_at: post.updated_at,
        published_at: post.published_at,
    }
}

/// A post whole.
fn body(post: Post) -> PostBody {
    PostBody {
        author: author(&post),
        id: post.id,
        title: post.title,
        body: post.body,
        tags: post.tags,
        status: post.status,
        version: post.version,
        created_at: post.created_at,
        updated_at: post.updated_at,
        published_at: post.published_at,
    }
}

#[derive(Debug, Serialize)]
struct CommentItem {
    id: Uuid,
    post_id: Uuid,
    author: Author,
    body: String,
    created_at: DateTime<Utc>,
}

/// The sort key of a list: a time (microseconds) and the id.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SortKey {
    at_us: i64,
    id: Uuid,
}

impl SortKey {
    fn at(&self) -> Result<DateTime<Utc>, Problem> {
        DateTime::from_timestamp_micros(self.at_us)
            .ok_or_else(|| Problem::bad_request("parameter `cursor` is not a cursor this route returned"))
    }

    /// Where the next page goes on from.
    fn after(&self) -> Result<(DateTime<Utc>, Uuid), Problem> {
        Ok((self.at()?, self.id))
    }
}

fn unavailable(error: sqlx::Error) -> Problem {
    tracing::error!(%error, "failed to read the blog read model");
    Problem::from_code(keel_proto::ErrorCode::Unavailable)
}

fn json_bytes(value: &impl Serialize) -> Bytes {
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

fn json_response(bytes: Bytes, freshness: Freshness) -> Response {
    let mut response = ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], bytes).into_response();
    if let Some((name, value)) = freshness.header() {
        response.headers_mut().insert(name, value);
    }
    response
}

/// Waits for the blog projection to pass the request's consistency tokens.
async fn fresh(state: &AppState, headers: &HeaderMap) -> Result<Freshness, Problem> {
    let (posts, comments) = (state.names.name(Topic::BlogPosts), state.names.name(Topic::BlogComments));
    let tokens = consistency::tokens(headers, &[posts.as_str(), comments.as_str()])?;
    consistency::wait(&state.pool, "blog", &tokens, state.consistency_timeout).await
}

fn list_params(
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    known: &[&str],
) -> Result<std::collections::BTreeMap<String, String>, Problem> {
    let Query(pairs) = query.map_err(|_| Problem::bad_request("the query string is malformed"))?;
    pagination::params(pairs, known)
}

/// `GET /v1/posts?author=&tag=&limit=&cursor=`: published posts, newest first.
pub(crate) async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, Problem> {
    let params = list_params(query, &["author", "tag", "limit", "cursor"])?;
    let author = params.get("author").map(|value| parse_id(value, "author")).transpose()?;
    let tag = params.get("tag").cloned();
    let limit = pagination::limit(&params, DEFAULT_LIMIT, MAX_LIMIT)?;
    let after = params.get("cursor").map(|value| decode_cursor::<SortKey>(value)).transpose()?;
    let freshness = fresh(&state, &headers).await?;
    let key = format!("posts:{author:?}:{tag:?}:{limit}:{}", params.get("cursor").map_or("", String::as_str));
    let load = async {
        let after = after.as_ref().map(SortKey::after).transpose()?;
        let rows = blog::published(&state.pool, author, tag.as_deref(), after, limit + 1).await.map_err(unavailable)?;
        let page = Page::of(rows, limit, |row| SortKey {
            at_us: row.published_at.map_or(0, |at| at.timestamp_micros()),
            id: row.id,
        });
        let page = Page { items: page.items.into_iter().map(item).collect::<Vec<_>>(), next_cursor: page.next_cursor };
        Ok(Some(json_bytes(&page)))
    };
    // A read that had to wait for consistency reads the read model itself.
    let bytes = if freshness == Freshness::Unconstrained {
        state.posts_cache.get_or_load(key, load).await?
    } else {
        load.await?
    };
    Ok(json_response(bytes.unwrap_or_default(), freshness))
}

/// `GET /v1/posts/{id}`.
pub(crate) async fn get(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let id = parse_id(&id, "post")?;
    let freshness = fresh(&state, &headers).await?;
    let row = blog::post(&state.pool, id).await.map_err(unavailable)?;
    let not_found = || Problem::not_found(format!("no post {id}"));
    let Some(row) = row else { return Err(not_found()) };
    match row.status.as_str() {
        "published" => {}
        "draft" => {
            let Some(user) = caller.user() else { return Err(not_found()) };
            if !state.security.permissions.check(user, "posts:read", Some(row.author_id)).await?.is_allowed() {
                return Err(not_found());
            }
        }
        _ => return Err(not_found()),
    }
    let version = row.version;
    let mut response = json_response(json_bytes(&body(row)), freshness);
    response.headers_mut().insert(header::ETAG, precondition::entity_tag(version));
    Ok(response)
}

/// `GET /v1/me/drafts?limit=&cursor=`: the caller's drafts, last changed first.
pub(crate) async fn my_drafts(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, Problem> {
    let Some(user) = caller.user() else { return Err(Problem::from_code(keel_proto::ErrorCode::Unauthenticated)) };
    let params = list_params(query, &["limit", "cursor"])?;
    let limit = pagination::limit(&params, DEFAULT_LIMIT, MAX_LIMIT)?;
    let after = params.get("cursor").map(|value| decode_cursor::<SortKey>(value)).transpose()?;
    let freshness = fresh(&state, &headers).await?;
    let after = after.as_ref().map(SortKey::after).transpose()?;
    let rows = blog::drafts_of(&state.pool, user, after, limit + 1).await.map_err(unavailable)?;
    let page = Page::of(rows, limit, |row| SortKey { at_us: row.updated_at.timestamp_micros(), id: row.id });
    let page = Page { items: page.items.into_iter().map(item).collect::<Vec<_>>(), next_cursor: page.next_cursor };
    Ok(json_response(json_bytes(&page), freshness))
}

/// `GET /v1/posts/{id}/comments?limit=&cursor=`: the comments of a published post, oldest first.
pub(crate) async fn comments(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, Problem> {
    let id = parse_id(&id, "post")?;
    let params = list_params(query, &["limit", "cursor"])?;
    let limit = pagination::limit(&params, DEFAULT_LIMIT, MAX_LIMIT)?;
    let after = params.get("cursor").map(|value| decode_cursor::<SortKey>(value)).transpose()?;
    let freshness = fresh(&state, &headers).await?;
    let key = format!("comments:{id}:{limit}:{}", params.get("cursor").map_or("", String::as_str));
    let load = async {
        let published = blog::is_published(&state.pool, id).await.map_err(unavailable)?;
        if published != Some(true) {
            return Err(Problem::not_found(format!("no post {id}")));
        }
        let after = after.as_ref().map(SortKey::after).transpose()?;
        let rows = blog::comments_of(&state.pool, id, after, limit + 1).await.map_err(unavailable)?;
        let page = Page::of(rows, limit, |row| SortKey { at_us: row.created_at.timestamp_micros(), id: row.id });
        let items: Vec<CommentItem> = page
            .items
            .into_iter()
            .map(|row| CommentItem {
                author: Author { id: row.author_id, display_name: row.author_name },
                id: row.id,
                post_id: row.post_id,
                body: row.body,
                created_at: row.created_at,
            })
            .collect();
        Ok(Some(json_bytes(&Page { items, next_cursor: page.next_cursor })))
    };
    let bytes = if freshness == Freshness::Unconstrained {
        state.posts_cache.get_or_load(key, load).await?
    } else {
        load.await?
    };
    Ok(json_response(bytes.unwrap_or_default(), freshness))
}

/// `POST /v1/posts` with `{"title", "body", "tags"}`: a draft of the caller's.
pub(crate) async fn draft(
    State(state): State<AppState>,
    command: CommandRequest,
    JsonBody(body): JsonBody<DraftBody>,
) -> Result<Response, Problem> {
    let request =
        DraftPostRequest { metadata: command.metadata(), title: body.title, body: body.body, tags: body.tags };
    let reply = state.blog.draft_post(request).await.map_err(|status| rejected("draft post", &status))?;
    created(format!("/v1/posts/{}", reply.aggregate_id), reply)
}

/// `PATCH /v1/posts/{id}` with `{"title"?, "body"?, "tags"?}`, optionally conditional on
/// `If-Match`.
pub(crate) async fn edit(
    State(state): State<AppState>,
    Extension(decision): Extension<Decision>,
    command: CommandRequest,
    JsonBody(body): JsonBody<EditBody>,
) -> Result<Response, Problem> {
    let request = EditPostRequest {
        metadata: command.metadata(),
        post_id: command.id("post")?.to_string(),
        title: body.title,
        body: body.body,
        tags: body.tags.map(|tags| Tags { tags }),
        expected_version: command.expected_version()?,
        any: decision.any(),
    };
    let reply = state.blog.edit_post(request).await.map_err(|status| rejected("edit post", &status))?;
    Ok(command_response(StatusCode::OK, reply))
}

/// The request of a command that moves a post through its life (publish, unpublish, delete).
fn post_command(command: &CommandRequest, decision: Decision) -> Result<PostCommandRequest, Problem> {
    Ok(PostCommandRequest {
        metadata: command.metadata(),
        post_id: command.id("post")?.to_string(),
        expected_version: command.expected_version()?,
        any: decision.any(),
    })
}

/// `POST /v1/posts/{id}/publish`.
pub(crate) async fn publish(
    State(state): State<AppState>,
    Extension(decision): Extension<Decision>,
    command: CommandRequest,
) -> Result<Response, Problem> {
    let request = post_command(&command, decision)?;
    let reply = state.blog.publish_post(request).await.map_err(|status| rejected("publish post", &status))?;
    Ok(command_response(StatusCode::OK, reply))
}

/// `POST /v1/posts/{id}/unpublish`.
pub(crate) async fn unpublish(
    State(state): State<AppState>,
    Extension(decision): Extension<Decision>,
    command: CommandRequest,
) -> Result<Response, Problem> {
    let request = post_command(&command, decision)?;
    let reply = state.blog.unpublish_post(request).await.map_err(|status| rejected("unpublish post", &status))?;
    Ok(command_response(StatusCode::OK, reply))
}

/// `DELETE /v1/posts/{id}`.
pub(crate) async fn delete(
    State(state): State<AppState>,
    Extension(decision): Extension<Decision>,
    command: CommandRequest,
) -> Result<Response, Problem> {
    let request = post_command(&command, decision)?;
    let reply = state.blog.delete_post(request).await.map_err(|status| rejected("delete post", &status))?;
    Ok(command_response(StatusCode::OK, reply))
}

/// `POST /v1/posts/{id}/comments` with `{"body"}`.
pub(crate) async fn comment(
    State(state): State<AppState>,
    command: CommandRequest,
    JsonBody(body): JsonBody<CommentBody>,
) -> Result<Response, Problem> {
    let request =
        AddCommentRequest { metadata: command.metadata(), post_id: command.id("post")?.to_string(), body: body.body };
    let reply = state.blog.add_comment(request).await.map_err(|status| rejected("add comment", &status))?;
    created(format!("/v1/comments/{}", reply.aggregate_id), reply)
}

/// `DELETE /v1/comments/{id}`.
pub(crate) async fn delete_comment(
    State(state): State<AppState>,
    Extension(decision): Extension<Decision>,
    command: CommandRequest,
) -> Result<Response, Problem> {
    let request = DeleteCommentRequest {
        metadata: command.metadata(),
        comment_id: command.id("comment")?.to_string(),
        any: decision.any(),
    };
    let reply = state.blog.delete_comment(request).await.map_err(|status| rejected("delete comment", &status))?;
    Ok(command_response(StatusCode::OK, reply))
}
