//! RFC 9457 problem details: the body of every error the gateway returns.

use axum::{
    Json,
    extract::{FromRequest, Request, rejection::JsonRejection},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use keel_proto::ErrorCode;
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

pub const CONTENT_TYPE: &str = "application/problem+json";

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
}

impl Problem {
    pub fn new(status: StatusCode, slug: &str, title: &'static str) -> Self {
        Self {
            kind: format!("urn:keel:problem:{slug}"),
            title,
            status: status.as_u16(),
            detail: None,
            extensions: serde_json::Map::new(),
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

    pub fn from_code(code: ErrorCode) -> Self {
        let status = StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let title = match code {
            ErrorCode::InvalidArgument => "Invalid request",
            ErrorCode::NotFound => "Not found",
            ErrorCode::Conflict => "Conflict",
            ErrorCode::Unauthenticated => "Unauthenticated",
            ErrorCode::PermissionDenied => "Forbidden",
            ErrorCode::ResourceExhausted => "Too many requests",
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

    /// A gRPC error of a command service, without its internal text unless it is client-facing.
    pub fn from_status(status: &tonic::Status) -> Self {
        let code = ErrorCode::from_grpc(status.code());
        let problem = Self::from_code(code);
        if code.is_client_facing() && !status.message().is_empty() { problem.detail(status.message()) } else { problem }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry_after = matches!(status, StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS);
        let mut response = (status, Json(self)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        if retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
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
