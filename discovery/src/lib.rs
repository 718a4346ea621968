//! Where every instance of every role is.
//!
//! Each long-running role registers itself once it is ready ([`Discovery::register`]): its
//! service, instance id, gRPC and admin addresses, version and the partitions it writes. It
//! keeps the registration alive while it runs and withdraws it first thing on shutdown. Callers
//! follow the instances of the services they call ([`Discovery::client`]), so a new instance
//! takes calls as soon as it is registered and a withdrawn or expired one gets none.
//!
//! Three backends sit behind [`Backend`]:
//! - **etcd**: a key per instance under a prefix, bound to a lease with a short TTL that the
//!   instance keeps alive; callers read the prefix once and then watch it ([`etcd`]).
//! - **Kubernetes**: a headless Service's DNS records, resolved again every second; a pod is
//!   listed once its readiness probe passes, so registration is Kubernetes' own ([`dns`]).
//! - **static**: fixed lists from the configuration, for the smallest setups.
//!
//! A registry that cannot be reached stops nothing: callers keep the last instances they knew,
//! an instance keeps serving (and registers again once the registry is back), and readiness
//! reports `discovery` as degraded meanwhile.

#![forbid(unsafe_code)]

pub mod dns;
pub mod etcd;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use futures::future::BoxFuture;
use keel_clients::ServiceClient;
use keel_runtime::{ConfigError, Lifecycle, ReadinessCheck, config::ensure};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The services whose instances callers look up, with the gRPC port each listens on by default.
pub const SERVICES: &[(&str, u16)] = &[("identity", 50051), ("auth", 50061), ("authz", 50071), ("blog", 50081)];

/// Which registry the role uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Fixed lists (`discovery.static`).
    #[default]
    Static,
    Etcd,
    Kubernetes,
}

/// The `discovery` section of the configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    pub backend: BackendKind,
    /// `static`: the gRPC endpoints of each service's instances.
    #[serde(rename = "static")]
    pub fixed: BTreeMap<String, Vec<String>>,
    pub etcd: etcd::EtcdConfig,
    pub kubernetes: dns::KubernetesConfig,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        let fixed = SERVICES
            .iter()
            .map(|(service, port)| ((*service).to_owned(), vec![format!("http://127.0.0.1:{port}")]))
            .collect();
        Self {
            backend: BackendKind::Static,
            fixed,
            etcd: etcd::EtcdConfig::default(),
            kubernetes: dns::KubernetesConfig::default(),
        }
    }
}

impl DiscoveryConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.backend {
            BackendKind::Static => {
                for (service, endpoints) in &self.fixed {
                    let path = format!("discovery.static.{service}");
                    ensure(!endpoints.is_empty(), &path, "must name at least one endpoint")?;
                    for endpoint in endpoints {
                        ensure(is_url(endpoint), &path, "must be http(s) URLs such as http://10.0.0.5:50051")?;
                    }
                }
                Ok(())
            }
            BackendKind::Etcd => self.etcd.validate(),
            BackendKind::Kubernetes => self.kubernetes.validate(),
        }
    }
}

/// An absolute http(s) URL: what a gRPC channel connects to. A bare `host:port` parses as a URI
/// too, but has no scheme to connect with.
fn is_url(text: &str) -> bool {
    text.parse::<http::Uri>().is_ok_and(|uri| {
        matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some_and(|host| !host.is_empty())
    })
}

/// One running instance of a role, as the registry lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// The role: `identity`, `gateway`, …
    pub service: String,
    /// Unique per process start.
    pub id: String,
    /// Where callers reach its gRPC server (`http://host:port`); roles without one have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<String>,
    /// Its health and metrics endpoints (`http://host:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
    pub version: String,
    /// The partitions it writes, by topic.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub partitions: BTreeMap<String, BTreeSet<i32>>,
}

impl Instance {
    /// A new instance of `service`, with a fresh id.
    pub fn new(service: &str, grpc: Option<String>, admin: Option<String>) -> Self {
        Self {
            service: service.to_owned(),
            id: format!("{service}-{}", uuid::Uuid::now_v7().simple()),
            grpc,
            admin,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            partitions: BTreeMap::new(),
        }
    }

    /// An instance known only by where it serves gRPC (a fixed list, a DNS record): `id` names
    /// it, nothing else is known.
    fn listed(service: &str, id: String, grpc: String) -> Self {
        Self {
            service: service.to_owned(),
            id,
            grpc: Some(grpc),
            admin: None,
            version: String::new(),
            partitions: BTreeMap::new(),
        }
    }
}

/// The partitions an instance writes, by topic: its write paths add and remove them as the group
/// assigns them, and its registration follows.
#[derive(Debug, Clone)]
pub struct Partitions(Arc<watch::Sender<BTreeMap<String, BTreeSet<i32>>>>);

impl Default for Partitions {
    fn default() -> Self {
        Self(Arc::new(watch::Sender::new(BTreeMap::new())))
    }
}

impl Partitions {
    pub fn add(&self, topic: &str, partition: i32) {
        self.0.send_if_modified(|owned| owned.entry(topic.to_owned()).or_default().insert(partition));
    }

    pub fn remove(&self, topic: &str, partition: i32) {
        self.0.send_if_modified(|owned| {
            let removed = owned.get_mut(topic).is_some_and(|partitions| partitions.remove(&partition));
            owned.retain(|_, partitions| !partitions.is_empty());
            removed
        });
    }

    fn subscribe(&self) -> watch::Receiver<BTreeMap<String, BTreeSet<i32>>> {
        self.0.subscribe()
    }
}

/// What each registry does; one implementation per backend.
pub trait Backend: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Keeps `instance` registered, publishing it again whenever it changes, until `until` is
    /// cancelled; then withdraws it. Reports to `health` whether the registry takes it. By
    /// default there is nothing to write (fixed lists; Kubernetes, which lists a pod by its
    /// readiness probe).
    fn register(
        self: Arc<Self>,
        _instance: watch::Receiver<Instance>,
        _health: Arc<BackendHealth>,
        until: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move { until.cancelled().await })
    }

    /// The instances of `service` now.
    fn list(&self, service: &str) -> BoxFuture<'_, anyhow::Result<Vec<Instance>>>;

    /// Sends every change of `service`'s instances to `members` until `until` is cancelled.
    /// While the registry cannot be reached, `members` keeps the last list and `health` says why.
    fn follow(
        self: Arc<Self>,
        service: String,
        members: watch::Sender<Vec<Instance>>,
        health: Arc<BackendHealth>,
        until: CancellationToken,
    ) -> BoxFuture<'static, ()>;
}

/// Publishes `instances` to `members` if they differ from what it holds (sorted by id, so the
/// order of the registry's answer does not count as a change).
pub(crate) fn publish(members: &watch::Sender<Vec<Instance>>, mut instances: Vec<Instance>) {
    instances.sort_by(|a, b| a.id.cmp(&b.id));
    members.send_if_modified(|known| {
        if *known == instances {
            return false;
        }
        let ids = |list: &[Instance]| list.iter().map(|instance| instance.id.clone()).collect::<BTreeSet<_>>();
        let (before, after) = (ids(known), ids(&instances));
        if let Some(instance) = instances.first() {
            for joined in after.difference(&before) {
                tracing::info!(service = %instance.service, instance = %joined, "instance joined");
            }
        }
        for left in before.difference(&after) {
            tracing::info!(instance = %left, "instance left");
        }
        *known = instances;
        true
    });
}

/// Whether the registry answers, per task that talks to it; the readiness check `discovery`.
#[derive(Debug, Default)]
pub struct BackendHealth {
    failing: Mutex<BTreeMap<String, String>>,
}

impl BackendHealth {
    /// Records the outcome of `task`'s last exchange with the registry.
    pub fn report(&self, task: &str, outcome: Result<(), String>) {
        let mut failing = self.failing.lock().unwrap_or_else(PoisonError::into_inner);
        match outcome {
            Ok(()) => {
                if failing.remove(task).is_some() {
                    tracing::info!(task, "the registry answers again");
                }
            }
            Err(reason) => {
                if failing.insert(task.to_owned(), reason.clone()).is_none() {
                    tracing::warn!(task, reason = %reason, "the registry does not answer; keeping the last known instances");
                }
            }
        }
    }

    /// `Err` names each task that cannot reach the registry, and why.
    pub fn status(&self) -> Result<(), String> {
        let failing = self.failing.lock().unwrap_or_else(PoisonError::into_inner);
        if failing.is_empty() {
            return Ok(());
        }
        Err(failing.iter().map(|(task, reason)| format!("{task}: {reason}")).collect::<Vec<_>>().join("; "))
    }
}

/// Readiness: degraded (never down) while the registry does not answer, since the last known
/// instances keep serving.
struct DiscoveryCheck(Arc<BackendHealth>);

#[async_trait::async_trait]
impl ReadinessCheck for DiscoveryCheck {
    fn name(&self) -> &'static str {
        "discovery"
    }

    fn critical(&self) -> bool {
        false
    }

    async fn check(&self) -> Result<(), String> {
        self.0.status()
    }
}

/// A role's view of the registry: it registers the role and follows the services it calls.
#[derive(Clone)]
pub struct Discovery {
    backend: Arc<dyn Backend>,
    health: Arc<BackendHealth>,
    /// Per followed service, the live list (one follower per service and process).
    followed: Arc<Mutex<HashMap<String, watch::Receiver<Vec<Instance>>>>>,
}

impl Discovery {
    pub fn new(config: &DiscoveryConfig) -> anyhow::Result<Self> {
        let backend: Arc<dyn Backend> = match config.backend {
            BackendKind::Static => Arc::new(Static(config.fixed.clone())),
            BackendKind::Etcd => Arc::new(etcd::Etcd::new(config.etcd.clone())),
            BackendKind::Kubernetes => Arc::new(dns::HeadlessServices::new(config.kubernetes.clone())),
        };
        Ok(Self { backend, health: Arc::default(), followed: Arc::default() })
    }

    /// The backend's name, for logs.
    pub fn backend(&self) -> &'static str {
        self.backend.name()
    }

    /// The readiness check `discovery` (not critical).
    pub fn check(&self) -> Arc<dyn ReadinessCheck> {
        Arc::new(DiscoveryCheck(self.health.clone()))
    }

    /// The instances of `service` now, straight from the registry.
    pub async fn list(&self, service: &str) -> anyhow::Result<Vec<Instance>> {
        let mut instances = self.backend.list(service).await?;
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(instances)
    }

    /// The live list of `service`'s instances, followed until the role's workers stop.
    pub fn members(&self, service: &str, lifecycle: &mut Lifecycle) -> watch::Receiver<Vec<Instance>> {
        let mut followed = self.followed.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(members) = followed.get(service) {
            return members.clone();
        }
        let (sender, members) = watch::channel(Vec::new());
        let follow = self.backend.clone().follow(service.to_owned(), sender, self.health.clone(), lifecycle.token());
        lifecycle.spawn(format!("{service} instances"), async move {
            follow.await;
            Ok(())
        });
        followed.insert(service.to_owned(), members.clone());
        members
    }

    /// A client of `service` that balances over its instances as the registry lists them.
    /// Until the first list arrives, calls wait (within `budget`) for an instance.
    pub fn client(&self, service: &'static str, budget: Duration, lifecycle: &mut Lifecycle) -> ServiceClient {
        let client = ServiceClient::new(service, budget);
        let mut members = self.members(service, lifecycle);
        let (following, token) = (client.clone(), lifecycle.token());
        lifecycle.spawn(format!("{service} client endpoints"), async move {
            loop {
                let endpoints: Vec<String> =
                    members.borrow_and_update().iter().filter_map(|instance| instance.grpc.clone()).collect();
                following.set_endpoints(&endpoints);
                tokio::select! {
                    () = token.cancelled() => return Ok(()),
                    changed = members.changed() => if changed.is_err() {
                        // The follower stopped: the role is stopping.
                        token.cancelled().await;
                        return Ok(());
                    },
                }
            }
        });
        client
    }

    /// Registers `instance` once the role is ready, keeps it registered (with the partitions it
    /// writes as they change), and withdraws it as soon as shutdown begins, before the servers
    /// stop, followed by the lifecycle's drain delay.
    pub fn register(&self, mut instance: Instance, partitions: Option<Partitions>, lifecycle: &mut Lifecycle) {
        let health = lifecycle.health();
        let draining = lifecycle.draining();
        let withdraw = CancellationToken::new();
        let withdrawn = CancellationToken::new();
        let (backend, backend_health) = (self.backend.clone(), self.health.clone());
        let (stop, done) = (withdraw.clone(), withdrawn.clone());
        lifecycle.spawn(format!("{} registration", instance.service), async move {
            let _done = done.drop_guard();
            // Registered once it can serve: a caller never meets an instance still loading.
            loop {
                if let Some(health) = &health
                    && !health.report().await.0
                {
                    tokio::select! {
                        () = draining.cancelled() => return Ok(()),
                        () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
                break;
            }
            let mut owned = partitions.as_ref().map(Partitions::subscribe);
            if let Some(owned) = &mut owned {
                instance.partitions = owned.borrow_and_update().clone();
            }
            let (sender, receiver) = watch::channel(instance);
            let registration = backend.register(receiver, backend_health, stop.clone());
            let relay = async {
                let Some(owned) = &mut owned else { return std::future::pending().await };
                while owned.changed().await.is_ok() {
                    let current = owned.borrow_and_update().clone();
                    sender.send_modify(|instance| instance.partitions = current);
                }
                std::future::pending().await
            };
            tokio::select! {
                () = registration => {}
                () = relay => {}
            }
            Ok(())
        });
        lifecycle.on_drain("deregister", async move {
            withdraw.cancel();
            withdrawn.cancelled().await;
        });
    }
}

/// Fixed lists: nothing registers, nothing changes.
struct Static(BTreeMap<String, Vec<String>>);

impl Static {
    fn instances(&self, service: &str) -> Vec<Instance> {
        let endpoints = self.0.get(service).map(Vec::as_slice).unwrap_or_default();
        endpoints.iter().map(|endpoint| Instance::listed(service, endpoint.clone(), endpoint.clone())).collect()
    }
}

impl Backend for Static {
    fn name(&self) -> &'static str {
        "static"
    }

    fn list(&self, service: &str) -> BoxFuture<'_, anyhow::Result<Vec<Instance>>> {
        let instances = self.instances(service);
        Box::pin(async move { Ok(instances) })
    }

    fn follow(
        self: Arc<Self>,
        service: String,
        members: watch::Sender<Vec<Instance>>,
        _health: Arc<BackendHealth>,
        until: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            publish(&members, self.instances(&service));
            until.cancelled().await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_static_and_valid_and_each_backend_checks_its_own_settings() {
        let config = DiscoveryConfig::default();
        assert_eq!(config.backend, BackendKind::Static);
        assert!(config.validate().is_ok());
        for endpoints in [&[][..], &["127.0.0.1:50051"], &["http://a:1", "not a url"], &["ftp://a:1"]] {
            let mut broken = config.clone();
            broken.fixed.insert("identity".into(), endpoints.iter().map(|endpoint| (*endpoint).to_owned()).collect());
            assert!(broken.validate().is_err(), "{endpoints:?}");
        }
        let mut broken = config.clone();
        broken.fixed.insert("identity".into(), vec!["http://identity-0:50051".into(), "https://identity-1:1".into()]);
        assert!(broken.validate().is_ok());
        broken.fixed.insert("identity".into(), vec!["127.0.0.1:50051".into()]);
        broken.backend = BackendKind::Etcd;
        assert!(broken.validate().is_ok(), "the static lists are not used with etcd");
        broken.etcd.endpoints.clear();
        assert!(broken.validate().is_err());
    }

    #[test]
    fn instances_round_trip_as_json_without_empty_fields() {
        let mut instance = Instance::new("identity", Some("http://10.0.0.5:50051".into()), None);
        assert!(instance.id.starts_with("identity-"));
        let json = serde_json::to_value(&instance).unwrap();
        assert!(json.get("admin").is_none() && json.get("partitions").is_none(), "{json}");
        instance.partitions.insert("identity.users".into(), BTreeSet::from([0, 3]));
        let text = serde_json::to_string(&instance).unwrap();
        assert_eq!(serde_json::from_str::<Instance>(&text).unwrap(), instance);
    }

    #[test]
    fn partitions_report_only_real_changes() {
        let partitions = Partitions::default();
        let mut owned = partitions.subscribe();
        partitions.add("t", 1);
        assert!(owned.has_changed().unwrap());
        assert_eq!(owned.borrow_and_update()["t"], BTreeSet::from([1]));
        partitions.add("t", 1);
        partitions.remove("t", 7);
        assert!(!owned.has_changed().unwrap(), "adding an owned one or removing an unowned one is no change");
        partitions.remove("t", 1);
        assert!(owned.borrow_and_update().is_empty(), "a topic with no partitions left is dropped");
    }

    #[test]
    fn a_list_is_published_only_when_it_changes() {
        let (sender, mut members) = watch::channel(Vec::new());
        let one = Instance::new("identity", Some("http://a:1".into()), None);
        let two = Instance::new("identity", Some("http://b:1".into()), None);
        publish(&sender, vec![two.clone(), one.clone()]);
        assert!(members.has_changed().unwrap());
        assert_eq!(members.borrow_and_update().len(), 2);
        publish(&sender, vec![one.clone(), two.clone()]);
        assert!(!members.has_changed().unwrap(), "the same instances in another order");
        publish(&sender, vec![one]);
        assert_eq!(members.borrow_and_update().len(), 1);
    }

    #[test]
    fn health_is_degraded_while_any_task_fails() {
        let health = BackendHealth::default();
        assert!(health.status().is_ok());
        health.report("register", Err("connection refused".into()));
        health.report("follow identity", Ok(()));
        assert_eq!(health.status(), Err("register: connection refused".into()));
        health.report("register", Ok(()));
        assert!(health.status().is_ok());
    }
}
