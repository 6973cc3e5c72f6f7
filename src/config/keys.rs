//! The one table of configuration keys. Each key is a constant that carries its name (the flag,
//! the TOML key, and the environment variable's stem), how it is written, where it may be set,
//! its default and its help. Code asks for a key by its constant, so a misspelt key does not
//! compile; adding a setting is one entry here, one line in [`ALL`], and the line that parses it.

use self::Default::{Derived, Is, Unset};

/// How a key is written on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `--key VALUE`.
    Text,
    /// `--key` alone means true; `--key=false`.
    Switch,
    /// May be given several times; comma-separated in the environment and the file.
    List,
}

/// Where a key may be set, and whether a `[[subscription]]` entry inherits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The process as a whole: flag, variable, or top level of the file.
    Process,
    /// Anywhere; a `[[subscription]]` entry that does not set it inherits the top-level value.
    Inherited,
    /// A queue's own: at the top level for the single-queue shorthand, or in an entry, which
    /// never inherits it (two entries cannot share a queue or its companions).
    PerQueue,
    /// Only in a `[[subscription]]` entry of the file.
    EntryOnly,
}

/// A key's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Default {
    Unset,
    Is(&'static str),
    /// Worked out from other keys by the code that reads it; the text says how (for help and
    /// documentation only, never parsed).
    Derived(&'static str),
}

/// One configurable key.
#[derive(Debug, PartialEq, Eq)]
pub struct Key {
    pub name: &'static str,
    pub kind: Kind,
    pub scope: Scope,
    pub default: Default,
    pub help: &'static str,
}

impl Key {
    const fn new(
        name: &'static str,
        kind: Kind,
        scope: Scope,
        default: Default,
        help: &'static str,
    ) -> Key {
        Key {
            name,
            kind,
            scope,
            default,
            help,
        }
    }

    const fn text(name: &'static str, scope: Scope, default: Default, help: &'static str) -> Key {
        Key::new(name, Kind::Text, scope, default, help)
    }

    const fn switch(name: &'static str, scope: Scope, default: Default, help: &'static str) -> Key {
        Key::new(name, Kind::Switch, scope, default, help)
    }

    const fn list(name: &'static str, scope: Scope, default: Default, help: &'static str) -> Key {
        Key::new(name, Kind::List, scope, default, help)
    }

    /// The environment variable that sets this key: `RABBIT_SIDECAR_` + upper snake case.
    pub fn env(&self) -> String {
        super::env_name(self.name)
    }

    /// Whether the key has a flag and a variable (entry-only keys live in the file alone).
    pub fn is_flag(&self) -> bool {
        self.scope != Scope::EntryOnly
    }

    /// Whether a `[[subscription]]` entry may set it.
    pub fn in_entries(&self) -> bool {
        self.scope != Scope::Process
    }

    /// Whether an entry that does not set it takes the top-level value.
    pub fn inherited(&self) -> bool {
        matches!(self.scope, Scope::Process | Scope::Inherited)
    }

    /// The default as text to parse, when it is a plain value.
    pub fn default_text(&self) -> Option<&'static str> {
        match self.default {
            Is(text) => Some(text),
            Unset | Derived(_) => None,
        }
    }

    /// The default as documentation shows it.
    pub fn default_doc(&self) -> Option<&'static str> {
        match self.default {
            Is(text) | Derived(text) => Some(text),
            Unset => None,
        }
    }
}

/// `--config FILE` / `RABBIT_SIDECAR_CONFIG`: the TOML file itself, read before any other key.
pub const CONFIG: Key = Key::text(
    "config",
    Scope::Process,
    Unset,
    "TOML file with the same keys as the flags",
);

pub const AMQP_URL: Key = Key::list(
    "amqp-url",
    Scope::Process,
    Is("amqp://guest:guest@127.0.0.1:5672/%2f"),
    "Comma-separated AMQP URIs of the broker nodes, tried in turn on failure",
);

pub const QUEUE: Key = Key::text(
    "queue",
    Scope::PerQueue,
    Unset,
    "The queue to consume (required)",
);

pub const DECLARE: Key = Key::switch(
    "declare",
    Scope::Inherited,
    Is("false"),
    "Declare the queue, its retry queue and its dead-letter queue if they are missing",
);

pub const QUEUE_TYPE: Key = Key::text(
    "queue-type",
    Scope::Inherited,
    Is("quorum"),
    "quorum or classic: the type --declare gives the queue; for a queue the sidecar did not declare, its type when the management API cannot tell (a quorum queue counts returns)",
);

pub const SINGLE_ACTIVE_CONSUMER: Key = Key::switch(
    "single-active-consumer",
    Scope::Inherited,
    Is("false"),
    "Declare the queue with x-single-active-consumer (active/standby replicas)",
);

pub const EXCHANGE: Key = Key::text(
    "exchange",
    Scope::PerQueue,
    Unset,
    "With --declare: an exchange to declare (durable) and bind the queue to",
);

pub const EXCHANGE_TYPE: Key = Key::text(
    "exchange-type",
    Scope::Inherited,
    Is("topic"),
    "direct, topic, fanout or headers, used with --exchange",
);

pub const BINDING_KEY: Key = Key::list(
    "binding-key",
    Scope::PerQueue,
    Unset,
    "Binding key of the queue to --exchange (repeatable; comma-separated in the environment and file)",
);

pub const TARGET_URL: Key = Key::text(
    "target-url",
    Scope::Inherited,
    Is("http://127.0.0.1:8080/"),
    "The app endpoint each message is POSTed to",
);

pub const PREFETCH: Key = Key::text(
    "prefetch",
    Scope::Inherited,
    Is("64"),
    "basic.qos prefetch: most messages held unacknowledged",
);

pub const CONCURRENCY: Key = Key::text(
    "concurrency",
    Scope::Inherited,
    Is("16"),
    "Most messages handed to the app at once (at most --prefetch)",
);

pub const ACK_BATCH_MAX: Key = Key::text(
    "ack-batch-max",
    Scope::Inherited,
    Is("32"),
    "Most accepted messages acknowledged by one basic.ack(multiple); at most half of --prefetch; 1 turns coalescing off",
);

pub const ACK_BATCH_WAIT: Key = Key::text(
    "ack-batch-wait",
    Scope::Inherited,
    Is("5ms"),
    "Longest an accepted message's ack waits to be coalesced with others (at most 10s)",
);

pub const HANDLER_TIMEOUT: Key = Key::text(
    "handler-timeout",
    Scope::Inherited,
    Is("30s"),
    "Deadline for the app's answer",
);

pub const MAX_DELIVERIES: Key = Key::text(
    "max-deliveries",
    Scope::Inherited,
    Is("5"),
    "Attempts before a message is dead-lettered",
);

pub const RETRY_BACKOFF: Key = Key::text(
    "retry-backoff",
    Scope::Inherited,
    Is("1s"),
    "First delay before a retry; doubles per attempt, with jitter, up to --retry-backoff-max",
);

pub const RETRY_BACKOFF_MAX: Key = Key::text(
    "retry-backoff-max",
    Scope::Inherited,
    Is("5m"),
    "Cap of the retry delay",
);

pub const RETRY_AFTER_MAX: Key = Key::text(
    "retry-after-max",
    Scope::Process,
    Is("5m"),
    "Cap of the app's Retry-After (on 429 and 503), as a message's retry delay and as the circuit's open time",
);

pub const CIRCUIT_BREAKER: Key = Key::switch(
    "circuit-breaker",
    Scope::Process,
    Is("true"),
    "Stop consuming while retryable failures dominate the app's answers; --circuit-breaker=false turns it off",
);

pub const CIRCUIT_WINDOW: Key = Key::text(
    "circuit-window",
    Scope::Process,
    Is("10s"),
    "The sliding window of answers the circuit breaker judges (at most the last 2 x --circuit-min-calls)",
);

pub const CIRCUIT_MIN_CALLS: Key = Key::text(
    "circuit-min-calls",
    Scope::Process,
    Is("20"),
    "Fewest answers in the window before the circuit may open",
);

pub const CIRCUIT_FAILURE_RATIO: Key = Key::text(
    "circuit-failure-ratio",
    Scope::Process,
    Is("0.5"),
    "Share of retryable failures (5xx, 408, 429, timeout, reset) in the window that opens the circuit (of at least min-calls x ratio different messages)",
);

pub const CIRCUIT_OPEN: Key = Key::text(
    "circuit-open",
    Scope::Process,
    Is("1s"),
    "How long the circuit first stays open before one probe message; doubles per failed probe",
);

pub const CIRCUIT_OPEN_MAX: Key = Key::text(
    "circuit-open-max",
    Scope::Process,
    Is("30s"),
    "Cap of the circuit's open time (a Retry-After may ask for longer, up to --retry-after-max)",
);

pub const DEAD_LETTER_QUEUE: Key = Key::text(
    "dead-letter-queue",
    Scope::PerQueue,
    Derived("<queue>.dead-letter"),
    "Where dead letters go",
);

pub const RETRY_QUEUE: Key = Key::text(
    "retry-queue",
    Scope::PerQueue,
    Derived("<queue>.retry"),
    "Where messages wait for their retry (a TTL queue that dead-letters back)",
);

pub const LISTEN: Key = Key::text(
    "listen",
    Scope::Process,
    Is("0.0.0.0:9102"),
    "The admin server's address (/metrics, /healthz, /readyz, /status)",
);

pub const SHUTDOWN_GRACE: Key = Key::text(
    "shutdown-grace",
    Scope::Process,
    Is("30s"),
    "How long SIGTERM waits for in-flight messages",
);

pub const TLS_CA_FILE: Key = Key::text(
    "tls-ca-file",
    Scope::Process,
    Unset,
    "For amqps://: a PEM CA bundle trusted beside the system roots",
);

pub const TLS_CERT_FILE: Key = Key::text(
    "tls-cert-file",
    Scope::Process,
    Unset,
    "For amqps:// mutual TLS: the client certificate (PEM)",
);

pub const TLS_KEY_FILE: Key = Key::text(
    "tls-key-file",
    Scope::Process,
    Unset,
    "For amqps:// mutual TLS: the client private key (PEM, PKCS#8)",
);

pub const HEARTBEAT: Key = Key::text(
    "heartbeat",
    Scope::Process,
    Is("10s"),
    "AMQP heartbeat interval; a silent peer is dropped after about two intervals",
);

pub const CONNECT_TIMEOUT: Key = Key::text(
    "connect-timeout",
    Scope::Process,
    Is("5s"),
    "Deadline for one connection attempt to one node",
);

pub const RECONNECT_BACKOFF: Key = Key::text(
    "reconnect-backoff",
    Scope::Process,
    Is("200ms"),
    "First delay between connection attempts; doubles with jitter",
);

pub const RECONNECT_BACKOFF_MAX: Key = Key::text(
    "reconnect-backoff-max",
    Scope::Process,
    Is("1s"),
    "Cap of the delay between connection attempts",
);

pub const APP_HEALTH_URL: Key = Key::text(
    "app-health-url",
    Scope::Process,
    Unset,
    "URL probed (GET, 2xx = up) while the app is down; default: TCP connect to --target-url",
);

pub const APP_PROBE_INTERVAL: Key = Key::text(
    "app-probe-interval",
    Scope::Process,
    Is("500ms"),
    "How often the app is probed while it is down",
);

pub const MANAGEMENT_URL: Key = Key::text(
    "management-url",
    Scope::Process,
    Unset,
    "RabbitMQ management API base URL (http://user:pass@host:15672), used to tell active from standby",
);

pub const BROKER_CONSUMER_TIMEOUT: Key = Key::text(
    "broker-consumer-timeout",
    Scope::Process,
    Is("30m"),
    "The broker's delivery-acknowledgement timeout (consumer_timeout); warn at 80% of it (a queue's own, read with --management-url, wins)",
);

pub const QUEUE_POLL_INTERVAL: Key = Key::text(
    "queue-poll-interval",
    Scope::Process,
    Is("5s"),
    "How often queue depth and consumer count are polled",
);

pub const LOG_FORMAT: Key = Key::text("log-format", Scope::Process, Is("text"), "text or json");

/// A subscription's path on the app, joined to the top-level `target-url` (file entries only).
pub const PATH: Key = Key::text(
    "path",
    Scope::EntryOnly,
    Unset,
    "The app path this subscription's messages are POSTed to, on the top-level target's host",
);

/// Every key, in the order the README documents them.
pub const ALL: [&Key; 42] = [
    &AMQP_URL,
    &QUEUE,
    &DECLARE,
    &QUEUE_TYPE,
    &SINGLE_ACTIVE_CONSUMER,
    &EXCHANGE,
    &EXCHANGE_TYPE,
    &BINDING_KEY,
    &TARGET_URL,
    &PREFETCH,
    &CONCURRENCY,
    &ACK_BATCH_MAX,
    &ACK_BATCH_WAIT,
    &HANDLER_TIMEOUT,
    &MAX_DELIVERIES,
    &RETRY_BACKOFF,
    &RETRY_BACKOFF_MAX,
    &RETRY_AFTER_MAX,
    &CIRCUIT_BREAKER,
    &CIRCUIT_WINDOW,
    &CIRCUIT_MIN_CALLS,
    &CIRCUIT_FAILURE_RATIO,
    &CIRCUIT_OPEN,
    &CIRCUIT_OPEN_MAX,
    &DEAD_LETTER_QUEUE,
    &RETRY_QUEUE,
    &LISTEN,
    &SHUTDOWN_GRACE,
    &TLS_CA_FILE,
    &TLS_CERT_FILE,
    &TLS_KEY_FILE,
    &HEARTBEAT,
    &CONNECT_TIMEOUT,
    &RECONNECT_BACKOFF,
    &RECONNECT_BACKOFF_MAX,
    &APP_HEALTH_URL,
    &APP_PROBE_INTERVAL,
    &MANAGEMENT_URL,
    &BROKER_CONSUMER_TIMEOUT,
    &QUEUE_POLL_INTERVAL,
    &LOG_FORMAT,
    &PATH,
];

#[cfg(test)]
mod tests {
    use super::*;

    const README: &str = include_str!("../../README.md");

    /// The README is the user's contract: a setting without its row there fails here.
    #[test]
    fn every_flag_and_variable_is_in_the_readme_configuration_table() {
        for key in ALL.iter().filter(|k| k.is_flag()) {
            let flag = format!("| `--{}` |", key.name);
            assert!(
                README.contains(&flag),
                "README's configuration table lacks {flag}"
            );
            let env = format!("`{}`", key.env());
            assert!(README.contains(&env), "README lacks {env}");
        }
    }

    #[test]
    fn names_are_unique_and_entry_keys_are_not_flags() {
        let mut names: Vec<&str> = ALL.iter().map(|k| k.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ALL.len(), "a key is listed twice");
        assert!(!PATH.is_flag() && PATH.in_entries() && !PATH.inherited());
        assert!(QUEUE.is_flag() && QUEUE.in_entries() && !QUEUE.inherited());
        assert!(PREFETCH.inherited() && !LISTEN.in_entries());
        assert_eq!(
            RETRY_QUEUE.default_text(),
            None,
            "a derived default is not parsed"
        );
        assert_eq!(RETRY_QUEUE.default_doc(), Some("<queue>.retry"));
    }
}
