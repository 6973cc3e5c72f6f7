//! `rabbit-sidecar dead-letters list|replay|purge`: the way back from the dead-letter queue.
//!
//! - `list` counts a queue's dead letters by reason (the sidecar's `rejected` and
//!   `max_deliveries`, the broker's `x-death` reasons) and origin, with the oldest and newest and
//!   a few examples; it removes nothing.
//! - `replay` moves them back into the queue they died in, each removed from the dead-letter queue
//!   only once the broker confirmed its copy, with its attempt history reset, at a bounded rate.
//! - `purge --yes` deletes them.
//!
//! The pieces: [`arguments`] (flags, and the consumer's configuration layers), [`session`] (the
//! consumer's connection code, node by node), [`letter`] (what a dead letter's headers say, and
//! the headers of its copies), [`limit`] (how many more returns a message survives),
//! [`browse`] (reading the queue without losing anything), then one file per subcommand and
//! [`report`] for what they print.
//!
//! Exit codes, as for the rest of the binary: 0 done; 64 bad flags or configuration (and `purge`
//! without `--yes`); 69 a broker node, the dead-letter queue or the destination could not be used
//! (what was moved before stays moved and is printed); 130 `replay` interrupted by SIGINT or
//! SIGTERM (it stops between messages and prints what it moved).

pub mod arguments;
pub mod browse;
pub mod letter;
pub mod limit;
pub mod list;
pub mod purge;
pub mod replay;
pub mod report;
pub mod session;

use std::ffi::OsString;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

pub use arguments::Target;
use arguments::{Action, Invocation};
use report::Report;

use crate::config::ProcessEnv;

const EX_USAGE: u8 = 64;
const EX_UNAVAILABLE: u8 = 69;
const EX_INTERRUPTED: u8 = 130;

/// Why a subcommand did not finish.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("interrupted")]
    Interrupted,
}

impl Failure {
    fn code(&self) -> u8 {
        match self {
            Failure::Usage(_) => EX_USAGE,
            Failure::Unavailable(_) => EX_UNAVAILABLE,
            Failure::Interrupted => EX_INTERRUPTED,
        }
    }
}

/// What a subcommand has to print (also when it failed part way) and whether it failed.
pub struct Outcome {
    pub report: Option<Box<dyn Report>>,
    pub failure: Option<Failure>,
}

impl Outcome {
    fn failed(failure: Failure) -> Outcome {
        Outcome {
            report: None,
            failure: Some(failure),
        }
    }
}

/// Runs `dead-letters`; `args` are the words after it.
pub async fn cli_main(args: Vec<OsString>) -> ExitCode {
    let Invocation { action, flags } = match arguments::parse(args) {
        Ok(i) => i,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let target = match arguments::target(flags, &ProcessEnv) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("rabbit-sidecar dead-letters: configuration error: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let (outcome, json) = match action {
        Action::List { json, max_scan } => (list::run(&target, max_scan).await, json),
        Action::Replay {
            json,
            reasons,
            limit,
            dry_run,
            rate,
        } => {
            let stop = CancellationToken::new();
            let signals = tokio::spawn(stop_on_signal(stop.clone()));
            let options = replay::ReplayOptions {
                reasons,
                limit,
                dry_run,
                rate,
            };
            let outcome = replay::run(&target, &options, &stop).await;
            signals.abort();
            (outcome, json)
        }
        Action::Purge { json, yes } => (purge::run(&target, yes).await, json),
    };
    if let Some(report) = &outcome.report {
        print!(
            "{}",
            if json {
                report.json() + "\n"
            } else {
                report.human()
            }
        );
    }
    match outcome.failure {
        None => ExitCode::SUCCESS,
        Some(f) => {
            eprintln!("rabbit-sidecar dead-letters: {f}");
            ExitCode::from(f.code())
        }
    }
}

/// Cancels `stop` on SIGINT or SIGTERM, so that a replay ends between two messages and reports.
async fn stop_on_signal(stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    stop.cancel();
}
