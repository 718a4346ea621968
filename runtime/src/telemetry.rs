//! Structured logs through `tracing`, set up once per process.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::{LogConfig, LogFormat};

const QUIET_AVRO_PARSER: &str = "apache_avro::schema::parser=error";

/// Installs the global subscriber. `KEEL_LOG` (an `EnvFilter` directive) wins over the config.
/// Calling it twice is harmless: the second call keeps the first subscriber, which is what
/// in-process tests that boot several roles want.
pub fn init(config: &LogConfig) {
    let directive = std::env::var("KEEL_LOG")
        .ok()
        .filter(|directive| EnvFilter::try_new(directive).is_ok())
        .unwrap_or_else(|| config.filter.clone());
    let mut filter = EnvFilter::try_new(&directive).unwrap_or_else(|_| EnvFilter::new("info"));
    // apache-avro warns on every parse of a union with one branch, which a commit schema has until
    // its aggregate's second event type; nobody can act on it. A filter naming it keeps its say.
    if !directive.contains("apache_avro") {
        filter = filter.add_directive(QUIET_AVRO_PARSER.parse().expect("a valid directive"));
    }
    let registry = tracing_subscriber::registry().with(filter);
    let result = match config.format {
        LogFormat::Json => registry
            .with(fmt::layer().json().flatten_event(true).with_current_span(true).with_span_list(false))
            .try_init(),
        LogFormat::Pretty => registry.with(fmt::layer().with_target(true)).try_init(),
    };
    // Already initialised (tests boot several roles in one process): keep the first one.
    drop(result);
}
