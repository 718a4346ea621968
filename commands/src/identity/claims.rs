//! Unique email addresses across every user.
//!
//! Users live in different partitions, so no single writer sees every email. Before a user takes
//! an address (registering, or changing to it) the identity service reserves it in PostgreSQL,
//! whose primary key makes the reservation atomic across every instance; the user's own event
//! then follows in the log. An address belongs to a user when both agree: the reservation names
//! the user, and the user's state holds the address.
//!
//! A reservation can outlive its purpose: the service may crash between reserving and writing
//! the event, or after an email change before releasing the old address. Such a reservation is
//! taken over when someone else wants the address, if it is older than the takeover age and its
//! holder's authoritative state (asked of the owner of the holder's partition) does not hold the
//! address. Younger ones answer "retry": their command may still be deciding. A command is never
//! decided after its deadline (`command_timeout_ms`), so with a takeover age well above it, a
//! reservation is only taken over once its command can no longer take effect.
//!
//! The reservation's key is an HMAC of the address under `identity.email_key`, so the table holds
//! no address, and an erased user's reservation (deleted anyway) could not be read back.

use hmac::{Hmac, KeyInit, Mac};
use keel_domain::identity::{Email, UserId};
use sha2::Sha256;
use sqlx::PgPool;
use uuid::Uuid;

/// The reservation id of an email address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClaimId(pub Uuid);

/// What reserving an address came to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Claimed {
    /// The address is reserved for the user (newly, or again).
    Held,
    /// Another user's reservation, this many seconds old.
    Taken { holder: UserId, age_secs: f64 },
}

/// The first 128 bits of HMAC-SHA256(key, address).
fn claim_id(key: &[u8], email: &Email) -> ClaimId {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(email.as_str().as_bytes());
    let digest: [u8; 32] = mac.finalize().into_bytes().into();
    let mut bytes = [0; 16];
    bytes.copy_from_slice(&digest[..16]);
    ClaimId(Uuid::from_bytes(bytes))
}

#[derive(Clone)]
pub struct EmailClaims {
    pool: PgPool,
    key: Vec<u8>,
}

impl EmailClaims {
    pub fn new(pool: PgPool, key: &str) -> Self {
        Self { pool, key: key.as_bytes().to_vec() }
    }

    pub fn id(&self, email: &Email) -> ClaimId {
        claim_id(&self.key, email)
    }

    /// Reserves `email` for `user`. A reservation the user already holds is renewed (its age
    /// starts again: a retry of an interrupted command is in flight once more).
    pub async fn claim(&self, email: &Email, user: UserId) -> Result<Claimed, sqlx::Error> {
        let claim = self.id(email);
        let row: (Uuid, f64) = sqlx::query_as(
            "INSERT INTO identity_email_claims (claim_id, user_id, claimed_at) VALUES ($1, $2, now())
             ON CONFLICT (claim_id) DO UPDATE SET claimed_at = CASE
                 WHEN identity_email_claims.user_id = excluded.user_id THEN now()
                 ELSE identity_email_claims.claimed_at END
             RETURNING user_id, extract(epoch FROM now() - claimed_at)::float8",
        )
        .bind(claim.0)
        .bind(user.as_uuid())
        .fetch_one(&self.pool)
        .await?;
        Ok(if row.0 == user.as_uuid() {
            Claimed::Held
        } else {
            Claimed::Taken { holder: UserId::from_uuid(row.0), age_secs: row.1 }
        })
    }

    /// Moves a stale reservation of `holder` to `user`; false if it changed meanwhile.
    pub async fn take_over(&self, email: &Email, holder: UserId, user: UserId) -> Result<bool, sqlx::Error> {
        let moved = sqlx::query(
            "UPDATE identity_email_claims SET user_id = $3, claimed_at = now() WHERE claim_id = $1 AND user_id = $2",
        )
        .bind(self.id(email).0)
        .bind(holder.as_uuid())
        .bind(user.as_uuid())
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(moved == 1)
    }

    /// Releases `user`'s reservation of `email`, if it holds one.
    pub async fn release(&self, email: &Email, user: UserId) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM identity_email_claims WHERE claim_id = $1 AND user_id = $2")
            .bind(self.id(email).0)
            .bind(user.as_uuid())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Releases every reservation of `user` (its personal data was erased).
    pub async fn release_all(&self, user: UserId) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM identity_email_claims WHERE user_id = $1")
            .bind(user.as_uuid())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_one_reservation_id_per_key() {
        let email = Email::parse("Ada@Example.com").unwrap();
        let id = |key: &str, email: &Email| claim_id(key.as_bytes(), email);
        assert_eq!(id("key-1", &email), id("key-1", &Email::parse("ada@example.com").unwrap()));
        assert_ne!(id("key-1", &email), id("key-1", &Email::parse("bo@example.com").unwrap()));
        assert_ne!(id("key-1", &email), id("key-2", &email));
    }
}
