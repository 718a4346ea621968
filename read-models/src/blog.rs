//! The `blog` read model: posts and their comments, as the gateway's query routes serve them.

use anyhow::Context;
use chrono::{DateTime, Utc};
use keel_domain::blog::{CommentEvent, PostEvent};
use keel_topics::{Topic, blog};
use sqlx::{PgConnection, PgPool, Postgres, QueryBuilder};
use uuid::Uuid;

use keel_projections::{Commit, Projection, TableSpec, Tables};

pub struct BlogProjection;

const TABLES: &[TableSpec] = &[
    TableSpec {
        name: "posts",
        ddl: "CREATE TABLE {table} (
                  id           uuid        PRIMARY KEY,
                  author_id    uuid        NOT NULL,
                  title        text        NOT NULL,
                  body         text        NOT NULL,
                  tags         text[]      NOT NULL,
                  status       text        NOT NULL,
                  version      bigint      NOT NULL,
                  created_at   timestamptz NOT NULL,
                  updated_at   timestamptz NOT NULL,
                  published_at timestamptz
              );
              -- Published posts, newest first (the public list and its keyset cursor).
              CREATE INDEX {table}_published ON {table} (published_at DESC, id DESC) WHERE status = 'published';
              CREATE INDEX {table}_author ON {table} (author_id, status, updated_at DESC);
              CREATE INDEX {table}_tags ON {table} USING gin (tags);",
        view: true,
    },
    TableSpec {
        name: "comments",
        ddl: "CREATE TABLE {table} (
                  id         uuid        PRIMARY KEY,
                  post_id    uuid        NOT NULL,
                  author_id  uuid        NOT NULL,
                  body       text        NOT NULL,
                  created_at timestamptz NOT NULL,
                  deleted_at timestamptz
              );
              CREATE INDEX {table}_post ON {table} (post_id, created_at, id);",
        view: true,
    },
];

#[async_trait::async_trait]
impl Projection for BlogProjection {
    fn name(&self) -> &'static str {
        "blog"
    }

    fn code_version(&self) -> i32 {
        1
    }

    fn topics(&self) -> &'static [Topic] {
        &[Topic::BlogPosts, Topic::BlogComments]
    }

    fn tables(&self) -> &'static [TableSpec] {
        TABLES
    }

    async fn apply(&self, connection: &mut PgConnection, tables: Tables, commits: &[Commit]) -> anyhow::Result<()> {
        let posts = tables.name("posts");
        let comments = tables.name("comments");
        for commit in commits {
            let at = commit.header.occurred_at;
            let first = commit.header.expected_version as i64 + 1;
            match commit.topic {
                Topic::BlogPosts => {
                    let events = blog::decode_posts(&commit.decoded).context("a valid posts commit decodes")?;
                    for (index, event) in events.into_iter().enumerate() {
                        let version = first + index as i64;
                        let query = match event {
                            PostEvent::Drafted { id, author, title, body, tags } => sqlx::query(sqlx::AssertSqlSafe(format!(
                                "INSERT INTO {posts} (id, author_id, title, body, tags, status, version, created_at, updated_at)
                                 VALUES ($1, $2, $3, $4, $5, 'draft', $6, $7, $7) ON CONFLICT (id) DO NOTHING"
                            )))
                            .bind(id.as_uuid())
                            .bind(author.as_uuid())
                            .bind(String::from(title))
                            .bind(String::from(body))
                            .bind(Vec::<String>::from(tags))
                            .bind(version)
                            .bind(at),
                            PostEvent::Edited { id, title, body, tags } => sqlx::query(sqlx::AssertSqlSafe(format!(
                                "UPDATE {posts} SET title = $2, body = $3, tags = $4, version = $5, updated_at = $6
                                 WHERE id = $1 AND version < $5"
                            )))
                            .bind(id.as_uuid())
                            .bind(String::from(title))
                            .bind(String::from(body))
                            .bind(Vec::<String>::from(tags))
                            .bind(version)
                            .bind(at),
                            PostEvent::Published { id } => sqlx::query(sqlx::AssertSqlSafe(format!(
                                "UPDATE {posts} SET status = 'published', published_at = $2, version = $3, updated_at = $2
                                 WHERE id = $1 AND version < $3"
                            )))
                            .bind(id.as_uuid())
                            .bind(at)
                            .bind(version),
                            PostEvent::Unpublished { id } => sqlx::query(sqlx::AssertSqlSafe(format!(
                                "UPDATE {posts} SET status = 'draft', published_at = NULL, version = $3, updated_at = $2
                                 WHERE id = $1 AND version < $3"
                            )))
                            .bind(id.as_uuid())
                            .bind(at)
                            .bind(version),
                            PostEvent::Deleted { id } => sqlx::query(sqlx::AssertSqlSafe(format!(
                                "UPDATE {posts} SET status = 'deleted', version = $3, updated_at = $2 WHERE id = $1 AND version < $3"
                            )))
                            .bind(id.as_uuid())
                            .bind(at)
                            .bind(version),
                        };
                        query.execute(&mut *connection).await.context("failed to apply a post event")?;
                    }
                }
                Topic::BlogComments => {
                    for event in blog::decode_comments(&commit.decoded).context("a valid comments commit decodes")? {
                        let query = match event {
                            CommentEvent::Added { id, post_id, author, body } => {
                                sqlx::query(sqlx::AssertSqlSafe(format!(
                                    "INSERT INTO {comments} (id, post_id, author_id, body, created_at)
                                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING"
                                )))
                                .bind(id.as_uuid())
                                .bind(post_id.as_uuid())
                                .bind(author.as_uuid())
                                .bind(String::from(body))
                                .bind(at)
                            }
                            CommentEvent::Deleted { id, .. } => sqlx::query(sqlx::AssertSqlSafe(format!(
                                "UPDATE {comments} SET deleted_at = $2 WHERE id = $1 AND deleted_at IS NULL"
                            )))
                            .bind(id.as_uuid())
                            .bind(at),
                        };
                        query.execute(&mut *connection).await.context("failed to apply a comment event")?;
                    }
                }
                other => anyhow::bail!("the blog projection does not read {other}"),
            }
        }
        Ok(())
    }
}

// --- Queries -------------------------------------------------------------------------------------

/// A post, with its author's display name (`None` once the author's personal data is erased).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Post {
    pub id: Uuid,
    pub author_id: Uuid,
    pub author_name: Option<String>,
    pub title: String,
    pub body: String,
    pub tags: Vec<String>,
    /// `draft`, `published` or `deleted`.
    pub status: String,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub published_at: Option<DateTime<Utc>>,
}

/// A comment, with its author's display name.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Comment {
    pub id: Uuid,
    pub post_id: Uuid,
    pub author_id: Uuid,
    pub author_name: Option<String>,
    pub body: String,
    pub created_at: DateTime<Utc>,
}

/// Where a keyset page goes on from: the sort time and id of the last row of the page before.
pub type After = Option<(DateTime<Utc>, Uuid)>;

const POST_COLUMNS: &str = "p.id, p.author_id, u.display_name AS author_name, p.title, p.body, p.tags, p.status,
                            p.version, p.created_at, p.updated_at, p.published_at";

/// Published posts, newest first, by `author` and with `tag` when given: `rows` of them after
/// `after`. Each filter and the cursor is a bound parameter; the page is a range of the
/// `posts_published` index.
pub async fn published(
    pool: &PgPool,
    author: Option<Uuid>,
    tag: Option<&str>,
    after: After,
    rows: i64,
) -> Result<Vec<Post>, sqlx::Error> {
    let mut sql = QueryBuilder::<Postgres>::new(format!(
        "SELECT {POST_COLUMNS} FROM posts p LEFT JOIN users u ON u.id = p.author_id WHERE p.status = 'published'"
    ));
    if let Some(author) = author {
        sql.push(" AND p.author_id = ").push_bind(author);
    }
    if let Some(tag) = tag {
        sql.push(" AND p.tags @> ARRAY[").push_bind(tag.to_lowercase()).push("]::text[]");
    }
    if let Some((at, id)) = after {
        sql.push(" AND (p.published_at, p.id) < (").push_bind(at).push(", ").push_bind(id).push(")");
    }
    sql.push(" ORDER BY p.published_at DESC, p.id DESC LIMIT ").push_bind(rows);
    sql.build_query_as().fetch_all(pool).await
}

/// The post `id`, whatever its status.
pub async fn post(pool: &PgPool, id: Uuid) -> Result<Option<Post>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {POST_COLUMNS} FROM posts p LEFT JOIN users u ON u.id = p.author_id WHERE p.id = $1"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// `author`'s drafts, last changed first: `rows` of them after `after`.
pub async fn drafts_of(pool: &PgPool, author: Uuid, after: After, rows: i64) -> Result<Vec<Post>, sqlx::Error> {
    let mut sql = QueryBuilder::<Postgres>::new(format!(
        "SELECT {POST_COLUMNS} FROM posts p LEFT JOIN users u ON u.id = p.author_id
         WHERE p.status = 'draft' AND p.author_id = "
    ));
    sql.push_bind(author);
    if let Some((at, id)) = after {
        sql.push(" AND (p.updated_at, p.id) < (").push_bind(at).push(", ").push_bind(id).push(")");
    }
    sql.push(" ORDER BY p.updated_at DESC, p.id DESC LIMIT ").push_bind(rows);
    sql.build_query_as().fetch_all(pool).await
}

/// Whether the post `id` is published; `None` when there is no such post.
pub async fn is_published(pool: &PgPool, id: Uuid) -> Result<Option<bool>, sqlx::Error> {
    sqlx::query_scalar("SELECT status = 'published' FROM posts WHERE id = $1").bind(id).fetch_optional(pool).await
}

/// The comments of `post` not deleted, oldest first: `rows` of them after `after`.
pub async fn comments_of(pool: &PgPool, post: Uuid, after: After, rows: i64) -> Result<Vec<Comment>, sqlx::Error> {
    let mut sql = QueryBuilder::<Postgres>::new(
        "SELECT c.id, c.post_id, c.author_id, u.display_name AS author_name, c.body, c.created_at
         FROM comments c LEFT JOIN users u ON u.id = c.author_id WHERE c.deleted_at IS NULL AND c.post_id = ",
    );
    sql.push_bind(post);
    if let Some((at, id)) = after {
        sql.push(" AND (c.created_at, c.id) > (").push_bind(at).push(", ").push_bind(id).push(")");
    }
    sql.push(" ORDER BY c.created_at, c.id LIMIT ").push_bind(rows);
    sql.build_query_as().fetch_all(pool).await
}

/// The author of the post `id`, if there is one.
pub async fn post_author(pool: &PgPool, id: Uuid) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT author_id FROM posts WHERE id = $1").bind(id).fetch_optional(pool).await
}

/// The author of the comment `id`, if there is one.
pub async fn comment_author(pool: &PgPool, id: Uuid) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT author_id FROM comments WHERE id = $1").bind(id).fetch_optional(pool).await
}
