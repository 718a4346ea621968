//! Permission checks through the authz service, cached for at most
//! `gateway.permission_cache_ms` and dropped as soon as the authz projection commits a batch.

use std::time::Duration;

use keel_clients::Authz;
use keel_proto::authz::v1::{CheckPermissionRequest, Decision as WireDecision};
use uuid::Uuid;

use crate::problem::Problem;

/// What authz answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Deny,
    /// Allowed on the caller's own resources only; the service that knows the owner enforces it.
    AllowOwn,
    Allow,
}

impl Decision {
    pub fn is_allowed(self) -> bool {
        self != Self::Deny
    }

    /// Whether it holds on resources of others too (the `any` flag of blog commands).
    pub fn any(self) -> bool {
        self == Self::Allow
    }
}

type Key = (Uuid, &'static str, Option<Uuid>);

pub struct Permissions {
    authz: Authz,
    cache: moka::future::Cache<Key, Decision>,
}

impl Permissions {
    pub fn new(authz: Authz, ttl: Duration) -> Self {
        Self { authz, cache: moka::future::Cache::builder().max_capacity(1_000_000).time_to_live(ttl).build() }
    }

    /// May `subject` do `action` on a resource of `owner` (`None`: not known here)?
    pub async fn check(&self, subject: Uuid, action: &'static str, owner: Option<Uuid>) -> Result<Decision, Problem> {
        let authz = self.authz.clone();
        self.cache
            .try_get_with((subject, action, owner), async move {
                let request = CheckPermissionRequest {
                    subject: subject.to_string(),
                    action: action.to_owned(),
                    owner: owner.map(|owner| owner.to_string()),
                };
                let reply = authz.check_permission(request).await?;
                Ok::<_, tonic::Status>(match reply.decision() {
                    WireDecision::Allow => Decision::Allow,
                    WireDecision::AllowOwn => Decision::AllowOwn,
                    WireDecision::Deny => Decision::Deny,
                })
            })
            .await
            .map_err(|status| {
                tracing::warn!(code = ?status.code(), message = status.message(), "permission check failed");
                Problem::from_status(&status)
            })
    }

    pub fn forget(&self) {
        self.cache.invalidate_all();
    }
}
