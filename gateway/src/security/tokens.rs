//! Access-token verification, local to each gateway, with the keys the auth service publishes.
//!
//! The key set is fetched from auth at start, refreshed every `gateway.auth.jwks_refresh_secs`,
//! and refreshed at once (at most once a second) when a token names a key not in it: a key auth
//! just started signing with. Auth publishes keys well before they sign, so the second path is
//! rare.
//!
//! A client sends the same token with every request for minutes: once its signature checked out,
//! its claims are kept ([`Verified`]), and later requests only check that they are still within
//! their time. A key that leaves the set drops every kept claim.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use ed25519_dalek::VerifyingKey;
use keel_proto::{
    auth::v1::GetJwksRequest,
    token::{self, AccessClaims, Expectations, TokenError},
};
use tokio::{sync::Mutex, time::Instant};
use tokio_util::sync::CancellationToken;

use keel_clients::Auth;

/// Claims of tokens whose signatures were checked, by token, within a byte budget.
struct Verified {
    claims: moka::sync::Cache<Arc<str>, AccessClaims>,
}

impl Verified {
    fn new(max_bytes: u64) -> Self {
        let claims = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|token: &Arc<str>, _: &AccessClaims| {
                (token.len() + std::mem::size_of::<AccessClaims>() + 64).try_into().unwrap_or(u32::MAX)
            })
            // Past a token's lifetime (minutes) it is refused anyway.
            .time_to_live(Duration::from_secs(3600))
            .build();
        Self { claims }
    }
}

pub struct TokenVerifier {
    auth: Auth,
    expectations: Expectations,
    verified: Verified,
    keys: RwLock<Arc<HashMap<String, VerifyingKey>>>,
    /// The published key set, as served at `/.well-known/jwks.json`.
    jwks: RwLock<Arc<String>>,
    /// When the key set was last fetched; one fetch at a time.
    fetched: Mutex<Option<Instant>>,
}

const UNKNOWN_KEY_REFRESH: Duration = Duration::from_secs(1);

impl TokenVerifier {
    /// `verified_bytes`: how much memory the claims of verified tokens may take.
    pub fn new(auth: Auth, expectations: Expectations, verified_bytes: u64) -> Self {
        Self {
            auth,
            expectations,
            verified: Verified::new(verified_bytes),
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
            .get_jwks(GetJwksRequest {})
            .await
            .map_err(|status| anyhow::anyhow!("auth did not give its keys: {}", status.message()))?
            .json;
        let keys = token::parse_jwks(&jwks).map_err(|error| anyhow::anyhow!("auth gave a bad key set: {error}"))?;
        tracing::debug!(keys = keys.len(), "fetched the token keys");
        if self.keys().keys().any(|kid| !keys.contains_key(kid)) {
            // A withdrawn key must not go on vouching for the tokens it signed.
            self.verified.claims.invalidate_all();
        }
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

    /// Whether `token`'s signature was checked before (verifying it again costs nothing).
    pub fn is_known(&self, token: &str) -> bool {
        self.verified.claims.contains_key(token)
    }

    /// Verifies an access token.
    pub async fn verify(&self, token: &str) -> Result<AccessClaims, TokenError> {
        let now =
            SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs() as i64);
        if let Some(claims) = self.verified.claims.get(token) {
            token::check_time(&claims, &self.expectations, now)?;
            return Ok(claims);
        }
        let claims = self.verify_signed(token, now).await?;
        self.verified.claims.insert(Arc::from(token), claims.clone());
        Ok(claims)
    }

    async fn verify_signed(&self, token: &str, now: i64) -> Result<AccessClaims, TokenError> {
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
