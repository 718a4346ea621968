//! The Post aggregate: a draft that its author (or an editor) edits, publishes, unpublishes and
//! deletes.

use std::fmt;

use uuid::Uuid;

use super::{Actor, PostBody, Tags, Title};
use crate::{Aggregate, DomainEvent, identity::UserId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct PostId(Uuid);

impl PostId {
    /// A post's id is derived from the command that drafts it, so a retried draft is one post.
    pub fn for_draft(command_id: Uuid) -> Self {
        Self(Uuid::new_v5(&POST_NAMESPACE, command_id.as_bytes()))
    }

    pub const fn from_uuid(id: Uuid) -> Self {
        Self(id)
    }

    pub const fn as_uuid(&self) -> Uuid {
        self.0
    }
}

const POST_NAMESPACE: Uuid = Uuid::from_u128(0x6b65_656c_2d70_6f73_7473_2d76_3100_0001);

impl fmt::Display for PostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DraftPost {
    pub id: PostId,
    pub author: UserId,
    pub title: Title,
    pub body: PostBody,
    pub tags: Tags,
}

/// Fields left out stay as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EditPost {
    pub by: Actor,
    pub title: Option<Title>,
    pub body: Option<PostBody>,
    pub tags: Option<Tags>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostCommand {
    Draft(DraftPost),
    Edit(EditPost),
    Publish { by: Actor },
    Unpublish { by: Actor },
    Delete { by: Actor },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostEvent {
    Drafted {
        id: PostId,
        author: UserId,
        title: Title,
        body: PostBody,
        tags: Tags,
    },
    /// The post's content after the edit, whole.
    Edited {
        id: PostId,
        title: Title,
        body: PostBody,
        tags: Tags,
    },
    Published {
        id: PostId,
    },
    Unpublished {
        id: PostId,
    },
    Deleted {
        id: PostId,
    },
}

impl DomainEvent for PostEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Drafted { .. } => "PostDrafted",
            Self::Edited { .. } => "PostEdited",
            Self::Published { .. } => "PostPublished",
            Self::Unpublished { .. } => "PostUnpublished",
            Self::Deleted { .. } => "PostDeleted",
        }
    }

    fn schema_version(&self) -> u32 {
        1
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PostError {
    #[error("the post exists")]
    Exists,
    #[error("no such post")]
    NoPost,
    #[error("only the author or an editor may change this post")]
    NotAllowed,
}

impl From<PostError> for crate::DomainError {
    fn from(error: PostError) -> Self {
        match error {
            PostError::Exists => Self::conflict(error.to_string()),
            PostError::NoPost => Self::not_found(error.to_string()),
            PostError::NotAllowed => Self::not_allowed(error.to_string()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PostStatus {
    Draft,
    Published,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Post {
    #[default]
    None,
    Written {
        id: PostId,
        author: UserId,
        title: Title,
        body: PostBody,
        tags: Tags,
        status: PostStatus,
    },
    Deleted {
        id: PostId,
        author: UserId,
    },
}

impl Post {
    pub fn author(&self) -> Option<UserId> {
        match self {
            Self::None => None,
            Self::Written { author, .. } | Self::Deleted { author, .. } => Some(*author),
        }
    }

    pub fn status(&self) -> Option<PostStatus> {
        match self {
            Self::Written { status, .. } => Some(*status),
            Self::None | Self::Deleted { .. } => None,
        }
    }

    /// The post, for a change by `by`: it must exist and `by` must be allowed to change it.
    fn changeable(&self, by: &Actor) -> Result<(PostId, &Title, &PostBody, &Tags, PostStatus), PostError> {
        match self {
            Self::None | Self::Deleted { .. } => Err(PostError::NoPost),
            Self::Written { author, .. } if !by.may_change(*author) => Err(PostError::NotAllowed),
            Self::Written { id, title, body, tags, status, .. } => Ok((*id, title, body, tags, *status)),
        }
    }
}

impl Aggregate for Post {
    type Command = PostCommand;
    type Event = PostEvent;
    type Error = PostError;

    fn decide(&self, command: PostCommand) -> Result<Vec<PostEvent>, PostError> {
        match command {
            PostCommand::Draft(draft) => match self {
                Self::None => Ok(vec![PostEvent::Drafted {
                    id: draft.id,
                    author: draft.author,
                    title: draft.title,
                    body: draft.body,
                    tags: draft.tags,
                }]),
                Self::Written { .. } | Self::Deleted { .. } => Err(PostError::Exists),
            },
            PostCommand::Edit(edit) => {
                let (id, title, body, tags, _) = self.changeable(&edit.by)?;
                let next_title = edit.title.unwrap_or_else(|| title.clone());
                let next_body = edit.body.unwrap_or_else(|| body.clone());
                let next_tags = edit.tags.unwrap_or_else(|| tags.clone());
                if (&next_title, &next_body, &next_tags) == (title, body, tags) {
                    return Ok(vec![]);
                }
                Ok(vec![PostEvent::Edited { id, title: next_title, body: next_body, tags: next_tags }])
            }
            PostCommand::Publish { by } => match self.changeable(&by)? {
                (_, _, _, _, PostStatus::Published) => Ok(vec![]),
                (id, ..) => Ok(vec![PostEvent::Published { id }]),
            },
            PostCommand::Unpublish { by } => match self.changeable(&by)? {
                (_, _, _, _, PostStatus::Draft) => Ok(vec![]),
                (id, ..) => Ok(vec![PostEvent::Unpublished { id }]),
            },
            PostCommand::Delete { by } => {
                let (id, ..) = self.changeable(&by)?;
                Ok(vec![PostEvent::Deleted { id }])
            }
        }
    }

    fn evolve(self, event: &PostEvent) -> Self {
        match (self, event) {
            (_, PostEvent::Drafted { id, author, title, body, tags }) => Self::Written {
                id: *id,
                author: *author,
                title: title.clone(),
                body: body.clone(),
                tags: tags.clone(),
                status: PostStatus::Draft,
            },
            (Self::Written { id, author, status, .. }, PostEvent::Edited { title, body, tags, .. }) => {
                Self::Written { id, author, title: title.clone(), body: body.clone(), tags: tags.clone(), status }
            }
            (Self::Written { id, author, title, body, tags, .. }, PostEvent::Published { .. }) => {
                Self::Written { id, author, title, body, tags, status: PostStatus::Published }
            }
            (Self::Written { id, author, title, body, tags, .. }, PostEvent::Unpublished { .. }) => {
                Self::Written { id, author, title, body, tags, status: PostStatus::Draft }
            }
            (Self::Written { id, author, .. }, PostEvent::Deleted { .. }) => Self::Deleted { id, author },
            (state, _) => state,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drafted(author: UserId) -> (Post, PostId) {
        let id = PostId::for_draft(Uuid::new_v4());
        let draft = DraftPost {
            id,
            author,
            title: Title::parse("Hello").unwrap(),
            body: PostBody::parse("First post").unwrap(),
            tags: Tags::parse(&["intro"]).unwrap(),
        };
        let events = Post::None.decide(PostCommand::Draft(draft)).unwrap();
        (events.iter().fold(Post::None, Post::evolve), id)
    }

    fn run(post: Post, command: PostCommand) -> Result<Post, PostError> {
        let events = post.decide(command)?;
        Ok(events.iter().fold(post, Post::evolve))
    }

    fn edit(by: Actor, title: &str) -> PostCommand {
        PostCommand::Edit(EditPost { by, title: Some(Title::parse(title).unwrap()), body: None, tags: None })
    }

    #[test]
    fn the_author_drafts_edits_publishes_and_unpublishes() {
        let author = UserId::new();
        let by = Actor { user_id: author, any: false };
        let (post, _) = drafted(author);
        assert_eq!(post.status(), Some(PostStatus::Draft));
        let post = run(post, edit(by, "Hello, world")).unwrap();
        let post = run(post, PostCommand::Publish { by }).unwrap();
        assert_eq!(post.status(), Some(PostStatus::Published));
        assert_eq!(post.decide(PostCommand::Publish { by }), Ok(vec![]));
        let post = run(post, PostCommand::Unpublish { by }).unwrap();
        assert_eq!(post.status(), Some(PostStatus::Draft));
        assert!(matches!(post, Post::Written { ref title, .. } if title.as_str() == "Hello, world"));
    }

    #[test]
    fn others_may_change_it_only_with_authority_over_any_post() {
        let (post, _) = drafted(UserId::new());
        let stranger = Actor { user_id: UserId::new(), any: false };
        assert_eq!(post.decide(edit(stranger, "Mine now")), Err(PostError::NotAllowed));
        assert_eq!(post.decide(PostCommand::Delete { by: stranger }), Err(PostError::NotAllowed));
        let editor = Actor { user_id: UserId::new(), any: true };
        assert!(run(post, edit(editor, "Edited")).is_ok());
    }

    #[test]
    fn an_edit_that_changes_nothing_decides_nothing() {
        let author = UserId::new();
        let (post, _) = drafted(author);
        assert_eq!(post.decide(edit(Actor { user_id: author, any: false }, "Hello")), Ok(vec![]));
    }

    #[test]
    fn a_deleted_post_is_gone_for_every_change() {
        let author = UserId::new();
        let by = Actor { user_id: author, any: false };
        let (post, _) = drafted(author);
        let post = run(post, PostCommand::Delete { by }).unwrap();
        assert_eq!(post.author(), Some(author));
        for command in [edit(by, "x"), PostCommand::Publish { by }, PostCommand::Delete { by }] {
            assert_eq!(post.decide(command), Err(PostError::NoPost));
        }
    }
}
