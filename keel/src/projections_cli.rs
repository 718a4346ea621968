//! `keel projections …`: status, zero-downtime rebuilds, resuming, dead letters.

use std::{process::ExitCode, time::Duration};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use keel_projections::{
    Projector, dead_letters,
    rebuild::{self, Outcome, StartFrom},
};
use keel_runtime::{lifecycle::cancel_on_signal, postgres};
use tokio_util::sync::CancellationToken;

use crate::config::KeelConfig;

#[derive(Debug, Args)]
pub struct ProjectionsArgs {
    #[command(subcommand)]
    command: ProjectionsCommand,
}

#[derive(Debug, Subcommand)]
enum ProjectionsCommand {
    /// Versions, lag per partition, last error and whether a rebuild is needed (JSON).
    Status,
    /// Build a new version into shadow tables while the live one serves, then swap atomically.
    /// Interrupted rebuilds resume where they stopped when run again.
    Rebuild {
        /// `users`, `audit`, …
        name: String,
        /// Apply only records at or after this offset of every partition (earlier records still
        /// feed the validation state).
        #[arg(long, conflicts_with = "from_time")]
        from_offset: Option<i64>,
        /// Apply only records at or after this time (RFC 3339).
        #[arg(long)]
        from_time: Option<DateTime<Utc>>,
    },
    /// Clear the stopped state a poison record put a projection in.
    Resume { name: String },
    /// Dead letters: records projections could not apply.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// List dead letters (unresolved unless --all), as JSON lines.
    List {
        #[arg(long)]
        projection: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// Apply the unresolved dead letters of a projection again (after fixing the cause).
    Retry { projection: String },
}

fn projection(projector: &Projector, name: &str) -> anyhow::Result<std::sync::Arc<dyn keel_projections::Projection>> {
    projector
        .projection(name)
        .with_context(|| format!("unknown projection `{name}`; known: {}", keel_read_models::NAMES.join(", ")))
}

pub async fn run(args: ProjectionsArgs, config: &KeelConfig) -> anyhow::Result<ExitCode> {
    let pool = postgres::pool(&config.database, "keel-projections-cli", crate::root::TOOL_CONNECTIONS)?;
    let projector = Projector::new(
        config.projector.clone(),
        config.kafka.clone(),
        &config.schema_registry.url,
        pool.clone(),
        keel_read_models::catalogue(keel_topics::Vault::new(pool.clone(), &config.personal_data)?),
        keel_runtime::notifications::Notifications::new(&[]),
    )?;
    match args.command {
        ProjectionsCommand::Status => {
            let report =
                keel_projections::status::report(&pool, &config.kafka, &projector.names, &projector.projections)
                    .await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        ProjectionsCommand::Rebuild { name, from_offset, from_time } => {
            let projection = projection(&projector, &name)?;
            let start = match (from_offset, from_time) {
                (Some(offset), _) => StartFrom::Offset(offset),
                (None, Some(time)) => StartFrom::Time(time),
                (None, None) => StartFrom::Beginning,
            };
            let (version, resumed) =
                rebuild::prepare(&pool, &config.kafka, &projector.names, projection.as_ref(), start).await?;
            eprintln!("{} version {version} of `{name}`", if resumed { "resuming" } else { "building" });
            let shutdown = CancellationToken::new();
            cancel_on_signal(shutdown.clone());
            let runner = std::sync::Arc::new(projector.runner(projection, version));
            let bar = ProgressBar::new(0).with_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} records · {per_sec} · lag {msg} · eta {eta}",
                )
                .context("progress template")?,
            );
            let grace = Duration::from_secs(config.projector.retired_grace_secs);
            let outcome = rebuild::build(&runner, &shutdown, grace, |progress| {
                bar.set_length(progress.total);
                bar.set_position(progress.read);
                bar.set_message(progress.lag().to_string());
            })
            .await?;
            bar.finish_and_clear();
            match outcome {
                Outcome::Swapped { version, replaced } => {
                    println!(
                        "`{name}` version {version} is live (replaced version {replaced}; its tables are dropped after {}s)",
                        config.projector.retired_grace_secs
                    );
                }
                Outcome::Shutdown => {
                    println!("interrupted; run the same command again to resume version {version}");
                    return Ok(ExitCode::from(130));
                }
                Outcome::Abandoned => {
                    println!(
                        "version {version} stopped building (poison record or no longer building); see `keel projections status`"
                    );
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        ProjectionsCommand::Resume { name } => {
            projection(&projector, &name)?;
            if keel_projections::resume(&pool, &name).await? {
                println!("`{name}` resumed");
            } else {
                println!("`{name}` was not stopped");
            }
        }
        ProjectionsCommand::Dlq { command: DlqCommand::List { projection: name, all } } => {
            if let Some(name) = &name {
                projection(&projector, name)?;
            }
            for letter in dead_letters::list(&pool, name.as_deref(), all).await? {
                println!("{}", serde_json::to_string(&letter)?);
            }
        }
        ProjectionsCommand::Dlq { command: DlqCommand::Retry { projection: name } } => {
            let projection = projection(&projector, &name)?;
            let outcomes =
                dead_letters::retry(&pool, &config.kafka, &projector.codec, &projector.names, projection).await?;
            let failed = outcomes.iter().filter(|outcome| outcome.error.is_some()).count();
            for outcome in &outcomes {
                println!("{}", serde_json::to_string(outcome)?);
            }
            eprintln!("{} retried, {} resolved, {failed} still failing", outcomes.len(), outcomes.len() - failed);
            if failed > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
