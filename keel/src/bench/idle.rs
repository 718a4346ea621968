//! `keel bench idle`: what a running platform (`scripts/run`) costs while nobody uses it, and how
//! soon a lone command reaches the read model then.
//!
//! 1. For `--seconds`, the CPU time of every process of the platform ([`super::cpu`]): each role,
//!    the broker, PostgreSQL, Redis. Nothing is sent meanwhile.
//! 2. Then `--probes` renames of a user of its own, one a second (the platform idles between),
//!    each timed from the request to its answer, and from the request to the moment the users
//!    read model has applied its commit (its live version's checkpoint passed the command's
//!    position; heard through the projector's notifications, checked at once after each).

use std::{process::ExitCode, time::Duration};

use anyhow::Context;
use keel_runtime::postgres;
use serde_json::json;
use sqlx::{PgPool, postgres::PgListener};
use tokio::time::Instant;

use super::{
    commands::{milliseconds, percentile},
    cpu,
};
use crate::config::KeelConfig;

/// How long one probe may take to reach the read model before the bench gives up.
const VISIBLE_WITHIN: Duration = Duration::from_secs(30);

pub(super) async fn run(config: &KeelConfig, seconds: u64, probes: u32, gateway: &str) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(seconds > 0, "--seconds must be positive");
    let http = reqwest::Client::new();
    let ready = http.get(format!("{gateway}/readyz")).send().await;
    anyhow::ensure!(
        ready.as_ref().is_ok_and(|response| response.status().is_success()),
        "the gateway at {gateway} is not ready; start the platform with scripts/run"
    );
    let window = Duration::from_secs(seconds);
    eprintln!("measuring the idle platform for {seconds} s");
    let groups = cpu::measure(window).await;
    println!("idle platform over {seconds} s (CPU of its processes; 100% = one core)");
    cpu::print(&groups, window);
    if probes == 0 {
        return Ok(ExitCode::SUCCESS);
    }

    let (user, token) = sign_up(&http, gateway).await?;
    let listening = postgres::listen_pool(&config.database, "keel-bench")?;
    let pool = postgres::pool(&config.database, "keel-bench", crate::root::TOOL_CONNECTIONS)?;
    let mut listener = PgListener::connect_with(&listening).await.context("failed to listen for projection batches")?;
    listener.listen(keel_topics::APPLIED_CHANNEL).await?;
    let mut answered = Vec::new();
    let mut visible = Vec::new();
    for probe in 0..probes {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let sent = Instant::now();
        let response = http
            .patch(format!("{gateway}/v1/users/{user}"))
            .bearer_auth(&token)
            .json(&json!({"display_name": format!("Idle probe {probe}")}))
            .send()
            .await?;
        anyhow::ensure!(response.status().is_success(), "a probe was answered {}", response.status());
        answered.push(sent.elapsed());
        let position = response
            .headers()
            .get("keel-position")
            .and_then(|value| value.to_str().ok())
            .context("a rename carries its position")?
            .to_owned();
        let deadline = sent + VISIBLE_WITHIN;
        while !applied(&pool, &position).await? {
            tokio::time::timeout_at(deadline, listener.recv()).await.with_context(|| {
                format!("the users read model did not apply {position} within {VISIBLE_WITHIN:?}")
            })??;
        }
        visible.push(sent.elapsed());
    }
    answered.sort_unstable();
    visible.sort_unstable();
    println!("{probes} lone renames, one a second");
    for (what, latencies) in [("answered", &answered), ("in the users read model", &visible)] {
        println!(
            "  {what:<24} p50 {:>7.1} ms   p99 {:>7.1} ms",
            milliseconds(percentile(latencies, 0.50)),
            milliseconds(percentile(latencies, 0.99))
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Registers and signs in a user of the bench's own.
async fn sign_up(http: &reqwest::Client, gateway: &str) -> anyhow::Result<(String, String)> {
    let email = format!("bench-idle-{}@example.com", super::run_id());
    let password = "idle bench password 1";
    let registered = http
        .post(format!("{gateway}/v1/users"))
        .json(&json!({"email": email, "display_name": "Idle bench", "password": password}))
        .send()
        .await?;
    anyhow::ensure!(registered.status().is_success(), "registration was answered {}", registered.status());
    let position = registered.headers().get("keel-position").cloned();
    let mut login = http.post(format!("{gateway}/v1/auth/login")).json(&json!({"email": email, "password": password}));
    if let Some(position) = position {
        login = login.header("keel-consistency", position);
    }
    let login = login.send().await?;
    anyhow::ensure!(login.status().is_success(), "login was answered {}", login.status());
    let body: serde_json::Value = login.json().await?;
    let field = |name: &str| body[name].as_str().map(str::to_owned).with_context(|| format!("login has no {name}"));
    Ok((field("user_id")?, field("access_token")?))
}

/// Whether the live users read model has applied the commit at `position` (`topic/partition/offset`).
async fn applied(pool: &PgPool, position: &str) -> anyhow::Result<bool> {
    let mut parts = position.rsplitn(3, '/');
    let offset: i64 = parts.next().context("position offset")?.parse()?;
    let partition: i32 = parts.next().context("position partition")?.parse()?;
    let topic = parts.next().context("position topic")?;
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (
             SELECT 1 FROM projection_checkpoints checkpoint
             JOIN projections live ON live.name = checkpoint.projection AND live.live_version = checkpoint.projection_version
             WHERE checkpoint.projection = 'users' AND checkpoint.topic = $1 AND checkpoint.partition = $2
               AND checkpoint.next_offset > $3
         )",
    )
    .bind(topic)
    .bind(partition)
    .bind(offset)
    .fetch_one(pool)
    .await?)
}
