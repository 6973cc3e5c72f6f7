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

pub(crate) mod arguments;
mod browse;
mod letter;
mod list;
mod purge;
mod replay;
mod report;
mod session;

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use arguments::Action;
pub use arguments::Invocation;
use arguments::Target;
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

/// Runs `dead-letters` as parsed by [`crate::cli`].
pub async fn main(invocation: Invocation) -> ExitCode {
    let Invocation { action, flags } = invocation;
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
            // Without handlers a signal would still lose nothing (the broker gives back what the
            // process held), but the report of what moved would be lost with it.
            let signals = crate::signals::cancel_on_terminate(stop.clone()).ok();
            let options = replay::ReplayOptions {
                reasons,
                limit,
                dry_run,
                rate,
            };
            let outcome = replay::run(&target, &options, &stop).await;
            if let Some(s) = signals {
                s.abort();
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const README: &str = include_str!("../../README.md");

    /// The README is the user's contract: a flag or a JSON field without its mention in the
    /// dead-letters section fails here.
    #[test]
    fn every_flag_and_json_field_is_in_the_readme() {
        let start = README
            .find("## Dead letters: list, replay, purge")
            .expect("the README has the dead-letters section");
        let section = &README[start..];
        for sub in arguments::command().get_subcommands() {
            for arg in sub.get_arguments() {
                if let Some(long) = arg.get_long() {
                    let flag = format!("--{long}");
                    assert!(
                        section.contains(&flag) || README.contains(&format!("| `{flag}` |")),
                        "README lacks {flag} of dead-letters {}",
                        sub.get_name()
                    );
                }
            }
        }
        let flags: BTreeMap<String, String> = [("queue".to_string(), "q".to_string())].into();
        let config = crate::config::Layers::collect(flags, &|_: &str| None)
            .unwrap()
            .build()
            .unwrap();
        let target = Target {
            config,
            queue: "q".into(),
            dead_letter_queue: "q.dead-letter".into(),
        };
        let list = list::Summary::default().report(
            &target,
            0,
            0,
            &crate::broker::facts::QueueFacts::assumed(),
        );
        let replay = report::ReplayReport::default();
        let purge = report::PurgeReport {
            dead_letter_queue: String::new(),
            purged: 0,
        };
        for (what, json) in [
            ("list", serde_json::to_value(&list).unwrap()),
            ("replay", serde_json::to_value(&replay).unwrap()),
            ("purge", serde_json::to_value(&purge).unwrap()),
        ] {
            for key in json.as_object().unwrap().keys() {
                assert!(
                    section.contains(&format!("`{key}`"))
                        || section.contains(&format!("`{key}[]`"))
                        || section.contains(&format!("\"{key}\"")),
                    "README's dead-letters section lacks the {what} JSON field {key}"
                );
            }
        }
    }
}
