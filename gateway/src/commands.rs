//! What every command route shares: the [`CommandRequest`] it extracts before its body, and the
//! response it gives.
//!
//! Command responses carry what a caller needs to go on without another read:
//! - `ETag: "<version>"`, the aggregate's version after the command, for the next `If-Match`;
//! - `Keel-Position: <topic>/<partition>/<offset>`, where the command's commit landed, when it
//!   appended one. It is a consistency token: a read model that has applied that offset of that
//!   partition reflects the command (see [`crate::consistency`]). A command that changed nothing
//!   has no position;
//! - `Idempotent-Replayed: true` when the request repeated an `Idempotency-Key` whose command
//!   had already been applied: the response is that first result, nothing was applied again.

use axum::{
    Json,
    extract::{FromRequestParts, MatchedPath, RawPathParams},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
};
use keel_proto::common::v1::{CommandMetadata, CommandReply, Position};
use serde::Serialize;
use uuid::Uuid;

use crate::{
    idempotency::{self, CommandScope, IDEMPOTENT_REPLAYED},
    precondition::{self, MalformedIfMatch},
    problem::Problem,
    security::Caller,
};

/// What a command route knows before it reads its body: who sends the command, the route and
/// the path's parameters, and from them and the headers the command's id (derived from
/// `Idempotency-Key`, scoped by the method, the route, the path and the caller), its envelope
/// metadata and its expected version (`If-Match`). Extract it before the body.
#[derive(Debug)]
pub(crate) struct CommandRequest {
    pub(crate) command_id: Uuid,
    /// The path's parameters, by name, in order.
    path: Vec<(String, String)>,
    metadata: CommandMetadata,
    if_match: Result<Option<i64>, MalformedIfMatch>,
}

impl<S: Send + Sync> FromRequestParts<S> for CommandRequest {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        let caller = parts.extensions.get::<Caller>().copied().ok_or_else(|| {
            tracing::error!("a command route is not behind the security pipeline");
            Problem::internal()
        })?;
        let route = parts.extensions.get::<MatchedPath>().map(|path| path.as_str().to_owned()).ok_or_else(|| {
            tracing::error!("a command route without a matched path");
            Problem::internal()
        })?;
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|_| Problem::bad_request("the path is not valid UTF-8"))?;
        let path: Vec<(String, String)> =
            params.iter().map(|(name, value)| (name.to_owned(), value.to_owned())).collect();
        // The command's target: the path's parameters (ids in their canonical form).
        let target = path
            .iter()
            .map(|(name, value)| if name == "id" { canonical(value) } else { value.clone() })
            .collect::<Vec<_>>()
            .join("/");
        let actor = caller.actor();
        let scope = CommandScope { method: parts.method.as_str(), route: &route, aggregate: &target, actor: &actor };
        let command_id = idempotency::command_id(&parts.headers, scope)?;
        let metadata = metadata(&parts.headers, command_id, &caller);
        Ok(Self { command_id, path, metadata, if_match: precondition::expected_version(&parts.headers) })
    }
}

impl CommandRequest {
    /// The command's envelope metadata.
    pub(crate) fn metadata(&self) -> Option<CommandMetadata> {
        Some(self.metadata.clone())
    }

    /// The version `If-Match` expects, for routes that honour it.
    pub(crate) fn expected_version(&self) -> Result<Option<i64>, Problem> {
        Ok(self.if_match?)
    }

    /// The path parameter `name`, as sent.
    pub(crate) fn param(&self, name: &str) -> Result<&str, Problem> {
        self.path.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str()).ok_or_else(|| {
            tracing::error!(name, "a command route reads a path parameter it does not have");
            Problem::internal()
        })
    }

    /// The path's `{id}`, the id of a `what`.
    pub(crate) fn id(&self, what: &str) -> Result<Uuid, Problem> {
        parse_id(self.param("id")?, what)
    }
}

/// An id in its canonical form (so that `ABC…` and `abc…` are one target); anything that is no
/// UUID as it is (the handler refuses it).
fn canonical(value: &str) -> String {
    Uuid::parse_str(value).map_or_else(|_| value.to_owned(), |id| id.to_string())
}

/// The consistency token of a command response.
pub(crate) const KEEL_POSITION: HeaderName = HeaderName::from_static("keel-position");

#[derive(Debug, Serialize)]
pub(crate) struct PositionBody {
    topic: String,
    partition: i32,
    offset: i64,
}

impl From<Position> for PositionBody {
    fn from(Position { topic, partition, offset }: Position) -> Self {
        Self { topic, partition, offset }
    }
}

/// The body of a command response.
#[derive(Debug, Serialize)]
struct CommandBody {
    id: String,
    version: i64,
    /// `null` when the command changed nothing.
    position: Option<PositionBody>,
}

/// The envelope metadata of a command sent by `caller`.
pub(crate) fn metadata(headers: &HeaderMap, command_id: Uuid, caller: &Caller) -> CommandMetadata {
    CommandMetadata {
        command_id: command_id.to_string(),
        actor: caller.actor(),
        correlation_id: correlation_id(headers).unwrap_or(command_id).to_string(),
        // The request's span: it continues the caller's trace, or began one.
        traceparent: keel_runtime::telemetry::traceparent_of(&tracing::Span::current()).unwrap_or_default(),
    }
}

/// A refused or failed call as a problem; the status itself, which may name internals, only goes
/// to the log.
pub(crate) fn rejected(command: &'static str, status: &tonic::Status) -> Problem {
    let problem = Problem::from_status(status);
    if problem.status >= 500 {
        tracing::warn!(command, code = ?status.code(), message = status.message(), "command failed");
    } else {
        tracing::info!(command, code = ?status.code(), message = status.message(), "command refused");
    }
    problem
}

/// The response to an applied (or replayed) command, with the headers the module documents.
pub(crate) fn command_response(status: StatusCode, reply: CommandReply) -> Response {
    let position_header = reply.position.as_ref().and_then(position_token);
    let body = CommandBody { id: reply.aggregate_id, version: reply.version, position: reply.position.map(Into::into) };
    let mut response = (status, Json(body)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::ETAG, precondition::entity_tag(reply.version));
    if let Some(position) = position_header {
        headers.insert(KEEL_POSITION, position);
    }
    if reply.replayed {
        headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    response
}

/// A `201 Created` command response with the new resource's `Location`.
pub(crate) fn created(location: String, reply: CommandReply) -> Result<Response, Problem> {
    let location = HeaderValue::try_from(location).map_err(|_| {
        tracing::error!("a command service returned an id that is no header value");
        Problem::internal()
    })?;
    let mut response = command_response(StatusCode::CREATED, reply);
    response.headers_mut().insert(header::LOCATION, location);
    Ok(response)
}

/// `<topic>/<partition>/<offset>`. Kafka topic names cannot contain `/`, so the token splits
/// unambiguously.
pub(crate) fn position_token(position: &Position) -> Option<HeaderValue> {
    HeaderValue::try_from(format!("{}/{}/{}", position.topic, position.partition, position.offset)).ok()
}

pub(crate) fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name)?.to_str().ok().map(str::to_owned)
}

fn correlation_id(headers: &HeaderMap) -> Option<Uuid> {
    header_text(headers, "x-correlation-id")?.parse().ok()
}

pub(crate) fn parse_id(id: &str, what: &str) -> Result<Uuid, Problem> {
    Uuid::parse_str(id).map_err(|_| Problem::bad_request(format!("the {what} id must be a UUID")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(position: Option<Position>, replayed: bool) -> CommandReply {
        CommandReply { aggregate_id: "0193a6c2-7f5e-7d43-9a1b-2c3d4e5f6a7b".into(), version: 4, position, replayed }
    }

    #[test]
    fn a_command_response_carries_version_position_and_replay() {
        let position = Position { topic: "identity.users".into(), partition: 3, offset: 17 };
        let response = command_response(StatusCode::OK, reply(Some(position), true));
        assert_eq!(response.headers()[header::ETAG], "\"4\"");
        assert_eq!(response.headers()[KEEL_POSITION], "identity.users/3/17");
        assert_eq!(response.headers()[IDEMPOTENT_REPLAYED], "true");
    }

    #[test]
    fn a_command_that_changed_nothing_has_no_position() {
        let response = command_response(StatusCode::OK, reply(None, false));
        assert_eq!(response.headers()[header::ETAG], "\"4\"");
        assert!(!response.headers().contains_key(KEEL_POSITION));
        assert!(!response.headers().contains_key(IDEMPOTENT_REPLAYED));
    }
}
