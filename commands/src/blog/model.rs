//! The blog aggregates on the shared write path: posts and comments.

use keel_domain::blog::{Comment, CommentEvent, Post, PostEvent};
use keel_topics::{Topic, blog as wire};

crate::plain_model! {
    /// Posts, by draft-derived id.
    Posts { state: Post, event: PostEvent, topic: Topic::BlogPosts, service: "blog", encode: wire::encode_posts, decode: wire::decode_posts }
}

crate::plain_model! {
    /// Comments, by command-derived id.
    Comments {
        state: Comment,
        event: CommentEvent,
        topic: Topic::BlogComments,
        service: "blog",
        encode: wire::encode_comments,
        decode: wire::decode_comments,
    }
}
