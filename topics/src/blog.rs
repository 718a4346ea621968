//! Wire form of the blog events: posts and comments.

use apache_avro::types::Value;
use keel_domain::{
    blog::{CommentBody, CommentEvent, CommentId, PostBody, PostEvent, PostId, Tags, Title},
    identity::UserId,
};

use crate::{
    Topic,
    codec::{self, CodecError, Decoded, invalid, record},
};

const POST_DRAFTED: &str = "keel.blog.PostDrafted";
const POST_EDITED: &str = "keel.blog.PostEdited";
const POST_PUBLISHED: &str = "keel.blog.PostPublished";
const POST_UNPUBLISHED: &str = "keel.blog.PostUnpublished";
const POST_DELETED: &str = "keel.blog.PostDeleted";
const COMMENT_ADDED: &str = "keel.blog.CommentAdded";
const COMMENT_DELETED: &str = "keel.blog.CommentDeleted";

fn uuid(name: &'static str, id: uuid::Uuid) -> (&'static str, Value) {
    (name, Value::Uuid(id))
}

fn text(name: &'static str, value: &str) -> (&'static str, Value) {
    (name, Value::String(value.to_owned()))
}

fn content(title: &Title, body: &PostBody, tags: &Tags) -> [(&'static str, Value); 3] {
    [text("title", title.as_str()), text("body", body.as_str()), ("tags", codec::strings(tags.iter()))]
}

pub fn encode_posts(events: &[PostEvent]) -> Value {
    let records = events
        .iter()
        .map(|event| match event {
            PostEvent::Drafted { id, author, title, body, tags } => {
                let mut fields = vec![uuid("post_id", id.as_uuid()), uuid("author_id", author.as_uuid())];
                fields.extend(content(title, body, tags));
                (POST_DRAFTED, record(fields))
            }
            PostEvent::Edited { id, title, body, tags } => {
                let mut fields = vec![uuid("post_id", id.as_uuid())];
                fields.extend(content(title, body, tags));
                (POST_EDITED, record(fields))
            }
            PostEvent::Published { id } => (POST_PUBLISHED, record(vec![uuid("post_id", id.as_uuid())])),
            PostEvent::Unpublished { id } => (POST_UNPUBLISHED, record(vec![uuid("post_id", id.as_uuid())])),
            PostEvent::Deleted { id } => (POST_DELETED, record(vec![uuid("post_id", id.as_uuid())])),
        })
        .collect();
    codec::commit_value(Topic::BlogPosts, records)
}

pub fn decode_posts(decoded: &Decoded) -> Result<Vec<PostEvent>, CodecError> {
    decoded
        .events
        .iter()
        .map(|event| {
            let record = &event.record;
            let id = PostId::from_uuid(codec::uuid_field(record, "post_id")?);
            let title = || Title::parse(codec::string_field(record, "title")?).map_err(invalid);
            let body = || PostBody::parse(codec::string_field(record, "body")?).map_err(invalid);
            let tags = || Tags::parse(&codec::strings_field(record, "tags")?).map_err(invalid);
            match event.type_name.as_str() {
                POST_DRAFTED => Ok(PostEvent::Drafted {
                    id,
                    author: UserId::from_uuid(codec::uuid_field(record, "author_id")?),
                    title: title()?,
                    body: body()?,
                    tags: tags()?,
                }),
                POST_EDITED => Ok(PostEvent::Edited { id, title: title()?, body: body()?, tags: tags()? }),
                POST_PUBLISHED => Ok(PostEvent::Published { id }),
                POST_UNPUBLISHED => Ok(PostEvent::Unpublished { id }),
                POST_DELETED => Ok(PostEvent::Deleted { id }),
                other => Err(CodecError::UnknownEventType(other.to_owned())),
            }
        })
        .collect()
}

pub fn encode_comments(events: &[CommentEvent]) -> Value {
    let records = events
        .iter()
        .map(|event| match event {
            CommentEvent::Added { id, post_id, author, body } => (
                COMMENT_ADDED,
                record(vec![
                    uuid("comment_id", id.as_uuid()),
                    uuid("post_id", post_id.as_uuid()),
                    uuid("author_id", author.as_uuid()),
                    text("body", body.as_str()),
                ]),
            ),
            CommentEvent::Deleted { id, post_id } => {
                (COMMENT_DELETED, record(vec![uuid("comment_id", id.as_uuid()), uuid("post_id", post_id.as_uuid())]))
            }
        })
        .collect();
    codec::commit_value(Topic::BlogComments, records)
}

pub fn decode_comments(decoded: &Decoded) -> Result<Vec<CommentEvent>, CodecError> {
    decoded
        .events
        .iter()
        .map(|event| {
            let record = &event.record;
            let id = CommentId::from_uuid(codec::uuid_field(record, "comment_id")?);
            let post_id = PostId::from_uuid(codec::uuid_field(record, "post_id")?);
            match event.type_name.as_str() {
                COMMENT_ADDED => Ok(CommentEvent::Added {
                    id,
                    post_id,
                    author: UserId::from_uuid(codec::uuid_field(record, "author_id")?),
                    body: CommentBody::parse(codec::string_field(record, "body")?).map_err(invalid)?,
                }),
                COMMENT_DELETED => Ok(CommentEvent::Deleted { id, post_id }),
                other => Err(CodecError::UnknownEventType(other.to_owned())),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_commits_validate_against_their_schemas() {
        let id = PostId::for_draft(uuid::Uuid::new_v4());
        let (title, body, tags) =
            (Title::parse("Hi").unwrap(), PostBody::parse("Body").unwrap(), Tags::parse(&["a", "b"]).unwrap());
        let posts = encode_posts(&[
            PostEvent::Drafted {
                id,
                author: UserId::new(),
                title: title.clone(),
                body: body.clone(),
                tags: tags.clone(),
            },
            PostEvent::Edited { id, title, body, tags },
            PostEvent::Published { id },
            PostEvent::Unpublished { id },
            PostEvent::Deleted { id },
        ]);
        assert!(posts.validate(codec::reader_schema(Topic::BlogPosts)));
        let comment = CommentId::for_command(uuid::Uuid::new_v4());
        let comments = encode_comments(&[
            CommentEvent::Added {
                id: comment,
                post_id: id,
                author: UserId::new(),
                body: CommentBody::parse("Nice").unwrap(),
            },
            CommentEvent::Deleted { id: comment, post_id: id },
        ]);
        assert!(comments.validate(codec::reader_schema(Topic::BlogComments)));
    }
}
