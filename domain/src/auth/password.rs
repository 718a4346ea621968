//! Passwords and their hashes.

use std::fmt;

use crate::{InvalidValue, identity::Email};

/// A password that meets the policy. Never printed, never serialized: it only lives until the
/// auth service has hashed it.
///
/// The policy follows NIST SP 800-63B: length matters, composition rules do not. A password has
/// 10 to 128 characters, is not one character repeated, is not one of the passwords every list
/// of breached passwords starts with, and does not contain the account's email address or the
/// part before its `@`.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    const MIN_CHARS: usize = 10;
    const MAX_CHARS: usize = 128;

    pub fn parse(input: &str, email: &Email) -> Result<Self, InvalidValue> {
        let invalid = |reason| InvalidValue::new("password", reason);
        let length = input.chars().count();
        if length < Self::MIN_CHARS {
            return Err(invalid("must be at least 10 characters"));
        }
        if length > Self::MAX_CHARS {
            return Err(invalid("must be at most 128 characters"));
        }
        if input.trim().is_empty() {
            return Err(invalid("must not be only spaces"));
        }
        let mut chars = input.chars();
        let first = chars.next();
        if chars.all(|c| Some(c) == first) {
            return Err(invalid("must not be one character repeated"));
        }
        let lower = input.to_lowercase();
        if COMMON.iter().any(|common| lower == *common) {
            return Err(invalid("is too common"));
        }
        let local = email.as_str().split('@').next().unwrap_or_default();
        if lower.contains(email.as_str()) || (local.chars().count() >= 4 && lower.contains(local)) {
            return Err(invalid("must not contain the email address"));
        }
        Ok(Self(input.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password([redacted])")
    }
}

/// The first entries of every breached-password list that are long enough to pass the length
/// rule; a deployment that needs more checks them at the edge (e.g. against a k-anonymity API).
const COMMON: &[&str] = &[
    "1234567890",
    "0123456789",
    "12345678910",
    "qwertyuiop",
    "1q2w3e4r5t",
    "password12",
    "password123",
    "password1234",
    "iloveyou12",
    "qwerty1234",
    "qwerty12345",
    "1qaz2wsx3edc",
    "abcdefghij",
    "letmein123",
    "welcome123",
    "administrator",
    "passw0rd123",
];

/// An Argon2id hash in the PHC string format (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`). The
/// hash, never the password, is what the events carry.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct PasswordHash(String);

impl PasswordHash {
    pub fn parse(phc: &str) -> Result<Self, InvalidValue> {
        let invalid = |reason| InvalidValue::new("password_hash", reason);
        if !phc.starts_with("$argon2id$") {
            return Err(invalid("must be an Argon2id hash in the PHC string format"));
        }
        if phc.len() > 512 || !phc.is_ascii() {
            return Err(invalid("is not a PHC string"));
        }
        Ok(Self(phc.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PasswordHash([redacted])")
    }
}

impl From<PasswordHash> for String {
    fn from(hash: PasswordHash) -> Self {
        hash.0
    }
}

impl TryFrom<String> for PasswordHash {
    type Error = InvalidValue;

    fn try_from(value: String) -> Result<Self, InvalidValue> {
        Self::parse(&value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn email() -> Email {
        Email::parse("ada.lovelace@example.com").unwrap()
    }

    #[test]
    fn long_passphrases_pass_whatever_their_characters() {
        for password in ["correct horse battery staple", "plain lowercase words", "ÄÖÜ-passwort-42", "Tr0ub4dor&3x"]
        {
            assert!(Password::parse(password, &email()).is_ok(), "{password}");
        }
    }

    #[test]
    fn short_repeated_common_and_personal_passwords_are_refused() {
        for password in [
            "short",
            "aaaaaaaaaaaa",
            "          ",
            "1234567890",
            "Password123",
            "my ada.lovelace@example.com",
            "xxada.lovelacexx",
            &"x".repeat(129),
        ] {
            assert!(Password::parse(password, &email()).is_err(), "{password:?}");
        }
    }

    #[test]
    fn neither_passwords_nor_hashes_are_printed() {
        let password = Password::parse("correct horse battery staple", &email()).unwrap();
        assert!(!format!("{password:?}").contains("horse"));
        let hash = PasswordHash::parse("$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2g").unwrap();
        assert!(!format!("{hash:?}").contains("argon2id"));
        assert!(PasswordHash::parse("$2b$12$bcrypt").is_err());
    }
}
