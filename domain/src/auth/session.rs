//! The Session aggregate: one login, and the family of refresh tokens that rotate from it.
//!
//! Each refresh hands out a new refresh token and retires the one presented. A retired token
//! presented again means two parties hold the family (a stolen token, or a client replaying an
//! old one): the whole family is revoked, so neither can go on (OAuth 2.0 Security BCP, §4.14).

use std::fmt;

use uuid::Uuid;

use crate::{Aggregate, DomainEvent, InvalidValue, identity::UserId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct SessionId(Uuid);

impl SessionId {
    pub const fn from_uuid(id: Uuid) -> Self {
        Self(id)
    }

    pub const fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The SHA-256 of a refresh token's secret. Tokens carry 256 random bits, so a fast hash is
/// enough: there is nothing to guess.
#[derive(Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(self) -> String {
        self.0.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    pub fn parse_hex(text: &str) -> Result<Self, InvalidValue> {
        let invalid = InvalidValue::new("token_hash", "must be 64 hexadecimal digits");
        if text.len() != 64 || !text.is_ascii() {
            return Err(invalid);
        }
        let mut bytes = [0; 32];
        for (index, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[index * 2..index * 2 + 2], 16).map_err(|_| invalid.clone())?;
        }
        Ok(Self(bytes))
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({}…)", &self.to_hex()[..8])
    }
}

impl From<TokenHash> for String {
    fn from(hash: TokenHash) -> Self {
        hash.to_hex()
    }
}

impl TryFrom<String> for TokenHash {
    type Error = InvalidValue;

    fn try_from(value: String) -> Result<Self, InvalidValue> {
        Self::parse_hex(&value)
    }
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevokeReason {
    Logout,
    /// A retired refresh token was presented again.
    TokenReuse,
}

impl RevokeReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Logout => "logout",
            Self::TokenReuse => "token_reuse",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "logout" => Some(Self::Logout),
            "token_reuse" => Some(Self::TokenReuse),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionCommand {
    Start {
        id: SessionId,
        user_id: UserId,
        refresh: TokenHash,
        expires_at: i64,
    },
    /// Trade the presented refresh token for `next`, at `now` (Unix seconds).
    Refresh {
        presented: TokenHash,
        next: TokenHash,
        now: i64,
    },
    Revoke {
        reason: RevokeReason,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    Started { id: SessionId, user_id: UserId, refresh: TokenHash, expires_at: i64 },
    Refreshed { id: SessionId, refresh: TokenHash },
    Revoked { id: SessionId, reason: RevokeReason },
}

impl DomainEvent for SessionEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Started { .. } => "SessionStarted",
            Self::Refreshed { .. } => "SessionRefreshed",
            Self::Revoked { .. } => "SessionRevoked",
        }
    }

    fn schema_version(&self) -> u32 {
        1
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("no such session")]
    NoSession,
    #[error("the session already exists")]
    AlreadyStarted,
    #[error("the session was revoked")]
    Revoked,
    #[error("the session expired")]
    Expired,
    #[error("the refresh token does not belong to this session")]
    UnknownToken,
}

impl From<SessionError> for crate::DomainError {
    fn from(error: SessionError) -> Self {
        match error {
            SessionError::NoSession => Self::not_found(error.to_string()),
            SessionError::AlreadyStarted => Self::conflict(error.to_string()),
            SessionError::Revoked | SessionError::Expired | SessionError::UnknownToken => {
                Self::unauthenticated(error.to_string())
            }
        }
    }
}

/// How many retired tokens a session remembers for reuse detection. A family older than this
/// many refreshes treats a very old token as unknown (refused, without revoking the family).
pub const RETIRED_TOKENS_KEPT: usize = 256;

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Session {
    #[default]
    None,
    Active {
        id: SessionId,
        user_id: UserId,
        current: TokenHash,
        /// Oldest first, at most [`RETIRED_TOKENS_KEPT`].
        retired: Vec<TokenHash>,
        expires_at: i64,
    },
    Revoked {
        id: SessionId,
        user_id: UserId,
        reason: RevokeReason,
    },
}

impl Session {
    pub fn user_id(&self) -> Option<UserId> {
        match self {
            Self::None => None,
            Self::Active { user_id, .. } | Self::Revoked { user_id, .. } => Some(*user_id),
        }
    }

    pub fn current(&self) -> Option<TokenHash> {
        match self {
            Self::Active { current, .. } => Some(*current),
            Self::None | Self::Revoked { .. } => None,
        }
    }

    pub fn revoked(&self) -> Option<RevokeReason> {
        match self {
            Self::Revoked { reason, .. } => Some(*reason),
            Self::None | Self::Active { .. } => None,
        }
    }
}

impl Aggregate for Session {
    type Command = SessionCommand;
    type Event = SessionEvent;
    type Error = SessionError;

    fn decide(&self, command: SessionCommand) -> Result<Vec<SessionEvent>, SessionError> {
        match (self, command) {
            (Self::None, SessionCommand::Start { id, user_id, refresh, expires_at }) => {
                Ok(vec![SessionEvent::Started { id, user_id, refresh, expires_at }])
            }
            (_, SessionCommand::Start { .. }) => Err(SessionError::AlreadyStarted),
            (Self::None, _) => Err(SessionError::NoSession),
            (Self::Revoked { .. }, SessionCommand::Revoke { .. }) => Ok(vec![]),
            (Self::Revoked { .. }, SessionCommand::Refresh { .. }) => Err(SessionError::Revoked),
            (Self::Active { id, .. }, SessionCommand::Revoke { reason }) => {
                Ok(vec![SessionEvent::Revoked { id: *id, reason }])
            }
            (
                Self::Active { id, current, retired, expires_at, .. },
                SessionCommand::Refresh { presented, next, now },
            ) => {
                if presented == *current {
                    if now >= *expires_at {
                        return Err(SessionError::Expired);
                    }
                    Ok(vec![SessionEvent::Refreshed { id: *id, refresh: next }])
                } else if retired.contains(&presented) {
                    Ok(vec![SessionEvent::Revoked { id: *id, reason: RevokeReason::TokenReuse }])
                } else {
                    Err(SessionError::UnknownToken)
                }
            }
        }
    }

    fn evolve(self, event: &SessionEvent) -> Self {
        match (self, event) {
            (_, SessionEvent::Started { id, user_id, refresh, expires_at }) => Self::Active {
                id: *id,
                user_id: *user_id,
                current: *refresh,
                retired: Vec::new(),
                expires_at: *expires_at,
            },
            (
                Self::Active { id, user_id, current, mut retired, expires_at },
                SessionEvent::Refreshed { refresh, .. },
            ) => {
                retired.push(current);
                if retired.len() > RETIRED_TOKENS_KEPT {
                    retired.remove(0);
                }
                Self::Active { id, user_id, current: *refresh, retired, expires_at }
            }
            (
                Self::Active { id, user_id, .. } | Self::Revoked { id, user_id, .. },
                SessionEvent::Revoked { reason, .. },
            ) => Self::Revoked { id, user_id, reason: *reason },
            // Only valid commits are applied, and they were decided against these states.
            (state, _) => state,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(byte: u8) -> TokenHash {
        TokenHash::from_bytes([byte; 32])
    }

    fn started() -> (Session, SessionId) {
        let id = SessionId::from_uuid(Uuid::now_v7());
        let start = SessionCommand::Start { id, user_id: UserId::new(), refresh: token(1), expires_at: 1_000 };
        let events = Session::default().decide(start).unwrap();
        (events.iter().fold(Session::default(), Session::evolve), id)
    }

    fn apply(state: Session, command: SessionCommand) -> Result<Session, SessionError> {
        let events = state.decide(command)?;
        Ok(events.iter().fold(state, Session::evolve))
    }

    #[test]
    fn a_refresh_rotates_the_token_and_retires_the_old_one() {
        let (state, _) = started();
        let state = apply(state, SessionCommand::Refresh { presented: token(1), next: token(2), now: 10 }).unwrap();
        assert_eq!(state.current(), Some(token(2)));
        let state = apply(state, SessionCommand::Refresh { presented: token(2), next: token(3), now: 20 }).unwrap();
        assert_eq!(state.current(), Some(token(3)));
    }

    #[test]
    fn presenting_a_retired_token_revokes_the_whole_family() {
        let (state, id) = started();
        let state = apply(state, SessionCommand::Refresh { presented: token(1), next: token(2), now: 10 }).unwrap();
        let events = state.decide(SessionCommand::Refresh { presented: token(1), next: token(9), now: 11 }).unwrap();
        assert_eq!(events, vec![SessionEvent::Revoked { id, reason: RevokeReason::TokenReuse }]);
        let state = events.iter().fold(state, Session::evolve);
        assert_eq!(state.revoked(), Some(RevokeReason::TokenReuse));
        // The current token of the family is worthless now too.
        assert_eq!(
            state.decide(SessionCommand::Refresh { presented: token(2), next: token(3), now: 12 }),
            Err(SessionError::Revoked)
        );
    }

    #[test]
    fn unknown_and_expired_tokens_are_refused_without_revoking() {
        let (state, _) = started();
        assert_eq!(
            state.decide(SessionCommand::Refresh { presented: token(7), next: token(2), now: 10 }),
            Err(SessionError::UnknownToken)
        );
        assert_eq!(
            state.decide(SessionCommand::Refresh { presented: token(1), next: token(2), now: 1_000 }),
            Err(SessionError::Expired)
        );
        assert!(state.revoked().is_none());
    }

    #[test]
    fn logout_revokes_once_and_then_is_a_no_op() {
        let (state, _) = started();
        let state = apply(state, SessionCommand::Revoke { reason: RevokeReason::Logout }).unwrap();
        assert_eq!(state.revoked(), Some(RevokeReason::Logout));
        assert_eq!(state.decide(SessionCommand::Revoke { reason: RevokeReason::Logout }), Ok(vec![]));
        assert_eq!(
            Session::default().decide(SessionCommand::Revoke { reason: RevokeReason::Logout }),
            Err(SessionError::NoSession)
        );
    }

    #[test]
    fn token_hashes_round_trip_as_hex() {
        let hash = TokenHash::from_bytes([0xab; 32]);
        assert_eq!(TokenHash::parse_hex(&hash.to_hex()).unwrap(), hash);
        assert!(TokenHash::parse_hex("zz").is_err());
    }
}
