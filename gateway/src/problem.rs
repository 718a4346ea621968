//! RFC 9457 problem details: the body of every error the gateway returns.

use axum::{
    Json,
    extract::{FromRequest, Request, rejection::JsonRejection},
    http::{HeaderName, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use keel_proto::ErrorCode;
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use crate::precondition::{self, MalformedIfMatch};

pub const CONTENT_TYPE: &str = "application/problem+json";

/// The status metadata in which a command service reports an aggregate's current version when it
/// refuses a command decided against another one (ABORTED).
pub const CURRENT_VERSION_METADATA: &str = "keel-current-version";

/// A problem details response. Only client-facing text goes in; causes are logged, not sent.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: &'static str,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(flatten, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extensions: serde_json::Map<String, Value>,
    /// Response headers besides the content type, e.g. the current `ETag` of a version conflict.
    #[serde(skip)]
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Problem {
    pub fn new(status: StatusCode, slug: &str, title: &'static str) -> Self {
        Self {
            kind: format!("urn:keel:problem:{slug}"),
            title,
            status: status.as_u16(),
            detail: None,
            extensions: serde_json::Map::new(),
            headers: Vec::new(),
        }
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extensions.insert(key.to_owned(), value.into());
        self
    }

    /// Adds a response header, e.g. the `ETag` a client needs to act on the problem.
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    pub fn from_code(code: ErrorCode) -> Self {
        let status = StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let title = match code {
            ErrorCode::InvalidArgument => "Invalid request",
            ErrorCode::NotFound => "Not found",
            ErrorCode::Conflict => "Conflict",
            ErrorCode::VersionConflict => "Version conflict",
            ErrorCode::Unauthenticated => "Unauthenticated",
            ErrorCode::PermissionDenied => "Forbidden",
            ErrorCode::RateLimited => "Too many requests",
            ErrorCode::Overloaded => "Overloaded",
            ErrorCode::Unavailable => "Service unavailable",
            ErrorCode::DeadlineExceeded => "Timed out",
            ErrorCode::Internal => "Internal error",
        };
        Self::new(status, code.slug(), title)
    }

    pub fn internal() -> Self {
        Self::from_code(ErrorCode::Internal)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::from_code(ErrorCode::NotFound).detail(detail)
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", "Bad request").detail(detail)
    }

    /// A gRPC error of a command service. The status message is passed on only for refusals
    /// whose text is written for the caller (a bad field, a missing or conflicting aggregate);
    /// the text of an outage, overload or timeout names internals (addresses, partitions) and is
    /// left to the logs. A version conflict carries the current version as `current_version`
    /// and as the `ETag` header, so the caller can decide again without another read.
    pub fn from_status(status: &tonic::Status) -> Self {
        let code = ErrorCode::from_grpc(status.code());
        let mut problem = Self::from_code(code);
        let written_for_the_caller = matches!(
            code,
            ErrorCode::InvalidArgument
                | ErrorCode::NotFound
                | ErrorCode::Conflict
                | ErrorCode::VersionConflict
                | ErrorCode::Unauthenticated
                | ErrorCode::PermissionDenied
        );
        if written_for_the_caller && !status.message().is_empty() {
            problem = problem.detail(status.message());
        }
        if code == ErrorCode::VersionConflict
            && let Some(current) = current_version(status)
        {
            problem = problem.with("current_version", current).header(header::ETAG, precondition::entity_tag(current));
        }
        problem
    }
}

impl From<MalformedIfMatch> for Problem {
    fn from(_: MalformedIfMatch) -> Self {
        Self::bad_request(MalformedIfMatch::DETAIL)
    }
}

impl IntoResponse for Problem {
    fn into_response(mut self) -> Response {
        // The request's trace, for the caller to quote when they report the problem.
        if let Some(trace_id) = keel_runtime::telemetry::trace_id_of(&tracing::Span::current()) {
            self.extensions.entry("trace_id").or_insert(trace_id.into());
        }
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry_after = matches!(status, StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS);
        let extra_headers = std::mem::take(&mut self.headers);
        let mut response = (status, Json(self)).into_response();
        let headers = response.headers_mut();
        for (name, value) in extra_headers {
            headers.insert(name, value);
        }
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        // A default for 503 and 429; never over the wait a refusal computed (a rate limit's).
        if retry_after && !headers.contains_key(header::RETRY_AFTER) {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body is never read, so the connection cannot carry another
            // request: say so, or a client may send its next request into a closing socket.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// The version a version-conflict status reports as current, if it reports one.
fn current_version(status: &tonic::Status) -> Option<i64> {
    let value = status.metadata().get(CURRENT_VERSION_METADATA)?.to_str().ok()?;
    value.trim().parse().ok().filter(|version: &i64| *version >= 0)
}

/// A JSON body whose every rejection is a problem: 400 malformed, 415 not JSON, 413 too large,
/// 422 well-formed but not the expected shape.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_problem(&rejection)),
        }
    }
}

fn json_problem(rejection: &JsonRejection) -> Problem {
    match rejection {
        JsonRejection::JsonDataError(error) => {
            Problem::from_code(ErrorCode::InvalidArgument).detail(source_text(error.body_text()))
        }
        JsonRejection::JsonSyntaxError(_) => Problem::bad_request("the body is not valid JSON"),
        JsonRejection::MissingJsonContentType(_) => {
            Problem::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type", "Unsupported media type")
                .detail("send `content-type: application/json`")
        }
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large", "Payload too large")
        }
        _ => Problem::bad_request("the body could not be read"),
    }
}

/// serde's message without axum's "Failed to deserialize the JSON body into the target type: "
/// prefix.
fn source_text(text: String) -> String {
    match text.split_once(": ") {
        Some((_, rest)) if text.starts_with("Failed to deserialize") => rest.to_owned(),
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use tonic::{Code, Status};

    use super::*;

    #[test]
    fn outages_and_overload_keep_their_text_to_themselves_and_ask_for_a_retry() {
        for (code, status) in [(Code::ResourceExhausted, 503), (Code::Unavailable, 503), (Code::Internal, 500)] {
            let problem = Problem::from_status(&Status::new(code, "partition 7 queue full at 10.0.0.3:50051"));
            assert_eq!(problem.status, status, "{code:?}");
            assert_eq!(problem.detail, None, "{code:?}");
            let response = problem.into_response();
            assert_eq!(response.headers().contains_key(header::RETRY_AFTER), status == 503, "{code:?}");
        }
        assert_eq!(Problem::from_status(&Status::resource_exhausted("")).kind, "urn:keel:problem:overloaded");
    }

    #[test]
    fn a_rate_limit_s_own_wait_is_not_replaced_by_the_default() {
        let limited = crate::security::too_many(crate::security::ratelimit::Limited {
            retry_after: std::time::Duration::from_millis(99_500),
        });
        assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(limited.headers()[header::RETRY_AFTER], "100");
        assert_eq!(limited.headers().get_all(header::RETRY_AFTER).iter().count(), 1);
    }

    #[test]
    fn refusals_keep_their_text() {
        let problem = Problem::from_status(&Status::already_exists("the email address is already registered"));
        assert_eq!(problem.status, 409);
        assert_eq!(problem.detail.as_deref(), Some("the email address is already registered"));
    }

    #[test]
    fn a_version_conflict_reports_the_current_version() {
        let mut status = Status::aborted("expected version 3");
        status.metadata_mut().insert(CURRENT_VERSION_METADATA, "5".parse().unwrap());
        let problem = Problem::from_status(&status);
        assert_eq!(problem.status, 409);
        assert_eq!(problem.kind, "urn:keel:problem:version-conflict");
        assert_eq!(problem.extensions["current_version"], 5);
        let response = problem.into_response();
        assert_eq!(response.headers()[header::ETAG], "\"5\"");
        assert_eq!(response.headers()[header::CONTENT_TYPE], CONTENT_TYPE);

        let without = Problem::from_status(&Status::aborted("stale"));
        assert_eq!(without.status, 409);
        assert!(!without.extensions.contains_key("current_version"));
    }
}
