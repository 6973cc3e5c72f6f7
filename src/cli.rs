//! The command line, one clap command with a subcommand each:
//!
//! - `rabbit-sidecar [run] [FLAGS]`: consume (the default when no subcommand is named);
//! - `rabbit-sidecar check [FLAGS]`: validate configuration, broker, queue and app;
//! - `rabbit-sidecar healthcheck [--url URL]`: probe `/healthz`;
//! - `rabbit-sidecar dead-letters list|replay|purge ...`: the way back from the dead-letter queue
//!   (its arguments are in [`crate::deadletters::arguments`]);
//! - `rabbit-sidecar remediate ...`: the Alertmanager webhook receiver.
//!
//! The flags of `run` and `check` are built from the [key table](crate::config::keys), so flags,
//! variables and file keys cannot disagree.

use std::collections::BTreeMap;
use std::ffi::OsString;

use clap::{Arg, ArgAction, ArgMatches, Args as _, Command, FromArgMatches as _};

use crate::config::keys::{self, Key, Kind};
use crate::{deadletters, remediate};

/// What the process was asked to do.
#[derive(Debug)]
pub enum Invocation {
    /// Consume, with these flags (key → text; repeated keys comma-joined).
    Run(BTreeMap<String, String>),
    /// Check what `run` would use, with these flags.
    Check(BTreeMap<String, String>),
    /// Probe a sidecar's `/healthz`; without a URL, the one `--listen` would serve.
    Healthcheck {
        url: Option<String>,
    },
    DeadLetters(deadletters::arguments::Invocation),
    Remediate(remediate::Args),
}

const ABOUT: &str =
    "Consume a RabbitMQ queue on behalf of an app, with failover and observability.";
const CHECK_ABOUT: &str = "Validate the configuration, connect to a broker node, passive-declare the queue, reach the app; exit non-zero on any failure.";

/// The whole command line.
pub fn command() -> Command {
    with_keys(Command::new("rabbit-sidecar"))
        .version(env!("CARGO_PKG_VERSION"))
        .about(ABOUT)
        .args_override_self(true)
        .args_conflicts_with_subcommands(true)
        .subcommand(with_keys(Command::new("run").about(ABOUT)))
        .subcommand(with_keys(Command::new("check").about(CHECK_ABOUT)))
        .subcommand(
            Command::new("healthcheck")
                .about("Exit 0 when /healthz answers 200 (for container HEALTHCHECKs without curl)")
                .arg(Arg::new("url").long("url").value_name("URL").help(format!(
                    "The URL to probe [default: http://127.0.0.1:PORT/healthz, PORT from {}]",
                    keys::LISTEN.env()
                ))),
        )
        .subcommand(deadletters::arguments::command())
        .subcommand(remediate::Args::augment_args(
            Command::new("remediate")
                .about("Alertmanager webhook receiver that restarts what a firing alert names"),
        ))
}

/// `cmd` with `--config` and a flag for every key of the table.
fn with_keys(cmd: Command) -> Command {
    let mut cmd = cmd.args_override_self(true).arg(flag(&keys::CONFIG));
    for key in keys::ALL.iter().filter(|k| k.is_flag()) {
        cmd = cmd.arg(flag(key));
    }
    cmd
}

/// The flag of `key`, as `run` and `check` have it (the dead-letter tooling takes some too).
pub(crate) fn flag(key: &Key) -> Arg {
    let mut help = format!("{} [env: {}]", key.help, key.env());
    if let Some(d) = key.default_doc() {
        help.push_str(&format!(" [default: {d}]"));
    }
    let arg = Arg::new(key.name).long(key.name).help(help);
    match key.kind {
        Kind::Text => arg
            .value_name(key.name.to_ascii_uppercase().replace('-', "_"))
            .action(ArgAction::Set),
        Kind::Switch => arg
            .value_name("BOOL")
            .num_args(0..=1)
            .require_equals(true)
            .default_missing_value("true")
            .action(ArgAction::Set),
        // Every occurrence is kept; the layers see them comma-joined.
        Kind::List => arg
            .value_name(key.name.to_ascii_uppercase().replace('-', "_"))
            .action(ArgAction::Append),
    }
}

/// Parses the command line. Errors are clap's (which name the flag); help and version come back
/// as errors too, for the caller to print with the right exit code.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Invocation, clap::Error> {
    let matches = command().try_get_matches_from(args)?;
    Ok(match matches.subcommand() {
        None => Invocation::Run(flags(&matches)),
        Some(("run", m)) => Invocation::Run(flags(m)),
        Some(("check", m)) => Invocation::Check(flags(m)),
        Some(("healthcheck", m)) => Invocation::Healthcheck {
            url: m.get_one::<String>("url").cloned(),
        },
        Some(("dead-letters", m)) => {
            Invocation::DeadLetters(deadletters::arguments::from_matches(m)?)
        }
        Some(("remediate", m)) => Invocation::Remediate(remediate::Args::from_arg_matches(m)?),
        Some((other, _)) => unreachable!("clap knows no subcommand {other:?}"),
    })
}

fn flags(matches: &ArgMatches) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let names = std::iter::once(keys::CONFIG.name).chain(keys::ALL.iter().map(|k| k.name));
    for name in names {
        if let Ok(Some(values)) = matches.try_get_many::<String>(name) {
            let values: Vec<&str> = values.map(String::as_str).collect();
            out.insert(name.to_string(), values.join(","));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_args(a: &[&str]) -> Result<Invocation, clap::Error> {
        parse(
            std::iter::once("rabbit-sidecar")
                .chain(a.iter().copied())
                .map(OsString::from),
        )
    }

    fn run_flags(a: &[&str]) -> BTreeMap<String, String> {
        match parse_args(a).unwrap() {
            Invocation::Run(f) => f,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn repeatable_keys_collect_and_others_take_the_last() {
        let f = run_flags(&[
            "--binding-key",
            "a",
            "--binding-key",
            "b",
            "--prefetch",
            "1",
            "--prefetch",
            "2",
            "--declare",
        ]);
        assert_eq!(f["binding-key"], "a,b");
        assert_eq!(f["prefetch"], "2");
        assert_eq!(f["declare"], "true");
        let f = run_flags(&["--declare=false"]);
        assert_eq!(f["declare"], "false");
        assert!(parse_args(&["--no-such-flag"]).is_err());
    }

    #[test]
    fn subcommands_take_their_own_arguments() {
        assert_eq!(run_flags(&["run", "--queue", "q"])["queue"], "q");
        match parse_args(&["check", "--queue", "q", "--config", "c.toml"]).unwrap() {
            Invocation::Check(f) => assert_eq!((&*f["queue"], &*f["config"]), ("q", "c.toml")),
            other => panic!("{other:?}"),
        }
        match parse_args(&["healthcheck", "--url", "http://127.0.0.1:1/healthz"]).unwrap() {
            Invocation::Healthcheck { url } => {
                assert_eq!(url.as_deref(), Some("http://127.0.0.1:1/healthz"))
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_args(&["healthcheck", "--queue", "q"]).is_err());
        assert!(matches!(
            parse_args(&["remediate", "--dry-run"]).unwrap(),
            Invocation::Remediate(_)
        ));
        assert!(
            parse_args(&["--queue", "q", "check"]).is_err(),
            "run's flags and a subcommand do not mix"
        );
        assert!(
            parse_args(&["--path", "/x"]).is_err(),
            "a file-only key has no flag"
        );
    }
}
