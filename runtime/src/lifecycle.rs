//! One shutdown path, in the platform's order: a signal (or a failed task) → not ready →
//! deregistered from service discovery, then a pause (the drain delay) while callers stop sending
//! → the HTTP servers stop accepting and drain → the gRPC servers → the workers → the stop hooks (pools
//! closed, producers flushed) → exit. Each phase is bounded by what is left of the grace period
//! and logged with its duration; what has not stopped when it runs out is aborted. A second
//! signal exits at once.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use anyhow::{Context, anyhow};
use tokio::{net::TcpListener, task::JoinSet, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{Health, ReadinessCheck};

/// What stops together, in the order they stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// HTTP servers: they stop accepting, then finish the requests in flight.
    Http,
    /// gRPC servers, likewise.
    Grpc,
    /// Everything else: writers (partitions released, snapshots written), feeds, caches,
    /// listeners; each finishes its current unit of work.
    Workers,
}

const PHASES: [Phase; 3] = [Phase::Http, Phase::Grpc, Phase::Workers];

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Grpc => "grpc",
            Self::Workers => "workers",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Http => 0,
            Self::Grpc => 1,
            Self::Workers => 2,
        }
    }
}

type Task = JoinSet<(String, anyhow::Result<()>)>;
type Hook = (String, Pin<Box<dyn Future<Output = ()> + Send>>);

/// The named background tasks of a role, by phase, and the tokens that stop them.
pub struct Lifecycle {
    /// Cancelled by a signal or a failed task: the role is draining (not ready).
    draining: CancellationToken,
    /// Per phase, the token that stops its tasks, and its tasks.
    phases: [(CancellationToken, Task); 3],
    hooks: Vec<Hook>,
    /// Run first on shutdown, while every server still serves (deregistration).
    drain_hooks: Vec<Hook>,
    /// After the drain hooks: how long callers get to notice before the servers stop accepting.
    drain_delay: Duration,
    grace: Duration,
    /// Checks every role adds to its own ([`Self::add_check`]).
    checks: Vec<Arc<dyn ReadinessCheck>>,
    /// The role's health, once it has made it ([`Self::make_health`]).
    health: Option<Health>,
}

impl Lifecycle {
    /// `draining` is the role's shutdown signal ([`cancel_on_signal`]).
    pub fn new(draining: CancellationToken, grace: Duration) -> Self {
        let phase = || (CancellationToken::new(), JoinSet::new());
        Self {
            draining,
            phases: [phase(), phase(), phase()],
            hooks: Vec::new(),
            drain_hooks: Vec::new(),
            drain_delay: Duration::ZERO,
            grace,
            checks: Vec::new(),
            health: None,
        }
    }

    /// How long the role keeps serving after it deregistered (within the grace period), so that
    /// callers that learn of it late still find it serving.
    pub fn set_drain_delay(&mut self, delay: Duration) {
        self.drain_delay = delay;
    }

    /// A readiness check for the role's health besides its own ([`Self::make_health`]).
    pub fn add_check(&mut self, check: Arc<dyn ReadinessCheck>) {
        self.checks.push(check);
    }

    /// The role's health: its `checks` and those added with [`Self::add_check`].
    pub fn make_health(&mut self, mut checks: Vec<Arc<dyn ReadinessCheck>>) -> Health {
        checks.extend(self.checks.iter().cloned());
        let health = Health::new(checks, self.draining());
        self.health = Some(health.clone());
        health
    }

    /// The role's health, if it has made it.
    pub fn health(&self) -> Option<Health> {
        self.health.clone()
    }

    /// Cancelled as soon as shutdown begins: readiness turns 503, streams end with their resume
    /// positions, gRPC health says NOT_SERVING.
    pub fn draining(&self) -> CancellationToken {
        self.draining.clone()
    }

    /// The token of a worker task ([`Self::spawn`]): cancelled in the workers phase, once the
    /// servers have drained.
    pub fn token(&self) -> CancellationToken {
        self.phase_token(Phase::Workers)
    }

    /// The token that stops the tasks of `phase`.
    pub fn phase_token(&self, phase: Phase) -> CancellationToken {
        self.phases[phase.index()].0.clone()
    }

    /// Spawns a worker: it must return once [`Self::token`] is cancelled (after finishing its
    /// current unit of work). A task that ends early, with or without an error, stops the role.
    pub fn spawn<F>(&mut self, name: impl Into<String>, task: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.spawn_in(Phase::Workers, name, task);
    }

    /// Spawns a task of `phase`: it must return once [`Self::phase_token`] of it is cancelled.
    pub fn spawn_in<F>(&mut self, phase: Phase, name: impl Into<String>, task: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let name = name.into();
        self.phases[phase.index()].1.spawn(async move { (name, task.await) });
    }

    /// Runs `hook` after every task has stopped (close a pool, flush a producer), in the order
    /// the hooks were added.
    pub fn on_stop<F>(&mut self, name: impl Into<String>, hook: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.hooks.push((name.into(), Box::pin(hook)));
    }

    /// Runs `hook` as soon as shutdown begins, before any server stops (deregister), in the order
    /// the hooks were added; the drain delay follows.
    pub fn on_drain<F>(&mut self, name: impl Into<String>, hook: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.drain_hooks.push((name.into(), Box::pin(hook)));
    }

    /// Serves `router` on `listener` until the HTTP phase, then drains in-flight requests.
    pub fn serve_http(&mut self, name: &'static str, listener: TcpListener, router: axum::Router) {
        let token = self.phase_token(Phase::Http);
        self.spawn_in(Phase::Http, name, async move {
            axum::serve(listener, router.into_make_service_with_connect_info::<std::net::SocketAddr>())
                .with_graceful_shutdown(token.cancelled_owned())
                .await
                .context("http server failed")
        });
    }

    /// Runs until a signal, a cancelled token or a failed task; then stops phase by phase
    /// within the grace period.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let first_failure = tokio::select! {
            () = self.draining.cancelled() => None,
            failure = first_ended(&mut self.phases) => {
                self.draining.cancel();
                failure
            }
        };
        let deadline = Instant::now() + self.grace;
        tracing::info!(grace_ms = self.grace.as_millis() as u64, "shutting down: not ready");
        let started = Instant::now();
        for (name, hook) in std::mem::take(&mut self.drain_hooks) {
            if tokio::time::timeout_at(deadline, hook).await.is_err() {
                tracing::warn!(hook = %name, "grace period over during a drain hook");
            }
        }
        tokio::time::sleep_until(deadline.min(Instant::now() + self.drain_delay)).await;
        tracing::info!(
            phase = "deregister",
            duration_ms = started.elapsed().as_millis() as u64,
            drain_delay_ms = self.drain_delay.as_millis() as u64,
            "shutdown phase done"
        );
        for phase in PHASES {
            let started = Instant::now();
            let (token, tasks) = &mut self.phases[phase.index()];
            token.cancel();
            let drain = async {
                while let Some(joined) = tasks.join_next().await {
                    if let Err(error) = describe(joined) {
                        tracing::error!(error = %error, "task failed during shutdown");
                    }
                }
            };
            let drained = tokio::time::timeout_at(deadline, drain).await.is_ok();
            if !drained {
                tracing::warn!(phase = phase.label(), remaining = tasks.len(), "grace period over, aborting tasks");
                self.phases.iter_mut().for_each(|(_, tasks)| tasks.abort_all());
            }
            tracing::info!(
                phase = phase.label(),
                duration_ms = started.elapsed().as_millis() as u64,
                drained,
                "shutdown phase done"
            );
        }
        let started = Instant::now();
        for (name, hook) in self.hooks {
            if tokio::time::timeout_at(deadline, hook).await.is_err() {
                tracing::warn!(hook = %name, "grace period over during a stop hook");
                break;
            }
        }
        tracing::info!(phase = "hooks", duration_ms = started.elapsed().as_millis() as u64, "shutdown phase done");
        match first_failure {
            None => Ok(()),
            Some(error) => Err(error),
        }
    }
}

/// Waits for the first task of any phase to end: before shutdown, that is a failure.
async fn first_ended(phases: &mut [(CancellationToken, Task); 3]) -> Option<anyhow::Error> {
    let [(_, http), (_, grpc), (_, workers)] = phases;
    let joined = tokio::select! {
        Some(joined) = http.join_next() => joined,
        Some(joined) = grpc.join_next() => joined,
        Some(joined) = workers.join_next() => joined,
        else => return Some(anyhow!("the role has no tasks")),
    };
    Some(match describe(joined) {
        Ok(()) => anyhow!("a task stopped before shutdown was requested"),
        Err(error) => error,
    })
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

/// Cancels `token` on SIGTERM or SIGINT; a second one exits at once.
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
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::warn!("a second signal: exiting without finishing the shutdown");
        std::process::exit(130);
    });
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    type Steps = Arc<Mutex<Vec<(&'static str, Duration)>>>;

    fn record(steps: &Steps, step: &'static str, started: Instant) {
        steps.lock().unwrap().push((step, started.elapsed()));
    }

    #[tokio::test(start_paused = true)]
    async fn drain_hooks_and_the_drain_delay_come_before_any_server_stops() {
        let draining = CancellationToken::new();
        let mut lifecycle = Lifecycle::new(draining.clone(), Duration::from_secs(10));
        lifecycle.set_drain_delay(Duration::from_millis(500));
        let steps = Steps::default();
        let started = Instant::now();
        let (http, stop_http) = (steps.clone(), lifecycle.phase_token(Phase::Http));
        lifecycle.spawn_in(Phase::Http, "server", async move {
            stop_http.cancelled().await;
            record(&http, "http", started);
            Ok(())
        });
        let (worker, stop_worker) = (steps.clone(), lifecycle.token());
        lifecycle.spawn("worker", async move {
            stop_worker.cancelled().await;
            record(&worker, "workers", started);
            Ok(())
        });
        let hook = steps.clone();
        lifecycle.on_drain("deregister", async move { record(&hook, "deregister", started) });
        let hook = steps.clone();
        lifecycle.on_stop("pool", async move { record(&hook, "hooks", started) });
        draining.cancel();
        lifecycle.run().await.unwrap();
        let steps = steps.lock().unwrap().clone();
        let names: Vec<&str> = steps.iter().map(|(name, _)| *name).collect();
        assert_eq!(names, ["deregister", "http", "workers", "hooks"]);
        assert!(steps[1].1 >= Duration::from_millis(500), "servers stop after the drain delay: {steps:?}");
    }
}
