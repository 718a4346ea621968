use tonic::Code;

/// Keel's error classes. Services return them as gRPC codes; the gateway turns them into HTTP
/// statuses and problem+json types. One table, both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidArgument,
    NotFound,
    /// The domain refused the command against the current state (e.g. the email is taken).
    Conflict,
    /// The command was decided against a version that is no longer current (`If-Match`).
    VersionConflict,
    Unauthenticated,
    PermissionDenied,
    /// The caller sent too many requests (the gateway's own limits); retry later.
    RateLimited,
    /// A service's queues are full; retry later. Services send it as RESOURCE_EXHAUSTED.
    Overloaded,
    /// A dependency is down or the outcome is unknown; safe to retry with the same command id.
    Unavailable,
    DeadlineExceeded,
    Internal,
}

impl ErrorCode {
    pub const fn grpc_code(self) -> Code {
        match self {
            Self::InvalidArgument => Code::InvalidArgument,
            Self::NotFound => Code::NotFound,
            Self::Conflict => Code::AlreadyExists,
            Self::VersionConflict => Code::Aborted,
            Self::Unauthenticated => Code::Unauthenticated,
            Self::PermissionDenied => Code::PermissionDenied,
            Self::RateLimited | Self::Overloaded => Code::ResourceExhausted,
            Self::Unavailable => Code::Unavailable,
            Self::DeadlineExceeded => Code::DeadlineExceeded,
            Self::Internal => Code::Internal,
        }
    }

    pub const fn from_grpc(code: Code) -> Self {
        match code {
            Code::InvalidArgument | Code::OutOfRange => Self::InvalidArgument,
            Code::NotFound => Self::NotFound,
            Code::AlreadyExists | Code::FailedPrecondition => Self::Conflict,
            Code::Aborted => Self::VersionConflict,
            Code::Unauthenticated => Self::Unauthenticated,
            Code::PermissionDenied => Self::PermissionDenied,
            // Between services, RESOURCE_EXHAUSTED means a full queue, never a client's limit.
            Code::ResourceExhausted => Self::Overloaded,
            Code::Unavailable | Code::Cancelled => Self::Unavailable,
            Code::DeadlineExceeded => Self::DeadlineExceeded,
            Code::Ok | Code::Unknown | Code::Unimplemented | Code::Internal | Code::DataLoss => Self::Internal,
        }
    }

    pub const fn http_status(self) -> u16 {
        match self {
            Self::InvalidArgument => 422,
            Self::NotFound => 404,
            Self::Conflict | Self::VersionConflict => 409,
            Self::Unauthenticated => 401,
            Self::PermissionDenied => 403,
            Self::RateLimited => 429,
            Self::Overloaded | Self::Unavailable => 503,
            Self::DeadlineExceeded => 504,
            Self::Internal => 500,
        }
    }

    /// The problem+json `type` slug, stable for clients to match on.
    pub const fn slug(self) -> &'static str {
        match self {
            Self::InvalidArgument => "invalid-argument",
            Self::NotFound => "not-found",
            Self::Conflict => "conflict",
            Self::VersionConflict => "version-conflict",
            Self::Unauthenticated => "unauthenticated",
            Self::PermissionDenied => "permission-denied",
            Self::RateLimited => "rate-limited",
            Self::Overloaded => "overloaded",
            Self::Unavailable => "unavailable",
            Self::DeadlineExceeded => "deadline-exceeded",
            Self::Internal => "internal",
        }
    }

    /// Whether the cause may be shown to a client; internal causes never are.
    pub const fn is_client_facing(self) -> bool {
        !matches!(self, Self::Internal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_grpc() {
        for code in [
            ErrorCode::InvalidArgument,
            ErrorCode::NotFound,
            ErrorCode::Conflict,
            ErrorCode::VersionConflict,
            ErrorCode::Unauthenticated,
            ErrorCode::PermissionDenied,
            ErrorCode::Overloaded,
            ErrorCode::Unavailable,
            ErrorCode::DeadlineExceeded,
            ErrorCode::Internal,
        ] {
            assert_eq!(ErrorCode::from_grpc(code.grpc_code()), code);
        }
    }

    #[test]
    fn a_rate_limit_is_the_gateways_own_and_comes_back_as_overload_between_services() {
        assert_eq!(ErrorCode::RateLimited.http_status(), 429);
        assert_eq!(ErrorCode::from_grpc(ErrorCode::RateLimited.grpc_code()), ErrorCode::Overloaded);
        assert_eq!(ErrorCode::Overloaded.http_status(), 503);
    }
}
