//! Values of the blog context.

use std::collections::BTreeSet;

use crate::{InvalidValue, identity::UserId};

/// Who issues a change, and whether they may change what others wrote (an editor, an admin) or
/// only their own (what the authz service answered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Actor {
    pub user_id: UserId,
    pub any: bool,
}

impl Actor {
    /// Whether this actor may change something written by `author`.
    pub fn may_change(&self, author: UserId) -> bool {
        self.any || self.user_id == author
    }
}

macro_rules! text_value {
    ($(#[$doc:meta])* $name:ident, $field:literal, $min:literal, $max:literal, $reason:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        #[serde(into = "String", try_from = "String")]
        pub struct $name(String);

        impl $name {
            pub fn parse(input: &str) -> Result<Self, InvalidValue> {
                let text = input.trim();
                let length = text.chars().count();
                if !($min..=$max).contains(&length) {
                    return Err(InvalidValue::new($field, $reason));
                }
                if text.chars().any(|c| c.is_control() && !matches!(c, '\n' | '\t' | '\r')) {
                    return Err(InvalidValue::new($field, "must not contain control characters"));
                }
                Ok(Self(text.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> Self {
                value.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidValue;

            fn try_from(value: String) -> Result<Self, InvalidValue> {
                Self::parse(&value)
            }
        }
    };
}

text_value!(
    /// A post's title: 1 to 200 characters, trimmed.
    Title, "title", 1, 200, "must be 1 to 200 characters"
);
text_value!(
    /// A post's body: up to 100,000 characters (Markdown, stored as written).
    PostBody, "body", 0, 100_000, "must be at most 100000 characters"
);
text_value!(
    /// A comment: 1 to 5,000 characters.
    CommentBody, "body", 1, 5_000, "must be 1 to 5000 characters"
);

/// A post's tags: at most 10, each 1 to 32 lowercase letters, digits or `-`; kept sorted and
/// without duplicates, so two spellings of one set are one value.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(into = "Vec<String>", try_from = "Vec<String>")]
pub struct Tags(BTreeSet<String>);

impl Tags {
    pub fn parse<S: AsRef<str>>(input: &[S]) -> Result<Self, InvalidValue> {
        let mut tags = BTreeSet::new();
        for tag in input {
            let tag = tag.as_ref().trim().to_lowercase();
            let valid = (1..=32).contains(&tag.len())
                && tag.bytes().all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-');
            if !valid {
                return Err(InvalidValue::new("tags", "each must be 1 to 32 lowercase letters, digits or -"));
            }
            tags.insert(tag);
        }
        if tags.len() > 10 {
            return Err(InvalidValue::new("tags", "at most 10"));
        }
        Ok(Self(tags))
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }
}

impl From<Tags> for Vec<String> {
    fn from(tags: Tags) -> Self {
        tags.0.into_iter().collect()
    }
}

impl TryFrom<Vec<String>> for Tags {
    type Error = InvalidValue;

    fn try_from(value: Vec<String>) -> Result<Self, InvalidValue> {
        Self::parse(&value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_are_trimmed_and_bounded() {
        assert_eq!(Title::parse("  Hello  ").unwrap().as_str(), "Hello");
        assert!(Title::parse("   ").is_err());
        assert!(Title::parse(&"t".repeat(201)).is_err());
        assert!(PostBody::parse("").is_ok());
        assert!(PostBody::parse("line\nline").is_ok());
        assert!(CommentBody::parse("").is_err());
        assert!(CommentBody::parse("nul\u{0}").is_err());
    }

    #[test]
    fn tags_are_normalised_sets() {
        let tags = Tags::parse(&["Rust", "rust", " kafka "]).unwrap();
        assert_eq!(tags.iter().collect::<Vec<_>>(), ["kafka", "rust"]);
        assert!(Tags::parse(&["no spaces"]).is_err());
        let many: Vec<String> = (0..11).map(|index| format!("t{index}")).collect();
        assert!(Tags::parse(&many).is_err());
    }
}
