//! One shutdown path: signal → cancellation token → bounded drain → abort the rest.

use std::{future::Future, time::Duration};

use anyhow::{Context, anyhow};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;

/// The named background tasks of a role and the token that stops them.
pub struct Lifecycle {
    shutdown: CancellationToken,
    tasks: JoinSet<(String, anyhow::Result<()>)>,
    grace: Duration,
}

impl Lifecycle {
    pub fn new(shutdown: CancellationToken, grace: Duration) -> Self {
        Self { shutdown, tasks: JoinSet::new(), grace }
    }

    pub fn token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Spawns a task that must return once the token is cancelled (after finishing its current
    /// unit of work). A task that ends early, with or without an error, stops the role.
    pub fn spawn<F>(&mut self, name: impl Into<String>, task: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let name = name.into();
        self.tasks.spawn(async move { (name, task.await) });
    }

    /// Serves `router` on `listener` until shutdown, then drains in-flight requests.
    pub fn serve_http(&mut self, name: &'static str, listener: TcpListener, router: axum::Router) {
        let token = self.shutdown.clone();
        self.spawn(name, async move {
            axum::serve(listener, router.into_make_service_with_connect_info::<std::net::SocketAddr>())
                .with_graceful_shutdown(token.cancelled_owned())
                .await
                .context("http server failed")
        });
    }

    /// Runs until a signal, a cancelled token or a failed task; then drains within the grace period.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let mut first_failure = None;
        tokio::select! {
            () = self.shutdown.cancelled() => {}
            Some(joined) = self.tasks.join_next() => {
                let requested = self.shutdown.is_cancelled();
                match describe(joined) {
                    Ok(()) if requested => {}
                    Ok(()) => first_failure = Some(anyhow!("a task stopped before shutdown was requested")),
                    Err(error) => first_failure = Some(error),
                }
                self.shutdown.cancel();
            }
        }
        tracing::info!(grace_ms = self.grace.as_millis() as u64, "shutting down");
        let drain = async {
            while let Some(joined) = self.tasks.join_next().await {
                if let Err(error) = describe(joined) {
                    tracing::error!(error = %error, "task failed during shutdown");
                }
            }
        };
        if tokio::time::timeout(self.grace, drain).await.is_err() {
            tracing::warn!(remaining = self.tasks.len(), "grace period over, aborting tasks");
            self.tasks.abort_all();
        }
        match first_failure {
            None => Ok(()),
            Some(error) => Err(error),
        }
    }
}

fn describe(joined: Result<(String, anyhow::Result<()>), tokio::task::JoinError>) -> anyhow::Result<()> {
    match joined {
        Ok((name, Ok(()))) => {
            tracing::debug!(task = %name, "task finished");
            Ok(())
        }
        Ok((name, Err(error))) => Err(error.context(format!("task `{name}` failed"))),
        Err(error) => Err(anyhow!("a task panicked or was aborted: {error}")),
    }
}

/// Cancels `token` on SIGTERM or SIGINT.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                return;
            }
        };
        tokio::select! {
            _ = terminate.recv() => tracing::info!(signal = "SIGTERM", "signal received"),
            _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "signal received"),
        }
        token.cancel();
    });
}
