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

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use hyper::Uri;
use lapin::uri::AMQPUri;

use crate::telemetry::LogFormat;

/// Prefix of every environment variable the sidecar reads.
pub const ENV_PREFIX: &str = "RABBIT_SIDECAR_";

/// Reads one environment variable; the process environment in production, a map in tests.
pub trait EnvSource {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl EnvSource for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

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

/// One configurable key: its flag name (also the TOML key) and help text.
pub struct Key {
    pub name: &'static str,
    pub help: &'static str,
    pub default: Option<&'static str>,
}

/// Every key the sidecar reads, in the order the README documents them.
pub const KEYS: &[Key] = &[
    key(
        "amqp-url",
        "Comma-separated AMQP URIs of the broker nodes, tried in turn on failure",
        Some("amqp://guest:guest@127.0.0.1:5672/%2f"),
    ),
    key("queue", "The queue to consume (required)", None),
    key(
        "declare",
        "Declare the queue, its retry queue and its dead-letter queue if they are missing",
        Some("false"),
    ),
    key(
        "queue-type",
        "quorum or classic, used with --declare",
        Some("quorum"),
    ),
    key(
        "single-active-consumer",
        "Declare the queue with x-single-active-consumer (active/standby replicas)",
        Some("false"),
    ),
    key(
        "exchange",
        "With --declare: an exchange to declare (durable) and bind the queue to",
        None,
    ),
    key(
        "exchange-type",
        "direct, topic, fanout or headers, used with --exchange",
        Some("topic"),
    ),
    key(
        "binding-key",
        "Binding key of the queue to --exchange (repeatable; comma-separated in the environment and file)",
        None,
    ),
    key(
        "target-url",
        "The app endpoint each message is POSTed to",
        Some("http://127.0.0.1:8080/"),
    ),
    key(
        "prefetch",
        "basic.qos prefetch: most messages held unacknowledged",
        Some("64"),
    ),
    key(
        "concurrency",
        "Most messages handed to the app at once (at most --prefetch)",
        Some("16"),
    ),
    key(
        "handler-timeout",
        "Deadline for the app's answer",
        Some("30s"),
    ),
    key(
        "max-deliveries",
        "Attempts before a message is dead-lettered",
        Some("5"),
    ),
    key(
        "retry-backoff",
        "First delay before a retry; doubles per attempt, with jitter, up to --retry-backoff-max",
        Some("1s"),
    ),
    key("retry-backoff-max", "Cap of the retry delay", Some("5m")),
    key(
        "dead-letter-queue",
        "Where dead letters go",
        Some("<queue>.dead-letter"),
    ),
    key(
        "retry-queue",
        "Where messages wait for their retry (a TTL queue that dead-letters back)",
        Some("<queue>.retry"),
    ),
    key(
        "listen",
        "The admin server's address (/metrics, /healthz, /readyz, /status)",
        Some("0.0.0.0:9102"),
    ),
    key(
        "shutdown-grace",
        "How long SIGTERM waits for in-flight messages",
        Some("30s"),
    ),
    key(
        "tls-ca-file",
        "For amqps://: a PEM CA bundle trusted beside the system roots",
        None,
    ),
    key(
        "tls-cert-file",
        "For amqps:// mutual TLS: the client certificate (PEM)",
        None,
    ),
    key(
        "tls-key-file",
        "For amqps:// mutual TLS: the client private key (PEM, PKCS#8)",
        None,
    ),
    key(
        "heartbeat",
        "AMQP heartbeat interval; a silent peer is dropped after about two intervals",
        Some("10s"),
    ),
    key(
        "connect-timeout",
        "Deadline for one connection attempt to one node",
        Some("5s"),
    ),
    key(
        "reconnect-backoff",
        "First delay between connection attempts; doubles with jitter",
        Some("200ms"),
    ),
    key(
        "reconnect-backoff-max",
        "Cap of the delay between connection attempts",
        Some("1s"),
    ),
    key(
        "app-health-url",
        "URL probed (GET, 2xx = up) while the app is down; default: TCP connect to --target-url",
        None,
    ),
    key(
        "app-probe-interval",
        "How often the app is probed while it is down",
        Some("500ms"),
    ),
    key(
        "management-url",
        "RabbitMQ management API base URL (http://user:pass@host:15672), used to tell active from standby",
        None,
    ),
    key(
        "broker-consumer-timeout",
        "The broker's delivery-acknowledgement timeout (consumer_timeout); warn at 80% of it",
        Some("30m"),
    ),
    key(
        "queue-poll-interval",
        "How often queue depth and consumer count are polled",
        Some("5s"),
    ),
    key("log-format", "text or json", Some("text")),
];

const fn key(name: &'static str, help: &'static str, default: Option<&'static str>) -> Key {
    Key {
        name,
        help,
        default,
    }
}

/// The environment variable that sets `key`: `RABBIT_SIDECAR_` + upper snake case.
pub fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.replace('-', "_").to_ascii_uppercase())
}

/// Raw text values by key, each remembering where it came from.
#[derive(Debug, Default, Clone)]
pub struct Layers {
    flags: BTreeMap<String, String>,
    env: BTreeMap<String, String>,
    file: BTreeMap<String, String>,
    subscriptions: Vec<BTreeMap<String, String>>,
    file_path: Option<PathBuf>,
}

impl Layers {
    /// Collects the layers: `flags` from the command line (key → text), the environment through
    /// `env`, and the TOML file named by `--config` or `RABBIT_SIDECAR_CONFIG`.
    pub fn collect(
        flags: BTreeMap<String, String>,
        env: &dyn EnvSource,
    ) -> Result<Self, ConfigError> {
        let mut layers = Layers {
            flags,
            ..Layers::default()
        };
        for key in KEYS {
            if let Some(value) = env.var(&env_name(key.name)) {
                layers.env.insert(key.name.to_string(), value);
            }
        }
        let path = match layers.flags.remove("config") {
            Some(path) => Some(path),
            None => env.var(&env_name("config")),
        };
        if let Some(path) = path {
            let path = PathBuf::from(path);
            (layers.file, layers.subscriptions) = read_file(&path)?;
            layers.file_path = Some(path);
        }
        Ok(layers)
    }

    fn file_origin(&self, key: &str) -> String {
        let path = self
            .file_path
            .as_deref()
            .unwrap_or(Path::new("config file"));
        format!("{key} (in {})", path.display())
    }

    /// Builds and validates the whole configuration.
    pub fn build(&self) -> Result<Config, ConfigError> {
        let reconnect_backoff = self.required("reconnect-backoff", parse_duration)?;
        let reconnect_backoff_max = self.required("reconnect-backoff-max", parse_duration)?;
        let tls_cert_file = self.parse("tls-cert-file", parse_path)?;
        let tls_key_file = self.parse("tls-key-file", parse_path)?;
        if tls_cert_file.is_some() != tls_key_file.is_some() {
            return Err(ConfigError::new(
                if tls_cert_file.is_some() {
                    "--tls-key-file"
                } else {
                    "--tls-cert-file"
                },
                "mutual TLS needs both --tls-cert-file and --tls-key-file",
            ));
        }
        let heartbeat = self.required("heartbeat", parse_duration)?;
        if heartbeat.as_secs() > u16::MAX as u64 {
            return Err(ConfigError::new("--heartbeat", "must be at most 65535s"));
        }
        let target_url = self.required("target-url", parse_http_url)?;
        let subscriptions = if self.subscriptions.is_empty() {
            vec![subscription(self, &target_url)?]
        } else {
            if let Some((origin, _)) = self.get("queue") {
                return Err(ConfigError::new(
                    origin,
                    "cannot be combined with [[subscription]] entries in the config file: put that queue in an entry of its own",
                ));
            }
            let mut subs = Vec::new();
            for (index, table) in self.subscriptions.iter().enumerate() {
                let entry = Entry {
                    parent: self,
                    table,
                    index,
                };
                let sub = subscription(&entry, &target_url)?;
                if subs
                    .iter()
                    .any(|s: &SubscriptionConfig| s.queue == sub.queue)
                {
                    return Err(ConfigError::new(
                        entry.origin("queue"),
                        format!("{:?} is consumed by an earlier entry already", sub.queue),
                    ));
                }
                subs.push(sub);
            }
            subs
        };
        Ok(Config {
            nodes: self.required("amqp-url", parse_nodes)?,
            subscriptions,
            target_url,
            listen: self.required("listen", |s| {
                s.parse::<SocketAddr>().map_err(|_| {
                    format!("{s:?} is not an address: expected IP:PORT such as 0.0.0.0:9102")
                })
            })?,
            shutdown_grace: self.required("shutdown-grace", parse_duration)?,
            tls_ca_file: self.parse("tls-ca-file", parse_path)?,
            tls_cert_file,
            tls_key_file,
            heartbeat,
            connect_timeout: self.required("connect-timeout", parse_positive_duration)?,
            reconnect_backoff,
            reconnect_backoff_max,
            app_health_url: self.parse("app-health-url", parse_http_url)?,
            app_probe_interval: self.required("app-probe-interval", parse_positive_duration)?,
            management_url: self.parse("management-url", parse_http_url)?.map(SecretUrl),
            consumer_timeout: self.required("broker-consumer-timeout", parse_positive_duration)?,
            queue_poll_interval: self.required("queue-poll-interval", parse_positive_duration)?,
            log_format: self.required("log-format", |s| {
                LogFormat::from_str(s).map_err(|e| e.to_string())
            })?,
        })
    }
}

/// Where values come from: the layers themselves, or one `[[subscription]]` entry over them.
trait Lookup {
    /// The raw text of `key` and where it came from.
    fn get(&self, key: &str) -> Option<(String, String)>;

    /// Where `key` would be named in an error when it is missing.
    fn origin(&self, key: &str) -> String {
        format!("--{key}")
    }

    /// The value of `key` parsed by `parse`, or the default text parsed the same way.
    fn parse<T>(
        &self,
        key: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        let Some((origin, text)) = self.get(key).or_else(|| {
            KEYS.iter()
                .find(|k| k.name == key)
                .and_then(|k| k.default)
                .filter(|d| !d.starts_with('<'))
                .map(|d| (format!("--{key} (default)"), d.to_string()))
        }) else {
            return Ok(None);
        };
        parse(text.trim())
            .map(Some)
            .map_err(|problem| ConfigError::new(origin, problem))
    }

    fn required<T>(
        &self,
        key: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        self.parse(key, parse)?.ok_or_else(|| {
            ConfigError::new(
                self.origin(key),
                format!(
                    "is required (flag --{key}, variable {}, or `{key}` in the config file)",
                    env_name(key)
                ),
            )
        })
    }
}

impl Lookup for Layers {
    fn get(&self, key: &str) -> Option<(String, String)> {
        if let Some(v) = self.flags.get(key) {
            return Some((format!("--{key}"), v.clone()));
        }
        if let Some(v) = self.env.get(key) {
            return Some((env_name(key), v.clone()));
        }
        self.file
            .get(key)
            .map(|v| (self.file_origin(key), v.clone()))
    }
}

/// One `[[subscription]]` entry; keys it does not set fall back to the top-level layers.
struct Entry<'a> {
    parent: &'a Layers,
    table: &'a BTreeMap<String, String>,
    index: usize,
}

impl Lookup for Entry<'_> {
    fn get(&self, key: &str) -> Option<(String, String)> {
        if let Some(v) = self.table.get(key) {
            return Some((self.origin(key), v.clone()));
        }
        // The queue and its own companions and routing are never inherited.
        if SUBSCRIPTION_ONLY.contains(&key) {
            return None;
        }
        self.parent.get(key)
    }

    fn origin(&self, key: &str) -> String {
        self.parent
            .file_origin(&format!("subscription[{}].{key}", self.index + 1))
    }
}

/// Keys a `[[subscription]]` entry may set, beyond which the top-level value applies.
const SUBSCRIPTION_KEYS: &[&str] = &[
    "queue",
    "declare",
    "queue-type",
    "single-active-consumer",
    "exchange",
    "exchange-type",
    "binding-key",
    "target-url",
    "path",
    "prefetch",
    "concurrency",
    "handler-timeout",
    "max-deliveries",
    "retry-backoff",
    "retry-backoff-max",
    "dead-letter-queue",
    "retry-queue",
];

/// Keys an entry never inherits from the top level.
const SUBSCRIPTION_ONLY: &[&str] = &[
    "queue",
    "exchange",
    "binding-key",
    "path",
    "dead-letter-queue",
    "retry-queue",
];

fn subscription(l: &impl Lookup, base_target: &Uri) -> Result<SubscriptionConfig, ConfigError> {
    let queue = l.required("queue", parse_name)?;
    let prefetch = l.required("prefetch", |s| parse_int(s, 1, u16::MAX as u64))? as u16;
    let concurrency = l.required("concurrency", |s| parse_int(s, 1, 65_535))? as usize;
    if concurrency > prefetch as usize {
        return Err(ConfigError::new(
            l.get("concurrency")
                .map(|(o, _)| o)
                .unwrap_or_else(|| l.origin("concurrency")),
            format!(
                "{concurrency} is more than --prefetch ({prefetch}); the extra slots could never be used"
            ),
        ));
    }
    let retry_backoff = l.required("retry-backoff", parse_duration)?;
    let retry_backoff_max = l.required("retry-backoff-max", parse_duration)?;
    if retry_backoff > retry_backoff_max {
        return Err(ConfigError::new(
            l.origin("retry-backoff"),
            "is longer than --retry-backoff-max",
        ));
    }
    let exchange_type = l.required("exchange-type", |s| match s {
        "direct" => Ok(ExchangeType::Direct),
        "topic" => Ok(ExchangeType::Topic),
        "fanout" => Ok(ExchangeType::Fanout),
        "headers" => Ok(ExchangeType::Headers),
        other => Err(format!(
            "{other:?} is not an exchange type: expected direct, topic, fanout or headers"
        )),
    })?;
    let exchange = l.parse("exchange", parse_name)?;
    let binding_keys: Vec<String> = l
        .parse("binding-key", |s| {
            Ok(s.split(',').map(|k| k.trim().to_string()).collect())
        })?
        .unwrap_or_default();
    if exchange.is_none() && !binding_keys.is_empty() {
        return Err(ConfigError::new(
            l.origin("binding-key"),
            "needs --exchange: a binding key binds the queue to an exchange",
        ));
    }
    if let Some(k) = binding_keys.iter().find(|k| k.len() > 255) {
        return Err(ConfigError::new(
            l.origin("binding-key"),
            format!(
                "a key is {} bytes long; AMQP keys are at most 255 bytes",
                k.len()
            ),
        ));
    }
    let target_url = match (l.parse("path", |s| Ok(s.to_string()))?, l.get("target-url")) {
        (Some(path), _) => {
            join_path(base_target, &path).map_err(|p| ConfigError::new(l.origin("path"), p))?
        }
        (None, Some(_)) => l.required("target-url", parse_http_url)?,
        (None, None) => base_target.clone(),
    };
    Ok(SubscriptionConfig {
        dead_letter_queue: l
            .parse("dead-letter-queue", parse_name)?
            .unwrap_or_else(|| format!("{queue}.dead-letter")),
        retry_queue: l
            .parse("retry-queue", parse_name)?
            .unwrap_or_else(|| format!("{queue}.retry")),
        queue,
        declare: l.required("declare", parse_bool)?,
        queue_type: l.required("queue-type", |s| match s {
            "quorum" => Ok(QueueType::Quorum),
            "classic" => Ok(QueueType::Classic),
            other => Err(format!(
                "{other:?} is not a queue type: expected \"quorum\" or \"classic\""
            )),
        })?,
        single_active_consumer: l.required("single-active-consumer", parse_bool)?,
        exchange: exchange.map(|e| (e, exchange_type)),
        binding_keys,
        target_url,
        prefetch,
        concurrency,
        handler_timeout: l.required("handler-timeout", parse_positive_duration)?,
        max_deliveries: l.required("max-deliveries", |s| parse_int(s, 1, 1_000_000))? as u32,
        retry_backoff,
        retry_backoff_max,
    })
}

/// `base`'s scheme and authority with `path`.
fn join_path(base: &Uri, path: &str) -> Result<Uri, String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} must start with /"));
    }
    let authority = base.authority().map(|a| a.as_str()).unwrap_or("127.0.0.1");
    format!("http://{authority}{path}")
        .parse()
        .map_err(|_| format!("{path:?} is not a valid URL path"))
}

type FileValues = (BTreeMap<String, String>, Vec<BTreeMap<String, String>>);

/// Reads the TOML file into key → text, and each `[[subscription]]` entry likewise. Unknown keys
/// are errors: a typo must not pass silently.
fn read_file(path: &Path) -> Result<FileValues, ConfigError> {
    let origin = format!("--config {}", path.display());
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(&origin, format!("cannot read the file: {e}")))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        ConfigError::new(&origin, format!("not valid TOML: {}", e.message()))
    })?;
    let named = |key: &str| format!("{key} (in {})", path.display());
    let mut top = BTreeMap::new();
    let mut subs = Vec::new();
    for (raw_key, value) in table {
        if raw_key == "subscription" {
            let toml::Value::Array(entries) = value else {
                return Err(ConfigError::new(
                    named("subscription"),
                    "must be an array of tables: write each entry as [[subscription]]",
                ));
            };
            for (i, entry) in entries.into_iter().enumerate() {
                let at = |k: &str| named(&format!("subscription[{}].{k}", i + 1));
                let toml::Value::Table(entry) = entry else {
                    return Err(ConfigError::new(at(""), "must be a table"));
                };
                let mut values = BTreeMap::new();
                for (raw, v) in entry {
                    let key = normalize_key(&raw);
                    if !SUBSCRIPTION_KEYS.contains(&key.as_str()) {
                        return Err(ConfigError::new(at(&raw), "unknown key in a subscription"));
                    }
                    values.insert(
                        key,
                        value_text(v).map_err(|p| ConfigError::new(at(&raw), p))?,
                    );
                }
                subs.push(values);
            }
            continue;
        }
        let key = normalize_key(&raw_key);
        if !KEYS.iter().any(|k| k.name == key) {
            return Err(ConfigError::new(named(&raw_key), "unknown key".to_string()));
        }
        top.insert(
            key,
            value_text(value).map_err(|p| ConfigError::new(named(&raw_key), p))?,
        );
    }
    Ok((top, subs))
}

/// File keys may use `_` or `-`; `binding-keys` is accepted for the repeatable `binding-key`.
fn normalize_key(raw: &str) -> String {
    let key = raw.replace('_', "-");
    if key == "binding-keys" {
        "binding-key".into()
    } else {
        key
    }
}

fn value_text(value: toml::Value) -> Result<String, String> {
    Ok(match value {
        toml::Value::String(s) => s,
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Array(items) => {
            let mut parts = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    toml::Value::String(s) => parts.push(s),
                    _ => return Err("arrays may hold only strings".into()),
                }
            }
            parts.join(",")
        }
        _ => return Err("expected a string, number or boolean".into()),
    })
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); write it like 250ms, 30s or 5m"))
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(d)
}

fn parse_int(s: &str, min: u64, max: u64) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("{s:?} is not a whole number from {min} to {max}")),
    }
}

pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean: expected true or false")),
    }
}

fn parse_path(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Err("is empty".into());
    }
    Ok(PathBuf::from(s))
}

/// Queue names are AMQP short strings: at most 255 bytes.
fn parse_name(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("is empty".into());
    }
    if s.len() > 255 {
        return Err(format!(
            "is {} bytes long; AMQP names are at most 255 bytes",
            s.len()
        ));
    }
    Ok(s.to_string())
}

fn parse_http_url(s: &str) -> Result<Uri, String> {
    let uri: Uri = s
        .parse()
        .map_err(|_| "is not a valid URL: expected http://host:port/path".to_string())?;
    match uri.scheme_str() {
        Some("http") if uri.host().is_some() => Ok(uri),
        Some("https") => Err("https is not supported for the local app: use http://".into()),
        _ => Err("is not an http:// URL with a host".into()),
    }
}

/// Parses the node list. Errors name the node by position and never echo the URI (passwords).
pub fn parse_nodes(s: &str) -> Result<Vec<AmqpNode>, String> {
    let mut nodes = Vec::new();
    for (i, part) in s.split(',').map(str::trim).enumerate() {
        if part.is_empty() {
            continue;
        }
        nodes.push(parse_node(part).map_err(|e| format!("node {}: {e}", i + 1))?);
    }
    if nodes.is_empty() {
        return Err("names no broker node".into());
    }
    Ok(nodes)
}

fn parse_node(s: &str) -> Result<AmqpNode, String> {
    let tls = if s.starts_with("amqps://") {
        true
    } else if s.starts_with("amqp://") {
        false
    } else {
        return Err("is not an amqp:// or amqps:// URI".into());
    };
    let mut uri = AMQPUri::from_str(s).map_err(|_| "is not a valid AMQP URI".to_string())?;
    // amq-protocol-uri keeps only DNS names as the host and turns IP literals into "localhost";
    // keep what the user wrote so 127.0.0.2 and ::1 mean what they say.
    if let Some(host) = literal_host(s) {
        uri.authority.host = host;
    }
    Ok(AmqpNode { uri, tls })
}

/// The host part of `scheme://[userinfo@]host[:port][/...]`, IPv6 brackets removed.
fn literal_host(s: &str) -> Option<String> {
    let rest = s.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(inner) = hostport.strip_prefix('[') {
        inner.split(']').next()?
    } else {
        hostport.split(':').next()?
    };
    (!host.is_empty()).then(|| host.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn flags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn build(f: &[(&str, &str)], e: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Layers::collect(flags(f), &env(e))?.build()
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let c = build(&[("queue", "orders")], &[]).unwrap();
        assert_eq!(c.subscriptions[0].prefetch, 64);
        assert_eq!(c.subscriptions[0].concurrency, 16);
        assert_eq!(c.subscriptions[0].dead_letter_queue, "orders.dead-letter");
        assert_eq!(c.subscriptions[0].retry_queue, "orders.retry");
        assert_eq!(c.nodes.len(), 1);
        assert_eq!(c.nodes[0].to_string(), "127.0.0.1:5672");
        assert_eq!(c.subscriptions[0].queue_type, QueueType::Quorum);
        assert_eq!(c.subscriptions[0].handler_timeout, Duration::from_secs(30));
    }

    #[test]
    fn flag_beats_env_beats_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "queue = \"from-file\"\nprefetch = 10\nconcurrency = 2\nmax_deliveries = 9\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let c = build(
            &[("config", p), ("prefetch", "30")],
            &[
                ("RABBIT_SIDECAR_PREFETCH", "20"),
                ("RABBIT_SIDECAR_CONCURRENCY", "3"),
            ],
        )
        .unwrap();
        assert_eq!(c.subscriptions[0].queue, "from-file");
        assert_eq!(c.subscriptions[0].prefetch, 30, "flag wins");
        assert_eq!(c.subscriptions[0].concurrency, 3, "env beats file");
        assert_eq!(c.subscriptions[0].max_deliveries, 9, "file beats default");
    }

    #[test]
    fn config_file_can_come_from_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "queue = \"q\"\namqp-url = [\"amqp://a:b@h1:1\", \"amqps://h2\"]\n",
        )
        .unwrap();
        let c = build(&[], &[("RABBIT_SIDECAR_CONFIG", path.to_str().unwrap())]).unwrap();
        assert_eq!(
            c.nodes.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            ["h1:1", "h2:5671"]
        );
        assert!(c.nodes[1].tls);
    }

    #[test]
    fn errors_name_the_key_and_the_problem() {
        let e = build(&[("queue", "q"), ("prefetch", "abc")], &[]).unwrap_err();
        assert_eq!(e.key, "--prefetch");
        assert!(e.problem.contains("not a whole number"), "{e}");

        let e = build(
            &[("queue", "q")],
            &[("RABBIT_SIDECAR_HANDLER_TIMEOUT", "soon")],
        )
        .unwrap_err();
        assert_eq!(e.key, "RABBIT_SIDECAR_HANDLER_TIMEOUT");
        assert!(e.problem.contains("not a duration"), "{e}");

        let e = build(&[], &[]).unwrap_err();
        assert_eq!(e.key, "--queue");
        assert!(e.problem.contains("required"));

        let e = build(&[("queue", "q"), ("concurrency", "100")], &[]).unwrap_err();
        assert!(e.problem.contains("more than --prefetch"), "{e}");

        let e = build(&[("queue", "q"), ("queue-type", "stream")], &[]).unwrap_err();
        assert_eq!(e.key, "--queue-type");

        let e = build(&[("queue", &"x".repeat(256))], &[]).unwrap_err();
        assert!(e.problem.contains("255"), "{e}");

        let e = build(&[("queue", "q"), ("tls-cert-file", "/c.pem")], &[]).unwrap_err();
        assert_eq!(e.key, "--tls-key-file");
    }

    #[test]
    fn bad_file_keys_and_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "queue = \"q\"\nprefech = 10\n").unwrap();
        let e = build(&[("config", path.to_str().unwrap())], &[]).unwrap_err();
        assert!(e.key.starts_with("prefech (in "), "{e}");
        assert_eq!(e.problem, "unknown key");

        std::fs::write(&path, "queue = [1, 2]\n").unwrap();
        let e = build(&[("config", path.to_str().unwrap())], &[]).unwrap_err();
        assert!(e.problem.contains("only strings"), "{e}");

        std::fs::write(&path, "queue = \n").unwrap();
        let e = build(&[("config", path.to_str().unwrap())], &[]).unwrap_err();
        assert!(e.problem.contains("not valid TOML"), "{e}");

        let e = build(&[("config", "/nonexistent/x.toml")], &[]).unwrap_err();
        assert!(e.problem.contains("cannot read"), "{e}");
    }

    #[test]
    fn amqp_passwords_never_appear_in_errors_or_debug() {
        let secret = "s3cr3t-pa55";
        let e = build(
            &[
                ("queue", "q"),
                (
                    "amqp-url",
                    &format!("amqp://u:{secret}@host:5672/%2f,http://u:{secret}@x"),
                ),
            ],
            &[],
        )
        .unwrap_err();
        assert!(!e.to_string().contains(secret), "{e}");
        assert!(e.problem.contains("node 2"), "{e}");

        let c = build(
            &[
                ("queue", "q"),
                ("amqp-url", &format!("amqp://u:{secret}@10.1.2.3:5673/%2f")),
                (
                    "management-url",
                    &format!("http://u:{secret}@10.1.2.3:15672"),
                ),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(c.nodes[0].uri.authority.userinfo.password, secret);
        assert!(!format!("{c:?}").contains(secret));
        assert_eq!(c.nodes[0].to_string(), "10.1.2.3:5673");
    }

    #[test]
    fn literal_hosts_survive_parsing() {
        assert_eq!(
            literal_host("amqp://u:p@127.0.0.2:5672/%2f").unwrap(),
            "127.0.0.2"
        );
        assert_eq!(literal_host("amqp://[::1]:5672").unwrap(), "::1");
        assert_eq!(
            literal_host("amqps://rabbit.local").unwrap(),
            "rabbit.local"
        );
        assert_eq!(literal_host("amqp://a@b@c:1/").unwrap(), "c");
    }

    #[test]
    fn subscriptions_from_the_file_inherit_top_level_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            r#"
target-url = "http://127.0.0.1:8080/"
prefetch = 40
declare = true
[[subscription]]
queue = "orders"
exchange = "shop"
binding-keys = ["order.created", "order.paid"]
path = "/orders"
concurrency = 4
[[subscription]]
queue = "payments"
exchange = "shop"
exchange_type = "topic"
binding_key = "payment.*"
target-url = "http://127.0.0.1:9000/pay"
max-deliveries = 9
"#,
        )
        .unwrap();
        let c = build(
            &[("config", path.to_str().unwrap())],
            &[("RABBIT_SIDECAR_HANDLER_TIMEOUT", "7s")],
        )
        .unwrap();
        assert_eq!(c.subscriptions.len(), 2);
        let (o, p) = (&c.subscriptions[0], &c.subscriptions[1]);
        assert_eq!(o.queue, "orders");
        assert_eq!(o.target_url.to_string(), "http://127.0.0.1:8080/orders");
        assert_eq!(o.binding_keys, ["order.created", "order.paid"]);
        assert_eq!(o.exchange, Some(("shop".to_string(), ExchangeType::Topic)));
        assert_eq!((o.prefetch, o.concurrency, o.max_deliveries), (40, 4, 5));
        assert!(o.declare && p.declare, "inherited");
        assert_eq!(
            o.handler_timeout,
            Duration::from_secs(7),
            "env applies to every entry"
        );
        assert_eq!(p.target_url.to_string(), "http://127.0.0.1:9000/pay");
        assert_eq!(p.binding_keys, ["payment.*"]);
        assert_eq!(p.max_deliveries, 9);
        assert_eq!(p.dead_letter_queue, "payments.dead-letter");
        assert_eq!(c.max_handler_timeout(), Duration::from_secs(7));
    }

    #[test]
    fn subscription_errors_name_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let p = path.to_str().unwrap().to_string();
        let err = |text: &str, flags: &[(&str, &str)]| {
            std::fs::write(&path, text).unwrap();
            let mut f = vec![("config", p.as_str())];
            f.extend_from_slice(flags);
            build(&f, &[]).unwrap_err()
        };
        let e = err(
            "[[subscription]]\nqueue = \"a\"\n[[subscription]]\nqueue = \"a\"\n",
            &[],
        );
        assert!(e.key.starts_with("subscription[2].queue"), "{e}");
        let e = err("[[subscription]]\nqueue = \"a\"\nprefech = 1\n", &[]);
        assert!(e.key.starts_with("subscription[1].prefech"), "{e}");
        let e = err(
            "[[subscription]]\nqueue = \"a\"\nexchange-type = \"fan\"\n",
            &[],
        );
        assert!(e.problem.contains("exchange type"), "{e}");
        let e = err(
            "[[subscription]]\nqueue = \"a\"\nbinding-key = \"k\"\n",
            &[],
        );
        assert!(e.problem.contains("needs --exchange"), "{e}");
        let e = err(
            "[[subscription]]\nqueue = \"a\"\npath = \"no-slash\"\n",
            &[],
        );
        assert!(e.key.starts_with("subscription[1].path"), "{e}");
        let e = err("[[subscription]]\nqueue = \"a\"\n", &[("queue", "b")]);
        assert_eq!(e.key, "--queue");
        let e = err("[[subscription]]\nexchange = \"x\"\n", &[]);
        assert!(e.key.starts_with("subscription[1].queue"), "{e}");
        let e = err("subscription = 3\n", &[]);
        assert!(e.problem.contains("array of tables"), "{e}");
    }

    #[test]
    fn exchange_and_binding_flags() {
        let c = build(
            &[
                ("queue", "q"),
                ("exchange", "ex"),
                ("binding-key", "a.*,b.#"),
            ],
            &[],
        )
        .unwrap();
        let s = &c.subscriptions[0];
        assert_eq!(s.exchange, Some(("ex".to_string(), ExchangeType::Topic)));
        assert_eq!(s.binding_keys, ["a.*", "b.#"]);
        let e = build(&[("queue", "q"), ("binding-key", "a")], &[]).unwrap_err();
        assert_eq!(e.key, "--binding-key");
    }

    #[test]
    fn booleans_and_env_names() {
        assert_eq!(
            env_name("single-active-consumer"),
            "RABBIT_SIDECAR_SINGLE_ACTIVE_CONSUMER"
        );
        let c = build(
            &[("queue", "q"), ("declare", "true")],
            &[("RABBIT_SIDECAR_SINGLE_ACTIVE_CONSUMER", "yes")],
        )
        .unwrap();
        assert!(c.subscriptions[0].declare && c.subscriptions[0].single_active_consumer);
        let e = build(&[("queue", "q")], &[("RABBIT_SIDECAR_DECLARE", "maybe")]).unwrap_err();
        assert_eq!(e.key, "RABBIT_SIDECAR_DECLARE");
    }
}
