//! The gRPC surface of the blog service.

use std::sync::Arc;

use keel_domain::{
    DomainError,
    blog::{
        Actor, AddComment, CommentBody, CommentCommand, CommentId, DraftPost, EditPost, Post, PostBody, PostCommand,
        PostId, PostStatus, Tags, Title,
    },
    identity::UserId,
};
use keel_proto::{
    blog::v1::{
        AddCommentRequest, DeleteCommentRequest, DraftPostRequest, EditPostRequest, GetPostRequest, PostCommandRequest,
        PostState, blog_client::BlogClient, blog_server::Blog,
    },
    common::v1::CommandReply,
};
use tonic::{Request, Response, Status};

use super::{Comments, Posts};
use crate::{
    CommandError, CommandMeta,
    engine::{Command, Engine, Location, Outcome},
    forward::{Peers, forwarded, is_forwarded},
    grpc::{execute, expected_version, invalid, receive, uuid},
};

pub struct BlogGrpc {
    pub posts: Arc<Engine<Posts>>,
    pub comments: Arc<Engine<Comments>>,
    pub peers: Peers,
}

/// The user a command comes from: blog commands come from signed-in users only.
fn author(meta: &CommandMeta) -> Result<UserId, Status> {
    uuid::Uuid::parse_str(&meta.actor)
        .map(UserId::from_uuid)
        .map_err(|_| invalid("metadata.actor: blog commands come from a user (a UUID)"))
}

fn parsed<T>(result: Result<T, keel_domain::InvalidValue>) -> Result<T, Status> {
    result.map_err(|error| invalid(error.to_string()))
}

impl BlogGrpc {
    /// A post as the owner of its partition knows it.
    async fn post_state(&self, id: PostId) -> Result<PostState, Status> {
        match self.posts.locate(id.as_uuid()).await {
            Location::Here => Ok(state_of(&self.posts.read_here(id.as_uuid()).await?)),
            Location::There(endpoint) => {
                let mut client = BlogClient::new(self.peers.channel(&endpoint)?);
                Ok(client.get_post(forwarded(GetPostRequest { post_id: id.to_string() })).await?.into_inner())
            }
            Location::Nowhere(error) => Err(error.into()),
        }
    }

    /// Publish, unpublish or delete: the same routing, another command.
    async fn post_command(
        &self,
        request: Request<PostCommandRequest>,
        which: Lifecycle,
    ) -> Result<Response<CommandReply>, Status> {
        let (forwarded_already, message, meta) = receive(request)?;
        let by = Actor { user_id: author(&meta)?, any: message.any };
        let id = PostId::from_uuid(uuid("post_id", &message.post_id)?);
        let version = expected_version(message.expected_version)?;
        let (name, command) = match which {
            Lifecycle::Publish => ("PublishPost", PostCommand::Publish { by }),
            Lifecycle::Unpublish => ("UnpublishPost", PostCommand::Unpublish { by }),
            Lifecycle::Delete => ("DeletePost", PostCommand::Delete { by }),
        };
        let local = || execute(&self.posts, Command::new(id.as_uuid(), meta, name, command).expecting(version));
        let remote = |channel| async move {
            let (mut client, request) = (BlogClient::new(channel), forwarded(message));
            match which {
                Lifecycle::Publish => client.publish_post(request).await,
                Lifecycle::Unpublish => client.unpublish_post(request).await,
                Lifecycle::Delete => client.delete_post(request).await,
            }
        };
        self.peers.route(&self.posts, id.as_uuid(), forwarded_already, local, remote).await.map(Response::new)
    }
}

/// The commands that move a post through its life without changing its content.
#[derive(Debug, Clone, Copy)]
enum Lifecycle {
    Publish,
    Unpublish,
    Delete,
}

fn state_of(outcome: &Outcome<Post>) -> PostState {
    let status = match &outcome.state {
        Post::None => "none",
        Post::Deleted { .. } => "deleted",
        Post::Written { status: PostStatus::Draft, .. } => "draft",
        Post::Written { status: PostStatus::Published, .. } => "published",
    };
    PostState {
        status: status.to_owned(),
        version: outcome.accepted.version as i64,
        author_id: outcome.state.author().map(|author| author.to_string()).unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl Blog for BlogGrpc {
    #[tracing::instrument(skip_all, fields(command_id))]
    async fn draft_post(&self, request: Request<DraftPostRequest>) -> Result<Response<CommandReply>, Status> {
        let (forwarded_already, message, meta) = receive(request)?;
        let id = PostId::for_draft(meta.command_id);
        let draft = DraftPost {
            id,
            author: author(&meta)?,
            title: parsed(Title::parse(&message.title))?,
            body: parsed(PostBody::parse(&message.body))?,
            tags: parsed(Tags::parse(&message.tags))?,
        };
        let local = || execute(&self.posts, Command::new(id.as_uuid(), meta, "DraftPost", PostCommand::Draft(draft)));
        let remote = |channel| async move { BlogClient::new(channel).draft_post(forwarded(message)).await };
        self.peers.route(&self.posts, id.as_uuid(), forwarded_already, local, remote).await.map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(command_id))]
    async fn edit_post(&self, request: Request<EditPostRequest>) -> Result<Response<CommandReply>, Status> {
        let (forwarded_already, message, meta) = receive(request)?;
        let id = PostId::from_uuid(uuid("post_id", &message.post_id)?);
        let edit = EditPost {
            by: Actor { user_id: author(&meta)?, any: message.any },
            title: message
                .title
                .as_deref()
                .map(Title::parse)
                .transpose()
                .map_err(|error| invalid(error.to_string()))?,
            body: message
                .body
                .as_deref()
                .map(PostBody::parse)
                .transpose()
                .map_err(|error| invalid(error.to_string()))?,
            tags: message
                .tags
                .as_ref()
                .map(|tags| Tags::parse(&tags.tags))
                .transpose()
                .map_err(|error| invalid(error.to_string()))?,
        };
        let version = expected_version(message.expected_version)?;
        let local = || {
            execute(
                &self.posts,
                Command::new(id.as_uuid(), meta, "EditPost", PostCommand::Edit(edit)).expecting(version),
            )
        };
        let remote = |channel| async move { BlogClient::new(channel).edit_post(forwarded(message)).await };
        self.peers.route(&self.posts, id.as_uuid(), forwarded_already, local, remote).await.map(Response::new)
    }

    async fn publish_post(&self, request: Request<PostCommandRequest>) -> Result<Response<CommandReply>, Status> {
        self.post_command(request, Lifecycle::Publish).await
    }

    async fn unpublish_post(&self, request: Request<PostCommandRequest>) -> Result<Response<CommandReply>, Status> {
        self.post_command(request, Lifecycle::Unpublish).await
    }

    async fn delete_post(&self, request: Request<PostCommandRequest>) -> Result<Response<CommandReply>, Status> {
        self.post_command(request, Lifecycle::Delete).await
    }

    #[tracing::instrument(skip_all, fields(command_id))]
    async fn add_comment(&self, request: Request<AddCommentRequest>) -> Result<Response<CommandReply>, Status> {
        let (forwarded_already, message, meta) = receive(request)?;
        let id = CommentId::for_command(meta.command_id);
        let post_id = PostId::from_uuid(uuid("post_id", &message.post_id)?);
        let author = author(&meta)?;
        let body = parsed(CommentBody::parse(&message.body))?;
        let local = || async move {
            let post = self.post_state(post_id).await?;
            if matches!(post.status.as_str(), "none" | "deleted") {
                return Err(CommandError::from(DomainError::not_found("no such post")).into());
            }
            let add = AddComment { id, post_id, author, body, post_published: post.status == "published" };
            execute(&self.comments, Command::new(id.as_uuid(), meta, "AddComment", CommentCommand::Add(add))).await
        };
        let remote = |channel| async move { BlogClient::new(channel).add_comment(forwarded(message)).await };
        self.peers.route(&self.comments, id.as_uuid(), forwarded_already, local, remote).await.map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(command_id))]
    async fn delete_comment(&self, request: Request<DeleteCommentRequest>) -> Result<Response<CommandReply>, Status> {
        let (forwarded_already, message, meta) = receive(request)?;
        let id = CommentId::from_uuid(uuid("comment_id", &message.comment_id)?);
        let by = Actor { user_id: author(&meta)?, any: message.any };
        let local = || {
            execute(&self.comments, Command::new(id.as_uuid(), meta, "DeleteComment", CommentCommand::Delete { by }))
        };
        let remote = |channel| async move { BlogClient::new(channel).delete_comment(forwarded(message)).await };
        self.peers.route(&self.comments, id.as_uuid(), forwarded_already, local, remote).await.map(Response::new)
    }

    async fn get_post(&self, request: Request<GetPostRequest>) -> Result<Response<PostState>, Status> {
        let forwarded_already = is_forwarded(&request);
        let message = request.into_inner();
        let id = uuid("post_id", &message.post_id)?;
        let local = || async move { Ok(state_of(&self.posts.read_here(id).await?)) };
        let remote = |channel| async move { BlogClient::new(channel).get_post(forwarded(message)).await };
        self.peers.route(&self.posts, id, forwarded_already, local, remote).await.map(Response::new)
    }
}
