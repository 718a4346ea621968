//! The gRPC surface of the auth service.
//!
//! Login resolves the email to a user through the identity read model (`users`), then runs on
//! the owner of the user's credentials: the password is verified there (Argon2id, off the async
//! threads) and a session is started on the owner of the session's partition. A refresh runs on
//! the owner of its session, which trades the presented token for a new one in one command.

use std::{sync::Arc, time::SystemTime};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use keel_domain::{
    DomainError,
    auth::{CredentialsCommand, Password, RevokeReason, Session, SessionCommand, SessionId, TokenHash},
    identity::{Email, UserId},
};
use keel_proto::{
    auth::v1::{
        GetJwksRequest, HashPasswordRequest, Jwks, LoginRequest, LogoutRequest, PasswordHash, RefreshRequest,
        RemovePasswordRequest, SetPasswordRequest, StartSessionRequest, Tokens, auth_client::AuthClient,
        auth_server::Auth,
    },
    common::v1::CommandReply,
    token::{self, AccessClaims},
};
use keel_read_models::users;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{CredentialStore, Sessions, SigningKeys, TokenSettings, passwords::Hasher};
use crate::{
    Accepted, CommandError, CommandMeta,
    engine::{Command, Engine, Location},
    forward::{Peers, forwarded},
    grpc::{execute, invalid, metadata, position, receive, uuid},
};

/// Keel's namespace for session ids derived from login command ids (UUIDv5).
const SESSION_NAMESPACE: Uuid = Uuid::from_u128(0x6b65_656c_2d73_6573_7369_2d76_3100_0001);

pub struct AuthGrpc {
    pub credentials: Arc<Engine<CredentialStore>>,
    pub sessions: Arc<Engine<Sessions>>,
    pub keys: Arc<SigningKeys>,
    pub hasher: Hasher,
    /// For the identity read model.
    pub pool: PgPool,
    pub peers: Peers,
    pub tokens: TokenSettings,
}

fn unauthenticated(message: &str) -> Status {
    CommandError::from(DomainError::unauthenticated(message)).into()
}

const BAD_CREDENTIALS: &str = "invalid email or password";

fn now_secs() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs() as i64)
}

fn hash_of(secret: &[u8]) -> TokenHash {
    TokenHash::from_bytes(Sha256::digest(secret).into())
}

/// A refresh token: `<session id>.<secret>`, the secret 256 random bits in base64url.
struct RefreshToken {
    session: SessionId,
    secret: [u8; 32],
}

impl RefreshToken {
    fn generate(session: SessionId) -> Self {
        let mut secret = [0; 32];
        getrandom::fill(&mut secret).expect("the operating system provides random bytes");
        Self { session, secret }
    }

    fn parse(text: &str) -> Option<Self> {
        let (session, secret) = text.split_once('.')?;
        let session = SessionId::from_uuid(Uuid::parse_str(session).ok()?);
        let secret = URL_SAFE_NO_PAD.decode(secret).ok()?.try_into().ok()?;
        Some(Self { session, secret })
    }

    fn hash(&self) -> TokenHash {
        hash_of(&self.secret)
    }

    fn encode(&self) -> String {
        format!("{}.{}", self.session.as_uuid().simple(), URL_SAFE_NO_PAD.encode(self.secret))
    }
}

impl AuthGrpc {
    /// The active user holding `email` in the identity read model.
    async fn user_by_email(&self, email: &Email) -> Result<Option<UserId>, Status> {
        let id = users::active_with_email(&self.pool, email.as_str()).await.map_err(read_model)?;
        Ok(id.map(UserId::from_uuid))
    }

    async fn is_active(&self, user: UserId) -> Result<bool, Status> {
        let status = users::status(&self.pool, user.as_uuid()).await.map_err(read_model)?;
        Ok(status.as_deref() == Some("active"))
    }

    /// Checks the password against the credentials held here, then starts a session.
    async fn login_here(&self, user: UserId, password: String, meta: CommandMeta) -> Result<Tokens, Status> {
        let credentials = self.credentials.read_here(user.as_uuid()).await?.state;
        if !self.hasher.verify(&password, credentials.hash()).await {
            metrics::counter!("keel_auth_logins_total", "outcome" => "refused").increment(1);
            return Err(unauthenticated(BAD_CREDENTIALS));
        }
        let session = SessionId::from_uuid(Uuid::new_v5(&SESSION_NAMESPACE, meta.command_id.as_bytes()));
        let refresh = RefreshToken::generate(session);
        let expires_at = now_secs() + self.tokens.session_ttl.as_secs() as i64;
        let start = SessionCommand::Start { id: session, user_id: user, refresh: refresh.hash(), expires_at };
        let accepted = match self.sessions.locate(session.as_uuid()).await {
            Location::Here => {
                let outcome = self.sessions.run(Command::new(session.as_uuid(), meta, "StartSession", start)).await?;
                if outcome.state.current() != Some(refresh.hash()) {
                    // A replayed login: its token was handed out the first time, not kept.
                    return Err(CommandError::Unavailable("this login was already done; log in again".into()).into());
                }
                outcome.accepted
            }
            Location::There(endpoint) => {
                let request = StartSessionRequest {
                    metadata: Some(metadata(&meta)),
                    session_id: session.to_string(),
                    user_id: user.to_string(),
                    refresh_token_hash: refresh.hash().to_hex(),
                    expires_at,
                };
                let mut client = AuthClient::new(self.peers.channel(&endpoint)?);
                let reply = client.start_session(forwarded(request)).await?.into_inner();
                if reply.replayed {
                    return Err(CommandError::Unavailable("this login was already done; log in again".into()).into());
                }
                accepted_of(&reply)?
            }
            Location::Nowhere(error) => return Err(error.into()),
        };
        metrics::counter!("keel_auth_logins_total", "outcome" => "accepted").increment(1);
        self.tokens(user, &refresh, expires_at, &accepted)
    }

    /// An access token for `user` in `refresh`'s session, and the refresh token.
    fn tokens(
        &self,
        user: UserId,
        refresh: &RefreshToken,
        expires_at: i64,
        accepted: &Accepted,
    ) -> Result<Tokens, Status> {
        let (kid, key) = self
            .keys
            .signer()
            .ok_or_else(|| Status::from(CommandError::Unavailable("no signing key is active; retry".into())))?;
        let now = now_secs();
        let access_ttl = self.tokens.access_ttl.as_secs() as i64;
        let claims = AccessClaims {
            iss: self.tokens.issuer.clone(),
            aud: self.tokens.audience.clone(),
            sub: user.as_uuid(),
            sid: refresh.session.as_uuid(),
            iat: now,
            nbf: now,
            exp: now + access_ttl,
            jti: Uuid::new_v4(),
        };
        Ok(Tokens {
            access_token: token::sign(&claims, &kid, &key),
            expires_in: access_ttl,
            refresh_token: refresh.encode(),
            refresh_expires_at: expires_at,
            user_id: user.to_string(),
            session_id: refresh.session.to_string(),
            position: accepted.position.as_ref().map(position),
        })
    }

    async fn refresh_here(&self, presented: RefreshToken, meta: CommandMeta) -> Result<Tokens, Status> {
        let current = self.sessions.read_here(presented.session.as_uuid()).await?.state;
        let (Some(user), Session::Active { expires_at, .. }) = (current.user_id(), &current) else {
            return Err(unauthenticated(match current.revoked() {
                Some(_) => "the session was revoked",
                None => "unknown refresh token",
            }));
        };
        let expires_at = *expires_at;
        if !self.is_active(user).await? {
            return Err(unauthenticated("the account is not active"));
        }
        let next = RefreshToken::generate(presented.session);
        let command = SessionCommand::Refresh { presented: presented.hash(), next: next.hash(), now: now_secs() };
        let refresh = Command::new(presented.session.as_uuid(), meta, "RefreshSession", command);
        let outcome = self.sessions.run(refresh).await?;
        if outcome.state.revoked() == Some(RevokeReason::TokenReuse) {
            metrics::counter!("keel_auth_refresh_reuse_total").increment(1);
            tracing::warn!(session = %presented.session, %user, "a retired refresh token was presented; the session is revoked");
            return Err(unauthenticated("refresh token reuse detected; the session is revoked"));
        }
        if outcome.state.current() != Some(next.hash()) {
            return Err(unauthenticated("this refresh token was already used"));
        }
        self.tokens(user, &next, expires_at, &outcome.accepted)
    }
}

#[tonic::async_trait]
impl Auth for AuthGrpc {
    async fn hash_password(&self, request: Request<HashPasswordRequest>) -> Result<Response<PasswordHash>, Status> {
        let message = request.into_inner();
        let email = Email::parse(&message.email).map_err(|error| invalid(error.to_string()))?;
        let password = Password::parse(&message.password, &email).map_err(|error| invalid(error.to_string()))?;
        let hash = self.hasher.hash(&password).await.map_err(|error| {
            tracing::error!(error = %format!("{error:#}"), "failed to hash a password");
            Status::from(CommandError::Internal)
        })?;
        Ok(Response::new(PasswordHash { phc: hash.as_str().to_owned() }))
    }

    #[tracing::instrument(skip_all, fields(command_id))]
    async fn set_password(&self, request: Request<SetPasswordRequest>) -> Result<Response<CommandReply>, Status> {
        let (forwarded_already, message, meta) = receive(request)?;
        let user_id = UserId::from_uuid(uuid("user_id", &message.user_id)?);
        let hash = keel_domain::auth::PasswordHash::parse(&message.password_hash)
            .map_err(|error| invalid(error.to_string()))?;
        let set =
            Command::new(user_id.as_uuid(), meta, "SetPassword", CredentialsCommand::SetPassword { user_id, hash });
        let local = || execute(&self.credentials, set);
        let remote = |channel| async move { AuthClient::new(channel).set_password(forwarded(message)).await };
        self.peers
            .route(&self.credentials, user_id.as_uuid(), forwarded_already, local, remote)
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(command_id))]
    async fn remove_password(&self, request: Request<RemovePasswordRequest>) -> Result<Response<CommandReply>, Status> {
        let (forwarded_already, message, meta) = receive(request)?;
        let user_id = UserId::from_uuid(uuid("user_id", &message.user_id)?);
        let remove = Command::new(user_id.as_uuid(), meta, "RemovePassword", CredentialsCommand::Remove);
        let local = || execute(&self.credentials, remove);
        let remote = |channel| async move { AuthClient::new(channel).remove_password(forwarded(message)).await };
        self.peers
            .route(&self.credentials, user_id.as_uuid(), forwarded_already, local, remote)
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(command_id))]
    async fn login(&self, request: Request<LoginRequest>) -> Result<Response<Tokens>, Status> {
        let (forwarded_already, message, meta) = receive(request)?;
        let Ok(email) = Email::parse(&message.email) else { return Err(unauthenticated(BAD_CREDENTIALS)) };
        let Some(user) = self.user_by_email(&email).await? else {
            // As slow as a wrong password, so that timing does not tell which emails exist.
            self.hasher.verify(&message.password, None).await;
            metrics::counter!("keel_auth_logins_total", "outcome" => "refused").increment(1);
            return Err(unauthenticated(BAD_CREDENTIALS));
        };
        let password = message.password.clone();
        let local = || self.login_here(user, password, meta);
        let remote = |channel| async move { AuthClient::new(channel).login(forwarded(message)).await };
        self.peers.route(&self.credentials, user.as_uuid(), forwarded_already, local, remote).await.map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(command_id))]
    async fn refresh(&self, request: Request<RefreshRequest>) -> Result<Response<Tokens>, Status> {
        let (forwarded_already, message, meta) = receive(request)?;
        let presented =
            RefreshToken::parse(&message.refresh_token).ok_or_else(|| unauthenticated("malformed refresh token"))?;
        let session = presented.session;
        let local = || self.refresh_here(presented, meta);
        let remote = |channel| async move { AuthClient::new(channel).refresh(forwarded(message)).await };
        self.peers.route(&self.sessions, session.as_uuid(), forwarded_already, local, remote).await.map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(command_id))]
    async fn logout(&self, request: Request<LogoutRequest>) -> Result<Response<CommandReply>, Status> {
        let (forwarded_already, message, meta) = receive(request)?;
        let session = SessionId::from_uuid(uuid("session_id", &message.session_id)?);
        let local = || async move {
            let revoke = SessionCommand::Revoke { reason: RevokeReason::Logout };
            execute(&self.sessions, Command::new(session.as_uuid(), meta, "Logout", revoke)).await
        };
        let remote = |channel| async move { AuthClient::new(channel).logout(forwarded(message)).await };
        self.peers.route(&self.sessions, session.as_uuid(), forwarded_already, local, remote).await.map(Response::new)
    }

    async fn get_jwks(&self, _request: Request<GetJwksRequest>) -> Result<Response<Jwks>, Status> {
        Ok(Response::new(Jwks { json: self.keys.jwks().to_string() }))
    }

    async fn start_session(&self, request: Request<StartSessionRequest>) -> Result<Response<CommandReply>, Status> {
        let (forwarded_already, message, meta) = receive(request)?;
        let session = SessionId::from_uuid(uuid("session_id", &message.session_id)?);
        let user_id = UserId::from_uuid(uuid("user_id", &message.user_id)?);
        let refresh = TokenHash::parse_hex(&message.refresh_token_hash).map_err(|error| invalid(error.to_string()))?;
        let start = SessionCommand::Start { id: session, user_id, refresh, expires_at: message.expires_at };
        let local = || execute(&self.sessions, Command::new(session.as_uuid(), meta, "StartSession", start));
        let remote = |channel| async move { AuthClient::new(channel).start_session(forwarded(message)).await };
        self.peers.route(&self.sessions, session.as_uuid(), forwarded_already, local, remote).await.map(Response::new)
    }
}

fn accepted_of(reply: &CommandReply) -> Result<Accepted, Status> {
    Ok(Accepted {
        aggregate_id: uuid("aggregate_id", &reply.aggregate_id)?,
        version: reply.version as u64,
        position: reply.position.as_ref().map(|position| keel_topics::Position {
            topic: position.topic.clone(),
            partition: position.partition,
            offset: position.offset,
        }),
        replayed: reply.replayed,
    })
}

fn read_model(error: sqlx::Error) -> Status {
    tracing::error!(%error, "failed to read the users read model");
    CommandError::Unavailable("cannot look up the account now; retry".into()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_tokens_round_trip_and_garbage_is_refused() {
        let token = RefreshToken::generate(SessionId::from_uuid(Uuid::now_v7()));
        let parsed = RefreshToken::parse(&token.encode()).unwrap();
        assert_eq!((parsed.session, parsed.hash()), (token.session, token.hash()));
        for garbage in ["", "x.y", "0192f5e0-0000-7000-8000-000000000000", "0192f5e000007000800000000000000.AAAA"] {
            assert!(RefreshToken::parse(garbage).is_none(), "{garbage:?}");
        }
    }
}
