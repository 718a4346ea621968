//! Values of the identity context, parsed once at the edge and trusted afterwards.

use std::fmt;

use uuid::Uuid;

pub use crate::InvalidValue;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct UserId(Uuid);

impl UserId {
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    pub const fn from_uuid(id: Uuid) -> Self {
        Self(id)
    }

    pub const fn as_uuid(&self) -> Uuid {
        self.0
    }

    /// The id of the user a registration creates: derived from the registration's command id,
    /// so that a retried registration (the same command) is the same user, whichever service
    /// asks first (the password is stored before the user is registered).
    pub fn for_registration(command_id: Uuid) -> Self {
        Self(Uuid::new_v5(&REGISTRATION_NAMESPACE, command_id.as_bytes()))
    }
}

/// Keel's namespace for user ids derived from registration command ids (UUIDv5).
const REGISTRATION_NAMESPACE: Uuid = Uuid::from_u128(0x6b65_656c_2d75_7365_7273_2d76_3200_0001);

impl Default for UserId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An email address, trimmed and lower-cased, so that two spellings of one mailbox are one
/// address for uniqueness. Deserializing parses, so a stored value is checked like an input.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Email(String);

impl Email {
    const MAX_LENGTH: usize = 254;
    const MAX_LOCAL_LENGTH: usize = 64;
    const MAX_LABEL_LENGTH: usize = 63;

    pub fn parse(input: &str) -> Result<Self, InvalidValue> {
        let invalid = |reason| InvalidValue::new("email", reason);
        let email = input.trim().to_lowercase();
        if email.is_empty() {
            return Err(invalid("must not be empty"));
        }
        if email.len() > Self::MAX_LENGTH {
            return Err(invalid("must be at most 254 characters"));
        }
        let (local, domain) = email.split_once('@').ok_or(invalid("must contain `@`"))?;
        if local.is_empty() || local.len() > Self::MAX_LOCAL_LENGTH {
            return Err(invalid("the part before `@` must be 1 to 64 characters"));
        }
        let local_ok = local.chars().all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~.".contains(c));
        if !local_ok || local.starts_with('.') || local.ends_with('.') || local.contains("..") {
            return Err(invalid("the part before `@` contains characters that are not allowed"));
        }
        let labels: Vec<&str> = domain.split('.').collect();
        if labels.len() < 2 {
            return Err(invalid("the domain must have at least two labels"));
        }
        for label in &labels {
            let label_ok = !label.is_empty()
                && label.len() <= Self::MAX_LABEL_LENGTH
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-');
            if !label_ok {
                return Err(invalid("the domain is not a valid host name"));
            }
        }
        Ok(Self(email))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The name a user shows to others: trimmed, 1 to 100 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct DisplayName(String);

impl DisplayName {
    const MAX_CHARS: usize = 100;

    pub fn parse(input: &str) -> Result<Self, InvalidValue> {
        let invalid = |reason| InvalidValue::new("display_name", reason);
        let name = input.trim();
        if name.is_empty() {
            return Err(invalid("must not be empty"));
        }
        if name.chars().count() > Self::MAX_CHARS {
            return Err(invalid("must be at most 100 characters"));
        }
        if name.chars().any(char::is_control) {
            return Err(invalid("must not contain control characters"));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DisplayName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a user says about themselves: up to 500 characters, trimmed; line breaks and tabs are
/// the only control characters allowed. Empty by default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Bio(String);

impl Bio {
    const MAX_CHARS: usize = 500;

    pub fn parse(input: &str) -> Result<Self, InvalidValue> {
        let invalid = |reason| InvalidValue::new("bio", reason);
        let bio = input.trim();
        if bio.chars().count() > Self::MAX_CHARS {
            return Err(invalid("must be at most 500 characters"));
        }
        if bio.chars().any(|c| c.is_control() && !matches!(c, '\n' | '\t')) {
            return Err(invalid("must not contain control characters other than line breaks and tabs"));
        }
        Ok(Self(bio.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! string_conversions {
    ($($value:ident),*) => {$(
        impl From<$value> for String {
            fn from(value: $value) -> Self {
                value.0
            }
        }

        impl TryFrom<String> for $value {
            type Error = InvalidValue;

            fn try_from(value: String) -> Result<Self, InvalidValue> {
                Self::parse(&value)
            }
        }
    )*};
}

string_conversions!(Email, DisplayName, Bio);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised() {
        assert_eq!(Email::parse("  Ada.Lovelace@Example.COM ").unwrap().as_str(), "ada.lovelace@example.com");
        assert_eq!(Email::parse("a+tag@sub.example-host.io").unwrap().as_str(), "a+tag@sub.example-host.io");
    }

    #[test]
    fn malformed_emails_are_rejected() {
        for input in [
            "",
            "   ",
            "no-at-sign",
            "@example.com",
            "ada@",
            "ada@localhost",
            "ada@@example.com",
            "ada@exa mple.com",
            "a da@example.com",
            ".ada@example.com",
            "ada..l@example.com",
            "ada@-example.com",
            "ada@example..com",
            "ada@exam_ple.com",
        ] {
            assert!(Email::parse(input).is_err(), "{input:?} should be rejected");
        }
        let long_local = format!("{}@example.com", "a".repeat(65));
        assert!(Email::parse(&long_local).is_err());
        let long = format!("a@{}.com", "b.".repeat(130));
        assert!(Email::parse(&long).is_err());
    }

    #[test]
    fn display_names_are_trimmed_and_bounded() {
        assert_eq!(DisplayName::parse("  Ada  ").unwrap().as_str(), "Ada");
        assert_eq!(DisplayName::parse(&"é".repeat(100)).unwrap().as_str().chars().count(), 100);
        assert!(DisplayName::parse(&"é".repeat(101)).is_err());
        assert!(DisplayName::parse(" \t ").is_err());
        assert!(DisplayName::parse("Ada\u{0}").is_err());
    }

    #[test]
    fn bios_may_be_empty_and_span_lines() {
        assert_eq!(Bio::parse("  ").unwrap(), Bio::default());
        assert_eq!(Bio::parse("Analyst.\nPoet.").unwrap().as_str(), "Analyst.\nPoet.");
        assert!(Bio::parse(&"x".repeat(501)).is_err());
        assert!(Bio::parse("bell\u{7}").is_err());
    }

    #[test]
    fn a_registration_is_one_user_however_often_it_is_retried() {
        let command = Uuid::new_v4();
        assert_eq!(UserId::for_registration(command), UserId::for_registration(command));
        assert_ne!(UserId::for_registration(command), UserId::for_registration(Uuid::new_v4()));
    }
}
