//! `keel bench commands`: how fast a running gateway accepts commands, next to the raw produce
//! rate of the same records on the same broker, measured in the same run.
//!
//! The platform must be running (`scripts/run`): the bench is an HTTP client of the gateway, and
//! every command goes the whole way (gateway → identity service → Kafka). What is measured:
//!
//! - `C` clients, sharing one connection pool, each `POST /v1/users` one new user at a time with
//!   an `Idempotency-Key`, sending the next once the last was answered `201`. A `503`, a `504` or
//!   a transport error is retried with the same key, so it costs latency, not a duplicate; the
//!   latency of a command runs from its first send to its `201`, retries included. Any other
//!   answer aborts the bench. A warm-up of min(500, N/10) commands comes first, not counted.
//! - The raw produce rate of N commits of the same size (same email, display name and actor
//!   lengths), with the producer settings the identity service uses, under a throwaway topic
//!   prefix (`bench-<id>.`): once as fast as the broker allows, once with at most `C` records in
//!   flight (like-for-like with the clients: each waits for its ack before sending the next).
//!
//! The registered users stay in the running installation (`bench-<id>-<n>@example.com`).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::Range,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use keel_topics::Topic;
use reqwest::StatusCode;
use serde::Serialize;
use tokio::task::JoinSet;

use super::{Rate, ScratchTopics};
use crate::config::KeelConfig;

/// The most warm-up commands, sent before measuring so connections and caches are warm.
const MAX_WARM_UP: u64 = 500;
/// The pause before a retry, as a polite client would make.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// How long a command is retried before the bench gives up on the platform.
const GIVE_UP_AFTER: Duration = Duration::from_secs(60);
/// Added to the gateway's own command deadline (`gateway.command_timeout_ms`, answered with a
/// 504) for the clients' request timeout, so the gateway's answer comes first.
const REQUEST_TIMEOUT_MARGIN: Duration = Duration::from_secs(5);
/// The actor the gateway records until callers authenticate, so raw records weigh what its do.
const GATEWAY_ACTOR: &str = "anonymous";

pub(super) async fn run(
    config: &KeelConfig,
    commands: u64,
    clients: usize,
    gateway: Option<String>,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(commands > 0, "--commands must be positive");
    anyhow::ensure!(clients > 0, "--clients must be positive");
    let base_url = match gateway {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => default_gateway_url(&config.gateway.listen),
    };
    let id = super::run_id();
    let warm_up = 0..(commands / 10).min(MAX_WARM_UP);
    let measured = warm_up.end..warm_up.end + commands;
    let request_timeout = Duration::from_millis(config.gateway.command_timeout_ms) + REQUEST_TIMEOUT_MARGIN;
    let gateway = Arc::new(Gateway::new(&base_url, &id, clients, request_timeout)?);
    gateway.check_ready().await?;

    eprintln!("warming up with {} commands", warm_up.end);
    gateway.drive(warm_up.clone(), clients).await.context("the warm-up failed")?;
    eprintln!("sending {commands} commands from {clients} clients");
    let (tally, elapsed) = gateway.drive(measured.clone(), clients).await?;
    let raw = raw_produce(config, &id, warm_up.clone(), measured, clients).await?;

    let mut latencies = tally.latencies;
    latencies.sort_unstable();
    let accepted = Rate { what: "POST /v1/users (201)".into(), count: commands, elapsed };
    println!(
        "commands: {commands} registrations through {base_url}, {clients} clients (after {} warm-up)",
        warm_up.end
    );
    for rate in [&accepted, &raw.unbounded, &raw.like_for_like] {
        rate.print();
    }
    println!("  {:<28} {:>10.2} ms", "latency p50", milliseconds(percentile(&latencies, 0.50)));
    println!("  {:<28} {:>10.2} ms", "latency p99", milliseconds(percentile(&latencies, 0.99)));
    println!("  {:<28} {:>10.2} ms", "latency max", milliseconds(percentile(&latencies, 1.0)));
    println!("  {:<28} {:>10}", "retries (503/504/transport)", tally.retries);
    println!("  {:<28} {:>10.0} bytes", "average record payload", raw.average_payload);
    println!("  {:<28} {:>10.2}", "commands / raw produce", accepted.per_second() / raw.unbounded.per_second());
    println!("  {:<28} {:>10.2}", "commands / like-for-like", accepted.per_second() / raw.like_for_like.per_second());
    println!("  (like-for-like: at most {clients} records in flight, one per client)");
    Ok(ExitCode::SUCCESS)
}

/// `http://<listen>`, with a wildcard listen address replaced by loopback of the same family.
pub(super) fn default_gateway_url(listen: &str) -> String {
    let authority = match listen.parse::<SocketAddr>() {
        Ok(address) if address.ip().is_unspecified() => {
            let loopback: IpAddr =
                if address.is_ipv4() { Ipv4Addr::LOCALHOST.into() } else { Ipv6Addr::LOCALHOST.into() };
            SocketAddr::new(loopback, address.port()).to_string()
        }
        _ => listen.to_owned(),
    };
    format!("http://{authority}")
}

/// The `quantile` (0 to 1) of sorted, non-empty latencies, by nearest rank.
pub(super) fn percentile(sorted: &[Duration], quantile: f64) -> Duration {
    let rank = (quantile * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(super) fn milliseconds(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1_000.0
}

#[derive(Debug, Serialize)]
struct RegisterBody {
    email: String,
    display_name: String,
    password: &'static str,
}

/// Every bench user's password (the cost of hashing it is part of a registration).
const BENCH_PASSWORD: &str = "bench password, long enough";

/// What the clients saw: one latency per command, and how many sends were retries.
#[derive(Debug, Default)]
struct Tally {
    latencies: Vec<Duration>,
    retries: u64,
}

/// The running gateway, as the bench's clients reach it.
struct Gateway {
    http: reqwest::Client,
    base_url: String,
    run_id: String,
}

impl Gateway {
    fn new(base_url: &str, run_id: &str, clients: usize, request_timeout: Duration) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(request_timeout)
            .pool_max_idle_per_host(clients)
            .build()
            .context("failed to create the HTTP client")?;
        Ok(Self { http, base_url: base_url.to_owned(), run_id: run_id.to_owned() })
    }

    /// Fails fast, with a hint, when nothing is running rather than retrying every command.
    async fn check_ready(&self) -> anyhow::Result<()> {
        let hint = "is the platform running (scripts/run)? Otherwise pass --gateway";
        let response = self
            .http
            .get(format!("{}/readyz", self.base_url))
            .send()
            .await
            .with_context(|| format!("the gateway at {} does not answer; {hint}", self.base_url))?;
        let status = response.status();
        anyhow::ensure!(status.is_success(), "the gateway at {} is not ready ({status}); {hint}", self.base_url);
        Ok(())
    }

    /// Registers users `numbers` from `clients` concurrent clients; the tally and the wall time.
    async fn drive(self: &Arc<Self>, numbers: Range<u64>, clients: usize) -> anyhow::Result<(Tally, Duration)> {
        let next = Arc::new(AtomicU64::new(numbers.start));
        let started = Instant::now();
        let mut workers = JoinSet::new();
        for _ in 0..clients {
            workers.spawn(Arc::clone(self).client(Arc::clone(&next), numbers.end));
        }
        let mut tally =
            Tally { latencies: Vec::with_capacity(numbers.end.saturating_sub(numbers.start) as usize), retries: 0 };
        // Returning early drops the set, which aborts the other clients.
        while let Some(joined) = workers.join_next().await {
            let client = joined.context("a bench client panicked")??;
            tally.latencies.extend(client.latencies);
            tally.retries += client.retries;
        }
        Ok((tally, started.elapsed()))
    }

    /// One client: takes the next number until `end`, one command at a time.
    async fn client(self: Arc<Self>, next: Arc<AtomicU64>, end: u64) -> anyhow::Result<Tally> {
        let mut tally = Tally::default();
        loop {
            let number = next.fetch_add(1, Ordering::Relaxed);
            if number >= end {
                return Ok(tally);
            }
            let (latency, retries) = self.register(number).await?;
            tally.latencies.push(latency);
            tally.retries += retries;
        }
    }

    /// Registers user `number` until the gateway answers 201; the latency and the retries.
    async fn register(&self, number: u64) -> anyhow::Result<(Duration, u64)> {
        let key = format!("bench-{}-{number}", self.run_id);
        let body = RegisterBody {
            email: format!("{key}@example.com"),
            display_name: format!("Bench user {number}"),
            password: BENCH_PASSWORD,
        };
        let url = format!("{}/v1/users", self.base_url);
        let started = Instant::now();
        let mut retries = 0;
        loop {
            let request = self.http.post(&url).header("Idempotency-Key", key.as_str()).json(&body);
            // The body is read in full in every case, so the connection goes back to the pool.
            let failure = match request.send().await {
                Ok(response) if response.status() == StatusCode::CREATED => match response.bytes().await {
                    Ok(_) => return Ok((started.elapsed(), retries)),
                    Err(error) => format!("{:#}", anyhow::Error::new(error)),
                },
                Ok(response)
                    if [StatusCode::SERVICE_UNAVAILABLE, StatusCode::GATEWAY_TIMEOUT].contains(&response.status()) =>
                {
                    let status = response.status();
                    let _ = response.bytes().await;
                    status.to_string()
                }
                Ok(response) => {
                    let status = response.status();
                    let text = response.text().await.unwrap_or_default();
                    anyhow::bail!("the gateway answered {status} to command {key} (expected 201): {text}");
                }
                Err(error) => format!("{:#}", anyhow::Error::new(error)),
            };
            anyhow::ensure!(
                started.elapsed() < GIVE_UP_AFTER,
                "command {key} still failed after {retries} retries in {GIVE_UP_AFTER:?}; last: {failure}"
            );
            retries += 1;
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
}

/// The raw produce rates of the commits the clients' commands append, and their payload size.
struct RawProduce {
    unbounded: Rate,
    like_for_like: Rate,
    average_payload: f64,
}

/// Produces the commits of `measured` twice (after those of `warm_up`, untimed): as fast as the
/// broker allows, then with at most `clients` in flight.
async fn raw_produce(
    config: &KeelConfig,
    id: &str,
    warm_up: Range<u64>,
    measured: Range<u64>,
    clients: usize,
) -> anyhow::Result<RawProduce> {
    let scratch = ScratchTopics::create(config, id).await.context("failed to set up the raw produce")?;
    let topic = scratch.names.name(Topic::IdentityUsers);
    // The gateway's email and display name, so the payloads are the size of the commands' commits.
    let email_prefix = format!("bench-{id}-");
    eprintln!("encoding {} commits", warm_up.end - warm_up.start + measured.end - measured.start);
    let warm_up_commits =
        super::encode_registrations(&scratch.codec, None, warm_up, &email_prefix, GATEWAY_ACTOR).await?;
    let commits = super::encode_registrations(&scratch.codec, None, measured, &email_prefix, GATEWAY_ACTOR).await?;
    let count = commits.len() as u64;
    let average_payload = commits.iter().map(|commit| commit.payload.len()).sum::<usize>() as f64 / count as f64;

    let producer = keel_topics::producer::Producer::commits(&scratch.kafka)?;
    eprintln!("producing");
    super::produce(&producer, &topic, &warm_up_commits, clients).await.context("the raw warm-up produce failed")?;
    let elapsed = super::produce(&producer, &topic, &commits, super::RAW_MAX_IN_FLIGHT).await?;
    let unbounded = Rate { what: "raw produce (idempotent)".into(), count, elapsed };
    let elapsed = super::produce(&producer, &topic, &commits, clients).await?;
    let like_for_like = Rate { what: "raw produce, like-for-like".into(), count, elapsed };
    Ok(RawProduce { unbounded, like_for_like, average_payload })
}
