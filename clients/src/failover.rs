//! A client of one command service over every instance it knows.
//!
//! Any instance accepts any call and forwards it to the owner of the aggregate's partition.
//! While ownership moves (an instance stops, a partition is reassigned) an instance answers
//! UNAVAILABLE; so does a connection that fails. The client then sends the same request — the
//! same command id — to the next instance, backing off a little more each time, until the
//! budget is spent. A command id is applied at most once, so a retry of a command whose first
//! attempt did land returns that first result: HTTP callers see neither the move nor the retry.
//! Every other answer, success or refusal, is final and returned at once.

use std::{
    fmt,
    future::Future,
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use keel_topics::Topic;
use tokio::time::Instant;
use uuid::Uuid;

use tonic::{
    Code, Status,
    transport::{Channel, Endpoint},
};

/// The pause before the first retry; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Longer than this, and an instance that is down costs a large share of a command's budget
/// before the next one is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// One instance of a service.
#[derive(Debug, Clone)]
pub struct ServiceEndpoint {
    /// As registered: names the instance in logs, metrics and readiness.
    pub url: String,
    /// Connects on first use and reconnects after a failure.
    pub channel: Channel,
    /// When its connection last broke (milliseconds since the client was made, 0: never).
    broken_at: Arc<AtomicU64>,
}

/// After a broken connection, an instance is tried last for this long, so that an instance that
/// is down does not cost every other call a failed attempt and a pause.
const TRY_LAST_FOR: Duration = Duration::from_secs(2);

/// Where each partition's writer is: a call about one aggregate goes there first, so it is
/// decided without a forwarding hop. A hint only: a wrong answer costs a hop, never a wrong
/// outcome.
pub trait Placement: Send + Sync {
    /// The endpoint (as configured) of the instance that writes `aggregate`'s partition of
    /// `topic`, if known.
    fn endpoint_of(&self, topic: Topic, aggregate: Uuid) -> Option<String>;
}

/// A cheap-to-clone client of one service that fails over between its instances.
#[derive(Clone)]
pub struct ServiceClient {
    /// The service's name, in logs, metrics and readiness.
    pub service: &'static str,
    /// The instances as last listed (by the registry, or the configuration); replaced whole.
    endpoints: Arc<RwLock<Arc<[ServiceEndpoint]>>>,
    /// Where the next call starts, so calls spread over the instances.
    next: Arc<AtomicUsize>,
    /// How long one call may take, all attempts and pauses included.
    budget: Duration,
    /// The clock of `broken_at`.
    epoch: Instant,
    /// Where each partition's writer is, for calls about one aggregate.
    placement: Option<Arc<dyn Placement>>,
}

impl fmt::Debug for ServiceClient {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("ServiceClient")
            .field("service", &self.service)
            .field("endpoints", &self.endpoints)
            .field("budget", &self.budget)
            .field("placed", &self.placement.is_some())
            .finish()
    }
}

impl ServiceClient {
    /// A client of `service` with no instance yet ([`Self::set_endpoints`] lists them). A call
    /// made before then waits, within its budget, for one.
    pub fn new(service: &'static str, budget: Duration) -> Self {
        Self {
            service,
            endpoints: Arc::new(RwLock::new(Arc::from(Vec::new()))),
            next: Arc::new(AtomicUsize::new(0)),
            budget,
            epoch: Instant::now(),
            placement: None,
        }
    }

    /// Replaces the instances with those at `urls`. An instance listed before keeps its
    /// connection (and what the client knows of it); a new one is connected on first use, so a
    /// call may go to it at once. A URL that is not one is logged and left out.
    pub fn set_endpoints(&self, urls: &[String]) {
        let mut endpoints = self.endpoints.write().unwrap_or_else(PoisonError::into_inner);
        let fresh: Vec<ServiceEndpoint> = urls
            .iter()
            .filter_map(|url| {
                if let Some(known) = endpoints.iter().find(|endpoint| endpoint.url == *url) {
                    return Some(known.clone());
                }
                match connect(self.service, url, self.budget) {
                    Ok(channel) => {
                        Some(ServiceEndpoint { url: url.clone(), channel, broken_at: Arc::new(AtomicU64::new(0)) })
                    }
                    Err(error) => {
                        tracing::warn!(service = self.service, error = %format!("{error:#}"), "ignoring an instance");
                        None
                    }
                }
            })
            .collect();
        let urls = |list: &[ServiceEndpoint]| list.iter().map(|endpoint| endpoint.url.clone()).collect::<Vec<_>>();
        if urls(&endpoints) != urls(&fresh) {
            tracing::info!(service = self.service, endpoints = ?urls(&fresh), "instances changed");
            metrics::gauge!("keel_client_instances", "service" => self.service).set(fresh.len() as f64);
        }
        *endpoints = fresh.into();
    }

    /// Sends calls about one aggregate ([`Self::send_to`]) to its partition's writer first.
    pub fn with_placement(mut self, placement: Arc<dyn Placement>) -> Self {
        self.placement = Some(placement);
        self
    }

    /// Every instance, as last listed.
    pub fn endpoints(&self) -> Arc<[ServiceEndpoint]> {
        self.endpoints.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Sends `request` with `call` (which makes the typed client from a channel), failing over
    /// between instances. A call about the aggregate `route` names goes to the writer of the
    /// aggregate's partition first, so it is decided there without a forwarding hop.
    pub async fn send_to<Req, Call, Reply, Answer>(
        &self,
        rpc: &'static str,
        route: Option<(Topic, Uuid)>,
        request: Req,
        call: Call,
    ) -> Result<Answer, Status>
    where
        Req: Clone,
        Call: Fn(Channel, tonic::Request<Req>) -> Reply,
        Reply: Future<Output = Result<tonic::Response<Answer>, Status>>,
    {
        let owner = route.and_then(|(topic, aggregate)| self.placement.as_ref()?.endpoint_of(topic, aggregate));
        let endpoints = self.endpoints();
        let start = match owner.and_then(|owner| endpoints.iter().position(|endpoint| endpoint.url == owner)) {
            Some(index) => {
                metrics::counter!("keel_client_routed_calls_total", "service" => self.service).increment(1);
                index
            }
            None => self.start(&endpoints),
        };
        let attempt = |endpoint: &ServiceEndpoint, remaining: Duration| {
            let mut request = tonic::Request::new(request.clone());
            // The service stops working on an attempt the gateway no longer waits for.
            request.set_timeout(remaining);
            crate::carry_trace(&mut request);
            let reply = call(endpoint.channel.clone(), request);
            let (broken_at, now) = (endpoint.broken_at.clone(), self.millis());
            async move {
                let outcome = reply.await.map(tonic::Response::into_inner);
                if let Err(status) = &outcome
                    && broken_connection(status)
                {
                    broken_at.store(now.max(1), Ordering::Relaxed);
                }
                outcome
            }
        };
        let current = || self.endpoints();
        with_failover(self.service, rpc, current, start, self.budget, |endpoint| endpoint.url.as_str(), attempt).await
    }
}

/// Sends one request to the targets `current` lists (read again before each attempt, so an
/// instance that joins mid-call can take a retry), starting at `start` and moving on to the next
/// target after each retryable failure, until an answer is final or `budget` is spent. While no
/// target is listed, it waits as after a failure.
///
/// Out of budget while an attempt is in flight, the answer is DEADLINE_EXCEEDED; out of budget
/// between attempts, UNAVAILABLE (the outcome is unknown, whatever the last failure was).
async fn with_failover<Target, Reply, Attempt, Outcome>(
    service: &'static str,
    rpc: &'static str,
    current: impl Fn() -> Arc<[Target]>,
    start: usize,
    budget: Duration,
    name: impl Fn(&Target) -> &str,
    attempt: Attempt,
) -> Result<Reply, Status>
where
    Attempt: Fn(&Target, Duration) -> Outcome,
    Outcome: Future<Output = Result<Reply, Status>>,
{
    let deadline = Instant::now() + budget;
    let mut backoff = FIRST_BACKOFF;
    let mut index = start;
    loop {
        let targets = current();
        let status = match targets.get(index % targets.len().max(1)) {
            None => Status::unavailable(format!("no instance of {service} is known yet")),
            Some(target) => {
                let remaining = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(remaining, attempt(target, remaining)).await {
                    Ok(Ok(reply)) => return Ok(reply),
                    Ok(Err(status)) => status,
                    Err(_) => {
                        let endpoint = name(target);
                        tracing::warn!(service, rpc, endpoint, budget_ms = budget.as_millis(), "call timed out");
                        return Err(Status::deadline_exceeded("the service did not answer in time"));
                    }
                }
            }
        };
        let endpoint = targets.get(index % targets.len().max(1)).map_or("none", |target| name(target));
        if !is_retryable(&status) {
            return Err(status);
        }
        // A retry that could not even start before the deadline only delays the answer.
        if deadline.saturating_duration_since(Instant::now()) <= backoff {
            tracing::warn!(service, rpc, endpoint, code = ?status.code(), message = status.message(), "call failed and its budget is spent");
            // Whatever the last failure was, the outcome is unknown and a retry is safe.
            return Err(Status::unavailable("the service is unavailable; retry with the same command id"));
        }
        tracing::info!(
            service,
            rpc,
            endpoint,
            code = ?status.code(),
            message = status.message(),
            backoff_ms = backoff.as_millis(),
            "call failed, retrying on the next endpoint"
        );
        metrics::counter!(
            "keel_client_retries_total",
            "service" => service,
            "rpc" => rpc,
            "code" => code_label(status.code())
        )
        .increment(1);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
        index = index.wrapping_add(1);
    }
}

/// A channel to the instance at `url`, connected on first use (so a caller starts while the
/// instance is still down).
fn connect(service: &str, url: &str, budget: Duration) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("{service} endpoint {url} is not a valid URL"))?
        .connect_timeout(CONNECT_TIMEOUT.min(budget))
        // Pings find a connection to a vanished instance before a call waits its whole budget on
        // it.
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy())
}

impl ServiceClient {
    fn millis(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The next of `endpoints` in turn whose connection did not break lately, or the next in turn.
    fn start(&self, endpoints: &[ServiceEndpoint]) -> usize {
        let count = endpoints.len().max(1);
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let now = self.millis();
        let healthy = |index: &usize| {
            let broken_at = endpoints[*index].broken_at.load(Ordering::Relaxed);
            broken_at == 0 || now.saturating_sub(broken_at) > TRY_LAST_FOR.as_millis() as u64
        };
        (0..endpoints.len()).map(|offset| (first + offset) % count).find(healthy).unwrap_or(first % count)
    }
}

/// UNAVAILABLE is the service's word for "no owner right now, or outcome unknown: retry with the
/// same command id". A status made on this side from a broken connection (reset, refused stream,
/// an instance killed mid-request) is UNKNOWN or CANCELLED, or carries the transport error as its
/// source; the services never send those codes themselves. The outcome is just as unknown, and
/// the same command id makes the retry just as safe.
fn is_retryable(status: &Status) -> bool {
    status.code() == Code::Unavailable || broken_connection(status)
}

/// A failure of the connection rather than an answer of the service.
fn broken_connection(status: &Status) -> bool {
    matches!(status.code(), Code::Unknown | Code::Cancelled) || caused_by_transport(status)
}

fn caused_by_transport(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error.is::<tonic::transport::Error>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// A bounded label for a status code.
fn code_label(code: Code) -> &'static str {
    match code {
        Code::Unavailable => "unavailable",
        Code::Cancelled => "cancelled",
        Code::Internal => "internal",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Debug, Clone, Copy)]
    enum Answer {
        Reply(&'static str),
        Fail(Code),
        /// Never answers: the budget runs out while the attempt is in flight.
        Hang,
    }

    /// Scripted answers, taken in order (UNAVAILABLE once they run out); records where and when
    /// each attempt went.
    struct Script {
        answers: Mutex<Vec<Answer>>,
        attempts: Mutex<Vec<(usize, Instant)>>,
    }

    impl Script {
        fn new(answers: &[Answer]) -> Self {
            Self { answers: Mutex::new(answers.to_vec()), attempts: Mutex::new(Vec::new()) }
        }

        async fn run(&self, targets: usize, start: usize, budget: Duration) -> Result<&'static str, Code> {
            let targets: Arc<[usize]> = (0..targets).collect();
            with_failover(
                "test",
                "Test",
                || targets.clone(),
                start,
                budget,
                |_| "target",
                |target, _remaining| {
                    self.attempts.lock().unwrap().push((*target, Instant::now()));
                    let mut answers = self.answers.lock().unwrap();
                    let answer = if answers.is_empty() { Answer::Fail(Code::Unavailable) } else { answers.remove(0) };
                    async move {
                        match answer {
                            Answer::Reply(reply) => Ok(reply),
                            Answer::Fail(code) => Err(Status::new(code, "scripted")),
                            Answer::Hang => std::future::pending().await,
                        }
                    }
                },
            )
            .await
            .map_err(|status| status.code())
        }

        fn targets(&self) -> Vec<usize> {
            self.attempts.lock().unwrap().iter().map(|(target, _)| *target).collect()
        }

        fn pauses(&self) -> Vec<Duration> {
            let attempts = self.attempts.lock().unwrap();
            attempts.windows(2).map(|pair| pair[1].1 - pair[0].1).collect()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn unavailable_moves_on_to_the_next_endpoint_with_growing_pauses() {
        let script =
            Script::new(&[Answer::Fail(Code::Unavailable), Answer::Fail(Code::Unavailable), Answer::Reply("done")]);
        assert_eq!(script.run(3, 1, Duration::from_secs(10)).await, Ok("done"));
        assert_eq!(script.targets(), [1, 2, 0]);
        assert_eq!(script.pauses(), [Duration::from_millis(50), Duration::from_millis(100)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_broken_connection_is_retried_like_unavailable() {
        let script = Script::new(&[Answer::Fail(Code::Unknown), Answer::Fail(Code::Cancelled), Answer::Reply("done")]);
        assert_eq!(script.run(2, 0, Duration::from_secs(10)).await, Ok("done"));
        assert_eq!(script.targets(), [0, 1, 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_is_final() {
        for code in [Code::AlreadyExists, Code::Aborted, Code::NotFound, Code::ResourceExhausted, Code::Internal] {
            let script = Script::new(&[Answer::Fail(code)]);
            assert_eq!(script.run(2, 0, Duration::from_secs(10)).await, Err(code));
            assert_eq!(script.targets(), [0], "{code:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pauses_are_capped_and_a_spent_budget_is_unavailable() {
        let script = Script::new(&[]);
        let started = Instant::now();
        assert_eq!(script.run(2, 0, Duration::from_secs(4)).await, Err(Code::Unavailable));
        assert!(started.elapsed() < Duration::from_secs(4), "no pause that cannot be followed by an attempt");
        let pauses = script.pauses();
        assert_eq!(pauses, [50, 100, 200, 400, 800, 1000, 1000].map(Duration::from_millis));
        assert!(script.targets().windows(2).all(|pair| pair[0] != pair[1]), "alternates between endpoints");
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_in_flight_at_the_deadline_is_a_timeout() {
        let script = Script::new(&[Answer::Fail(Code::Unavailable), Answer::Hang]);
        let started = Instant::now();
        assert_eq!(script.run(2, 0, Duration::from_secs(3)).await, Err(Code::DeadlineExceeded));
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_secs(3) && elapsed < Duration::from_millis(3_010), "{elapsed:?}");
        assert_eq!(script.targets(), [0, 1]);
    }

    #[tokio::test]
    async fn an_instance_whose_connection_broke_is_tried_last_for_a_while() {
        let urls = ["http://127.0.0.1:1".to_owned(), "http://127.0.0.1:2".to_owned()];
        let client = ServiceClient::new("identity", Duration::from_secs(1));
        client.set_endpoints(&urls);
        let endpoints = client.endpoints();
        let start = || client.start(&endpoints);
        assert_eq!((start(), start()), (0, 1), "round robin");
        endpoints[0].broken_at.store(client.millis().max(1), Ordering::Relaxed);
        assert_eq!((start(), start(), start()), (1, 1, 1));
        endpoints[1].broken_at.store(client.millis().max(1), Ordering::Relaxed);
        assert_eq!((start(), start()), (1, 0), "all broken: round robin again");
    }

    #[tokio::test]
    async fn a_new_list_keeps_what_is_known_of_the_instances_it_still_has() {
        let client = ServiceClient::new("identity", Duration::from_secs(1));
        assert!(client.endpoints().is_empty());
        client.set_endpoints(&["http://127.0.0.1:1".to_owned(), "http://127.0.0.1:2".to_owned()]);
        client.endpoints()[1].broken_at.store(7, Ordering::Relaxed);
        client.set_endpoints(&[
            "http://127.0.0.1:2".to_owned(),
            "not a url".to_owned(),
            "http://127.0.0.1:3".to_owned(),
        ]);
        let endpoints = client.endpoints();
        let urls: Vec<&str> = endpoints.iter().map(|endpoint| endpoint.url.as_str()).collect();
        assert_eq!(urls, ["http://127.0.0.1:2", "http://127.0.0.1:3"], "an invalid URL is left out");
        assert_eq!(endpoints[0].broken_at.load(Ordering::Relaxed), 7, "the same instance, not a new connection");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_waits_for_an_instance_to_be_listed() {
        let listed: Mutex<Arc<[usize]>> = Mutex::new(Arc::from(Vec::new()));
        let attempts = Mutex::new(0);
        let outcome = with_failover(
            "test",
            "Test",
            || {
                let mut listed = listed.lock().unwrap();
                *attempts.lock().unwrap() += 1;
                // Listed from the third look on.
                if *attempts.lock().unwrap() == 3 {
                    *listed = Arc::from(vec![5]);
                }
                listed.clone()
            },
            0,
            Duration::from_secs(10),
            |_| "target",
            |target, _| {
                let target = *target;
                async move { Ok::<_, Status>(target) }
            },
        )
        .await;
        assert_eq!(outcome.unwrap(), 5);
        assert_eq!(*attempts.lock().unwrap(), 3);
        let nothing: Arc<[usize]> = Arc::from(Vec::new());
        let outcome = with_failover(
            "test",
            "Test",
            || nothing.clone(),
            0,
            Duration::from_secs(1),
            |_| "t",
            |_, _| async { Ok::<_, Status>(()) },
        )
        .await;
        assert_eq!(outcome.unwrap_err().code(), Code::Unavailable, "no instance within the budget");
    }

    #[test]
    fn only_unavailable_or_a_broken_connection_is_retried() {
        assert!(is_retryable(&Status::unavailable("no owner")));
        assert!(is_retryable(&Status::unknown("transport error")));
        assert!(!is_retryable(&Status::internal("a bug in the service")));
        assert!(!is_retryable(&Status::not_found("no such user")));
        assert!(!is_retryable(&Status::aborted("stale")));
        assert!(!is_retryable(&Status::resource_exhausted("queue full")));
    }
}
