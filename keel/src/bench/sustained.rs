//! `keel bench sustained`: renames at a constant rate for minutes, through a running gateway,
//! to show that latency and memory stay flat (no queue that grows, no leak).
//!
//! The load is open-loop: a request leaves every `1 / rate` seconds whether or not earlier ones
//! were answered (at most [`MAX_OUTSTANDING`] at once; beyond that the bench says the platform
//! cannot keep up), so a platform that slows down shows it in latency instead of quietly getting
//! less work. Users are the bench's own, registered first; their access tokens are refreshed
//! before they expire. Each window (a minute by default) prints its throughput, errors and
//! latency p50/p99; the resident memory of every role is printed at the start and the end.

use std::{
    collections::BTreeMap,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use serde_json::json;
use tokio::{sync::Semaphore, time::Instant};

use super::commands::{milliseconds, percentile};

/// Requests in flight at most; a platform that needs more cannot keep the rate.
const MAX_OUTSTANDING: usize = 2_000;
/// A token this close to its expiry is refreshed before it is used.
const REFRESH_BEFORE: Duration = Duration::from_secs(60);
const PASSWORD: &str = "sustained bench password";

pub(super) struct Sustained {
    pub gateway: String,
    pub rate: f64,
    pub duration: Duration,
    /// The span each printed line covers.
    pub window: Duration,
    pub users: usize,
}

/// One user of the bench, with its current tokens.
struct User {
    id: String,
    access: String,
    refresh: String,
    expires: Instant,
}

/// One minute of answers.
#[derive(Default)]
struct Window {
    latencies: Vec<Duration>,
    errors: u64,
}

pub(super) async fn run(bench: Sustained) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        bench.rate > 0.0 && !bench.duration.is_zero() && !bench.window.is_zero() && bench.users > 0,
        "rate, duration, window and users must be positive"
    );
    let http = reqwest::Client::builder().pool_max_idle_per_host(MAX_OUTSTANDING).build()?;
    eprintln!("registering {} users", bench.users);
    let mut users = Vec::with_capacity(bench.users);
    for _ in 0..bench.users {
        users.push(Arc::new(tokio::sync::Mutex::new(sign_up(&http, &bench.gateway).await?)));
    }
    let memory_before = super::cpu::resident_memory();
    let windows: Arc<Mutex<BTreeMap<u64, Window>>> = Arc::default();
    let outstanding = Arc::new(Semaphore::new(MAX_OUTSTANDING));
    let started = Instant::now();
    let end = started + bench.duration;
    let window_of = move |at: Instant| (at - started).as_millis() as u64 / bench.window.as_millis().max(1) as u64;
    let windows_total = bench.duration.as_millis().div_ceil(bench.window.as_millis().max(1)) as u64;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / bench.rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0_u64;
    let mut overloaded = 0_u64;
    let mut reported = 0;
    println!(
        "{} renames/s for {} s through {}, a line per {} s",
        bench.rate,
        bench.duration.as_secs(),
        bench.gateway,
        bench.window.as_secs_f64()
    );
    println!("  window   sent/s    ok/s  errors   p50 ms   p99 ms");
    while Instant::now() < end {
        ticker.tick().await;
        let Ok(permit) = outstanding.clone().try_acquire_owned() else {
            overloaded += 1;
            continue;
        };
        let user = users[(sent as usize) % users.len()].clone();
        let (http, gateway, shared) = (http.clone(), bench.gateway.clone(), windows.clone());
        let minute = window_of(Instant::now());
        sent += 1;
        let name = format!("Sustained {sent}");
        tokio::spawn(async move {
            let sent_at = Instant::now();
            let ok = rename(&http, &gateway, &user, &name).await.is_ok();
            let mut windows = shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let window = windows.entry(minute).or_default();
            if ok {
                window.latencies.push(sent_at.elapsed());
            } else {
                window.errors += 1;
            }
            drop(permit);
        });
        // A window is reported once its answers are in (a second after it ended, at most).
        let done = window_of(Instant::now().checked_sub(Duration::from_secs(1)).unwrap_or(started));
        while reported < done {
            report(&windows, reported, bench.window);
            reported += 1;
        }
    }
    // The last answers.
    let _ = tokio::time::timeout(Duration::from_secs(30), outstanding.acquire_many(MAX_OUTSTANDING as u32)).await;
    while reported < windows_total {
        report(&windows, reported, bench.window);
        reported += 1;
    }
    let memory_after = super::cpu::resident_memory();
    println!("  not sent (over {MAX_OUTSTANDING} outstanding): {overloaded}");
    println!("  resident memory     start      end");
    for (role, before) in &memory_before {
        let after = memory_after.get(role).copied().unwrap_or_default();
        println!("  {role:<16} {:>6.1} MiB {:>6.1} MiB", *before as f64 / 1048576.0, after as f64 / 1048576.0);
    }
    Ok(ExitCode::SUCCESS)
}

fn report(windows: &Mutex<BTreeMap<u64, Window>>, index: u64, span: Duration) {
    let mut windows = windows.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let window = windows.remove(&index).unwrap_or_default();
    let mut latencies = window.latencies;
    latencies.sort_unstable();
    let (p50, p99) = if latencies.is_empty() {
        (0.0, 0.0)
    } else {
        (milliseconds(percentile(&latencies, 0.50)), milliseconds(percentile(&latencies, 0.99)))
    };
    let seconds = span.as_secs_f64();
    let ok = latencies.len() as f64 / seconds;
    let sent = (latencies.len() as u64 + window.errors) as f64 / seconds;
    println!("  {:>6} {sent:>8.0} {ok:>7.0} {:>7} {p50:>8.1} {p99:>8.1}", index + 1, window.errors);
}

async fn rename(
    http: &reqwest::Client,
    gateway: &str,
    user: &tokio::sync::Mutex<User>,
    name: &str,
) -> anyhow::Result<()> {
    let (id, token) = {
        let mut user = user.lock().await;
        if user.expires.saturating_duration_since(Instant::now()) < REFRESH_BEFORE {
            refresh(http, gateway, &mut user).await?;
        }
        (user.id.clone(), user.access.clone())
    };
    let response = http
        .patch(format!("{gateway}/v1/users/{id}"))
        .bearer_auth(token)
        .json(&json!({"display_name": name}))
        .send()
        .await?;
    anyhow::ensure!(response.status().is_success(), "answered {}", response.status());
    response.bytes().await?;
    Ok(())
}

async fn sign_up(http: &reqwest::Client, gateway: &str) -> anyhow::Result<User> {
    let email = format!("bench-sustained-{}@example.com", super::run_id());
    let registered = http
        .post(format!("{gateway}/v1/users"))
        .json(&json!({"email": email, "display_name": "Sustained", "password": PASSWORD}))
        .send()
        .await?;
    anyhow::ensure!(registered.status().is_success(), "registration was answered {}", registered.status());
    let position = registered.headers().get("keel-position").cloned().context("a registration has a position")?;
    let login = http
        .post(format!("{gateway}/v1/auth/login"))
        .header("keel-consistency", position)
        .json(&json!({"email": email, "password": PASSWORD}))
        .send()
        .await?;
    anyhow::ensure!(login.status().is_success(), "login was answered {}", login.status());
    let mut user = User { id: String::new(), access: String::new(), refresh: String::new(), expires: Instant::now() };
    take_tokens(&mut user, login.json().await?)?;
    Ok(user)
}

async fn refresh(http: &reqwest::Client, gateway: &str, user: &mut User) -> anyhow::Result<()> {
    let response =
        http.post(format!("{gateway}/v1/auth/refresh")).json(&json!({"refresh_token": user.refresh})).send().await?;
    anyhow::ensure!(response.status().is_success(), "refresh was answered {}", response.status());
    take_tokens(user, response.json().await?)
}

fn take_tokens(user: &mut User, body: serde_json::Value) -> anyhow::Result<()> {
    let field = |name: &str| body[name].as_str().map(str::to_owned).with_context(|| format!("no {name}"));
    if let Some(id) = body["user_id"].as_str() {
        user.id = id.to_owned();
    }
    user.access = field("access_token")?;
    user.refresh = field("refresh_token")?;
    let lifetime = body["expires_in"].as_u64().context("no expires_in")?;
    user.expires = Instant::now() + Duration::from_secs(lifetime);
    Ok(())
}
