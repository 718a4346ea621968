//! Per-route spans and metrics, and the answer to a panic.

use std::{any::Any, time::Instant};

use axum::{
    extract::{MatchedPath, Request},
    middleware::Next,
    response::{IntoResponse, Response},
};
use keel_runtime::errors;
use tracing::Instrument;

use crate::problem::Problem;

/// Opens a span per request — continuing the trace of the request's W3C `traceparent`, or
/// starting one — and counts the request by route template, method and status. The response
/// names the trace in its own `traceparent`.
pub async fn record(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    // Probes and scrapes come every few seconds: they are counted, not traced.
    let probe = matches!(route.as_str(), "/livez" | "/readyz" | "/healthz" | "/metrics");
    let span = if probe { tracing::Span::none() } else { request_span(&method, &route) };
    keel_runtime::telemetry::continue_trace_from_headers(&span, request.headers());
    // This request's hub (see the router): a panic's report names the route too.
    sentry::configure_scope(|scope| scope.set_tag("route", &route));
    let mut response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    span.record("status", status.as_u16());
    span.record("http.response.status_code", i64::from(status.as_u16()));
    if let Some(value) = keel_runtime::telemetry::traceparent_of(&span).and_then(|value| value.parse().ok()) {
        response.headers_mut().insert("traceparent", value);
    }
    let labels = [("method", method.to_string()), ("route", route.clone()), ("status", status.as_u16().to_string())];
    metrics::counter!("keel_http_requests_total", &labels).increment(1);
    metrics::histogram!("keel_http_request_duration_seconds", &labels).record(started.elapsed().as_secs_f64());
    let code = status.as_u16().to_string();
    if status.is_server_error() {
        let message = format!("{method} {route} answered {code}");
        span.in_scope(|| {
            errors::system(&code, &message, &[("route", &route), ("method", method.as_str()), ("status", &code)], None);
        });
    } else if status.is_client_error() {
        errors::business(&code, &route);
    }
    response
}

/// The server span of a request (`PATCH /v1/users/{id}`).
fn request_span(method: &http::Method, route: &str) -> tracing::Span {
    tracing::info_span!(
        "http",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        method = %method,
        route = %route,
        status = tracing::field::Empty,
    )
}

/// A panic in a handler becomes a 500 problem; its message is logged, never sent.
pub fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    tracing::error!(panic = message, "handler panicked");
    metrics::counter!("keel_http_panics_total").increment(1);
    // Sent by the panic integration, with the request's scope; counted here.
    errors::count(errors::Class::System, "panic");
    Problem::internal().into_response()
}
