//! Access tokens: the contract between the auth service, which signs them, and the gateways,
//! which verify them locally with the keys auth publishes (a JWKS).
//!
//! An access token is a compact JWS (RFC 7515) signed with Ed25519 (`alg: EdDSA`, RFC 8037),
//! naming its key (`kid`). Verification accepts exactly that algorithm: `none`, HMAC (the
//! classic confusion of signing with the public key as an HMAC secret) and every other algorithm
//! are refused before any key is looked at, and so are unknown keys, `crit` headers, bad
//! signatures (`verify_strict`), and claims out of their time window, issuer or audience.

use std::collections::HashMap;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

/// What an access token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    pub iss: String,
    pub aud: String,
    /// The user.
    pub sub: Uuid,
    /// The session (login) the token belongs to: revoking it ends the token.
    pub sid: Uuid,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: Uuid,
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default, skip_serializing)]
    crit: Option<Value>,
}

const ALGORITHM: &str = "EdDSA";

/// Signs `claims` with `key`, named `kid`.
pub fn sign(claims: &AccessClaims, kid: &str, key: &SigningKey) -> String {
    let header = Header { alg: ALGORITHM.into(), typ: Some("JWT".into()), kid: Some(kid.into()), crit: None };
    let signing_input = format!("{}.{}", part(&header), part(claims));
    let signature = key.sign(signing_input.as_bytes());
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
}

/// One base64url part of a token.
fn part(value: &impl Serialize) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).expect("token parts serialize"))
}

/// Why a token was refused. The gateway tells clients only that it was; the reason is logged
/// and counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a compact JWS")]
    Malformed,
    #[error("algorithm `{0}` is not accepted")]
    Algorithm(String),
    #[error("the token names no key")]
    NoKey,
    #[error("key `{0}` is unknown")]
    UnknownKey(String),
    #[error("critical header parameters are not supported")]
    Critical,
    #[error("the signature does not verify")]
    Signature,
    #[error("the claims are malformed")]
    Claims,
    #[error("the token expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token was issued by someone else")]
    Issuer,
    #[error("the token is meant for someone else")]
    Audience,
}

impl TokenError {
    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Algorithm(_) => "algorithm",
            Self::NoKey | Self::UnknownKey(_) => "unknown_key",
            Self::Critical => "critical",
            Self::Signature => "signature",
            Self::Claims => "claims",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Issuer => "issuer",
            Self::Audience => "audience",
        }
    }
}

/// What a verifier insists on besides the signature.
#[derive(Debug, Clone)]
pub struct Expectations {
    pub issuer: String,
    pub audience: String,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_secs: i64,
}

/// The key id a token names, read without verifying anything (to find out whether the key set
/// needs refreshing before verification).
pub fn key_id(token: &str) -> Option<String> {
    let header = token.split('.').next()?;
    let header: Header = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).ok()?).ok()?;
    header.kid
}

/// Verifies `token` against the keys in `keys` at `now` (Unix seconds).
pub fn verify(
    token: &str,
    keys: &HashMap<String, VerifyingKey>,
    expect: &Expectations,
    now: i64,
) -> Result<AccessClaims, TokenError> {
    let mut parts = token.split('.');
    let (Some(header_part), Some(claims_part), Some(signature_part), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let decode = |part: &str| URL_SAFE_NO_PAD.decode(part).map_err(|_| TokenError::Malformed);
    let header: Header = serde_json::from_slice(&decode(header_part)?).map_err(|_| TokenError::Malformed)?;
    if header.alg != ALGORITHM {
        return Err(TokenError::Algorithm(header.alg));
    }
    if header.crit.is_some() {
        return Err(TokenError::Critical);
    }
    let kid = header.kid.ok_or(TokenError::NoKey)?;
    let key = keys.get(&kid).ok_or_else(|| TokenError::UnknownKey(kid.clone()))?;
    let signature = Signature::from_slice(&decode(signature_part)?).map_err(|_| TokenError::Signature)?;
    let signing_input = &token[..header_part.len() + 1 + claims_part.len()];
    key.verify_strict(signing_input.as_bytes(), &signature).map_err(|_| TokenError::Signature)?;
    let claims: AccessClaims = serde_json::from_slice(&decode(claims_part)?).map_err(|_| TokenError::Claims)?;
    check_time(&claims, expect, now)?;
    if claims.iss != expect.issuer {
        return Err(TokenError::Issuer);
    }
    if claims.aud != expect.audience {
        return Err(TokenError::Audience);
    }
    Ok(claims)
}

/// Whether verified claims are valid at `now` (Unix seconds): not expired, not before their time.
pub fn check_time(claims: &AccessClaims, expect: &Expectations, now: i64) -> Result<(), TokenError> {
    if claims.exp + expect.leeway_secs <= now {
        return Err(TokenError::Expired);
    }
    if claims.nbf - expect.leeway_secs > now {
        return Err(TokenError::NotYetValid);
    }
    Ok(())
}

/// The JWK (RFC 8037) of an Ed25519 public key.
pub fn jwk(kid: &str, key: &VerifyingKey) -> Value {
    json!({
        "kty": "OKP",
        "crv": "Ed25519",
        "alg": ALGORITHM,
        "use": "sig",
        "kid": kid,
        "x": URL_SAFE_NO_PAD.encode(key.to_bytes()),
    })
}

/// The Ed25519 keys of a JWKS by key id; other keys are ignored.
pub fn parse_jwks(jwks: &str) -> Result<HashMap<String, VerifyingKey>, TokenError> {
    let document: Value = serde_json::from_str(jwks).map_err(|_| TokenError::Malformed)?;
    let keys = document.get("keys").and_then(Value::as_array).ok_or(TokenError::Malformed)?;
    let mut parsed = HashMap::new();
    for key in keys {
        let text = |name: &str| key.get(name).and_then(Value::as_str);
        if text("kty") != Some("OKP") || text("crv") != Some("Ed25519") {
            continue;
        }
        let (Some(kid), Some(x)) = (text("kid"), text("x")) else { return Err(TokenError::Malformed) };
        let bytes: [u8; 32] = URL_SAFE_NO_PAD
            .decode(x)
            .map_err(|_| TokenError::Malformed)?
            .try_into()
            .map_err(|_| TokenError::Malformed)?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| TokenError::Malformed)?;
        parsed.insert(kid.to_owned(), key);
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn claims(now: i64) -> AccessClaims {
        AccessClaims {
            iss: "keel".into(),
            aud: "keel".into(),
            sub: Uuid::now_v7(),
            sid: Uuid::now_v7(),
            iat: now,
            nbf: now,
            exp: now + 300,
            jti: Uuid::new_v4(),
        }
    }

    fn expect() -> Expectations {
        Expectations { issuer: "keel".into(), audience: "keel".into(), leeway_secs: 0 }
    }

    fn keys(kid: &str, key: &SigningKey) -> HashMap<String, VerifyingKey> {
        HashMap::from([(kid.to_owned(), key.verifying_key())])
    }

    fn forge(header: &Value, claims: &AccessClaims, signature: &[u8]) -> String {
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap()),
            URL_SAFE_NO_PAD.encode(signature)
        )
    }

    #[test]
    fn a_signed_token_verifies_and_names_its_key() {
        let now = 1_800_000_000;
        let token = sign(&claims(now), "k1", &key(1));
        assert_eq!(key_id(&token).as_deref(), Some("k1"));
        let verified = verify(&token, &keys("k1", &key(1)), &expect(), now).unwrap();
        assert_eq!(verified.exp, now + 300);
    }

    #[test]
    fn attacks_are_refused() {
        let now = 1_800_000_000;
        let good = claims(now);
        let keys = keys("k1", &key(1));
        let none = forge(&json!({"alg": "none", "kid": "k1"}), &good, b"");
        assert_eq!(verify(&none, &keys, &expect(), now), Err(TokenError::Algorithm("none".into())));
        let hs256 = forge(&json!({"alg": "HS256", "kid": "k1"}), &good, &[0; 32]);
        assert_eq!(verify(&hs256, &keys, &expect(), now), Err(TokenError::Algorithm("HS256".into())));
        let unknown = sign(&good, "k2", &key(2));
        assert_eq!(verify(&unknown, &keys, &expect(), now), Err(TokenError::UnknownKey("k2".into())));
        let wrong_key = sign(&good, "k1", &key(2));
        assert_eq!(verify(&wrong_key, &keys, &expect(), now), Err(TokenError::Signature));
        let crit = forge(&json!({"alg": "EdDSA", "kid": "k1", "crit": ["exp"]}), &good, &[0; 64]);
        assert_eq!(verify(&crit, &keys, &expect(), now), Err(TokenError::Critical));
        // A tampered payload keeps the old signature.
        let token = sign(&good, "k1", &key(1));
        let parts: Vec<&str> = token.split('.').collect();
        let mut tampered = good.clone();
        tampered.sub = Uuid::now_v7();
        let forged =
            format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(serde_json::to_vec(&tampered).unwrap()), parts[2]);
        assert_eq!(verify(&forged, &keys, &expect(), now), Err(TokenError::Signature));
        assert_eq!(verify("a.b", &keys, &expect(), now), Err(TokenError::Malformed));
    }

    #[test]
    fn the_time_window_issuer_and_audience_are_checked() {
        let now = 1_800_000_000;
        let keys = keys("k1", &key(1));
        let token = sign(&claims(now), "k1", &key(1));
        assert_eq!(verify(&token, &keys, &expect(), now + 300), Err(TokenError::Expired));
        let lenient = Expectations { leeway_secs: 30, ..expect() };
        assert!(verify(&token, &keys, &lenient, now + 310).is_ok());
        assert_eq!(verify(&token, &keys, &expect(), now - 1), Err(TokenError::NotYetValid));
        let other = Expectations { issuer: "other".into(), ..expect() };
        assert_eq!(verify(&token, &keys, &other, now), Err(TokenError::Issuer));
        let other = Expectations { audience: "other".into(), ..expect() };
        assert_eq!(verify(&token, &keys, &other, now), Err(TokenError::Audience));
    }

    #[test]
    fn jwks_round_trip() {
        let jwks =
            json!({"keys": [jwk("k1", &key(1).verifying_key()), {"kty": "RSA", "kid": "r", "n": "x", "e": "AQAB"}]});
        let parsed = parse_jwks(&jwks.to_string()).unwrap();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed["k1"], key(1).verifying_key());
        assert!(parse_jwks("{}").is_err());
    }
}
