//! Configuration: flags, `RABBIT_SIDECAR_*` environment variables and a TOML file, in that order of
//! precedence, over built-in defaults.
//!
//! Every value is read as text from whichever layer has it first and parsed in one place, so a bad
//! value is reported the same way wherever it came from: the error names the flag, variable or file
//! key and what is wrong with the value. The process environment is reached through [`EnvSource`]
//! so tests can feed a map instead of mutating the real environment.
//!
//! AMQP URIs carry passwords: they are parsed into [`AmqpNode`], whose `Display` and `Debug` show
//! only host and port, and no error message ever repeats a URI.

pub mod keys;
mod layers;
mod parse;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use hyper::Uri;
use lapin::uri::AMQPUri;

pub use self::keys::Key;
pub use self::layers::Layers;
pub use crate::app::circuit::CircuitConfig;
pub use crate::env::{EnvSource, ProcessEnv};
use crate::telemetry::LogFormat;

/// Prefix of every environment variable the sidecar reads.
pub const ENV_PREFIX: &str = "RABBIT_SIDECAR_";

/// A configuration problem: which key, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    /// Where the value came from: `--prefetch`, `RABBIT_SIDECAR_PREFETCH` or `prefetch (in FILE)`.
    pub key: String,
    pub problem: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// How the sidecar declares the queue when `--declare` is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    Classic,
    Quorum,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

/// One broker node. Holds the credentials, but shows only `host:port`.
#[derive(Clone)]
pub struct AmqpNode {
    pub uri: AMQPUri,
    pub tls: bool,
}

impl AmqpNode {
    pub fn host(&self) -> &str {
        &self.uri.authority.host
    }

    pub fn port(&self) -> u16 {
        self.uri.authority.port
    }
}

impl fmt::Display for AmqpNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host().contains(':') {
            write!(f, "[{}]:{}", self.host(), self.port())
        } else {
            write!(f, "{}:{}", self.host(), self.port())
        }
    }
}

impl fmt::Debug for AmqpNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AmqpNode({self})")
    }
}

/// A URL that may carry credentials in its user info; `Debug` shows only scheme, host and port.
#[derive(Clone)]
pub struct SecretUrl(pub Uri);

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = self.0.host().unwrap_or("?");
        let port = self
            .0
            .port_u16()
            .map(|p| format!(":{p}"))
            .unwrap_or_default();
        write!(
            f,
            "SecretUrl({}://{host}{port})",
            self.0.scheme_str().unwrap_or("http")
        )
    }
}

/// How the exchange of a subscription is declared (with `--declare`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeType {
    Direct,
    Topic,
    Fanout,
    Headers,
}

impl ExchangeType {
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeType::Direct => "direct",
            ExchangeType::Topic => "topic",
            ExchangeType::Fanout => "fanout",
            ExchangeType::Headers => "headers",
        }
    }
}

/// One queue consumed for the app: the single-queue flags, or one `[[subscription]]` entry.
#[derive(Debug, Clone)]
pub struct SubscriptionConfig {
    pub queue: String,
    pub declare: bool,
    pub queue_type: QueueType,
    pub single_active_consumer: bool,
    /// Declared (with `declare`) and bound with `binding_keys`.
    pub exchange: Option<(String, ExchangeType)>,
    pub binding_keys: Vec<String>,
    pub target_url: Uri,
    pub prefetch: u16,
    pub concurrency: usize,
    /// Most accepted messages one `basic.ack(multiple)` covers, already capped at half the
    /// prefetch; 1: every message is acked on its own.
    pub ack_batch_max: usize,
    /// Longest an accepted message's ack waits to be coalesced.
    pub ack_batch_wait: Duration,
    pub handler_timeout: Duration,
    pub max_deliveries: u32,
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
    pub dead_letter_queue: String,
    pub retry_queue: String,
}

/// Everything the sidecar needs to run, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub nodes: Vec<AmqpNode>,
    /// At least one; queue names are unique.
    pub subscriptions: Vec<SubscriptionConfig>,
    /// The app's endpoint of the shorthand flags; probed while the app is down.
    pub target_url: Uri,
    pub listen: SocketAddr,
    pub shutdown_grace: Duration,
    pub tls_ca_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub heartbeat: Duration,
    pub connect_timeout: Duration,
    pub reconnect_backoff: Duration,
    pub reconnect_backoff_max: Duration,
    pub app_health_url: Option<Uri>,
    pub app_probe_interval: Duration,
    pub management_url: Option<SecretUrl>,
    pub consumer_timeout: Duration,
    pub queue_poll_interval: Duration,
    /// Cap of the app's `Retry-After`.
    pub retry_after_max: Duration,
    /// The circuit breaker's settings; `None` with `--circuit-breaker=false`.
    pub circuit: Option<CircuitConfig>,
    pub log_format: LogFormat,
}

impl Config {
    /// The longest handler timeout of any subscription (what the stuck-handler check allows).
    pub fn max_handler_timeout(&self) -> Duration {
        self.subscriptions
            .iter()
            .map(|s| s.handler_timeout)
            .max()
            .unwrap_or_default()
    }

    pub fn queues(&self) -> Vec<String> {
        self.subscriptions.iter().map(|s| s.queue.clone()).collect()
    }
}

/// The environment variable that sets the key named `key`: `RABBIT_SIDECAR_` + upper snake case.
pub fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.replace('-', "_").to_ascii_uppercase())
}
