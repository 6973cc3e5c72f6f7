//! The arguments of `rabbit-sidecar dead-letters list|replay|purge`, and which queue they are
//! about.
//!
//! The connection flags are the consumer's own ([`cli::flag`] of the keys in [`SHARED_KEYS`]:
//! same names, help and environment variables), and the values go through the consumer's
//! [`Layers`]: flag > `RABBIT_SIDECAR_*` > `--config` file > default, validated by the same code.
//! So the tooling run in the sidecar's own container needs no flags at all: the environment that
//! names the queue, the nodes and the credentials for the sidecar names them for the tooling too.
//! With several `[[subscription]]` entries in the file, `--queue` picks one (and with it that
//! entry's `dead-letter-queue`).

use std::collections::BTreeMap;
use std::str::FromStr;

use clap::{Arg, ArgAction, ArgMatches, Command};

use crate::cli;
use crate::config::keys::{self, Key};
use crate::config::{Config, ConfigError, EnvSource, Layers};

use super::letter::is_known_reason;
use super::replay::Rate;

/// The consumer's keys that the tooling takes as flags. Every other key may still come from the
/// environment or the file, as for the consumer.
pub const SHARED_KEYS: [&Key; 9] = [
    &keys::AMQP_URL,
    &keys::QUEUE,
    &keys::DEAD_LETTER_QUEUE,
    &keys::TLS_CA_FILE,
    &keys::TLS_CERT_FILE,
    &keys::TLS_KEY_FILE,
    &keys::HEARTBEAT,
    &keys::CONNECT_TIMEOUT,
    &keys::MANAGEMENT_URL,
];

/// Most messages `list` reads by default: about 40 s on a quorum queue, where each `basic.get`
/// is a Raft command (3.7 ms measured on 3.10), and 7 s on a classic one. The total is exact
/// whatever this says (a passive declare); the counts by reason cover the messages read.
pub const DEFAULT_MAX_SCAN: u64 = 10_000;

/// What `replay` moves per second by default: gentle next to what a healthy app handles, so a
/// replay adds little to the load of an app that has just recovered.
pub const DEFAULT_RATE: &str = "20/s";

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    List {
        json: bool,
        max_scan: u64,
    },
    Replay {
        json: bool,
        reasons: Vec<String>,
        limit: Option<u64>,
        dry_run: bool,
        rate: Rate,
    },
    Purge {
        json: bool,
        yes: bool,
    },
}

/// A parsed command line: what to do, and the consumer's keys as text (for [`target`]).
#[derive(Debug)]
pub struct Invocation {
    pub action: Action,
    pub flags: BTreeMap<String, String>,
}

/// `dead-letters` and its subcommands, a subcommand of [`cli::command`].
pub fn command() -> Command {
    let shared: Vec<Arg> = std::iter::once(&keys::CONFIG)
        .chain(SHARED_KEYS)
        .map(|key| {
            let arg = cli::flag(key);
            let arg = if key.name == keys::QUEUE.name {
                arg.help(format!(
                    "The queue whose dead letters to work on (its dead-letter queue is --dead-letter-queue) [env: {}]",
                    key.env()
                ))
            } else if key.name == keys::MANAGEMENT_URL.name {
                arg.help(format!(
                    "RabbitMQ management API base URL (http://user:pass@host:15672), to learn the dead-letter queue's type and delivery limit [env: {}]",
                    key.env()
                ))
            } else {
                arg
            };
            arg.help_heading("Queue and connection (as for the consumer)")
        })
        .collect();
    let json = Arg::new("json")
        .long("json")
        .action(ArgAction::SetTrue)
        .help("Print the report as JSON (the shape is in the README)");
    let with_shared = |cmd: Command| shared.iter().cloned().fold(cmd, Command::arg);
    Command::new("dead-letters")
        .about("List, replay or purge the dead letters of a queue. Connection flags, environment and config file as for the consumer.")
        .subcommand_required(true)
        .arg_required_else_help(true)
        .args_override_self(true)
        .subcommand(with_shared(
            Command::new("list")
                .about("Count the dead letters by reason and origin, with their age and a few examples; removes nothing")
                .arg(json.clone())
                .arg(
                    Arg::new("max-scan")
                        .long("max-scan")
                        .value_name("N")
                        .help(format!("Read at most N messages [default: {DEFAULT_MAX_SCAN}]")),
                ),
        ))
        .subcommand(with_shared(
            Command::new("replay")
                .about("Move dead letters back to the queue they came from, confirmed copy first, then removal")
                .arg(json.clone())
                .arg(
                    Arg::new("reason")
                        .long("reason")
                        .value_name("REASON")
                        .action(ArgAction::Append)
                        .help("Only dead letters with this reason: rejected, max_deliveries, delivery_limit, expired, maxlen (repeatable)"),
                )
                .arg(
                    Arg::new("limit")
                        .long("limit")
                        .value_name("N")
                        .help("Move at most N dead letters"),
                )
                .arg(
                    Arg::new("dry-run")
                        .long("dry-run")
                        .action(ArgAction::SetTrue)
                        .help("Say what would move; move nothing"),
                )
                .arg(
                    Arg::new("rate")
                        .long("rate")
                        .value_name("N/s")
                        .help(format!(
                            "Most messages moved per second (N/s, or N/m per minute) [default: {DEFAULT_RATE}]"
                        )),
                ),
        ))
        .subcommand(with_shared(
            Command::new("purge")
                .about("Delete every dead letter of the queue, for good")
                .arg(json)
                .arg(
                    Arg::new("yes")
                        .long("yes")
                        .action(ArgAction::SetTrue)
                        .help("Confirm the purge; without it nothing is deleted"),
                ),
        ))
}

/// Reads what clap matched for `dead-letters`. Errors name the flag and the problem, the way
/// clap's own do.
pub fn from_matches(matches: &ArgMatches) -> Result<Invocation, clap::Error> {
    let (name, sub) = matches.subcommand().expect("a subcommand is required");
    let json = sub.get_flag("json");
    let number = |flag: &str| -> Result<Option<u64>, clap::Error> {
        match sub.get_one::<String>(flag) {
            None => Ok(None),
            Some(s) => match s.parse::<u64>() {
                Ok(n) if n > 0 => Ok(Some(n)),
                _ => Err(invalid(
                    flag,
                    format!("{s:?} is not a whole number above zero"),
                )),
            },
        }
    };
    let action = match name {
        "list" => Action::List {
            json,
            max_scan: number("max-scan")?.unwrap_or(DEFAULT_MAX_SCAN),
        },
        "replay" => {
            let reasons: Vec<String> = sub
                .get_many::<String>("reason")
                .map(|r| {
                    r.flat_map(|s| s.split(','))
                        .map(|s| s.trim().to_string())
                        .collect()
                })
                .unwrap_or_default();
            if let Some(bad) = reasons.iter().find(|r| !is_known_reason(r)) {
                return Err(invalid(
                    "reason",
                    format!(
                        "{bad:?} is not a dead-letter reason: expected rejected, max_deliveries, delivery_limit, expired or maxlen"
                    ),
                ));
            }
            let rate = sub
                .get_one::<String>("rate")
                .map(String::as_str)
                .unwrap_or(DEFAULT_RATE);
            Action::Replay {
                json,
                reasons,
                limit: number("limit")?,
                dry_run: sub.get_flag("dry-run"),
                rate: Rate::from_str(rate).map_err(|p| invalid("rate", p))?,
            }
        }
        "purge" => Action::Purge {
            json,
            yes: sub.get_flag("yes"),
        },
        other => unreachable!("clap knows no subcommand {other}"),
    };
    Ok(Invocation {
        action,
        flags: shared_flags(sub),
    })
}

/// A bad value of a subcommand's own flag, reported the way clap reports its own errors.
fn invalid(flag: &str, problem: String) -> clap::Error {
    command().error(
        clap::error::ErrorKind::ValueValidation,
        format!("--{flag}: {problem}"),
    )
}

fn shared_flags(matches: &ArgMatches) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for key in std::iter::once(&keys::CONFIG).chain(SHARED_KEYS) {
        if let Some(values) = matches.get_many::<String>(key.name) {
            let values: Vec<&str> = values.map(String::as_str).collect();
            out.insert(key.name.to_string(), values.join(","));
        }
    }
    out
}

/// The queue the tooling works on, its dead-letter queue, and the consumer's configuration.
#[derive(Debug, Clone)]
pub struct Target {
    pub config: Config,
    pub queue: String,
    pub dead_letter_queue: String,
}

/// Resolves the configuration as the consumer would, then the queue: `--queue`, or the one queue
/// the configuration names. Its dead-letter queue is `--dead-letter-queue`, else what the
/// configuration says for that queue, else `<queue>.dead-letter`.
pub fn target(
    mut flags: BTreeMap<String, String>,
    env: &dyn EnvSource,
) -> Result<Target, ConfigError> {
    let queue_flag = flags.remove(keys::QUEUE.name);
    let dlq_flag = flags.remove(keys::DEAD_LETTER_QUEUE.name);
    for (key, value) in [
        (keys::QUEUE.name, &queue_flag),
        (keys::DEAD_LETTER_QUEUE.name, &dlq_flag),
    ] {
        if let Some(v) = value {
            check_name(key, v)?;
        }
    }
    // First as configured, without --queue: a config file's [[subscription]] entries cannot be
    // combined with --queue for the consumer, but here --queue only picks among them.
    let config = match Layers::collect(flags.clone(), env)?.build() {
        Ok(config) => config,
        Err(e) if is_missing_queue(&e) && queue_flag.is_some() => {
            let mut with_queue = flags;
            with_queue.insert(
                keys::QUEUE.name.into(),
                queue_flag.clone().unwrap_or_default(),
            );
            Layers::collect(with_queue, env)?.build()?
        }
        Err(e) => return Err(e),
    };
    let queue = match queue_flag {
        Some(q) => q,
        None if config.subscriptions.len() == 1 => config.subscriptions[0].queue.clone(),
        None => {
            return Err(ConfigError {
                key: "--queue".into(),
                problem: format!(
                    "the configuration names {} queues ({}): pick one with --queue",
                    config.subscriptions.len(),
                    config.queues().join(", ")
                ),
            });
        }
    };
    let dead_letter_queue = dlq_flag
        .or_else(|| {
            config
                .subscriptions
                .iter()
                .find(|s| s.queue == queue)
                .map(|s| s.dead_letter_queue.clone())
        })
        .unwrap_or_else(|| format!("{queue}.dead-letter"));
    if dead_letter_queue == queue {
        return Err(ConfigError {
            key: "--dead-letter-queue".into(),
            problem: format!("{queue:?} is the queue itself"),
        });
    }
    Ok(Target {
        config,
        queue,
        dead_letter_queue,
    })
}

/// The consumer's "no queue anywhere" error.
fn is_missing_queue(e: &ConfigError) -> bool {
    e.key == "--queue" && e.problem.starts_with("is required")
}

fn check_name(key: &str, value: &str) -> Result<(), ConfigError> {
    let problem = if value.is_empty() {
        "is empty".to_string()
    } else if value.len() > 255 {
        format!(
            "is {} bytes long; AMQP names are at most 255 bytes",
            value.len()
        )
    } else {
        return Ok(());
    };
    Err(ConfigError {
        key: format!("--{key}"),
        problem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse_words(words: &[&str]) -> Result<Invocation, clap::Error> {
        let matches =
            command().try_get_matches_from(std::iter::once(&"dead-letters").chain(words))?;
        from_matches(&matches)
    }

    /// An environment of `pairs`, as the consumer's tests feed one.
    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name: &str| map.get(name).cloned()
    }

    #[test]
    fn subcommands_and_their_flags() {
        let i = parse_words(&["list", "--queue", "orders", "--json"]).unwrap();
        assert_eq!(
            i.action,
            Action::List {
                json: true,
                max_scan: DEFAULT_MAX_SCAN
            }
        );
        assert_eq!(i.flags["queue"], "orders");
        let i = parse_words(&[
            "replay",
            "--reason",
            "rejected",
            "--reason",
            "expired,maxlen",
            "--limit",
            "5",
            "--dry-run",
            "--rate",
            "2/s",
            "--amqp-url",
            "amqp://a",
            "--amqp-url",
            "amqp://b",
        ])
        .unwrap();
        let Action::Replay {
            reasons,
            limit,
            dry_run,
            rate,
            ..
        } = i.action
        else {
            panic!("replay")
        };
        assert_eq!(reasons, ["rejected", "expired", "maxlen"]);
        assert_eq!((limit, dry_run), (Some(5), true));
        assert_eq!(rate.per_second(), 2.0);
        assert_eq!(i.flags["amqp-url"], "amqp://a,amqp://b");
        assert!(matches!(
            parse_words(&["purge"]).unwrap().action,
            Action::Purge { yes: false, .. }
        ));

        for bad in [
            &["replay", "--reason", "reject"][..],
            &["replay", "--limit", "0"],
            &["replay", "--rate", "fast"],
            &["list", "--max-scan", "-1"],
            &["list", "--prefetch", "3"],
            &["frobnicate"],
            &[],
        ] {
            assert!(parse_words(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_queue_and_its_dead_letter_queue_come_from_the_consumers_layers() {
        let flags = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let t = target(flags(&[("queue", "orders")]), &env(&[])).unwrap();
        assert_eq!(
            (t.queue.as_str(), t.dead_letter_queue.as_str()),
            ("orders", "orders.dead-letter")
        );

        // The sidecar's own environment is enough.
        let t = target(
            flags(&[]),
            &env(&[
                ("RABBIT_SIDECAR_QUEUE", "orders"),
                ("RABBIT_SIDECAR_DEAD_LETTER_QUEUE", "orders.dlq"),
                (
                    "RABBIT_SIDECAR_AMQP_URL",
                    "amqp://u:p@h1:5672,amqp://u:p@h2:5672",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(t.dead_letter_queue, "orders.dlq");
        assert_eq!(t.config.nodes.len(), 2);
        // Another queue than the environment's does not take that queue's dead-letter queue.
        let t = target(
            flags(&[("queue", "payments")]),
            &env(&[
                ("RABBIT_SIDECAR_QUEUE", "orders"),
                ("RABBIT_SIDECAR_DEAD_LETTER_QUEUE", "orders.dlq"),
            ]),
        )
        .unwrap();
        assert_eq!(t.dead_letter_queue, "payments.dead-letter");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[[subscription]]\nqueue = \"orders\"\n[[subscription]]\nqueue = \"payments\"\ndead-letter-queue = \"pay.dlq\"\n",
        )
        .unwrap();
        let file = path.to_str().unwrap();
        let t = target(flags(&[("config", file), ("queue", "payments")]), &env(&[])).unwrap();
        assert_eq!(t.dead_letter_queue, "pay.dlq");
        let t = target(
            flags(&[
                ("config", file),
                ("queue", "payments"),
                ("dead-letter-queue", "x"),
            ]),
            &env(&[]),
        )
        .unwrap();
        assert_eq!(t.dead_letter_queue, "x", "the flag wins");
        let e = target(flags(&[("config", file)]), &env(&[])).unwrap_err();
        assert_eq!(e.key, "--queue");
        assert!(e.problem.contains("orders, payments"), "{e}");

        let e = target(flags(&[]), &env(&[])).unwrap_err();
        assert!(is_missing_queue(&e), "the consumer's own error: {e}");
        let e = target(
            flags(&[("queue", "q")]),
            &env(&[("RABBIT_SIDECAR_HEARTBEAT", "soon")]),
        )
        .unwrap_err();
        assert_eq!(e.key, "RABBIT_SIDECAR_HEARTBEAT");
        let e = target(
            flags(&[("queue", "q"), ("dead-letter-queue", "")]),
            &env(&[]),
        )
        .unwrap_err();
        assert_eq!(e.key, "--dead-letter-queue");
        let e = target(
            flags(&[("queue", "q"), ("dead-letter-queue", "q")]),
            &env(&[]),
        )
        .unwrap_err();
        assert!(e.problem.contains("the queue itself"), "{e}");
    }
}
