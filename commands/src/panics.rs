//! Panic recovery on a service's gRPC server: a call whose handler panics is answered INTERNAL
//! and counted (`keel_grpc_panics_total{service}`), and the instance goes on serving every other
//! call — as the gateway does for HTTP. Every call is counted too
//! (`keel_grpc_requests_total{service,kind}`, kind `call`, `health` or `reflection`), so an
//! operator sees which instances take traffic. Every call but health checks and reflection runs
//! in a server span that continues the caller's trace (W3C `traceparent` in the call's metadata),
//! with a Sentry hub of its own, and a call that ends in an error status is reported on the error
//! bus by its code's class.

use std::{
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures::FutureExt;
use keel_runtime::errors;
use sentry::SentryFutureExt;
use tonic::Status;
use tracing::Instrument;

/// The layer that puts [`CatchPanic`] around a gRPC server's routes.
#[derive(Debug, Clone, Copy)]
pub struct CatchPanicLayer {
    /// The service's name in the metric and the log.
    pub service: &'static str,
}

impl<S> tower::Layer<S> for CatchPanicLayer {
    type Service = CatchPanic<S>;

    fn layer(&self, inner: S) -> CatchPanic<S> {
        CatchPanic { inner, service: self.service }
    }
}

/// Answers INTERNAL for a call that panicked, making the call's future or while it ran.
#[derive(Debug, Clone)]
pub struct CatchPanic<S> {
    inner: S,
    service: &'static str,
}

type Answer<E> = Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for CatchPanic<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Answer<S::Error>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let service = self.service;
        let path = request.uri().path().to_owned();
        metrics::counter!("keel_grpc_requests_total", "service" => service, "kind" => kind(&path)).increment(1);
        let span = rpc_span(&path, request.headers());
        // A hub of the call's own: what its handler sets on the scope stays with its reports.
        let hub = Arc::new(sentry::Hub::new_from_top(sentry::Hub::current()));
        hub.configure_scope(|scope| scope.set_tag("rpc", path.trim_start_matches('/')));
        let call = sentry::Hub::run(hub.clone(), || {
            span.in_scope(|| std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(request))))
        });
        let answer = async move {
            let outcome = match call {
                Ok(future) => AssertUnwindSafe(future).catch_unwind().await,
                Err(panic) => Err(panic),
            };
            match outcome {
                Ok(answer) => {
                    if let Ok(response) = &answer {
                        classify(response, &path);
                    }
                    answer
                }
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|text| (*text).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    tracing::error!(service, rpc = %path, panic = %message, "a gRPC handler panicked; answered INTERNAL");
                    metrics::counter!("keel_grpc_panics_total", "service" => service).increment(1);
                    // Sent by the panic integration, with this call's scope; counted here.
                    errors::count(errors::Class::System, "panic");
                    Ok(Status::internal("internal error").into_http())
                }
            }
        };
        Box::pin(answer.instrument(span).bind_hub(hub))
    }
}

/// The server span of a call (`keel.identity.v1.IdentityCommands/UpdateProfile`), a child of the
/// caller's span when the metadata carries one; none for health checks and reflection, which
/// would fill traces with polls.
fn rpc_span(path: &str, headers: &http::HeaderMap) -> tracing::Span {
    if kind(path) != "call" {
        return tracing::Span::none();
    }
    let name = path.trim_start_matches('/');
    let (service, method) = name.split_once('/').unwrap_or((name, ""));
    let span = tracing::info_span!(
        "grpc",
        otel.name = name,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
    );
    keel_runtime::telemetry::continue_trace_from_headers(&span, headers);
    span
}

/// Reports a call that ended in an error status (a unary call's error is a trailers-only
/// response: its status is in the headers) on the error bus, by its code's class.
fn classify(response: &http::Response<tonic::body::Body>, path: &str) {
    let Some(status) = Status::from_header_map(response.headers()) else { return };
    if status.code() == tonic::Code::Ok {
        return;
    }
    let kind = format!("{:?}", status.code()).to_lowercase();
    let rpc = path.trim_start_matches('/');
    match errors::class_of_grpc(status.code() as i32) {
        errors::Class::Business => errors::business(&kind, rpc),
        errors::Class::System => {
            let message = format!("{rpc} answered {kind}: {}", status.message());
            errors::system(&kind, &message, &[("rpc", rpc)], None);
        }
    }
}

/// What a call is, by its path: a bounded label whatever paths clients send.
fn kind(path: &str) -> &'static str {
    if path.starts_with("/grpc.health.") {
        "health"
    } else if path.starts_with("/grpc.reflection.") {
        "reflection"
    } else {
        "call"
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tower::{Layer, Service, ServiceExt};

    use super::*;

    #[tokio::test]
    async fn a_panicking_call_is_internal_and_the_next_call_is_served() {
        let handler = tower::service_fn(|request: http::Request<()>| async move {
            if request.uri().path() == "/keel.test.v1.Test/Panic" {
                panic!("a bug");
            }
            Ok::<_, Infallible>(http::Response::new(tonic::body::Body::empty()))
        });
        let mut service = CatchPanicLayer { service: "test" }.layer(handler);
        let call = |path: &str| http::Request::builder().uri(path).body(()).unwrap();

        let panicked = service.ready().await.unwrap().call(call("/keel.test.v1.Test/Panic")).await.unwrap();
        let status = Status::from_header_map(panicked.headers()).expect("a gRPC status");
        assert_eq!(status.code(), tonic::Code::Internal);
        assert_eq!(status.message(), "internal error", "the panic's text stays in the log");

        let served = service.ready().await.unwrap().call(call("/keel.test.v1.Test/Fine")).await.unwrap();
        assert!(Status::from_header_map(served.headers()).is_none(), "the next call is served as usual");
    }
}
