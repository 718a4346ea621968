//! Permissions and the decision rule.
//!
//! An action is `<resource>:<verb>` (`posts:update`). A grant is an action with a scope:
//! `posts:update:any` allows it on every resource, `posts:update:own` only on resources the
//! subject owns; `*` allows everything. A check either names the owner of the resource (then
//! the answer is yes or no) or does not (then the answer says which scope the subject holds, and
//! the service that knows the owner enforces `own`, atomically with the change).

use std::{fmt, str::FromStr};

use crate::{InvalidValue, identity::UserId};

/// What a subject wants to do: `<resource>:<verb>`, lowercase letters, digits, `-` and `_`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Action {
    resource: String,
    verb: String,
}

impl Action {
    pub fn parse(text: &str) -> Result<Self, InvalidValue> {
        let invalid = || InvalidValue::new("action", "must be <resource>:<verb>, e.g. posts:update");
        let (resource, verb) = text.split_once(':').ok_or_else(invalid)?;
        if !is_segment(resource) || !is_segment(verb) {
            return Err(invalid());
        }
        Ok(Self { resource: resource.to_owned(), verb: verb.to_owned() })
    }

    pub fn resource(&self) -> &str {
        &self.resource
    }

    pub fn verb(&self) -> &str {
        &self.verb
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.resource, self.verb)
    }
}

fn is_segment(text: &str) -> bool {
    (1..=64).contains(&text.len())
        && text.bytes().all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-' || byte == b'_')
}

/// On which resources a grant holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Only resources the subject owns.
    Own,
    /// Every resource.
    Any,
}

/// One permission a role holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Grant {
    /// `*`: everything.
    All,
    Action {
        action: Action,
        scope: Scope,
    },
}

impl Grant {
    /// `*`, `<resource>:<verb>:any`, `<resource>:<verb>:own`, or `<resource>:<verb>` (= `any`).
    pub fn parse(text: &str) -> Result<Self, InvalidValue> {
        if text == "*" {
            return Ok(Self::All);
        }
        let invalid = || InvalidValue::new("permissions", "each must be *, or <resource>:<verb>[:any|:own]");
        let mut parts = text.splitn(3, ':');
        let (resource, verb, scope) = (parts.next(), parts.next(), parts.next());
        let action = Action::parse(&format!("{}:{}", resource.unwrap_or_default(), verb.ok_or_else(invalid)?))
            .map_err(|_| invalid())?;
        let scope = match scope {
            None | Some("any") => Scope::Any,
            Some("own") => Scope::Own,
            Some(_) => return Err(invalid()),
        };
        Ok(Self::Action { action, scope })
    }

    fn scope_for(&self, wanted: &Action) -> Option<Scope> {
        match self {
            Self::All => Some(Scope::Any),
            Self::Action { action, scope } => (action == wanted).then_some(*scope),
        }
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => f.write_str("*"),
            Self::Action { action, scope: Scope::Any } => write!(f, "{action}:any"),
            Self::Action { action, scope: Scope::Own } => write!(f, "{action}:own"),
        }
    }
}

impl FromStr for Grant {
    type Err = InvalidValue;

    fn from_str(text: &str) -> Result<Self, InvalidValue> {
        Self::parse(text)
    }
}

/// The answer to a permission check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Deny,
    /// Allowed on resources the subject owns only; the caller did not name an owner.
    AllowOwn,
    Allow,
}

impl Decision {
    pub fn is_allowed(self) -> bool {
        self != Self::Deny
    }
}

/// Decides whether `subject`, holding `grants`, may do `action` on a resource owned by `owner`
/// (`None`: the owner is not known to the caller). Deny by default.
pub fn evaluate<'a>(
    grants: impl IntoIterator<Item = &'a Grant>,
    action: &Action,
    subject: UserId,
    owner: Option<UserId>,
) -> Decision {
    let best = grants.into_iter().filter_map(|grant| grant.scope_for(action)).max();
    match (best, owner) {
        (None, _) => Decision::Deny,
        (Some(Scope::Any), _) => Decision::Allow,
        (Some(Scope::Own), Some(owner)) if owner == subject => Decision::Allow,
        (Some(Scope::Own), Some(_)) => Decision::Deny,
        (Some(Scope::Own), None) => Decision::AllowOwn,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(texts: &[&str]) -> Vec<Grant> {
        texts.iter().map(|text| Grant::parse(text).unwrap()).collect()
    }

    fn action(text: &str) -> Action {
        Action::parse(text).unwrap()
    }

    #[test]
    fn nothing_held_is_a_no() {
        let subject = UserId::new();
        assert_eq!(evaluate(&grants(&[]), &action("posts:update"), subject, None), Decision::Deny);
        assert_eq!(evaluate(&grants(&["posts:create"]), &action("posts:update"), subject, None), Decision::Deny);
    }

    #[test]
    fn own_scope_depends_on_the_owner() {
        let (subject, other) = (UserId::new(), UserId::new());
        let held = grants(&["posts:update:own"]);
        assert_eq!(evaluate(&held, &action("posts:update"), subject, Some(subject)), Decision::Allow);
        assert_eq!(evaluate(&held, &action("posts:update"), subject, Some(other)), Decision::Deny);
        assert_eq!(evaluate(&held, &action("posts:update"), subject, None), Decision::AllowOwn);
    }

    #[test]
    fn any_beats_own_and_star_allows_everything() {
        let (subject, other) = (UserId::new(), UserId::new());
        let held = grants(&["posts:update:own", "posts:update:any"]);
        assert_eq!(evaluate(&held, &action("posts:update"), subject, Some(other)), Decision::Allow);
        assert_eq!(evaluate(&grants(&["*"]), &action("audit:read"), subject, None), Decision::Allow);
    }

    #[test]
    fn grants_parse_and_print() {
        assert_eq!(Grant::parse("posts:update").unwrap().to_string(), "posts:update:any");
        assert_eq!(Grant::parse("posts:update:own").unwrap().to_string(), "posts:update:own");
        for bad in ["", "posts", "posts:", ":update", "posts:update:mine", "Posts:update", "posts:up date", "**"] {
            assert!(Grant::parse(bad).is_err(), "{bad:?}");
        }
    }
}
