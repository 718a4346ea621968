//! `keel`: one binary, a subcommand per role and per admin task.

#![forbid(unsafe_code)]

mod bench;
mod config;
mod projections_cli;
mod replay;
mod root;
mod tail;
mod traces;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use keel_runtime::ConfigSources;

use crate::config::KeelConfig;

#[derive(Debug, Parser)]
#[command(name = "keel", version, about = "Keel: event sourcing and CQRS with Kafka as the source of truth")]
struct Cli {
    /// YAML config file; `KEEL_…` environment variables override it (`__` nests).
    #[arg(long, global = true, env = "KEEL_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the schema registry (Confluent REST subset, stored in PostgreSQL).
    Registry,
    /// Run the identity command service (gRPC).
    Identity,
    /// Run the auth command service: passwords, sessions, token signing keys (gRPC).
    Auth,
    /// Run the authz command service: roles, grants, permission checks (gRPC).
    Authz,
    /// Run the blog command service: posts and comments (gRPC).
    Blog,
    /// Run the projection workers (read models and audit log).
    Projector,
    /// Run the HTTP gateway.
    Gateway,
    /// Apply the database migrations.
    Migrate,
    /// Kafka topics.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// Configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// The keys that sign access tokens.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Print the stored records of a topic, decoded (sensitive fields redacted by default).
    Replay(replay::ReplayArgs),
    /// Follow a live stream of the gateway (`GET /v1/streams/…`), resuming across disconnects.
    Tail(tail::TailArgs),
    /// The spans the local trace receiver kept (`scripts/run`): the latest traces, or one as a tree.
    Traces(traces::TracesArgs),
    /// Projections: status, rebuilds, dead letters.
    Projections(projections_cli::ProjectionsArgs),
    /// The running instances the service registry lists (every role, or one).
    Instances {
        /// `identity`, `auth`, `authz`, `blog`, `gateway`, `projector` or `schema-registry`.
        service: Option<String>,
    },
    /// Benchmarks that print figures (run against the configured broker and database).
    Bench(bench::BenchArgs),
}

#[derive(Debug, Subcommand)]
enum TopicsCommand {
    /// Create every topic of the catalogue that does not exist yet.
    Create,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration, secrets redacted.
    Dump,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Make the next signing key now; it signs after `auth.key_publish_ahead_secs`, once every
    /// gateway has it. Tokens signed by the current key stay valid until they expire.
    Rotate,
    /// The keys, with when each signs.
    List,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Recompute every hash chain and name the first broken entry.
    Verify,
}

/// What a process of `command` is called in traces (`keel-<name>`).
fn service_name(command: &Command) -> &'static str {
    match command {
        Command::Registry => "registry",
        Command::Identity => "identity",
        Command::Auth => "auth",
        Command::Authz => "authz",
        Command::Blog => "blog",
        Command::Projector => "projector",
        Command::Gateway => "gateway",
        _ => "cli",
    }
}

fn main() -> ExitCode {
    // Before any thread starts: it clears the socket-activation variables.
    keel_runtime::listen::inherit_sockets();
    let cli = Cli::parse();
    let config = match ConfigSources::from_process(cli.config.clone()).load::<KeelConfig>() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("keel: {error}");
            return ExitCode::from(2);
        }
    };
    if let Err(error) = config.validate() {
        eprintln!("keel: {error}");
        return ExitCode::from(2);
    }
    // `keel replay` and `keel tail` print records on stdout, where log lines would mix with
    // them; they report on stderr themselves.
    // Flushes the queued spans when main returns.
    let _telemetry = (!matches!(cli.command, Command::Replay(_) | Command::Tail(_)))
        .then(|| keel_runtime::telemetry::init(&config.log, &config.tracing, service_name(&cli.command)));
    // Sends the queued error reports when main returns.
    let _errors = keel_runtime::errors::init(&config.errors, service_name(&cli.command));
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("keel: failed to start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(root::run(cli.command, config)) {
        Ok(code) => code,
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "keel failed");
            eprintln!("keel: {error:#}");
            ExitCode::FAILURE
        }
    }
}
