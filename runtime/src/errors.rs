//! The error bus: every error a role meets is classified once and reported here.
//!
//! - **Business** errors are refusals the caller can act on (a 4xx, a gRPC `INVALID_ARGUMENT`,
//!   `NOT_FOUND`, `ABORTED` …): logged at debug and counted, never sent anywhere.
//! - **System** errors are Keel's to fix (a 5xx, a dead letter, a writer that stopped, a panic):
//!   logged at error with their context, counted, and sent to Sentry when `errors.sentry_dsn` is
//!   set, tagged with the service, the kind, the trace id, the route or RPC, and the user's id
//!   (never their personal data).
//!
//! Both are counted in `keel_errors_total{service,class,kind}`; `kind` is from a bounded set
//! (a status, a gRPC code, `dead_letter`, `writer_stopped`, `panic` …).
//!
//! Panics anywhere reach Sentry through its panic integration; the catch layers around handlers
//! count them here. Each HTTP request and gRPC call runs with a Sentry hub of its own, so what
//! one sets on its scope (its user, its route) never leaks into another's report.

use std::{borrow::Cow, sync::OnceLock};

use crate::config::ErrorsConfig;

/// Which side of the line an error is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Business,
    System,
}

impl Class {
    fn label(self) -> &'static str {
        match self {
            Self::Business => "business",
            Self::System => "system",
        }
    }
}

static SERVICE: OnceLock<&'static str> = OnceLock::new();

/// Ends error reporting: reports still queued are sent (within two seconds).
#[must_use = "dropping the guard flushes the reports at once"]
pub struct ErrorsGuard(Option<sentry::ClientInitGuard>);

impl Drop for ErrorsGuard {
    fn drop(&mut self) {
        if let Some(guard) = self.0.take() {
            guard.flush(Some(std::time::Duration::from_secs(2)));
        }
    }
}

/// Sets the bus up for `service` (the role). With a DSN, reports go to Sentry: release (Keel's
/// version), environment, the service as a tag, the trace id of the span the report is made in,
/// and log lines of Keel's as breadcrumbs.
pub fn init(config: &ErrorsConfig, service: &'static str) -> ErrorsGuard {
    let _ = SERVICE.set(service);
    let Some(dsn) = &config.sentry_dsn else { return ErrorsGuard(None) };
    let mut options = sentry::ClientOptions::default();
    options.dsn = dsn.expose().parse().ok();
    options.release = Some(Cow::Borrowed(env!("CARGO_PKG_VERSION")));
    options.environment = Some(Cow::Owned(config.environment.clone()));
    // No IP addresses, cookies or request bodies: the user is named by id only.
    options.send_default_pii = false;
    options.before_send = Some(std::sync::Arc::new(move |mut event| {
        event.tags.insert("service".into(), service.into());
        if let Some(trace_id) = crate::telemetry::trace_id_of(&tracing::Span::current()) {
            event.tags.entry("trace_id".into()).or_insert(trace_id);
        }
        Some(event)
    }));
    ErrorsGuard(Some(sentry::init(options)))
}

fn service_name() -> &'static str {
    SERVICE.get().copied().unwrap_or("keel")
}

/// A business error: counted and logged at debug; never sent.
pub fn business(kind: &str, message: &str) {
    metrics::counter!("keel_errors_total", "service" => service_name(), "class" => Class::Business.label(), "kind" => kind.to_owned())
        .increment(1);
    tracing::debug!(kind, message, "refused");
}

/// A system error: counted, logged at error with `context`, and sent to Sentry with `context` as
/// tags (and `user` as the user's id).
pub fn system(kind: &str, message: &str, context: &[(&str, &str)], user: Option<&str>) {
    count(Class::System, kind);
    let fields: Vec<String> = context.iter().map(|(key, value)| format!("{key}={value}")).collect();
    tracing::error!(kind, message, context = %fields.join(" "), "system error");
    sentry::with_scope(
        |scope| {
            scope.set_tag("kind", kind);
            for (key, value) in context {
                scope.set_tag(key, value);
            }
            if let Some(user) = user {
                scope.set_user(Some(sentry::User { id: Some(user.to_owned()), ..Default::default() }));
            }
        },
        || sentry::capture_message(message, sentry::Level::Error),
    );
}

/// Counts an error reported elsewhere (a panic, which the panic integration sends).
pub fn count(class: Class, kind: &str) {
    metrics::counter!("keel_errors_total", "service" => service_name(), "class" => class.label(), "kind" => kind.to_owned())
        .increment(1);
}

/// The class of a gRPC status code: the codes a caller acts on are business.
pub fn class_of_grpc(code: i32) -> Class {
    // OK, INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED, FAILED_PRECONDITION,
    // ABORTED, OUT_OF_RANGE, UNAUTHENTICATED, RESOURCE_EXHAUSTED (a limit), CANCELLED (the caller).
    if matches!(code, 0 | 1 | 3 | 5 | 6 | 7 | 8 | 9 | 10 | 11 | 16) { Class::Business } else { Class::System }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_codes_a_caller_acts_on_are_business_and_the_rest_system() {
        // INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED, FAILED_PRECONDITION,
        // ABORTED, UNAUTHENTICATED, RESOURCE_EXHAUSTED.
        for code in [3, 5, 6, 7, 9, 10, 16, 8] {
            assert_eq!(class_of_grpc(code), Class::Business, "{code}");
        }
        // UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS.
        for code in [2, 4, 12, 13, 14, 15] {
            assert_eq!(class_of_grpc(code), Class::System, "{code}");
        }
    }
}
