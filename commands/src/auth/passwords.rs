//! Password hashing with Argon2id, off the async threads.

use argon2::{Algorithm, Argon2, Params, PasswordHasher, PasswordVerifier, Version};
use keel_domain::auth::{Password, PasswordHash};
use serde::{Deserialize, Serialize};

/// Argon2id cost. The defaults are OWASP's recommendation (19 MiB, 2 passes, 1 lane); lower them
/// only where a slow hash costs more than a weak one (tests).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Argon2Config {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for Argon2Config {
    fn default() -> Self {
        Self { memory_kib: 19 * 1024, iterations: 2, parallelism: 1 }
    }
}

impl Argon2Config {
    pub fn params(&self) -> Result<Params, argon2::Error> {
        Params::new(self.memory_kib, self.iterations, self.parallelism, None)
    }
}

#[derive(Clone)]
pub struct Hasher {
    params: Params,
    /// A hash of nothing, verified against when an email is unknown, so that an unknown email
    /// costs as much time as a known one with a wrong password.
    decoy: String,
}

impl Hasher {
    pub fn new(config: &Argon2Config) -> anyhow::Result<Self> {
        let params = config.params().map_err(|error| anyhow::anyhow!("auth.argon2: {error}"))?;
        let decoy = hash_with(&params, b"keel decoy password")?;
        Ok(Self { params, decoy })
    }

    pub async fn hash(&self, password: &Password) -> anyhow::Result<PasswordHash> {
        let params = self.params.clone();
        let password = password.expose().to_owned();
        let phc = tokio::task::spawn_blocking(move || hash_with(&params, password.as_bytes())).await??;
        PasswordHash::parse(&phc).map_err(|error| anyhow::anyhow!("argon2 made an unexpected hash: {error}"))
    }

    /// Whether `password` matches `hash` (`None`: the user has none; the time spent is the same).
    pub async fn verify(&self, password: &str, hash: Option<&PasswordHash>) -> bool {
        let known = hash.is_some();
        let phc = hash.map_or_else(|| self.decoy.clone(), |hash| hash.as_str().to_owned());
        let password = password.to_owned();
        let matches = tokio::task::spawn_blocking(move || {
            // The parameters come from the PHC string.
            Argon2::default().verify_password(password.as_bytes(), phc.as_str()).is_ok()
        })
        .await
        .unwrap_or(false);
        known && matches
    }
}

fn hash_with(params: &Params, password: &[u8]) -> anyhow::Result<String> {
    let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    Ok(argon2
        .hash_password(password)
        .map_err(|error| anyhow::anyhow!("failed to hash a password: {error}"))?
        .to_string())
}

#[cfg(test)]
mod tests {
    use keel_domain::identity::Email;

    use super::*;

    #[tokio::test]
    async fn a_hash_verifies_its_password_only() {
        let hasher = Hasher::new(&Argon2Config { memory_kib: 256, iterations: 1, parallelism: 1 }).unwrap();
        let email = Email::parse("ada@example.com").unwrap();
        let password = Password::parse("correct horse battery staple", &email).unwrap();
        let hash = hasher.hash(&password).await.unwrap();
        assert!(hash.as_str().starts_with("$argon2id$v=19$m=256,t=1,p=1$"));
        assert!(hasher.verify("correct horse battery staple", Some(&hash)).await);
        assert!(!hasher.verify("wrong horse battery staple", Some(&hash)).await);
        assert!(!hasher.verify("keel decoy password", None).await, "the decoy never lets anyone in");
    }
}
