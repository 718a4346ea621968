//! `keel bench streams`: N events fanned out to M SSE clients by a running gateway — delivery
//! latency and the gateway's memory.
//!
//! The platform must be running (`scripts/run`), and the token (`--token` / `KEEL_TOKEN`) must be
//! an account's that may draft posts and read whole streams (`streams:read:any`: an admin's).
//! What is measured:
//!
//! - M clients each open `GET /v1/streams/posts?type=PostDrafted` (from now), then W writers
//!   draft N posts through the gateway as fast as it accepts them. Every client reads as fast as
//!   it can and keeps the posts of this run only (their titles carry the run's id).
//! - Delivery latency: from the commit's `occurred_at` (stamped by the blog service before it
//!   appends) to the event's arrival at a client, for every event at every client: the whole
//!   path command service → Kafka → the gateway's hub → the client's buffer → HTTP. Clients and
//!   services share this machine's clock; on other machines, clock skew adds to it.
//! - Command latency, from a draft's first send to its `201` (the commit is in the log), for
//!   comparison: what delivery adds is roughly the difference.
//! - The gateway's resident memory (its `keel_process_resident_memory_bytes`) before the clients
//!   connect and once every event is delivered, with the streams still open.
//!
//! Drafts answered `429` (the per-user rate limit, 50/s by default) or `503` wait `Retry-After`
//! and go again with the same `Idempotency-Key` (a `503` may have landed), and are counted: raise
//! `gateway.rate_limit.per_user` to measure the fan-out rather than the limit. A client cut off
//! for falling behind (a final `lagged` event) is counted, not resumed; the drafted posts stay in
//! the installation.

use std::{
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use keel_gateway::streams::sse::SseParser;
use reqwest::StatusCode;
use serde_json::json;
use tokio::{sync::Barrier, task::JoinSet};

use super::{
    Rate,
    commands::{default_gateway_url, milliseconds, percentile},
};
use crate::config::KeelConfig;

/// How long a client waits for the next event before it gives up on the rest.
const SILENCE: Duration = Duration::from_secs(60);

pub(super) struct StreamsBench {
    pub events: u64,
    pub clients: usize,
    pub writers: usize,
    pub gateway: Option<String>,
    pub token: String,
}

/// What one client saw.
#[derive(Default)]
struct Received {
    latencies: Vec<Duration>,
    cut_off: bool,
}

pub(super) async fn run(config: &KeelConfig, bench: StreamsBench) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        bench.events > 0 && bench.clients > 0 && bench.writers > 0,
        "--events, --clients and --writers must be positive"
    );
    let base_url = match &bench.gateway {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => default_gateway_url(&config.gateway.listen),
    };
    let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).build()?;
    let memory = |http: reqwest::Client, url: String| async move {
        let text = http.get(format!("{url}/metrics")).send().await?.text().await?;
        text.lines()
            .find_map(|line| line.strip_prefix("keel_process_resident_memory_bytes ")?.trim().parse::<f64>().ok())
            .ok_or_else(|| anyhow!("the gateway reports no keel_process_resident_memory_bytes"))
    };
    let idle = memory(http.clone(), base_url.clone()).await.with_context(|| {
        format!("the gateway at {base_url} does not answer; is the platform running (scripts/run)?")
    })?;

    let run_id = super::run_id();
    let marker = format!("bench-{run_id}-");
    eprintln!("opening {} streams", bench.clients);
    let opened = Arc::new(Barrier::new(bench.clients + 1));
    let mut clients = JoinSet::new();
    for _ in 0..bench.clients {
        let response = http
            .get(format!("{base_url}/v1/streams/posts?type=PostDrafted"))
            .bearer_auth(&bench.token)
            .send()
            .await
            .context("failed to open a stream")?;
        if response.status() != StatusCode::OK {
            let status = response.status();
            anyhow::bail!("the gateway refused a stream: {status} {}", response.text().await.unwrap_or_default());
        }
        let (opened, marker, events) = (opened.clone(), marker.clone(), bench.events);
        clients.spawn(async move {
            opened.wait().await;
            receive(response, &marker, events).await
        });
    }
    opened.wait().await;

    eprintln!("drafting {} posts from {} writers", bench.events, bench.writers);
    let started = Instant::now();
    let throttled = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut commands = futures::stream::iter(0..bench.events)
        .map(|number| {
            let (http, base_url, token, throttled) = (&http, &base_url, &bench.token, throttled.clone());
            let title = format!("{marker}{number}");
            let body = json!({"title": title, "body": "Fanned out."});
            async move {
                let sent = Instant::now();
                loop {
                    let response = http
                        .post(format!("{base_url}/v1/posts"))
                        .bearer_auth(token)
                        .header("idempotency-key", &title)
                        .json(&body)
                        .send()
                        .await?;
                    let status = response.status();
                    // A rate limit or a busy service: wait as told, then the same draft again.
                    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
                        throttled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let wait =
                            response.headers().get("retry-after").and_then(|value| value.to_str().ok()?.parse().ok());
                        tokio::time::sleep(Duration::from_secs(wait.unwrap_or(1))).await;
                        continue;
                    }
                    anyhow::ensure!(
                        status == StatusCode::CREATED,
                        "drafting answered {status}: {}",
                        response.text().await?
                    );
                    return anyhow::Ok(sent.elapsed());
                }
            }
        })
        .buffer_unordered(bench.writers)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<Duration>>>()?;
    let written = Rate { what: "POST /v1/posts (201)".into(), count: bench.events, elapsed: started.elapsed() };

    let mut latencies = Vec::with_capacity((bench.events as usize) * bench.clients);
    let mut cut_off = 0;
    let mut results = Vec::new();
    while let Some(joined) = clients.join_next().await {
        results.push(joined.context("a bench client panicked")??);
    }
    let delivered_in = started.elapsed();
    let loaded = memory(http.clone(), base_url.clone()).await?;
    for received in results {
        cut_off += u64::from(received.cut_off);
        latencies.extend(received.latencies);
    }
    drop(clients);
    latencies.sort_unstable();
    commands.sort_unstable();
    anyhow::ensure!(!latencies.is_empty(), "no client received an event");
    let deliveries = Rate { what: "deliveries".into(), count: latencies.len() as u64, elapsed: delivered_in };
    let mib = |bytes: f64| bytes / 1024.0 / 1024.0;
    println!(
        "streams: {} events to {} SSE clients through {base_url} ({} writers)",
        bench.events, bench.clients, bench.writers
    );
    written.print();
    deliveries.print();
    println!("  {:<28} {:>10} of {}", "deliveries expected", latencies.len(), bench.events * bench.clients as u64);
    println!("  {:<28} {:>10}", "clients cut off (lagged)", cut_off);
    println!("  {:<28} {:>10}", "drafts throttled (429/503)", throttled.load(std::sync::atomic::Ordering::Relaxed));
    println!("  {:<28} {:>10.2} ms", "delivery latency p50", milliseconds(percentile(&latencies, 0.50)));
    println!("  {:<28} {:>10.2} ms", "delivery latency p99", milliseconds(percentile(&latencies, 0.99)));
    println!("  {:<28} {:>10.2} ms", "delivery latency max", milliseconds(percentile(&latencies, 1.0)));
    println!("  {:<28} {:>10.2} ms", "command latency p50", milliseconds(percentile(&commands, 0.50)));
    println!("  {:<28} {:>10.2} ms", "command latency p99", milliseconds(percentile(&commands, 0.99)));
    println!("  {:<28} {:>10.1} MiB", "gateway memory, idle", mib(idle));
    println!("  {:<28} {:>10.1} MiB", "gateway memory, streams open", mib(loaded));
    println!("  {:<28} {:>10.1} KiB", "  per stream", (loaded - idle) / bench.clients as f64 / 1024.0);
    Ok(ExitCode::SUCCESS)
}

/// What a client reads of an event (the rest is skipped, not parsed: the clients share the
/// machine with the platform).
#[derive(serde::Deserialize)]
struct Seen<'a> {
    occurred_at: DateTime<Utc>,
    #[serde(borrow)]
    payload: SeenPayload<'a>,
}

#[derive(serde::Deserialize)]
struct SeenPayload<'a> {
    #[serde(borrow, default)]
    title: Option<std::borrow::Cow<'a, str>>,
}

/// Reads one stream until it has `events` of this run's posts, is cut off, or goes silent.
async fn receive(response: reqwest::Response, marker: &str, events: u64) -> anyhow::Result<Received> {
    let mut received = Received::default();
    let mut parser = SseParser::default();
    let mut body = response.bytes_stream();
    while (received.latencies.len() as u64) < events {
        let Ok(Some(chunk)) = tokio::time::timeout(SILENCE, body.next()).await else { break };
        let arrived = Utc::now();
        for event in parser.push(&chunk.context("the stream broke")?) {
            if event.event == "lagged" {
                received.cut_off = true;
                return Ok(received);
            }
            let seen: Seen<'_> = serde_json::from_str(&event.data)?;
            if seen.payload.title.is_some_and(|title| title.starts_with(marker)) {
                received.latencies.push((arrived - seen.occurred_at).to_std().unwrap_or_default());
            }
        }
    }
    Ok(received)
}
