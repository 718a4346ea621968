//! `keel tail`: a live stream from the gateway in a terminal — the same subscription as
//! `GET /v1/streams/…`, printed for people (`pretty`) or tools (`json`, one event per line).
//!
//! It resumes by itself: after a dropped connection, a `lagged` cut-off or a gateway shutting
//! down it reconnects with `Last-Event-ID`, so it prints every event once, in each partition's
//! order. It stops at Ctrl-C, after `--limit` events, or when the gateway refuses it (a bad
//! stream, an expired token: 4xx).

use std::{
    io::{self, Write},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, anyhow};
use futures::StreamExt;
use keel_gateway::streams::sse::{SseEvent, SseParser};
use keel_runtime::lifecycle::cancel_on_signal;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::config::KeelConfig;

#[derive(Debug, clap::Args)]
pub struct TailArgs {
    /// The stream: users, sessions, roles, grants, posts, comments, or audit (every topic).
    stream: String,
    /// One aggregate of the stream.
    id: Option<String>,
    /// Only these event types (comma-separated or repeated): `--type PostPublished`.
    #[arg(long = "type", value_delimiter = ',')]
    types: Vec<String>,
    /// Where to start: latest (default), earliest, an RFC 3339 time, or a cursor (an event's id).
    #[arg(long)]
    from: Option<String>,
    /// The gateway's URL. Default: `gateway.listen` of the configuration.
    #[arg(long)]
    gateway: Option<String>,
    /// An access token (`POST /v1/auth/login`).
    #[arg(long, env = "KEEL_TOKEN", hide_env_values = true)]
    token: String,
    /// `pretty` for people, `json` for tools (JSON Lines: one event per line).
    #[arg(long, value_enum, default_value_t = Format::Pretty)]
    format: Format,
    /// Stop after this many events.
    #[arg(long)]
    limit: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Pretty,
    Json,
}

/// How one connection ended.
enum Ended {
    /// Ctrl-C or `--limit`.
    Done,
    /// The gateway closed the stream (with a final event) or the connection dropped: resume.
    Resume(String),
}

pub async fn run(args: TailArgs, config: &KeelConfig) -> anyhow::Result<ExitCode> {
    let gateway = args.gateway.clone().unwrap_or_else(|| format!("http://{}", config.gateway.listen));
    let mut url = reqwest::Url::parse(&gateway).context("--gateway must be a URL such as http://127.0.0.1:8080")?;
    url.path_segments_mut()
        .map_err(|()| anyhow!("--gateway must be a URL such as http://127.0.0.1:8080"))?
        .pop_if_empty()
        .extend(["v1", "streams", args.stream.as_str()])
        .extend(args.id.as_deref());
    {
        let mut query = url.query_pairs_mut();
        if let Some(from) = &args.from {
            query.append_pair("from", from);
        }
        if !args.types.is_empty() {
            query.append_pair("type", &args.types.join(","));
        }
    }
    let client = reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).build()?;
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    let mut tail = Tail { args: &args, parser: SseParser::default(), printed: 0, out: io::stdout().lock() };
    let mut backoff = Duration::ZERO;
    loop {
        let printed = tail.printed;
        let ended = tokio::select! {
            () = shutdown.cancelled() => return Ok(ExitCode::SUCCESS),
            ended = tail.connect(&client, &url) => ended?,
        };
        match ended {
            Ended::Done => return Ok(ExitCode::SUCCESS),
            Ended::Resume(reason) => {
                eprintln!("keel tail: {reason}; resuming");
                // A connection that delivered something resumes at once; one that did not, later
                // each time.
                backoff = if tail.printed > printed {
                    Duration::ZERO
                } else {
                    (backoff * 2).clamp(Duration::from_millis(250), Duration::from_secs(10))
                };
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(ExitCode::SUCCESS),
                    () = tokio::time::sleep(backoff) => {}
                }
            }
        }
    }
}

struct Tail<'a> {
    args: &'a TailArgs,
    parser: SseParser,
    printed: u64,
    out: io::StdoutLock<'static>,
}

impl Tail<'_> {
    /// One connection, from the last event printed. `Err` for a refusal that retrying cannot fix.
    async fn connect(&mut self, client: &reqwest::Client, url: &reqwest::Url) -> anyhow::Result<Ended> {
        // What a dropped connection left half-read is not part of the next one.
        self.parser = SseParser::resuming(self.parser.last_id.take());
        let mut request = client.get(url.clone()).bearer_auth(&self.args.token).header("accept", "text/event-stream");
        if let Some(id) = &self.parser.last_id {
            request = request.header("last-event-id", id);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => return Ok(Ended::Resume(format!("cannot reach the gateway ({error})"))),
        };
        let status = response.status();
        if !status.is_success() {
            let problem: Value = response.json().await.unwrap_or_default();
            let detail = problem["detail"].as_str().or(problem["title"].as_str()).unwrap_or("").to_owned();
            if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                return Ok(Ended::Resume(format!("the gateway answered {status} {detail}")));
            }
            return Err(anyhow!("the gateway refused the stream: {status} {detail}"));
        }
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(error) => return Ok(Ended::Resume(format!("the connection dropped ({error})"))),
            };
            for event in self.parser.push(&chunk) {
                if event.event != "message" {
                    let reason: Value = serde_json::from_str(&event.data).unwrap_or_default();
                    let reason = reason["reason"].as_str().unwrap_or(&event.event).to_owned();
                    return Ok(Ended::Resume(reason));
                }
                self.print(&event)?;
                self.printed += 1;
                if self.args.limit.is_some_and(|limit| self.printed >= limit) {
                    return Ok(Ended::Done);
                }
            }
        }
        Ok(Ended::Resume("the gateway closed the stream".into()))
    }

    fn print(&mut self, event: &SseEvent) -> anyhow::Result<()> {
        match self.args.format {
            Format::Json => writeln!(self.out, "{}", event.data)?,
            Format::Pretty => {
                let value: Value =
                    serde_json::from_str(&event.data).context("the gateway sent an event that is not JSON")?;
                writeln!(
                    self.out,
                    "{} {:<24} {} v{} by {}  {}/{}@{}\n    {}",
                    value["occurred_at"].as_str().unwrap_or("?"),
                    value["event_type"].as_str().unwrap_or("?"),
                    value["aggregate_id"].as_str().unwrap_or("?"),
                    value["aggregate_version"],
                    value["actor"].as_str().unwrap_or("?"),
                    value["topic"].as_str().unwrap_or("?"),
                    value["partition"],
                    value["offset"],
                    value["payload"],
                )?;
            }
        }
        self.out.flush()?;
        Ok(())
    }
}
