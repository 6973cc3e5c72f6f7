//! The command line: `rabbit-sidecar [run] [FLAGS]`, `rabbit-sidecar check [FLAGS]`,
//! `rabbit-sidecar healthcheck [--url URL]` and `rabbit-sidecar remediate ...`. Flags are built
//! from [`crate::config::KEYS`], so the flags, variables and file keys cannot disagree.

use std::collections::BTreeMap;
use std::ffi::OsString;

use clap::{Arg, ArgAction, Command};

use crate::config::{KEYS, env_name};

/// Keys that are switches: `--declare` alone means true.
const SWITCHES: &[&str] = &["declare", "single-active-consumer"];

/// Keys that may be given several times.
const REPEATABLE: &[&str] = &["binding-key", "amqp-url"];

/// What the process was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Run,
    Check,
}

pub fn command(mode: Mode) -> Command {
    let name = match mode {
        Mode::Run => "rabbit-sidecar",
        Mode::Check => "rabbit-sidecar check",
    };
    let about = match mode {
        Mode::Run => {
            "Consume a RabbitMQ queue on behalf of an app, with failover and observability.\n\nSubcommands: check (validate config, broker, queue and app), healthcheck (probe /healthz), remediate (Alertmanager webhook receiver)."
        }
        Mode::Check => {
            "Validate the configuration, connect to a broker node, passive-declare the queue, reach the app; exit non-zero on any failure."
        }
    };
    let mut cmd = Command::new(name)
        .version(env!("CARGO_PKG_VERSION"))
        .args_override_self(true)
        .about(about)
        .arg(
            Arg::new("config")
                .long("config")
                .value_name("FILE")
                .help(format!(
                    "TOML file with the same keys as the flags [env: {}]",
                    env_name("config")
                )),
        );
    for key in KEYS {
        let mut help = format!("{} [env: {}]", key.help, env_name(key.name));
        if let Some(d) = key.default {
            help.push_str(&format!(" [default: {d}]"));
        }
        let mut arg = Arg::new(key.name).long(key.name).help(help);
        if SWITCHES.contains(&key.name) {
            arg = arg
                .value_name("BOOL")
                .num_args(0..=1)
                .require_equals(true)
                .default_missing_value("true");
        } else {
            arg = arg.value_name(key.name.to_ascii_uppercase().replace('-', "_"));
        }
        // Repeatable keys collect every occurrence; the layers see them comma-joined.
        let action = if REPEATABLE.contains(&key.name) {
            ArgAction::Append
        } else {
            ArgAction::Set
        };
        cmd = cmd.arg(arg.action(action));
    }
    cmd
}

/// Parses flags into key → text. Errors are clap's (which name the flag); help and version are
/// returned as errors too, for the caller to print with the right exit code.
pub fn parse(
    mode: Mode,
    args: impl IntoIterator<Item = OsString>,
) -> Result<BTreeMap<String, String>, clap::Error> {
    let matches = command(mode).try_get_matches_from(args)?;
    let mut out = BTreeMap::new();
    for id in std::iter::once("config").chain(KEYS.iter().map(|k| k.name)) {
        if let Some(values) = matches.get_many::<String>(id) {
            let values: Vec<&str> = values.map(String::as_str).collect();
            out.insert(id.to_string(), values.join(","));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        std::iter::once("rabbit-sidecar")
            .chain(a.iter().copied())
            .map(OsString::from)
            .collect()
    }

    #[test]
    fn repeatable_keys_collect_and_others_take_the_last() {
        let f = parse(
            Mode::Run,
            args(&[
                "--binding-key",
                "a",
                "--binding-key",
                "b",
                "--prefetch",
                "1",
                "--prefetch",
                "2",
                "--declare",
            ]),
        )
        .unwrap();
        assert_eq!(f["binding-key"], "a,b");
        assert_eq!(f["prefetch"], "2");
        assert_eq!(f["declare"], "true");
        let f = parse(Mode::Run, args(&["--declare=false"])).unwrap();
        assert_eq!(f["declare"], "false");
        assert!(parse(Mode::Run, args(&["--no-such-flag"])).is_err());
    }
}
