//! The etcd registry: one key per instance, `<prefix>/services/<service>/<instance id>`, whose
//! value is the instance as JSON, bound to a lease of `lease_ttl_secs` that the instance keeps
//! alive three times per TTL. A process that dies stops its keep-alives and etcd deletes the key
//! when the lease expires; one that stops revokes its lease first thing. Callers read the
//! service's prefix and watch it from the revision they read, so they see every join and leave
//! as it happens, and read it again whenever the watch breaks.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use anyhow::{Context, anyhow};
use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, WatchOptions,
};
use futures::future::BoxFuture;
use keel_runtime::{ConfigError, config::ensure};
use serde::{Deserialize, Serialize};
use tokio::sync::{OnceCell, watch};
use tokio_util::sync::CancellationToken;

use crate::{Backend, BackendHealth, Instance, publish};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    /// The cluster's client URLs.
    pub endpoints: Vec<String>,
    /// Every key Keel writes starts with it: one prefix per installation sharing a cluster.
    pub prefix: String,
    /// How long an instance stays listed after its last keep-alive (it sends three per TTL).
    pub lease_ttl_secs: u64,
    /// How long one request to etcd may take.
    pub request_timeout_ms: u64,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/keel".into(),
            lease_ttl_secs: 5,
            request_timeout_ms: 2_000,
        }
    }
}

impl EtcdConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        ensure(!self.endpoints.is_empty(), "discovery.etcd.endpoints", "must name at least one endpoint")?;
        for endpoint in &self.endpoints {
            ensure(crate::is_url(endpoint), "discovery.etcd.endpoints", "must be URLs such as http://127.0.0.1:2379")?;
        }
        ensure(self.prefix.starts_with('/'), "discovery.etcd.prefix", "must start with /")?;
        ensure((2..=300).contains(&self.lease_ttl_secs), "discovery.etcd.lease_ttl_secs", "must be 2 to 300")?;
        ensure(self.request_timeout_ms > 0, "discovery.etcd.request_timeout_ms", "must be positive")
    }
}

/// The pause after a failed exchange with etcd; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

pub struct Etcd {
    config: EtcdConfig,
    /// Connected on first use: a role starts while etcd is down.
    client: OnceCell<Client>,
}

impl Etcd {
    pub fn new(config: EtcdConfig) -> Self {
        Self { config, client: OnceCell::new() }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.request_timeout_ms)
    }

    async fn client(&self) -> anyhow::Result<Client> {
        let timeout = self.timeout();
        let client = self
            .client
            .get_or_try_init(|| async {
                let options = ConnectOptions::new()
                    .with_connect_timeout(timeout)
                    .with_timeout(timeout)
                    // Finds a connection to a vanished server while a watch is quiet.
                    .with_keep_alive(Duration::from_secs(2), timeout)
                    .with_keep_alive_while_idle(true);
                Client::connect(&self.config.endpoints, Some(options)).await.context("failed to set up the etcd client")
            })
            .await?;
        Ok(client.clone())
    }

    /// Bounds one request, whatever the client's channel does while no server answers.
    async fn bounded<T>(
        &self,
        what: &str,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> anyhow::Result<T> {
        match tokio::time::timeout(self.timeout(), request).await {
            Ok(outcome) => outcome.with_context(|| format!("etcd {what} failed")),
            Err(_) => Err(anyhow!("etcd {what} timed out after {:?}", self.timeout())),
        }
    }

    fn service_prefix(&self, service: &str) -> String {
        format!("{}/services/{service}/", self.config.prefix.trim_end_matches('/'))
    }

    fn key(&self, instance: &Instance) -> String {
        format!("{}{}", self.service_prefix(&instance.service), instance.id)
    }

    /// Grants a lease and writes the instance under it.
    async fn grant_and_put(&self, instance: &Instance) -> anyhow::Result<Lease> {
        let mut client = self.client().await?;
        let ttl = self.config.lease_ttl_secs as i64;
        let id = self.bounded("lease grant", client.lease_grant(ttl, None)).await?.id();
        self.put(instance, id).await?;
        let (keeper, responses) = self.bounded("lease keep-alive", client.lease_keep_alive(id)).await?;
        Ok(Lease { id, keeper, responses })
    }

    async fn put(&self, instance: &Instance, lease: i64) -> anyhow::Result<()> {
        let mut client = self.client().await?;
        let value = serde_json::to_vec(instance)?;
        let options = PutOptions::new().with_lease(lease);
        self.bounded("put", client.put(self.key(instance), value, Some(options))).await?;
        Ok(())
    }

    /// One keep-alive: `false` if the lease is gone (expired while etcd could not be reached).
    async fn keep_alive(&self, lease: &mut Lease) -> anyhow::Result<bool> {
        self.bounded("keep-alive", lease.keeper.keep_alive()).await?;
        let answer = self.bounded("keep-alive", lease.responses.message()).await?;
        let answer = answer.context("etcd closed the keep-alive stream")?;
        Ok(answer.ttl() > 0)
    }

    async fn revoke(&self, lease: i64) -> anyhow::Result<()> {
        let mut client = self.client().await?;
        self.bounded("lease revoke", client.lease_revoke(lease)).await?;
        Ok(())
    }

    /// Reads the service's instances, then applies the watch's events from the next revision
    /// until the watch breaks (an error) or `until` is cancelled (`Ok`).
    async fn read_and_watch(
        &self,
        service: &str,
        members: &watch::Sender<Vec<Instance>>,
        health: &BackendHealth,
        task: &str,
        until: &CancellationToken,
    ) -> anyhow::Result<()> {
        let prefix = self.service_prefix(service);
        let mut client = self.client().await?;
        let listed = self.bounded("get", client.get(prefix.clone(), Some(GetOptions::new().with_prefix()))).await?;
        let revision = listed.header().map_or(0, |header| header.revision());
        let mut known: BTreeMap<Vec<u8>, Instance> =
            listed.kvs().iter().filter_map(|kv| Some((kv.key().to_vec(), parse(kv.key(), kv.value())?))).collect();
        publish(members, known.values().cloned().collect());
        let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
        let mut stream = self.bounded("watch", client.watch(prefix, Some(options))).await?;
        health.report(task, Ok(()));
        loop {
            let answer = tokio::select! {
                () = until.cancelled() => return Ok(()),
                answer = stream.message() => answer.context("the etcd watch failed")?,
            };
            let answer = answer.context("etcd ended the watch")?;
            if answer.canceled() {
                anyhow::bail!("etcd cancelled the watch: {}", answer.cancel_reason());
            }
            for event in answer.events() {
                let Some(kv) = event.kv() else { continue };
                match event.event_type() {
                    EventType::Put => {
                        if let Some(instance) = parse(kv.key(), kv.value()) {
                            known.insert(kv.key().to_vec(), instance);
                        }
                    }
                    EventType::Delete => {
                        known.remove(kv.key());
                    }
                }
            }
            publish(members, known.values().cloned().collect());
        }
    }
}

/// A lease this instance holds and the stream that keeps it alive.
struct Lease {
    id: i64,
    keeper: LeaseKeeper,
    responses: LeaseKeepAliveStream,
}

/// An instance's value, or `None` (logged) if it is not one: a stray key under the prefix must not
/// stop discovery.
fn parse(key: &[u8], value: &[u8]) -> Option<Instance> {
    match serde_json::from_slice(value) {
        Ok(instance) => Some(instance),
        Err(error) => {
            tracing::warn!(key = %String::from_utf8_lossy(key), %error, "ignoring a registry entry that is not an instance");
            None
        }
    }
}

impl Backend for Etcd {
    fn name(&self) -> &'static str {
        "etcd"
    }

    fn register(
        self: Arc<Self>,
        mut instance: watch::Receiver<Instance>,
        health: Arc<BackendHealth>,
        until: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let task = "registration";
            let beat = Duration::from_secs(self.config.lease_ttl_secs) / 3;
            let mut lease: Option<Lease> = None;
            let mut backoff = FIRST_BACKOFF;
            loop {
                if lease.is_none() {
                    let current = instance.borrow_and_update().clone();
                    match self.grant_and_put(&current).await {
                        Ok(granted) => {
                            tracing::info!(
                                service = %current.service,
                                instance = %current.id,
                                lease = granted.id,
                                key = %self.key(&current),
                                "registered"
                            );
                            health.report(task, Ok(()));
                            lease = Some(granted);
                            backoff = FIRST_BACKOFF;
                        }
                        Err(error) => health.report(task, Err(format!("{error:#}"))),
                    }
                }
                let pause = if lease.is_some() { beat } else { backoff };
                tokio::select! {
                    () = until.cancelled() => break,
                    changed = instance.changed(), if lease.is_some() => {
                        if changed.is_err() {
                            break;
                        }
                        let current = instance.borrow_and_update().clone();
                        let id = lease.as_ref().map_or(0, |lease| lease.id);
                        if let Err(error) = self.put(&current, id).await {
                            health.report(task, Err(format!("{error:#}")));
                            lease = None;
                        }
                    }
                    () = tokio::time::sleep(pause) => {
                        let Some(held) = &mut lease else {
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                            continue;
                        };
                        match self.keep_alive(held).await {
                            Ok(true) => health.report(task, Ok(())),
                            Ok(false) => {
                                tracing::warn!(lease = held.id, "the registration's lease expired; registering again");
                                lease = None;
                            }
                            Err(error) => {
                                // Registered again under a new lease once etcd answers: the
                                // key is the same, so the instance is never listed twice.
                                health.report(task, Err(format!("{error:#}")));
                                lease = None;
                            }
                        }
                    }
                }
            }
            if let Some(held) = lease {
                let current = instance.borrow().clone();
                match self.revoke(held.id).await {
                    Ok(()) => tracing::info!(service = %current.service, instance = %current.id, "deregistered"),
                    Err(error) => tracing::warn!(
                        error = %format!("{error:#}"),
                        "failed to deregister; the registration expires with its lease"
                    ),
                }
            }
        })
    }

    fn list(&self, service: &str) -> BoxFuture<'_, anyhow::Result<Vec<Instance>>> {
        let prefix = self.service_prefix(service);
        Box::pin(async move {
            let mut client = self.client().await?;
            let listed = self.bounded("get", client.get(prefix, Some(GetOptions::new().with_prefix()))).await?;
            Ok(listed.kvs().iter().filter_map(|kv| parse(kv.key(), kv.value())).collect())
        })
    }

    fn follow(
        self: Arc<Self>,
        service: String,
        members: watch::Sender<Vec<Instance>>,
        health: Arc<BackendHealth>,
        until: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let task = format!("{service} instances");
            let mut backoff = FIRST_BACKOFF;
            loop {
                let started = tokio::time::Instant::now();
                match self.read_and_watch(&service, &members, &health, &task, &until).await {
                    Ok(()) => return,
                    Err(error) => health.report(&task, Err(format!("{error:#}"))),
                }
                // A watch that served a while broke once; one that cannot even start backs off.
                if started.elapsed() > MAX_BACKOFF {
                    backoff = FIRST_BACKOFF;
                }
                tokio::select! {
                    () = until.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        })
    }
}
