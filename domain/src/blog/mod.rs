//! The blog context: posts and their comments.
//!
//! Who may change what is decided in two places, each where its fact lives: the authz service
//! says whether the actor may act on any post or only on their own, and the aggregate, which
//! knows its author, enforces "only their own" atomically with the change.

mod comment;
mod post;
mod values;

pub use comment::{AddComment, Comment, CommentCommand, CommentError, CommentEvent, CommentId};
pub use post::{DraftPost, EditPost, Post, PostCommand, PostError, PostEvent, PostId, PostStatus};
pub use values::{Actor, CommentBody, PostBody, Tags, Title};
