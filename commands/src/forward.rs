//! Sending a call to the instance that owns the aggregate's partition.
//!
//! Any instance of a service accepts any call. One whose aggregate lives in a partition owned
//! elsewhere is forwarded once, whole, to the owner (marked, so that it is never forwarded
//! again: a call that reaches a non-owner twice answers UNAVAILABLE and the caller retries).

use std::{collections::HashMap, future::Future, sync::Mutex, time::Duration};

use tonic::{
    Request, Status,
    metadata::MetadataValue,
    transport::{Channel, Endpoint},
};
use uuid::Uuid;

use crate::{
    CommandError,
    engine::{Engine, Location, Model},
};

/// Marks a forwarded call.
const FORWARDED: &str = "keel-forwarded";

pub fn is_forwarded<T>(request: &Request<T>) -> bool {
    request.metadata().contains_key(FORWARDED)
}

/// A call to send on to the owner.
pub fn forwarded<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(FORWARDED, MetadataValue::from_static("1"));
    keel_clients::carry_trace(&mut request);
    request
}

/// Channels to the other instances of a service, one lazily connected channel per endpoint.
pub struct Peers {
    service: &'static str,
    channels: Mutex<HashMap<String, Channel>>,
    timeout: Duration,
}

impl Peers {
    pub fn new(service: &'static str, timeout: Duration) -> Self {
        Self { service, channels: Mutex::default(), timeout }
    }

    pub fn channel(&self, endpoint: &str) -> Result<Channel, Status> {
        metrics::counter!("keel_commands_forwarded_total", "service" => self.service).increment(1);
        let mut channels = self.channels.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(channel) = channels.get(endpoint) {
            return Ok(channel.clone());
        }
        let channel = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|_| {
                tracing::error!(endpoint, "the owner directory holds an invalid endpoint");
                Status::unavailable("cannot reach the partition's owner; retry")
            })?
            .connect_timeout(Duration::from_secs(1))
            .timeout(self.timeout)
            .connect_lazy();
        channels.insert(endpoint.to_owned(), channel.clone());
        Ok(channel)
    }

    /// Runs `local` if this instance serves `aggregate_id`'s partition; otherwise sends the call
    /// to the owner with `remote` (unless it was forwarded already).
    pub async fn route<M, R, Local, LocalFuture, Remote, RemoteFuture>(
        &self,
        engine: &Engine<M>,
        aggregate_id: Uuid,
        forwarded: bool,
        local: Local,
        remote: Remote,
    ) -> Result<R, Status>
    where
        M: Model,
        Local: FnOnce() -> LocalFuture,
        LocalFuture: Future<Output = Result<R, Status>>,
        Remote: FnOnce(Channel) -> RemoteFuture,
        RemoteFuture: Future<Output = Result<tonic::Response<R>, Status>>,
    {
        match engine.locate(aggregate_id).await {
            Location::Here => local().await,
            Location::There(_) if forwarded => Err(not_owner()),
            Location::There(endpoint) => remote(self.channel(&endpoint)?).await.map(tonic::Response::into_inner),
            Location::Nowhere(error) => Err(error.into()),
        }
    }
}

pub fn not_owner() -> Status {
    CommandError::Unavailable("this instance no longer owns the partition; retry".into()).into()
}
