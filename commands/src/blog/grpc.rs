//! The gRPC surface of the blog service.

use std::sync::Arc;

use keel_domain::{
    Aggregate,
    blog::{
        Actor, AddComment, Comment, CommentBody, CommentCommand, CommentError, CommentId, DraftPost, EditPost, Post,
        PostBody, PostCommand, PostError, PostId, PostStatus, Tags, Title,
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
    grpc::{command_meta, expected_version, invalid, reply, uuid},
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
    async fn run_post(
        &self,
        id: PostId,
        version: Option<u64>,
        meta: CommandMeta,
        name: &'static str,
        command: PostCommand,
    ) -> Result<CommandReply, Status> {
        let command = Command {
            aggregate_id: id.as_uuid(),
            expected_version: version,
            meta,
            name,
            decide: Box::new(move |post: &Post, _: &()| post.decide(command.clone()).map_err(post_error)),
        };
        Ok(reply(&self.posts.run(command).await?.accepted))
    }

    async fn run_comment(
        &self,
        id: CommentId,
        meta: CommandMeta,
        name: &'static str,
        command: CommentCommand,
    ) -> Result<CommandReply, Status> {
        let command = Command {
            aggregate_id: id.as_uuid(),
            expected_version: None,
            meta,
            name,
            decide: Box::new(move |comment: &Comment, _: &()| comment.decide(command.clone()).map_err(comment_error)),
        };
        Ok(reply(&self.comments.run(command).await?.accepted))
    }

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
        let forwarded_already = is_forwarded(&request);
        let message = request.into_inner();
        let meta = command_meta(message.metadata.clone())?;
        let by = Actor { user_id: author(&meta)?, any: message.any };
        let id = PostId::from_uuid(uuid("post_id", &message.post_id)?);
        let version = expected_version(message.expected_version)?;
        let (name, command) = match which {
            Lifecycle::Publish => ("PublishPost", PostCommand::Publish { by }),
            Lifecycle::Unpublish => ("UnpublishPost", PostCommand::Unpublish { by }),
            Lifecycle::Delete => ("DeletePost", PostCommand::Delete { by }),
        };
        let local = || self.run_post(id, version, meta, name, command);
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
        let forwarded_already = is_forwarded(&request);
        let message = request.into_inner();
        let meta = command_meta(message.metadata.clone())?;
        tracing::Span::current().record("command_id", tracing::field::display(meta.command_id));
        let id = PostId::for_draft(meta.command_id);
        let draft = DraftPost {
            id,
            author: author(&meta)?,
            title: parsed(Title::parse(&message.title))?,
            body: parsed(PostBody::parse(&message.body))?,
            tags: parsed(Tags::parse(&message.tags))?,
        };
        let local = || self.run_post(id, None, meta, "DraftPost", PostCommand::Draft(draft));
        let remote = |channel| async move { BlogClient::new(channel).draft_post(forwarded(message)).await };
        self.peers.route(&self.posts, id.as_uuid(), forwarded_already, local, remote).await.map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(command_id))]
    async fn edit_post(&self, request: Request<EditPostRequest>) -> Result<Response<CommandReply>, Status> {
        let forwarded_already = is_forwarded(&request);
        let message = request.into_inner();
        let meta = command_meta(message.metadata.clone())?;
        tracing::Span::current().record("command_id", tracing::field::display(meta.command_id));
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
        let local = || self.run_post(id, version, meta, "EditPost", PostCommand::Edit(edit));
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
        let forwarded_already = is_forwarded(&request);
        let message = request.into_inner();
        let meta = command_meta(message.metadata.clone())?;
        tracing::Span::current().record("command_id", tracing::field::display(meta.command_id));
        let id = CommentId::for_command(meta.command_id);
        let post_id = PostId::from_uuid(uuid("post_id", &message.post_id)?);
        let author = author(&meta)?;
        let body = parsed(CommentBody::parse(&message.body))?;
        let local = || async move {
            let post = self.post_state(post_id).await?;
            if matches!(post.status.as_str(), "none" | "deleted") {
                return Err(CommandError::NotFound("no such post".into()).into());
            }
            let add = AddComment { id, post_id, author, body, post_published: post.status == "published" };
            self.run_comment(id, meta, "AddComment", CommentCommand::Add(add)).await
        };
        let remote = |channel| async move { BlogClient::new(channel).add_comment(forwarded(message)).await };
        self.peers.route(&self.comments, id.as_uuid(), forwarded_already, local, remote).await.map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(command_id))]
    async fn delete_comment(&self, request: Request<DeleteCommentRequest>) -> Result<Response<CommandReply>, Status> {
        let forwarded_already = is_forwarded(&request);
        let message = request.into_inner();
        let meta = command_meta(message.metadata.clone())?;
        tracing::Span::current().record("command_id", tracing::field::display(meta.command_id));
        let id = CommentId::from_uuid(uuid("comment_id", &message.comment_id)?);
        let by = Actor { user_id: author(&meta)?, any: message.any };
        let local = || self.run_comment(id, meta, "DeleteComment", CommentCommand::Delete { by });
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

fn post_error(error: PostError) -> CommandError {
    match error {
        PostError::Exists => CommandError::Rejected(error.to_string()),
        PostError::NoPost => CommandError::NotFound(error.to_string()),
        PostError::NotAllowed => CommandError::PermissionDenied(error.to_string()),
    }
}

fn comment_error(error: CommentError) -> CommandError {
    match error {
        CommentError::Exists | CommentError::PostNotPublished => CommandError::Rejected(error.to_string()),
        CommentError::NoComment => CommandError::NotFound(error.to_string()),
        CommentError::NotAllowed => CommandError::PermissionDenied(error.to_string()),
    }
}
