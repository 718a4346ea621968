//! Registry errors and their Confluent wire form (`{"error_code": N, "message": "..."}`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::api::registry_json;

/// Everything a registry request can fail with.
///
/// Client errors carry Confluent's error codes; infrastructure failures are kept apart in
/// [`RegistryError::Internal`], whose text is logged and never sent to the client.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// 40401: the subject has no (live) versions.
    #[error("Subject '{0}' not found.")]
    SubjectNotFound(String),
    /// 40402: the subject exists but not at that version.
    #[error("Version {version} not found for subject '{subject}'.")]
    VersionNotFound {
        /// The subject looked up.
        subject: String,
        /// The version asked for, as given.
        version: String,
    },
    /// 40403: no such schema (by id, or not registered under the subject).
    #[error("{0}")]
    SchemaNotFound(String),
    /// 40405: a permanent delete of a subject that is not soft-deleted first.
    #[error("Subject '{0}' was not deleted first before being permanently deleted")]
    SubjectNotSoftDeleted(String),
    /// 40408: the subject has no subject-level compatibility configured.
    #[error("Subject '{0}' does not have subject-level compatibility configured")]
    SubjectConfigNotFound(String),
    /// 409: the schema breaks the subject's compatibility level.
    #[error("{0}")]
    Incompatible(String),
    /// 42201: the schema cannot be parsed, or is of an unsupported type.
    #[error("{0}")]
    InvalidSchema(String),
    /// 42202: the version is neither a positive 32-bit integer nor `latest`.
    #[error(
        "The specified version '{0}' is not a valid version id. Allowed values are between [1, 2^31-1] and the string \"latest\""
    )]
    InvalidVersion(String),
    /// 42203: not one of the seven compatibility levels.
    #[error(
        "Invalid compatibility level '{0}'. Valid values are NONE, BACKWARD, BACKWARD_TRANSITIVE, FORWARD, FORWARD_TRANSITIVE, FULL and FULL_TRANSITIVE"
    )]
    InvalidCompatibilityLevel(String),
    /// 400: the request body is not JSON, or a path or query parameter is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// 422: the body is JSON but not of the expected shape.
    #[error("{0}")]
    UnprocessableEntity(String),
    /// 404 for a route the registry does not serve.
    #[error("HTTP 404 Not Found")]
    RouteNotFound,
    /// 405 for a method a route does not serve.
    #[error("HTTP 405 Method Not Allowed")]
    MethodNotAllowed,
    /// 413: the request body exceeds the limit.
    #[error("request body too large")]
    PayloadTooLarge,
    /// 40407: a permanent delete of a version that is not soft-deleted first.
    #[error("Subject '{subject}' Version {version} was not deleted first before being permanently deleted")]
    VersionNotSoftDeleted {
        /// The subject.
        subject: String,
        /// The version that is still live.
        version: i32,
    },
    /// 50001: a storage (or other server-side) failure; details only go to the log.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl From<sqlx::Error> for RegistryError {
    fn from(error: sqlx::Error) -> Self {
        Self::Internal(Box::new(error))
    }
}

impl RegistryError {
    /// Confluent's error code; its first three digits are the HTTP status.
    pub fn error_code(&self) -> u32 {
        match self {
            Self::SubjectNotFound(_) => 40401,
            Self::VersionNotFound { .. } => 40402,
            Self::SchemaNotFound(_) => 40403,
            Self::SubjectNotSoftDeleted(_) => 40405,
            Self::VersionNotSoftDeleted { .. } => 40407,
            Self::SubjectConfigNotFound(_) => 40408,
            Self::Incompatible(_) => 409,
            Self::InvalidSchema(_) => 42201,
            Self::InvalidVersion(_) => 42202,
            Self::InvalidCompatibilityLevel(_) => 42203,
            Self::BadRequest(_) => 400,
            Self::UnprocessableEntity(_) => 422,
            Self::RouteNotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::PayloadTooLarge => 413,
            Self::Internal(_) => 50001,
        }
    }

    /// The HTTP status: the first three digits of the error code.
    pub fn status(&self) -> StatusCode {
        let code = self.error_code();
        let status = if code >= 1000 { code / 100 } else { code };
        u16::try_from(status)
            .ok()
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error_code: u32,
    message: &'a str,
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let message = match &self {
            Self::Internal(cause) => {
                tracing::error!(error = %cause, "registry storage failure");
                "internal error".to_owned()
            }
            other => other.to_string(),
        };
        registry_json(self.status(), &ErrorBody { error_code: self.error_code(), message: &message })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_the_first_three_digits_of_the_code() {
        assert_eq!(RegistryError::SubjectNotFound("s".into()).status(), StatusCode::NOT_FOUND);
        assert_eq!(RegistryError::Incompatible("x".into()).status(), StatusCode::CONFLICT);
        assert_eq!(RegistryError::InvalidCompatibilityLevel("x".into()).status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(RegistryError::from(sqlx::Error::PoolTimedOut).status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
