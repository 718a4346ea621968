//! Who may call a route: the rule each route of the table declares, which the pipeline enforces
//! before the handler runs.

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone (a token, if sent, must still be valid).
    Public,
    /// Any signed-in, active user.
    Authenticated,
    /// Whoever authz allows `action` on the resource. Deny by default.
    Permission { action: &'static str, owner: Owner },
}

/// Whom the resource of a [`Access::Permission`] route belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// The user of the path's `{id}`: authz answers for that owner.
    PathUser,
    /// No user (roles, the audit log, the projections, whole streams): only a grant on any
    /// resource (`:any`, `*`) allows it.
    Nobody,
    /// Known to the handler only (a post's author, a stream's aggregate): authz says whether the
    /// caller may act on any or only on their own ([`crate::security::Decision`]), and "own" is
    /// enforced where the owner is known, with the change or the read.
    Resource,
}

/// [`Access::Permission`], for tables.
pub const fn permission(action: &'static str, owner: Owner) -> Access {
    Access::Permission { action, owner }
}

impl Access {
    /// The permission the route needs, if it needs one.
    pub fn action(&self) -> Option<&'static str> {
        match self {
            Self::Permission { action, .. } => Some(action),
            Self::Public | Self::Authenticated => None,
        }
    }
}
