//! Kubernetes: each service is a headless Service whose DNS name resolves to the addresses of
//! its ready pods. Kubernetes lists a pod once its readiness probe (`/readyz` on the admin port)
//! passes and drops it when the probe fails or the pod stops, so an instance registers by being
//! ready and deregisters by turning not-ready on SIGTERM. Callers resolve the name again every
//! `resolve_every_ms`. Kubernetes lists a pod by its readiness probe, so registering writes
//! nothing (the trait's default).

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use futures::future::BoxFuture;
use keel_runtime::{ConfigError, config::ensure};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{Backend, BackendHealth, Instance, SERVICES, publish};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// Per service, `host:port` of its headless Service (the port is the gRPC port).
    pub services: BTreeMap<String, String>,
    /// How often a name is resolved again.
    pub resolve_every_ms: u64,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        let services = SERVICES
            .iter()
            .map(|(service, port)| ((*service).to_owned(), format!("{service}-headless:{port}")))
            .collect();
        Self { services, resolve_every_ms: 1_000 }
    }
}

impl KubernetesConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (service, address) in &self.services {
            let port = address.rsplit_once(':').and_then(|(host, port)| (!host.is_empty()).then_some(port));
            ensure(
                port.is_some_and(|port| port.parse::<u16>().is_ok()),
                &format!("discovery.kubernetes.services.{service}"),
                "must be host:port, e.g. identity-headless.keel.svc.cluster.local:50051",
            )?;
        }
        ensure(self.resolve_every_ms > 0, "discovery.kubernetes.resolve_every_ms", "must be positive")
    }
}

pub struct HeadlessServices {
    config: KubernetesConfig,
}

impl HeadlessServices {
    pub fn new(config: KubernetesConfig) -> Self {
        Self { config }
    }

    async fn resolve(&self, service: &str) -> anyhow::Result<Vec<Instance>> {
        let address = self
            .config
            .services
            .get(service)
            .with_context(|| format!("discovery.kubernetes.services.{service} is not set"))?;
        let mut addresses: Vec<SocketAddr> =
            tokio::net::lookup_host(address).await.with_context(|| format!("failed to resolve {address}"))?.collect();
        addresses.sort();
        addresses.dedup();
        Ok(addresses
            .into_iter()
            .map(|address| Instance::listed(service, address.to_string(), format!("http://{address}")))
            .collect())
    }
}

impl Backend for HeadlessServices {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn list(&self, service: &str) -> BoxFuture<'_, anyhow::Result<Vec<Instance>>> {
        let service = service.to_owned();
        Box::pin(async move { self.resolve(&service).await })
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
            let every = Duration::from_millis(self.config.resolve_every_ms);
            loop {
                match self.resolve(&service).await {
                    // No address: the name exists but no pod is ready. Kept as is: callers wait.
                    Ok(instances) => {
                        publish(&members, instances);
                        health.report(&task, Ok(()));
                    }
                    Err(error) => health.report(&task, Err(format!("{error:#}"))),
                }
                tokio::select! {
                    () = until.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_name_resolves_to_one_instance_per_address() {
        let config = KubernetesConfig {
            services: BTreeMap::from([("identity".to_owned(), "127.0.0.1:50051".to_owned())]),
            resolve_every_ms: 1_000,
        };
        let backend = HeadlessServices::new(config);
        let instances = backend.list("identity").await.unwrap();
        assert_eq!(instances.len(), 1);
        assert_eq!(instances[0].grpc.as_deref(), Some("http://127.0.0.1:50051"));
        assert!(backend.list("blog").await.is_err(), "a service without a name is an error, not an empty list");
    }

    #[test]
    fn names_need_a_port() {
        let mut config = KubernetesConfig::default();
        assert!(config.validate().is_ok());
        config.services.insert("identity".into(), "identity-headless".into());
        assert!(config.validate().is_err());
    }
}
