//! The `blog` read model: posts and their comments, as the gateway's query routes serve them.

use anyhow::Context;
use keel_domain::blog::{CommentEvent, PostEvent};
use keel_topics::{Topic, blog};
use sqlx::PgConnection;

use crate::{Commit, Projection, TableSpec, Tables};

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
