//! Keel's read models and its audit log. Each module is one projection, whole: its tables (the
//! one source of their schema: every version's tables are made from it), how it applies valid
//! commits (run by the projection framework, `keel-projections`), and the queries that read it.
//! Nothing else in Keel writes SQL against these tables.

#![forbid(unsafe_code)]

pub mod audit;
pub mod authz;
pub mod blog;
pub mod sessions;
mod status_notice;
pub mod users;

use std::sync::Arc;

use keel_projections::Projection;
use keel_topics::Vault;

/// The names of every projection this build has, in the order of [`catalogue`].
pub const NAMES: &[&str] = &["users", "audit", "sessions", "authz", "blog"];

/// Every projection this build has. The users projection opens personal data with `vault`.
pub fn catalogue(vault: Vault) -> Vec<Arc<dyn Projection>> {
    vec![
        Arc::new(users::UsersProjection::new(vault)),
        Arc::new(audit::AuditProjection),
        Arc::new(sessions::SessionsProjection),
        Arc::new(authz::AuthzProjection),
        Arc::new(blog::BlogProjection),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_names_are_the_catalogue_s() {
        // A vault needs a pool, but not a connection: a lazy one never connects here.
        let pool = sqlx::PgPool::connect_lazy("postgres://127.0.0.1:1/none").unwrap();
        let config = keel_topics::PersonalDataConfig::default();
        let catalogue = catalogue(Vault::new(pool, &config).unwrap());
        let names: Vec<&str> = catalogue.iter().map(|projection| projection.name()).collect();
        assert_eq!(names, NAMES);
    }
}
