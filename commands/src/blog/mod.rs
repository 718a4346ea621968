//! The blog command service: posts and comments.

mod grpc;
mod model;

use keel_proto::blog::v1::blog_server::BlogServer;
use tonic::service::Routes;

pub use model::{Comments, Posts};

use crate::service::{CommandService, ServiceBuilder, ServiceSection};

crate::command_service_config! {
    /// The `blog` section of the configuration.
    BlogConfig { grpc: "127.0.0.1:50081", admin: "127.0.0.1:9131" }
    {}
}

impl BlogConfig {
    pub fn validate(&self) -> Result<(), keel_runtime::ConfigError> {
        self.service().validate("blog")
    }
}

/// The blog service: posts and comments.
pub struct BlogService;

impl CommandService for BlogService {
    const NAME: &'static str = "blog";
    type Config = BlogConfig;

    async fn build(_config: &BlogConfig, service: &mut ServiceBuilder<'_>) -> anyhow::Result<Routes> {
        let posts = service.engine(Posts).await?;
        let comments = service.engine(Comments).await?;
        let grpc = grpc::BlogGrpc { posts, comments, peers: service.peers() };
        Ok(Routes::new(BlogServer::new(grpc)))
    }
}
