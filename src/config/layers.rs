//! The layers a value can come from (flags, environment, file, default), and building the
//! validated [`Config`] from them. Every value is read as text from the first layer that has it
//! and parsed in one place, so an error names the key as the user wrote it: `--prefetch`,
//! `RABBIT_SIDECAR_PREFETCH`, or `prefetch (in FILE)`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use hyper::Uri;

use super::keys::{self, Key};
use super::parse::*;
use super::*;

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
        for key in keys::ALL.iter().filter(|k| k.is_flag()) {
            if let Some(value) = env.var(&key.env()) {
                layers.env.insert(key.name.to_string(), value);
            }
        }
        let path = match layers.flags.remove(keys::CONFIG.name) {
            Some(path) => Some(path),
            None => env.var(&keys::CONFIG.env()),
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
        let reconnect_backoff = self.required(&keys::RECONNECT_BACKOFF, parse_duration)?;
        let reconnect_backoff_max = self.required(&keys::RECONNECT_BACKOFF_MAX, parse_duration)?;
        let tls_cert_file = self.parse(&keys::TLS_CERT_FILE, parse_path)?;
        let tls_key_file = self.parse(&keys::TLS_KEY_FILE, parse_path)?;
        if tls_cert_file.is_some() != tls_key_file.is_some() {
            let missing = if tls_cert_file.is_some() {
                &keys::TLS_KEY_FILE
            } else {
                &keys::TLS_CERT_FILE
            };
            return Err(ConfigError::new(
                self.origin(missing),
                "mutual TLS needs both --tls-cert-file and --tls-key-file",
            ));
        }
        let heartbeat = self.required(&keys::HEARTBEAT, parse_duration)?;
        if heartbeat.as_secs() > u16::MAX as u64 {
            return Err(ConfigError::new(
                self.origin(&keys::HEARTBEAT),
                "must be at most 65535s",
            ));
        }
        let target_url = self.required(&keys::TARGET_URL, parse_http_url)?;
        let subscriptions = if self.subscriptions.is_empty() {
            vec![subscription(self, &target_url)?]
        } else {
            if let Some((origin, _)) = self.get(&keys::QUEUE) {
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
                        entry.origin(&keys::QUEUE),
                        format!("{:?} is consumed by an earlier entry already", sub.queue),
                    ));
                }
                subs.push(sub);
            }
            subs
        };
        Ok(Config {
            nodes: self.required(&keys::AMQP_URL, parse_nodes)?,
            subscriptions,
            target_url,
            listen: self.required(&keys::LISTEN, |s| {
                s.parse::<SocketAddr>().map_err(|_| {
                    format!("{s:?} is not an address: expected IP:PORT such as 0.0.0.0:9102")
                })
            })?,
            shutdown_grace: self.required(&keys::SHUTDOWN_GRACE, parse_duration)?,
            tls_ca_file: self.parse(&keys::TLS_CA_FILE, parse_path)?,
            tls_cert_file,
            tls_key_file,
            heartbeat,
            connect_timeout: self.required(&keys::CONNECT_TIMEOUT, parse_positive_duration)?,
            reconnect_backoff,
            reconnect_backoff_max,
            app_health_url: self.parse(&keys::APP_HEALTH_URL, parse_http_url)?,
            app_probe_interval: self
                .required(&keys::APP_PROBE_INTERVAL, parse_positive_duration)?,
            management_url: self
                .parse(&keys::MANAGEMENT_URL, parse_http_url)?
                .map(SecretUrl),
            consumer_timeout: self
                .required(&keys::BROKER_CONSUMER_TIMEOUT, parse_positive_duration)?,
            queue_poll_interval: self
                .required(&keys::QUEUE_POLL_INTERVAL, parse_positive_duration)?,
            retry_after_max: self.required(&keys::RETRY_AFTER_MAX, parse_duration)?,
            circuit: if self.required(&keys::CIRCUIT_BREAKER, parse_bool)? {
                Some(CircuitConfig {
                    window: self.required(&keys::CIRCUIT_WINDOW, parse_positive_duration)?,
                    min_calls: self
                        .required(&keys::CIRCUIT_MIN_CALLS, |s| parse_int(s, 1, 1_000_000))?
                        as u32,
                    failure_ratio: self.required(&keys::CIRCUIT_FAILURE_RATIO, parse_ratio)?,
                    open_base: self.required(&keys::CIRCUIT_OPEN, parse_positive_duration)?,
                    open_max: self.required(&keys::CIRCUIT_OPEN_MAX, parse_positive_duration)?,
                })
            } else {
                None
            },
            log_format: self.required(&keys::LOG_FORMAT, |s| {
                LogFormat::from_str(s).map_err(|e| e.to_string())
            })?,
        })
    }
}

/// Where values come from: the layers themselves, or one `[[subscription]]` entry over them.
trait Lookup {
    /// The raw text of `key` and where it came from.
    fn get(&self, key: &Key) -> Option<(String, String)>;

    /// Where `key` would be named in an error when it is missing.
    fn origin(&self, key: &Key) -> String {
        format!("--{}", key.name)
    }

    /// The value of `key` parsed by `parse`, or its default parsed the same way.
    fn parse<T>(
        &self,
        key: &Key,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        let Some((origin, text)) = self.get(key).or_else(|| {
            key.default_text()
                .map(|d| (format!("--{} (default)", key.name), d.to_string()))
        }) else {
            return Ok(None);
        };
        parse(text.trim())
            .map(Some)
            .map_err(|problem| ConfigError::new(origin, problem))
    }

    fn required<T>(
        &self,
        key: &Key,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        self.parse(key, parse)?.ok_or_else(|| {
            let name = key.name;
            ConfigError::new(
                self.origin(key),
                format!(
                    "is required (flag --{name}, variable {}, or `{name}` in the config file)",
                    key.env()
                ),
            )
        })
    }
}

impl Lookup for Layers {
    fn get(&self, key: &Key) -> Option<(String, String)> {
        let name = key.name;
        if let Some(v) = self.flags.get(name) {
            return Some((format!("--{name}"), v.clone()));
        }
        if let Some(v) = self.env.get(name) {
            return Some((key.env(), v.clone()));
        }
        self.file
            .get(name)
            .map(|v| (self.file_origin(name), v.clone()))
    }
}

/// One `[[subscription]]` entry; keys it does not set fall back to the top-level layers.
struct Entry<'a> {
    parent: &'a Layers,
    table: &'a BTreeMap<String, String>,
    index: usize,
}

impl Lookup for Entry<'_> {
    fn get(&self, key: &Key) -> Option<(String, String)> {
        if let Some(v) = self.table.get(key.name) {
            return Some((self.origin(key), v.clone()));
        }
        if !key.inherited() {
            return None;
        }
        self.parent.get(key)
    }

    fn origin(&self, key: &Key) -> String {
        self.parent
            .file_origin(&format!("subscription[{}].{}", self.index + 1, key.name))
    }
}

fn subscription(l: &impl Lookup, base_target: &Uri) -> Result<SubscriptionConfig, ConfigError> {
    let queue = l.required(&keys::QUEUE, parse_name)?;
    let prefetch = l.required(&keys::PREFETCH, |s| parse_int(s, 1, u16::MAX as u64))? as u16;
    let concurrency = l.required(&keys::CONCURRENCY, |s| parse_int(s, 1, 65_535))? as usize;
    if concurrency > prefetch as usize {
        return Err(ConfigError::new(
            l.get(&keys::CONCURRENCY)
                .map(|(o, _)| o)
                .unwrap_or_else(|| l.origin(&keys::CONCURRENCY)),
            format!(
                "{concurrency} is more than --prefetch ({prefetch}); the extra slots could never be used"
            ),
        ));
    }
    // Capped at half the prefetch: acks held back for a batch hold prefetch slots, and the
    // broker must keep room to deliver the next messages meanwhile.
    let ack_batch_max = (l.required(&keys::ACK_BATCH_MAX, |s| parse_int(s, 1, 65_535))? as usize)
        .min((usize::from(prefetch) / 2).max(1));
    let ack_batch_wait = l.required(&keys::ACK_BATCH_WAIT, |s| match parse_duration(s)? {
        d if d > Duration::from_secs(10) => Err(format!(
            "{s:?} is longer than 10s: held acks keep messages from other consumers, and a crash redelivers them"
        )),
        d => Ok(d),
    })?;
    let retry_backoff = l.required(&keys::RETRY_BACKOFF, parse_duration)?;
    let retry_backoff_max = l.required(&keys::RETRY_BACKOFF_MAX, parse_duration)?;
    if retry_backoff > retry_backoff_max {
        return Err(ConfigError::new(
            l.origin(&keys::RETRY_BACKOFF),
            "is longer than --retry-backoff-max",
        ));
    }
    let exchange_type = l.required(&keys::EXCHANGE_TYPE, |s| match s {
        "direct" => Ok(ExchangeType::Direct),
        "topic" => Ok(ExchangeType::Topic),
        "fanout" => Ok(ExchangeType::Fanout),
        "headers" => Ok(ExchangeType::Headers),
        other => Err(format!(
            "{other:?} is not an exchange type: expected direct, topic, fanout or headers"
        )),
    })?;
    let exchange = l.parse(&keys::EXCHANGE, parse_name)?;
    let binding_keys: Vec<String> = l
        .parse(&keys::BINDING_KEY, |s| {
            Ok(s.split(',').map(|k| k.trim().to_string()).collect())
        })?
        .unwrap_or_default();
    if exchange.is_none() && !binding_keys.is_empty() {
        return Err(ConfigError::new(
            l.origin(&keys::BINDING_KEY),
            "needs --exchange: a binding key binds the queue to an exchange",
        ));
    }
    if let Some(k) = binding_keys.iter().find(|k| k.len() > 255) {
        return Err(ConfigError::new(
            l.origin(&keys::BINDING_KEY),
            format!(
                "a key is {} bytes long; AMQP keys are at most 255 bytes",
                k.len()
            ),
        ));
    }
    let target_url = match (
        l.parse(&keys::PATH, |s| Ok(s.to_string()))?,
        l.get(&keys::TARGET_URL),
    ) {
        (Some(path), _) => {
            join_path(base_target, &path).map_err(|p| ConfigError::new(l.origin(&keys::PATH), p))?
        }
        (None, Some(_)) => l.required(&keys::TARGET_URL, parse_http_url)?,
        (None, None) => base_target.clone(),
    };
    Ok(SubscriptionConfig {
        dead_letter_queue: l
            .parse(&keys::DEAD_LETTER_QUEUE, parse_name)?
            .unwrap_or_else(|| format!("{queue}.dead-letter")),
        retry_queue: l
            .parse(&keys::RETRY_QUEUE, parse_name)?
            .unwrap_or_else(|| format!("{queue}.retry")),
        queue,
        declare: l.required(&keys::DECLARE, parse_bool)?,
        queue_type: l.required(&keys::QUEUE_TYPE, |s| match s {
            "quorum" => Ok(QueueType::Quorum),
            "classic" => Ok(QueueType::Classic),
            other => Err(format!(
                "{other:?} is not a queue type: expected \"quorum\" or \"classic\""
            )),
        })?,
        single_active_consumer: l.required(&keys::SINGLE_ACTIVE_CONSUMER, parse_bool)?,
        exchange: exchange.map(|e| (e, exchange_type)),
        binding_keys,
        target_url,
        prefetch,
        concurrency,
        ack_batch_max,
        ack_batch_wait,
        handler_timeout: l.required(&keys::HANDLER_TIMEOUT, parse_positive_duration)?,
        max_deliveries: l.required(&keys::MAX_DELIVERIES, |s| parse_int(s, 1, 1_000_000))? as u32,
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
                    if !keys::ALL.iter().any(|k| k.name == key && k.in_entries()) {
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
        if !keys::ALL.iter().any(|k| k.name == key && k.is_flag()) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name: &str| map.get(name).cloned()
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
    fn ack_coalescing_defaults_and_is_capped_at_half_the_prefetch() {
        let c = build(&[("queue", "q")], &[]).unwrap();
        let s = &c.subscriptions[0];
        assert_eq!(
            (s.ack_batch_max, s.ack_batch_wait),
            (32, Duration::from_millis(5))
        );
        let c = build(
            &[("queue", "q"), ("prefetch", "10"), ("concurrency", "4")],
            &[],
        )
        .unwrap();
        assert_eq!(c.subscriptions[0].ack_batch_max, 5, "half the prefetch");
        let c = build(
            &[("queue", "q"), ("prefetch", "1"), ("concurrency", "1")],
            &[("RABBIT_SIDECAR_ACK_BATCH_MAX", "32")],
        )
        .unwrap();
        assert_eq!(c.subscriptions[0].ack_batch_max, 1, "never below one");
        let c = build(&[("queue", "q"), ("ack-batch-max", "1")], &[]).unwrap();
        assert_eq!(c.subscriptions[0].ack_batch_max, 1, "off");
        let e = build(&[("queue", "q"), ("ack-batch-max", "0")], &[]).unwrap_err();
        assert_eq!(e.key, "--ack-batch-max");
        let e = build(
            &[("queue", "q")],
            &[("RABBIT_SIDECAR_ACK_BATCH_WAIT", "11s")],
        )
        .unwrap_err();
        assert_eq!(e.key, "RABBIT_SIDECAR_ACK_BATCH_WAIT");
        assert!(e.problem.contains("longer than 10s"), "{e}");
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
