//! The Comment aggregate: a reader's comment on a published post.

use std::fmt;

use uuid::Uuid;

use super::{Actor, CommentBody, PostId};
use crate::{Aggregate, DomainEvent, identity::UserId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct CommentId(Uuid);

const COMMENT_NAMESPACE: Uuid = Uuid::from_u128(0x6b65_656c_2d63_6f6d_6d65_2d76_3100_0001);

impl CommentId {
    /// Derived from the command that adds it, so a retried comment is one comment.
    pub fn for_command(command_id: Uuid) -> Self {
        Self(Uuid::new_v5(&COMMENT_NAMESPACE, command_id.as_bytes()))
    }

    pub const fn from_uuid(id: Uuid) -> Self {
        Self(id)
    }

    pub const fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl fmt::Display for CommentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Add a comment. `post_published` is looked up before deciding: comments go on published
/// posts only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddComment {
    pub id: CommentId,
    pub post_id: PostId,
    pub author: UserId,
    pub body: CommentBody,
    pub post_published: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommentCommand {
    Add(AddComment),
    Delete { by: Actor },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommentEvent {
    Added { id: CommentId, post_id: PostId, author: UserId, body: CommentBody },
    Deleted { id: CommentId, post_id: PostId },
}

impl DomainEvent for CommentEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Added { .. } => "CommentAdded",
            Self::Deleted { .. } => "CommentDeleted",
        }
    }

    fn schema_version(&self) -> u32 {
        1
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommentError {
    #[error("the comment exists")]
    Exists,
    #[error("no such comment")]
    NoComment,
    #[error("comments are only possible on published posts")]
    PostNotPublished,
    #[error("only the comment's author or a moderator may delete it")]
    NotAllowed,
}

impl From<CommentError> for crate::DomainError {
    fn from(error: CommentError) -> Self {
        match error {
            CommentError::Exists | CommentError::PostNotPublished => Self::conflict(error.to_string()),
            CommentError::NoComment => Self::not_found(error.to_string()),
            CommentError::NotAllowed => Self::not_allowed(error.to_string()),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Comment {
    #[default]
    None,
    Written {
        id: CommentId,
        post_id: PostId,
        author: UserId,
    },
    Deleted {
        id: CommentId,
    },
}

impl Aggregate for Comment {
    type Command = CommentCommand;
    type Event = CommentEvent;
    type Error = CommentError;

    fn decide(&self, command: CommentCommand) -> Result<Vec<CommentEvent>, CommentError> {
        match (self, command) {
            (Self::None, CommentCommand::Add(add)) if !add.post_published => Err(CommentError::PostNotPublished),
            (Self::None, CommentCommand::Add(add)) => {
                Ok(vec![CommentEvent::Added { id: add.id, post_id: add.post_id, author: add.author, body: add.body }])
            }
            (_, CommentCommand::Add(_)) => Err(CommentError::Exists),
            (Self::None | Self::Deleted { .. }, CommentCommand::Delete { .. }) => Err(CommentError::NoComment),
            (Self::Written { author, .. }, CommentCommand::Delete { by }) if !by.may_change(*author) => {
                Err(CommentError::NotAllowed)
            }
            (Self::Written { id, post_id, .. }, CommentCommand::Delete { .. }) => {
                Ok(vec![CommentEvent::Deleted { id: *id, post_id: *post_id }])
            }
        }
    }

    fn evolve(self, event: &CommentEvent) -> Self {
        match event {
            CommentEvent::Added { id, post_id, author, .. } => {
                Self::Written { id: *id, post_id: *post_id, author: *author }
            }
            CommentEvent::Deleted { id, .. } => Self::Deleted { id: *id },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(author: UserId, published: bool) -> CommentCommand {
        CommentCommand::Add(AddComment {
            id: CommentId::for_command(Uuid::new_v4()),
            post_id: PostId::for_draft(Uuid::new_v4()),
            author,
            body: CommentBody::parse("Nice").unwrap(),
            post_published: published,
        })
    }

    #[test]
    fn comments_need_a_published_post() {
        assert_eq!(Comment::None.decide(add(UserId::new(), false)), Err(CommentError::PostNotPublished));
        assert_eq!(Comment::None.decide(add(UserId::new(), true)).unwrap().len(), 1);
    }

    #[test]
    fn only_the_author_or_a_moderator_deletes() {
        let author = UserId::new();
        let comment = Comment::None.decide(add(author, true)).unwrap().iter().fold(Comment::None, Comment::evolve);
        let stranger = Actor { user_id: UserId::new(), any: false };
        assert_eq!(comment.decide(CommentCommand::Delete { by: stranger }), Err(CommentError::NotAllowed));
        let deleted = comment.decide(CommentCommand::Delete { by: Actor { user_id: author, any: false } }).unwrap();
        let comment = deleted.iter().fold(comment, Comment::evolve);
        assert_eq!(
            comment.decide(CommentCommand::Delete { by: Actor { user_id: author, any: true } }),
            Err(CommentError::NoComment)
        );
    }
}
