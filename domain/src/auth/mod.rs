//! The auth context: credentials (a password hash per user) and sessions (a family of rotating
//! refresh tokens). Secrets never appear here: passwords are hashed by the auth service before a
//! command is decided, and refresh tokens are kept as hashes.

mod credentials;
mod password;
mod session;

pub use credentials::{Credentials, CredentialsCommand, CredentialsError, CredentialsEvent};
pub use password::{Password, PasswordHash};
pub use session::{RevokeReason, Session, SessionCommand, SessionError, SessionEvent, SessionId, TokenHash};
