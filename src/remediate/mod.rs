//! `rabbit-sidecar remediate`: an Alertmanager webhook receiver that turns firing restart alerts
//! into restarts, for places where no orchestrator does it (docker-compose, plain VMs).
//!
//! The loop: a shipped alert rule fires with `action="restart"` and `restart_target="app"` (or
//! `"sidecar"`); Alertmanager posts it here with a bearer token; [`payload`] says what the alert
//! asks for; the [`config`] maps the target name to an action; [`policy`] applies the cooldown and
//! the rate limit; [`actions`] performs the restart (Docker Engine API, Kubernetes API, or a fixed
//! program) in the background; [`metrics`] logs and counts every step. Alert labels only ever
//! select among configured targets: they are never interpolated into a command, a URL path or a
//! request, except a Kubernetes `pod` label that passed a strict name check and that the API
//! server confirms is selected by the configured label selector.

pub mod actions;
mod client;
pub mod config;
pub mod metrics;
pub mod payload;
pub mod policy;
mod server;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

pub use config::{Config, ConfigError};
pub use server::serve;

/// Exit code for bad flags or configuration (`EX_USAGE` in sysexits).
const EXIT_USAGE: u8 = 64;

/// Default location of the configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/rabbit-sidecar/remediate.toml";

/// The arguments of `rabbit-sidecar remediate`.
#[derive(Debug, Parser)]
#[command(
    name = "rabbit-sidecar remediate",
    about = "Alertmanager webhook receiver that restarts what a firing alert names"
)]
pub struct Args {
    /// TOML configuration file.
    #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Address to listen on; overrides `listen` in the file.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Decide and log, but never restart anything; overrides `dry_run` in the file.
    #[arg(long)]
    dry_run: bool,
}

/// Parses `args` (the words after `remediate`) and runs the subcommand.
pub async fn cli_main(args: Vec<OsString>) -> ExitCode {
    let argv = std::iter::once(OsString::from("rabbit-sidecar remediate")).chain(args);
    match Args::try_parse_from(argv) {
        Ok(args) => main(args).await,
        Err(error) => {
            let _ = error.print();
            if error.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}

/// Runs the `remediate` subcommand. Expects the caller to have installed a tracing subscriber.
/// Returns when SIGTERM or SIGINT has been handled.
pub async fn main(args: Args) -> ExitCode {
    let mut config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(error) => {
            tracing::error!(config = %args.config.display(), %error, "invalid configuration");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    config.dry_run |= args.dry_run;

    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(listen = %config.listen, %error, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    let signals = match crate::signals::cancel_on_terminate(shutdown.clone()) {
        Ok(signals) => signals,
        Err(error) => {
            tracing::error!(%error, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let result = serve(config, listener, shutdown).await;
    signals.abort();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "remediation receiver failed");
            ExitCode::FAILURE
        }
    }
}
