//! Structured logs and traces through `tracing`, set up once per process.
//!
//! Logs go to stderr (pretty or JSON). Keel's own spans (targets `keel…`) are also OpenTelemetry
//! spans: they carry W3C trace context across every hop (HTTP, gRPC metadata, Kafka record
//! headers), and with `tracing.otlp_endpoint` set they are exported over OTLP/HTTP by a batch
//! processor with a bounded queue, flushed when the process ends.

use std::time::Duration;

use opentelemetry::{
    Context, KeyValue,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider},
};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, Layer, filter::filter_fn, fmt, prelude::*};

use crate::config::{LogConfig, LogFormat, TracingConfig};

const QUIET_AVRO_PARSER: &str = "apache_avro::schema::parser=error";

/// Ends the process's tracing: every span still queued is exported (within the export timeout).
#[must_use = "dropping the guard flushes the spans at once"]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(error) = self.provider.shutdown() {
            eprintln!("keel: flushing traces at exit failed: {error}");
        }
    }
}

/// Installs the global subscriber for `service` (the role, as traces name it). `KEEL_LOG` (an
/// `EnvFilter` directive) wins over the log filter. Calling it twice is harmless: the second
/// call keeps the first subscriber, which is what in-process tests that boot several roles want.
pub fn init(log: &LogConfig, tracing: &TracingConfig, service: &str) -> TelemetryGuard {
    let directive = std::env::var("KEEL_LOG")
        .ok()
        .filter(|directive| EnvFilter::try_new(directive).is_ok())
        .unwrap_or_else(|| log.filter.clone());
    let mut filter = EnvFilter::try_new(&directive).unwrap_or_else(|_| EnvFilter::new("info"));
    // apache-avro warns on every parse of a union with one branch, which a commit schema has until
    // its aggregate's second event type; nobody can act on it. A filter naming it keeps its say.
    if !directive.contains("apache_avro") {
        filter = filter.add_directive(QUIET_AVRO_PARSER.parse().expect("a valid directive"));
    }
    let provider = tracer_provider(tracing, service);
    // Only Keel's own spans become trace spans: libraries' spans (database, HTTP/2) would
    // multiply the cost per command without telling an operator more.
    let traces = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("keel"))
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_filter(filter_fn(|metadata| metadata.target().starts_with("keel")));
    // Keel's log lines become the breadcrumbs of the error reports made after them (reports
    // themselves go through `errors`, never from a log line).
    let breadcrumbs = sentry::integrations::tracing::BreadcrumbLayer::new().with_filter(filter_fn(|metadata| {
        metadata.target().starts_with("keel")
            && matches!(*metadata.level(), tracing::Level::ERROR | tracing::Level::WARN | tracing::Level::INFO)
    }));
    let registry = tracing_subscriber::registry().with(filter).with(traces).with(breadcrumbs);
    let result = match log.format {
        LogFormat::Json => registry
            .with(fmt::layer().json().flatten_event(true).with_current_span(true).with_span_list(false))
            .try_init(),
        LogFormat::Pretty => registry.with(fmt::layer().with_target(true)).try_init(),
    };
    // Already initialised (tests boot several roles in one process): keep the first one.
    drop(result);
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    TelemetryGuard { provider }
}

/// With an OTLP endpoint: spans sampled by `tracing.sample_ratio` at the root and as their parent
/// was below it, and sent there. Without one: no span is recorded (spans cost next to nothing),
/// but each still has its ids, so trace context is carried and returned all the same.
fn tracer_provider(config: &TracingConfig, service: &str) -> SdkTracerProvider {
    let resource = Resource::builder()
        .with_service_name(format!("keel-{service}"))
        .with_attributes([KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))])
        .build();
    let sampler = match config.otlp_endpoint {
        Some(_) => Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio))),
        None => Sampler::AlwaysOff,
    };
    let mut builder = SdkTracerProvider::builder().with_sampler(sampler).with_resource(resource);
    if let Some(endpoint) = &config.otlp_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
            .with_timeout(Duration::from_millis(config.export_timeout_ms))
            .build();
        match exporter {
            Ok(exporter) => {
                let batches = BatchConfigBuilder::default()
                    .with_max_queue_size(config.queue_size)
                    .with_scheduled_delay(Duration::from_millis(config.export_every_ms))
                    .build();
                builder = builder
                    .with_span_processor(BatchSpanProcessor::builder(exporter).with_batch_config(batches).build());
            }
            // A bad endpoint is refused by validation; what is left (no HTTP client) is logged.
            Err(error) => eprintln!("keel: traces are not exported: {error}"),
        }
    }
    builder.build()
}

/// Header maps (HTTP, gRPC metadata as `http` headers) as carriers of trace context.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// One `traceparent` value as a carrier.
struct Traceparent<'a>(&'a str);

impl Extractor for Traceparent<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

#[derive(Default)]
struct Written(Option<String>);

impl Injector for Written {
    fn set(&mut self, key: &str, value: String) {
        if key == "traceparent" {
            self.0 = Some(value);
        }
    }
}

/// The trace context a request's headers carry (W3C `traceparent` / `tracestate`), if any.
pub fn context_of_headers(headers: &http::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&Headers(headers))
}

/// The trace context a `traceparent` value names (empty when it is not a valid one).
pub fn context_of_traceparent(traceparent: &str) -> Context {
    TraceContextPropagator::new().extract(&Traceparent(traceparent))
}

/// Makes `span` a child of the context `headers` carry, if any (before it is first entered).
pub fn continue_trace_from_headers(span: &tracing::Span, headers: &http::HeaderMap) {
    let context = context_of_headers(headers);
    if context.span().span_context().is_valid() {
        let _ = span.set_parent(context);
    }
}

/// Makes `span` a child of `traceparent` (a value carried in a message or a header).
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(traceparent) = traceparent {
        let context = context_of_traceparent(traceparent);
        if context.span().span_context().is_valid() {
            let _ = span.set_parent(context);
        }
    }
}

/// `span`'s context as a W3C `traceparent`, to carry to the next hop; `None` when the span has
/// no trace (tracing is not set up in this process, or the span is disabled).
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut written = Written::default();
    TraceContextPropagator::new().inject_context(&context, &mut written);
    written.0
}

/// The trace id of `span` (32 hex digits), if it has one.
pub fn trace_id_of(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then(|| span_context.trace_id().to_string())
}

/// Links `span` to the context `traceparent` names: how a span that handles many messages at
/// once (a batch) points at each message's producer.
pub fn link(span: &tracing::Span, traceparent: &str) {
    let context = context_of_traceparent(traceparent);
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        span.add_link(span_context);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_an_endpoint_spans_record_nothing_but_carry_their_context() {
        let _telemetry = init(&LogConfig::default(), &TracingConfig::default(), "test");
        // A request continuing a caller's trace: the same trace, a span of its own, not sampled.
        let span = tracing::info_span!("request");
        continue_trace(&span, Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        let carried = traceparent_of(&span).expect("the span has a context");
        assert!(carried.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{carried}");
        assert!(!carried.contains("00f067aa0ba902b7") && carried.ends_with("-00"), "{carried}");
        // A request without one starts a trace all the same.
        let root = tracing::info_span!("root");
        let trace = trace_id_of(&root).expect("a new trace");
        assert_ne!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
        // Spans of other crates are not traces.
        let foreign = tracing::info_span!(target: "sqlx::query", "query");
        assert_eq!(traceparent_of(&foreign), None);
    }
}
