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
    blog_client::BlogClient,
};
use keel_topics::Topic;
use serde::{Deserialize, Serialize};
use sqlx::{Postgres, QueryBuilder};
use uuid::Uuid;

use crate::{
    AppState,
    commands::{command_response, created, metadata, parse_id, rejected},
    consistency::{self, Freshness},
    idempotency,
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

#[derive(Debug, sqlx::FromRow)]
struct PostRow {
    id: Uuid,
    author_id: Uuid,
    author_name: Option<String>,
    title: String,
    body: String,
    tags: Vec<String>,
    status: String,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    published_at: Option<DateTime<Utc>>,
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

impl PostRow {
    fn author(&self) -> Author {
        Author { id: self.author_id, display_name: self.author_name.clone() }
    }

    fn item(self) -> PostItem {
        let excerpt: String = self.body.chars().take(EXCERPT_CHARS).collect();
        PostItem {
            author: self.author(),
            id: self.id,
            title: self.title,
            excerpt,
            tags: self.tags,
            status: self.status,
            version: self.version,
            updated_at: self.updated_at,
            published_at: self.published_at,
        }
    }

    fn body(self) -> PostBody {
        PostBody {
            author: self.author(),
            id: self.id,
            title: self.title,
            body: self.body,
            tags: self.tags,
            status: self.status,
            version: self.version,
            created_at: self.created_at,
            updated_at: self.updated_at,
            published_at: self.published_at,
        }
    }
}

#[derive(Debug, Serialize, sqlx::FromRow)]
struct CommentRow {
    id: Uuid,
    post_id: Uuid,
    author_id: Uuid,
    #[serde(skip)]
    author_name: Option<String>,
    body: String,
    created_at: DateTime<Utc>,
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
}

const POST_COLUMNS: &str = "p.id, p.author_id, u.display_name AS author_name, p.title, p.body, p.tags, p.status,
                            p.version, p.created_at, p.updated_at, p.published_at";

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
        let mut sql = QueryBuilder::<Postgres>::new(format!(
            "SELECT {POST_COLUMNS} FROM posts p LEFT JOIN users u ON u.id = p.author_id WHERE p.status = 'published'"
        ));
        if let Some(author) = author {
            sql.push(" AND p.author_id = ").push_bind(author);
        }
        if let Some(tag) = &tag {
            sql.push(" AND p.tags @> ARRAY[").push_bind(tag.to_lowercase()).push("]::text[]");
        }
        if let Some(after) = &after {
            sql.push(" AND (p.published_at, p.id) < (").push_bind(after.at()?).push(", ").push_bind(after.id).push(")");
        }
        sql.push(" ORDER BY p.published_at DESC, p.id DESC LIMIT ").push_bind(limit + 1);
        let rows: Vec<PostRow> = sql.build_query_as().fetch_all(&state.pool).await.map_err(unavailable)?;
        let page = Page::of(rows, limit, |row| SortKey {
            at_us: row.published_at.map_or(0, |at| at.timestamp_micros()),
            id: row.id,
        });
        let page = Page {
            items: page.items.into_iter().map(PostRow::item).collect::<Vec<_>>(),
            next_cursor: page.next_cursor,
        };
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
    let row = sqlx::query_as::<_, PostRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {POST_COLUMNS} FROM posts p LEFT JOIN users u ON u.id = p.author_id WHERE p.id = $1"
    )))
    .bind(id)
    .fetch_optional(&state.pool)
    .await
    .map_err(unavailable)?;
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
    let mut response = json_response(json_bytes(&row.body()), freshness);
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
    let mut sql = QueryBuilder::<Postgres>::new(format!(
        "SELECT {POST_COLUMNS} FROM posts p LEFT JOIN users u ON u.id = p.author_id
         WHERE p.status = 'draft' AND p.author_id = "
    ));
    sql.push_bind(user);
    if let Some(after) = &after {
        sql.push(" AND (p.updated_at, p.id) < (").push_bind(after.at()?).push(", ").push_bind(after.id).push(")");
    }
    sql.push(" ORDER BY p.updated_at DESC, p.id DESC LIMIT ").push_bind(limit + 1);
    let rows: Vec<PostRow> = sql.build_query_as().fetch_all(&state.pool).await.map_err(unavailable)?;
    let page = Page::of(rows, limit, |row| SortKey { at_us: row.updated_at.timestamp_micros(), id: row.id });
    let page =
        Page { items: page.items.into_iter().map(PostRow::item).collect::<Vec<_>>(), next_cursor: page.next_cursor };
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
        let published: Option<bool> = sqlx::query_scalar("SELECT status = 'published' FROM posts WHERE id = $1")
            .bind(id)
            .fetch_optional(&state.pool)
            .await
            .map_err(unavailable)?;
        if published != Some(true) {
            return Err(Problem::not_found(format!("no post {id}")));
        }
        let mut sql = QueryBuilder::<Postgres>::new(
            "SELECT c.id, c.post_id, c.author_id, u.display_name AS author_name, c.body, c.created_at
             FROM comments c LEFT JOIN users u ON u.id = c.author_id WHERE c.deleted_at IS NULL AND c.post_id = ",
        );
        sql.push_bind(id);
        if let Some(after) = &after {
            sql.push(" AND (c.created_at, c.id) > (").push_bind(after.at()?).push(", ").push_bind(after.id).push(")");
        }
        sql.push(" ORDER BY c.created_at, c.id LIMIT ").push_bind(limit + 1);
        let rows: Vec<CommentRow> = sql.build_query_as().fetch_all(&state.pool).await.map_err(unavailable)?;
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
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<DraftBody>,
) -> Result<Response, Problem> {
    let command_id = idempotency::command_id_of(&headers, "POST", "/v1/posts", "", &caller)?;
    let request = DraftPostRequest {
        metadata: Some(metadata(&headers, command_id, &caller)),
        title: body.title,
        body: body.body,
        tags: body.tags,
    };
    let reply = state
        .blog
        .send(
            "DraftPost",
            request,
            |channel, request| async move { BlogClient::new(channel).draft_post(request).await },
        )
        .await
        .map_err(|status| rejected("draft post", &status))?;
    created(format!("/v1/posts/{}", reply.aggregate_id), reply)
}

/// `PATCH /v1/posts/{id}` with `{"title"?, "body"?, "tags"?}`, optionally conditional on
/// `If-Match`.
pub(crate) async fn edit(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(decision): Extension<Decision>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<EditBody>,
) -> Result<Response, Problem> {
    let id = parse_id(&id, "post")?;
    let command_id = idempotency::command_id_of(&headers, "PATCH", "/v1/posts/{id}", &id.to_string(), &caller)?;
    let request = EditPostRequest {
        metadata: Some(metadata(&headers, command_id, &caller)),
        post_id: id.to_string(),
        title: body.title,
        body: body.body,
        tags: body.tags.map(|tags| Tags { tags }),
        expected_version: precondition::expected_version(&headers)?,
        any: decision.any(),
    };
    let reply = state
        .blog
        .send("EditPost", request, |channel, request| async move { BlogClient::new(channel).edit_post(request).await })
        .await
        .map_err(|status| rejected("edit post", &status))?;
    Ok(command_response(StatusCode::OK, reply))
}

/// Which post command a route sends.
#[derive(Debug, Clone, Copy)]
enum PostCommand {
    Publish,
    Unpublish,
    Delete,
}

async fn post_command(
    state: AppState,
    caller: Caller,
    decision: Decision,
    id: String,
    headers: HeaderMap,
    which: PostCommand,
) -> Result<Response, Problem> {
    let id = parse_id(&id, "post")?;
    let (method, route) = match which {
        PostCommand::Publish => ("POST", "/v1/posts/{id}/publish"),
        PostCommand::Unpublish => ("POST", "/v1/posts/{id}/unpublish"),
        PostCommand::Delete => ("DELETE", "/v1/posts/{id}"),
    };
    let command_id = idempotency::command_id_of(&headers, method, route, &id.to_string(), &caller)?;
    let request = PostCommandRequest {
        metadata: Some(metadata(&headers, command_id, &caller)),
        post_id: id.to_string(),
        expected_version: precondition::expected_version(&headers)?,
        any: decision.any(),
    };
    let reply = state
        .blog
        .send(route, request, |channel, request| async move {
            let mut client = BlogClient::new(channel);
            match which {
                PostCommand::Publish => client.publish_post(request).await,
                PostCommand::Unpublish => client.unpublish_post(request).await,
                PostCommand::Delete => client.delete_post(request).await,
            }
        })
        .await
        .map_err(|status| rejected(route, &status))?;
    Ok(command_response(StatusCode::OK, reply))
}

/// `POST /v1/posts/{id}/publish`.
pub(crate) async fn publish(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(decision): Extension<Decision>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    post_command(state, caller, decision, id, headers, PostCommand::Publish).await
}

/// `POST /v1/posts/{id}/unpublish`.
pub(crate) async fn unpublish(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(decision): Extension<Decision>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    post_command(state, caller, decision, id, headers, PostCommand::Unpublish).await
}

/// `DELETE /v1/posts/{id}`.
pub(crate) async fn delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(decision): Extension<Decision>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    post_command(state, caller, decision, id, headers, PostCommand::Delete).await
}

/// `POST /v1/posts/{id}/comments` with `{"body"}`.
pub(crate) async fn comment(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<CommentBody>,
) -> Result<Response, Problem> {
    let id = parse_id(&id, "post")?;
    let command_id = idempotency::command_id_of(&headers, "POST", "/v1/posts/{id}/comments", &id.to_string(), &caller)?;
    let request = AddCommentRequest {
        metadata: Some(metadata(&headers, command_id, &caller)),
        post_id: id.to_string(),
        body: body.body,
    };
    let reply =
        state
            .blog
            .send("AddComment", request, |channel, request| async move {
                BlogClient::new(channel).add_comment(request).await
            })
            .await
            .map_err(|status| rejected("add comment", &status))?;
    created(format!("/v1/comments/{}", reply.aggregate_id), reply)
}

/// `DELETE /v1/comments/{id}`.
pub(crate) async fn delete_comment(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(decision): Extension<Decision>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let id = parse_id(&id, "comment")?;
    let command_id = idempotency::command_id_of(&headers, "DELETE", "/v1/comments/{id}", &id.to_string(), &caller)?;
    let request = DeleteCommentRequest {
        metadata: Some(metadata(&headers, command_id, &caller)),
        comment_id: id.to_string(),
        any: decision.any(),
    };
    let reply = state
        .blog
        .send("DeleteComment", request, |channel, request| async move {
            BlogClient::new(channel).delete_comment(request).await
        })
        .await
        .map_err(|status| rejected("delete comment", &status))?;
    Ok(command_response(StatusCode::OK, reply))
}
