//! The gRPC surface of the auth service.
//!
//! Login resolves the email to a user through the identity read model (`users`), then runs on
//! the owner of the user's credentials: the password is verified there (Argon2id, off the async
//! threads) and a session is started on the owner of the session's partition. A refresh runs on
//! the owner of its session, which trades the presented token for a new one in one command.

use std::{sync::Arc, time::SystemTime};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use keel_domain::{
    Aggregate,
    auth::{
        Credentials, CredentialsCommand, CredentialsError, Password, RevokeReason, Session, SessionCommand,
        SessionError, SessionId, TokenHash,
    },
    identity::{Email, UserId},
};
use keel_proto::{
    auth::v1::{
        GetJwksRequest, Jwks, LoginRequest, LogoutRequest, RefreshRequest, RemovePasswordRequest, SetPasswordRequest,
        StartSessionRequest, Tokens, auth_client::AuthClient, auth_server::Auth,
    },
    common::v1::CommandReply,
    token::{self, AccessClaims},
};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{CredentialStore, Sessions, SigningKeys, TokenSettings, passwords::Hasher};
use crate::{
    Accepted, CommandError, CommandMeta,
    engine::{Command, Engine, Location, Outcome},
    forward::{Peers, forwarded, is_forwarded},
    grpc::{command_meta, invalid, position, reply, uuid},
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
    CommandError::Unauthenticated(message.to_owned()).into()
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
    async fn run_session(
        &self,
        id: SessionId,
        meta: CommandMeta,
        name: &'static str,
        command: SessionCommand,
    ) -> Result<Outcome<Session>, Status> {
        let command = Command {
            aggregate_id: id.as_uuid(),
            expected_version: None,
            meta,
            name,
            decide: Box::new(move |session: &Session, _: &()| session.decide(command.clone()).map_err(session_error)),
        };
        Ok(self.sessions.run(command).await?)
    }

    /// The active user holding `email` in the identity read model.
    async fn user_by_email(&self, email: &Email) -> Result<Option<UserId>, Status> {
        let id: Option<Uuid> = sqlx::query_scalar(
            "SELECT id FROM users WHERE email = $1 AND status = 'active' ORDER BY updated_at DESC LIMIT 1",
        )
        .bind(email.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(read_model)?;
        Ok(id.map(UserId::from_uuid))
    }

    async fn is_active(&self, user: UserId) -> Result<bool, Status> {
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM users WHERE id = $1")
            .bind(user.as_uuid())
            .fetch_optional(&self.pool)
            .await
            .map_err(read_model)?;
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
                let outcome = self.run_session(session, meta, "StartSession", start).await?;
                if outcome.state.current() != Some(refresh.hash()) {
                    // A replayed login: its token was handed out the first time, not kept.
                    return Err(CommandError::Unavailable("this login was already done; log in again".into()).into());
                }
                outcome.accepted
            }
            Location::There(endpoint) => {
                let request = StartSessionRequest {
                    metadata: Some(keel_proto::common::v1::CommandMetadata {
                        command_id: meta.command_id.to_string(),
                        actor: meta.actor.clone(),
                        correlation_id: meta.correlation_id.to_string(),
                        traceparent: meta.traceparent.clone().unwrap_or_default(),
                    }),
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
        let outcome = self.run_session(presented.session, meta, "RefreshSession", command).await?;
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
    #[tracing::instrument(skip_all, fields(command_id))]
    async fn set_password(&self, request: Request<SetPasswordRequest>) -> Result<Response<CommandReply>, Status> {
        let forwarded_already = is_forwarded(&request);
        let message = request.into_inner();
        let meta = command_meta(message.metadata.clone())?;
        tracing::Span::current().record("command_id", tracing::field::display(meta.command_id));
        let user_id = UserId::from_uuid(uuid("user_id", &message.user_id)?);
        let email = Email::parse(&message.email).map_err(|error| invalid(error.to_string()))?;
        let password = Password::parse(&message.password, &email).map_err(|error| invalid(error.to_string()))?;
        let local = || async move {
            let hash = self.hasher.hash(&password).await.map_err(|error| {
                tracing::error!(error = %format!("{error:#}"), "failed to hash a password");
                Status::from(CommandError::Internal)
            })?;
            let command = Command {
                aggregate_id: user_id.as_uuid(),
                expected_version: None,
                meta,
                name: "SetPassword",
                decide: Box::new(move |credentials: &Credentials, _: &()| {
                    let command = CredentialsCommand::SetPassword { user_id, hash: hash.clone() };
                    credentials.decide(command).map_err(credentials_error)
                }),
            };
            Ok(reply(&self.credentials.run(command).await?.accepted))
        };
        let remote = |channel| async move { AuthClient::new(channel).set_password(forwarded(message)).await };
        self.peers
            .route(&self.credentials, user_id.as_uuid(), forwarded_already, local, remote)
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(command_id))]
    async fn remove_password(&self, request: Request<RemovePasswordRequest>) -> Result<Response<CommandReply>, Status> {
        let forwarded_already = is_forwarded(&request);
        let message = request.into_inner();
        let meta = command_meta(message.metadata.clone())?;
        tracing::Span::current().record("command_id", tracing::field::display(meta.command_id));
        let user_id = UserId::from_uuid(uuid("user_id", &message.user_id)?);
        let local = || async move {
            let command = Command {
                aggregate_id: user_id.as_uuid(),
                expected_version: None,
                meta,
                name: "RemovePassword",
                decide: Box::new(|credentials: &Credentials, _: &()| {
                    match credentials.decide(CredentialsCommand::Remove) {
                        // Nothing to remove is what was asked for.
                        Err(CredentialsError::NoPassword) => Ok(Vec::new()),
                        decided => decided.map_err(credentials_error),
                    }
                }),
            };
            Ok(reply(&self.credentials.run(command).await?.accepted))
        };
        let remote = |channel| async move { AuthClient::new(channel).remove_password(forwarded(message)).await };
        self.peers
            .route(&self.credentials, user_id.as_uuid(), forwarded_already, local, remote)
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(command_id))]
    async fn login(&self, request: Request<LoginRequest>) -> Result<Response<Tokens>, Status> {
        let forwarded_already = is_forwarded(&request);
        let message = request.into_inner();
        let meta = command_meta(message.metadata.clone())?;
        tracing::Span::current().record("command_id", tracing::field::display(meta.command_id));
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
        let forwarded_already = is_forwarded(&request);
        let message = request.into_inner();
        let meta = command_meta(message.metadata.clone())?;
        tracing::Span::current().record("command_id", tracing::field::display(meta.command_id));
        let presented =
            RefreshToken::parse(&message.refresh_token).ok_or_else(|| unauthenticated("malformed refresh token"))?;
        let session = presented.session;
        let local = || self.refresh_here(presented, meta);
        let remote = |channel| async move { AuthClient::new(channel).refresh(forwarded(message)).await };
        self.peers.route(&self.sessions, session.as_uuid(), forwarded_already, local, remote).await.map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(command_id))]
    async fn logout(&self, request: Request<LogoutRequest>) -> Result<Response<CommandReply>, Status> {
        let forwarded_already = is_forwarded(&request);
        let message = request.into_inner();
        let meta = command_meta(message.metadata.clone())?;
        tracing::Span::current().record("command_id", tracing::field::display(meta.command_id));
        let session = SessionId::from_uuid(uuid("session_id", &message.session_id)?);
        let local = || async move {
            let revoke = SessionCommand::Revoke { reason: RevokeReason::Logout };
            Ok(reply(&self.run_session(session, meta, "Logout", revoke).await?.accepted))
        };
        let remote = |channel| async move { AuthClient::new(channel).logout(forwarded(message)).await };
        self.peers.route(&self.sessions, session.as_uuid(), forwarded_already, local, remote).await.map(Response::new)
    }

    async fn get_jwks(&self, _request: Request<GetJwksRequest>) -> Result<Response<Jwks>, Status> {
        Ok(Response::new(Jwks { json: self.keys.jwks().to_string() }))
    }

    async fn start_session(&self, request: Request<StartSessionRequest>) -> Result<Response<CommandReply>, Status> {
        let forwarded_already = is_forwarded(&request);
        let message = request.into_inner();
        let meta = command_meta(message.metadata.clone())?;
        let session = SessionId::from_uuid(uuid("session_id", &message.session_id)?);
        let user_id = UserId::from_uuid(uuid("user_id", &message.user_id)?);
        let refresh = TokenHash::parse_hex(&message.refresh_token_hash).map_err(|error| invalid(error.to_string()))?;
        let start = SessionCommand::Start { id: session, user_id, refresh, expires_at: message.expires_at };
        let local =
            || async move { Ok(reply(&self.run_session(session, meta, "StartSession", start).await?.accepted)) };
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

fn session_error(error: SessionError) -> CommandError {
    match error {
        SessionError::NoSession => CommandError::NotFound(error.to_string()),
        SessionError::AlreadyStarted => CommandError::Rejected(error.to_string()),
        SessionError::Revoked | SessionError::Expired | SessionError::UnknownToken => {
            CommandError::Unauthenticated(error.to_string())
        }
    }
}

fn credentials_error(error: CredentialsError) -> CommandError {
    match error {
        CredentialsError::NoPassword => CommandError::NotFound(error.to_string()),
    }
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
