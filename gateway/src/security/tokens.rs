//! Access-token verification, local to each gateway, with the keys the auth service publishes.
//!
//! The key set is fetched from auth at start, refreshed every `gateway.auth.jwks_refresh_secs`,
//! and refreshed at once (at most once a second) when a token names a key not in it: a key auth
//! just started signing with. Auth publishes keys well before they sign, so the second path is
//! rare.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use ed25519_dalek::VerifyingKey;
use keel_proto::{
    auth::v1::{GetJwksRequest, auth_client::AuthClient},
    token::{self, AccessClaims, Expectations, TokenError},
};
use tokio::{sync::Mutex, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::clients::ServiceClient;

pub struct TokenVerifier {
    auth: ServiceClient,
    expectations: Expectations,
    keys: RwLock<Arc<HashMap<String, VerifyingKey>>>,
    /// The published key set, as served at `/.well-known/jwks.json`.
    jwks: RwLock<Arc<String>>,
    /// When the key set was last fetched; one fetch at a time.
    fetched: Mutex<Option<Instant>>,
}

const UNKNOWN_KEY_REFRESH: Duration = Duration::from_secs(1);

impl TokenVerifier {
    pub fn new(auth: ServiceClient, expectations: Expectations) -> Self {
        Self {
            auth,
            expectations,
            keys: RwLock::new(Arc::default()),
            jwks: RwLock::new(Arc::new(r#"{"keys":[]}"#.to_owned())),
            fetched: Mutex::new(None),
        }
    }

    fn keys(&self) -> Arc<HashMap<String, VerifyingKey>> {
        self.keys.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub fn jwks(&self) -> Arc<String> {
        self.jwks.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub fn has_keys(&self) -> bool {
        !self.keys().is_empty()
    }

    /// Fetches the key set from auth, unless it was fetched less than `unless_within` ago.
    pub async fn refresh(&self, unless_within: Duration) -> anyhow::Result<()> {
        let mut fetched = self.fetched.lock().await;
        if fetched.is_some_and(|at| at.elapsed() < unless_within) {
            return Ok(());
        }
        let jwks = self
            .auth
            .send("GetJwks", GetJwksRequest {}, |channel, request| async move {
                AuthClient::new(channel).get_jwks(request).await
            })
            .await
            .map_err(|status| anyhow::anyhow!("auth did not give its keys: {}", status.message()))?
            .json;
        let keys = token::parse_jwks(&jwks).map_err(|error| anyhow::anyhow!("auth gave a bad key set: {error}"))?;
        tracing::debug!(keys = keys.len(), "fetched the token keys");
        *self.keys.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(keys);
        *self.jwks.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(jwks);
        *fetched = Some(Instant::now());
        Ok(())
    }

    /// Keeps the key set fresh until shutdown.
    pub async fn run(self: Arc<Self>, every: Duration, shutdown: CancellationToken) -> anyhow::Result<()> {
        loop {
            let wait = match self.refresh(Duration::ZERO).await {
                Ok(()) => every,
                Err(error) => {
                    tracing::warn!(error = %format!("{error:#}"), "failed to refresh the token keys; retrying");
                    Duration::from_secs(1).min(every)
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Verifies an access token.
    pub async fn verify(&self, token: &str) -> Result<AccessClaims, TokenError> {
        let now =
            SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs() as i64);
        let keys = self.keys();
        let known = token::key_id(token).is_some_and(|kid| keys.contains_key(&kid));
        if !known && token::key_id(token).is_some() {
            if let Err(error) = self.refresh(UNKNOWN_KEY_REFRESH).await {
                tracing::warn!(error = %format!("{error:#}"), "failed to refresh the token keys for an unknown key");
            }
            return token::verify(token, &self.keys(), &self.expectations, now);
        }
        token::verify(token, &keys, &self.expectations, now)
    }
}
