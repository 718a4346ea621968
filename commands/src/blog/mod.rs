//! The blog command service: posts and comments.

mod grpc;
mod model;

use keel_proto::blog::v1::blog_server::BlogServer;
use keel_runtime::{KafkaConfig, Lifecycle};
use sqlx::PgPool;
use tokio::net::TcpListener;

pub use model::{Comments, Posts};

use crate::service::ServiceBuilder;

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

/// Starts the blog service.
pub async fn start(
    config: &BlogConfig,
    kafka_config: &KafkaConfig,
    registry_url: &str,
    pool: PgPool,
    lifecycle: &mut Lifecycle,
    grpc_listener: TcpListener,
    admin_listener: TcpListener,
) -> anyhow::Result<()> {
    let mut service =
        ServiceBuilder::new("blog", config.service(), kafka_config, registry_url, pool, lifecycle, grpc_listener)?;
    let posts = service.engine(Posts).await?;
    let comments = service.engine(Comments).await?;
    let grpc = grpc::BlogGrpc {
        posts,
        comments,
        peers: crate::forward::Peers::new("blog", config.service().command_timeout()),
    };
    service.serve(admin_listener, tonic::service::Routes::new(BlogServer::new(grpc)));
    Ok(())
}
