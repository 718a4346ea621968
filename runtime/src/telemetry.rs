//! Structured logs through `tracing`, set up once per process.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. `KEEL_LOG` (an `EnvFilter` directive) wins over the config.
/// Calling it twice is harmless: the second call keeps the first subscriber, which is what
/// in-process tests that boot several roles want.
pub fn init(config: &LogConfig) {
    let filter = std::env::var("KEEL_LOG")
        .ok()
        .and_then(|directive| EnvFilter::try_new(directive).ok())
        .or_else(|| EnvFilter::try_new(&config.filter).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
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
