//! Health and metrics: `/livez`, `/readyz`, `/healthz` and Prometheus `/metrics`.

use std::{sync::Arc, sync::OnceLock, time::Duration};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// One dependency a role needs before it can serve: its database, the broker, …
#[async_trait::async_trait]
pub trait ReadinessCheck: Send + Sync {
    fn name(&self) -> &'static str;
    /// `Err` carries a short, operator-facing reason.
    async fn check(&self) -> Result<(), String>;
    /// Whether the role cannot serve while this check fails. A failing check that is not
    /// critical (a backend only some routes need) shows as `degraded` and leaves the role ready.
    fn critical(&self) -> bool {
        true
    }
}

/// The readiness checks of a role and its shutdown state.
#[derive(Clone)]
pub struct Health {
    checks: Arc<Vec<Arc<dyn ReadinessCheck>>>,
    shutdown: CancellationToken,
    timeout: Duration,
}

impl Health {
    pub fn new(checks: Vec<Arc<dyn ReadinessCheck>>, shutdown: CancellationToken) -> Self {
        Self { checks: Arc::new(checks), shutdown, timeout: Duration::from_secs(2) }
    }

    /// Runs every check concurrently, each bounded by a timeout; each reports how long it took
    /// (`latency_ms`).
    pub async fn report(&self) -> (bool, serde_json::Value) {
        let results = futures::future::join_all(self.checks.iter().map(|check| async move {
            let started = std::time::Instant::now();
            let outcome = match tokio::time::timeout(self.timeout, check.check()).await {
                Ok(outcome) => outcome,
                Err(_) => Err(format!("timed out after {:?}", self.timeout)),
            };
            let latency_ms = (started.elapsed().as_secs_f64() * 10_000.0).round() / 10.0;
            (check.name(), check.critical(), outcome, latency_ms)
        }))
        .await;
        let mut ready = !self.shutdown.is_cancelled();
        let mut checks = serde_json::Map::new();
        for (name, critical, outcome, latency_ms) in results {
            let status = match outcome {
                Ok(()) => json!({"status": "up", "latency_ms": latency_ms}),
                Err(reason) if critical => {
                    ready = false;
                    json!({"status": "down", "reason": reason, "latency_ms": latency_ms})
                }
                Err(reason) => json!({"status": "degraded", "reason": reason, "latency_ms": latency_ms}),
            };
            checks.insert(name.to_owned(), status);
        }
        let status = if self.shutdown.is_cancelled() {
            "shutting_down"
        } else if ready {
            "ready"
        } else {
            "not_ready"
        };
        (ready, json!({"status": status, "checks": checks}))
    }
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .install_recorder()
                .expect("no other metrics recorder is installed in a keel process")
        })
        .clone()
}

/// Routes every role serves next to its own.
pub fn router(health: Health) -> Router {
    let metrics = metrics_handle();
    Router::new()
        .route("/livez", get(|| async { Json(json!({"status": "alive"})) }))
        .route("/readyz", get(readyz))
        .route("/healthz", get(readyz))
        .with_state(health)
        .route(
            "/metrics",
            get(move || {
                record_process_metrics();
                std::future::ready(metrics.render())
            }),
        )
}

/// The process's memory and open files, read from `/proc` when scraped (Linux; elsewhere the
/// gauges are absent).
fn record_process_metrics() {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return };
    let kib = |field: &str| {
        status.lines().find_map(|line| line.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse::<f64>().ok())
    };
    if let Some(resident) = kib("VmRSS:") {
        metrics::gauge!("keel_process_resident_memory_bytes").set(resident * 1024.0);
    }
    if let Some(peak) = kib("VmHWM:") {
        metrics::gauge!("keel_process_resident_memory_peak_bytes").set(peak * 1024.0);
    }
    if let Ok(files) = std::fs::read_dir("/proc/self/fd") {
        metrics::gauge!("keel_process_open_fds").set(files.count() as f64);
    }
}

async fn readyz(State(health): State<Health>) -> impl IntoResponse {
    let (ready, body) = health.report().await;
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body))
}
