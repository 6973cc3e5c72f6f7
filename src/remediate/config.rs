//! Configuration of the remediation receiver: a TOML file, validated once at start-up.
//!
//! Everything that can act on the outside world (which containers, pods or programs) comes from
//! here and only from here; alert labels merely pick one of the `[targets.<name>]` tables by name.
//! Validation errors name the offending key (`targets.app.container: ...`) so an operator can fix
//! the file without reading code. Environment variables are read through a closure so tests can
//! feed a map instead of mutating the process environment.

use crate::env::{EnvSource, ProcessEnv};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::Uri;
use serde::Deserialize;

/// Default Docker Engine socket.
pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";
/// Service-account files mounted into every pod that has a token.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Variables Kubernetes sets in every container to locate the API server.
pub const ENV_KUBERNETES_SERVICE_HOST: &str = "KUBERNETES_SERVICE_HOST";
pub const ENV_KUBERNETES_SERVICE_PORT: &str = "KUBERNETES_SERVICE_PORT";

/// A configuration problem; the message names the key and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Syntax(String),
    #[error("{key}: {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

/// The bearer token Alertmanager must present. Its `Debug` never shows the value.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    pub fn new(value: impl Into<String>) -> Self {
        Token(value.into())
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Path of the webhook endpoint, e.g. `/alerts`.
    pub path: String,
    pub token: Token,
    /// Decide and record as usual, but never touch anything.
    pub dry_run: bool,
    /// No second restart of a target within this long after the previous one.
    pub cooldown: Duration,
    /// At most this many restarts of a target per `window`; then stop and leave it to a human.
    pub max_restarts: u32,
    pub window: Duration,
    pub max_body_bytes: usize,
    /// How long in-flight restarts may take to finish after SIGTERM.
    pub shutdown_grace: Duration,
    pub targets: BTreeMap<String, Target>,
}

/// What a restart of one named target does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    DockerRestart {
        container: String,
        socket: PathBuf,
        /// Passed to Docker as `t`: seconds to wait for a graceful stop before killing.
        stop_timeout: Duration,
    },
    KubernetesDeletePod {
        api_server: Uri,
        namespace: String,
        pod: PodChoice,
        token_file: PathBuf,
        ca_file: PathBuf,
    },
    Command {
        program: PathBuf,
        args: Vec<String>,
        timeout: Duration,
    },
}

/// How the pod to delete is chosen. Both ways keep the choice inside the configured namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodChoice {
    /// Always this pod.
    Named(String),
    /// The pod named by the alert's `pod` label, but only if it is one of the pods this selector
    /// lists in the configured namespace.
    Selector(String),
}

/// The bounded set of action kinds, used as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionKind {
    DockerRestart,
    KubernetesDeletePod,
    Command,
}

impl ActionKind {
    pub const ALL: [ActionKind; 3] = [
        ActionKind::DockerRestart,
        ActionKind::KubernetesDeletePod,
        ActionKind::Command,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::DockerRestart => "docker_restart",
            ActionKind::KubernetesDeletePod => "kubernetes_delete_pod",
            ActionKind::Command => "command",
        }
    }
}

impl Target {
    pub fn kind(&self) -> ActionKind {
        match self {
            Target::DockerRestart { .. } => ActionKind::DockerRestart,
            Target::KubernetesDeletePod { .. } => ActionKind::KubernetesDeletePod,
            Target::Command { .. } => ActionKind::Command,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    path: Option<String>,
    token_file: Option<PathBuf>,
    token_env: Option<String>,
    #[serde(default)]
    dry_run: bool,
    cooldown: Option<String>,
    max_restarts: Option<u32>,
    window: Option<String>,
    max_body_bytes: Option<usize>,
    shutdown_grace: Option<String>,
    #[serde(default)]
    targets: BTreeMap<String, RawTarget>,
}

#[derive(Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
enum RawTarget {
    DockerRestart {
        container: String,
        docker_socket: Option<PathBuf>,
        stop_timeout: Option<String>,
    },
    KubernetesDeletePod {
        namespace: Option<String>,
        pod: Option<String>,
        label_selector: Option<String>,
        api_server: Option<String>,
        token_file: Option<PathBuf>,
        ca_file: Option<PathBuf>,
    },
    Command {
        program: PathBuf,
        #[serde(default)]
        args: Vec<String>,
        timeout: Option<String>,
    },
}

impl Config {
    /// Reads and validates the file at `path`, taking environment variables from the process.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, &ProcessEnv)
    }

    /// Validates TOML text; `env` answers environment lookups (`token_env`, Kubernetes defaults).
    pub fn parse(text: &str, env: &dyn EnvSource) -> Result<Config, ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;

        let listen = raw.listen.as_deref().unwrap_or("0.0.0.0:9103");
        let listen = listen
            .parse()
            .map_err(|e| invalid("listen", format!("{listen:?} is not an address:port ({e})")))?;

        let path = raw.path.unwrap_or_else(|| "/alerts".to_owned());
        if !path.starts_with('/') || path == "/healthz" || path == "/metrics" {
            return Err(invalid(
                "path",
                format!("{path:?} must start with '/' and not be /healthz or /metrics"),
            ));
        }

        let token = load_token(raw.token_file.as_deref(), raw.token_env.as_deref(), env)?;

        let cooldown = duration("cooldown", raw.cooldown.as_deref(), "5m")?;
        let window = duration("window", raw.window.as_deref(), "1h")?;
        if window.is_zero() {
            return Err(invalid("window", "must be longer than zero"));
        }
        let max_restarts = raw.max_restarts.unwrap_or(3);
        if max_restarts == 0 {
            return Err(invalid(
                "max_restarts",
                "must be at least 1 (use dry_run = true to never act)",
            ));
        }
        let max_body_bytes = raw.max_body_bytes.unwrap_or(1024 * 1024);
        if max_body_bytes == 0 {
            return Err(invalid("max_body_bytes", "must be at least 1"));
        }
        let shutdown_grace = duration("shutdown_grace", raw.shutdown_grace.as_deref(), "30s")?;

        if raw.targets.is_empty() {
            return Err(invalid(
                "targets",
                "no [targets.<name>] table: nothing could ever be restarted",
            ));
        }
        let mut targets = BTreeMap::new();
        for (name, raw_target) in raw.targets {
            let target = validate_target(&name, raw_target, env)?;
            targets.insert(name, target);
        }

        Ok(Config {
            listen,
            path,
            token,
            dry_run: raw.dry_run,
            cooldown,
            max_restarts,
            window,
            max_body_bytes,
            shutdown_grace,
            targets,
        })
    }
}

fn load_token(
    file: Option<&Path>,
    var: Option<&str>,
    env: &dyn EnvSource,
) -> Result<Token, ConfigError> {
    let (key, value) = match (file, var) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "token_file",
                "set token_file or token_env, not both",
            ));
        }
        (None, None) => {
            return Err(invalid(
                "token_file",
                "missing: a bearer token is required (token_file or token_env)",
            ));
        }
        (Some(path), None) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                invalid("token_file", format!("cannot read {}: {e}", path.display()))
            })?;
            ("token_file", text)
        }
        (None, Some(name)) => {
            let value = env.var(name).ok_or_else(|| {
                invalid(
                    "token_env",
                    format!("environment variable {name} is not set"),
                )
            })?;
            ("token_env", value)
        }
    };
    // Secret files usually end with a newline that is not part of the token.
    let value = value.trim();
    if value.is_empty() {
        return Err(invalid(key, "the token is empty"));
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(key, "the token contains whitespace"));
    }
    Ok(Token::new(value))
}

fn duration(key: &str, value: Option<&str>, default: &str) -> Result<Duration, ConfigError> {
    let text = value.unwrap_or(default);
    humantime::parse_duration(text)
        .map_err(|e| invalid(key, format!("{text:?} is not a duration like \"5m\" ({e})")))
}

fn validate_target(name: &str, raw: RawTarget, env: &dyn EnvSource) -> Result<Target, ConfigError> {
    let key = |field: &str| format!("targets.{name}.{field}");
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
    {
        return Err(invalid(
            format!("targets.{name:?}"),
            "target names use letters, digits, '_', '-' and '.' only",
        ));
    }
    match raw {
        RawTarget::DockerRestart {
            container,
            docker_socket,
            stop_timeout,
        } => {
            if !is_docker_name(&container) {
                return Err(invalid(
                    key("container"),
                    format!("{container:?} is not a Docker container name or id"),
                ));
            }
            let stop_timeout = duration(&key("stop_timeout"), stop_timeout.as_deref(), "10s")?;
            Ok(Target::DockerRestart {
                container,
                socket: docker_socket.unwrap_or_else(|| PathBuf::from(DEFAULT_DOCKER_SOCKET)),
                stop_timeout,
            })
        }
        RawTarget::KubernetesDeletePod {
            namespace,
            pod,
            label_selector,
            api_server,
            token_file,
            ca_file,
        } => {
            let sa = Path::new(SERVICE_ACCOUNT_DIR);
            let namespace = match namespace {
                Some(ns) => ns,
                None => std::fs::read_to_string(sa.join("namespace"))
                    .map(|s| s.trim().to_owned())
                    .map_err(|_| {
                        invalid(
                            key("namespace"),
                            "missing, and no service-account namespace file",
                        )
                    })?,
            };
            if !is_dns1123_label(&namespace) {
                return Err(invalid(
                    key("namespace"),
                    format!("{namespace:?} is not a valid namespace name"),
                ));
            }
            let pod = match (pod, label_selector) {
                (Some(pod), None) if is_dns1123_subdomain(&pod) => PodChoice::Named(pod),
                (Some(pod), None) => {
                    return Err(invalid(
                        key("pod"),
                        format!("{pod:?} is not a valid pod name"),
                    ));
                }
                (None, Some(selector)) if is_label_selector(&selector) => {
                    PodChoice::Selector(selector)
                }
                (None, Some(selector)) => {
                    return Err(invalid(
                        key("label_selector"),
                        format!("{selector:?} is not a label selector like \"app=web,tier!=db\""),
                    ));
                }
                _ => {
                    return Err(invalid(
                        key("pod"),
                        "set exactly one of pod or label_selector",
                    ));
                }
            };
            let api_server = match api_server {
                Some(url) => url,
                None => default_api_server(env).ok_or_else(|| {
                    invalid(
                        key("api_server"),
                        format!(
                            "missing, and {ENV_KUBERNETES_SERVICE_HOST}/{ENV_KUBERNETES_SERVICE_PORT} are not set"
                        ),
                    )
                })?,
            };
            let api_server: Uri = api_server
                .parse()
                .ok()
                .filter(|u: &Uri| {
                    matches!(u.scheme_str(), Some("https" | "http"))
                        && u.host().is_some()
                        && u.path() == "/"
                        && u.query().is_none()
                })
                .ok_or_else(|| {
                    invalid(
                        key("api_server"),
                        format!("{api_server:?} is not a URL like https://host:port"),
                    )
                })?;
            Ok(Target::KubernetesDeletePod {
                api_server,
                namespace,
                pod,
                token_file: token_file.unwrap_or_else(|| sa.join("token")),
                ca_file: ca_file.unwrap_or_else(|| sa.join("ca.crt")),
            })
        }
        RawTarget::Command {
            program,
            args,
            timeout,
        } => {
            // An absolute path means PATH cannot change what runs.
            if !program.is_absolute() {
                return Err(invalid(
                    key("program"),
                    format!("{} must be an absolute path", program.display()),
                ));
            }
            let timeout = duration(&key("timeout"), timeout.as_deref(), "30s")?;
            if timeout.is_zero() {
                return Err(invalid(key("timeout"), "must be longer than zero"));
            }
            Ok(Target::Command {
                program,
                args,
                timeout,
            })
        }
    }
}

fn default_api_server(env: &dyn EnvSource) -> Option<String> {
    let host = env.var(ENV_KUBERNETES_SERVICE_HOST)?;
    let port = env
        .var(ENV_KUBERNETES_SERVICE_PORT)
        .unwrap_or_else(|| "443".to_owned());
    if host.contains(':') {
        Some(format!("https://[{host}]:{port}"))
    } else {
        Some(format!("https://{host}:{port}"))
    }
}

/// Docker names are `[a-zA-Z0-9][a-zA-Z0-9_.-]*`; ids are hex. Both fit in a URL path unescaped.
fn is_docker_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        && s.len() <= 255
}

/// RFC 1123 label as Kubernetes uses it for namespaces: lowercase alphanumerics and '-', at most
/// 63 characters, alphanumeric at both ends.
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain as Kubernetes uses it for pod names: dot-separated labels, at most 253.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// A conservative check: equality-based selectors only, in a character set that needs no escaping
/// beyond what we do when building the query string.
fn is_label_selector(s: &str) -> bool {
    !s.is_empty()
        && s.split(',').all(|term| {
            let term = term.trim();
            let (k, v) = if let Some((k, v)) = term.split_once("!=") {
                (k, v)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, v)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, v)
            } else {
                (term.strip_prefix('!').unwrap_or(term), "")
            };
            let ok = |x: &str| {
                x.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
            };
            !k.is_empty() && ok(k) && ok(v)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(_: &str) -> Option<String> {
        None
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, &|name: &str| {
            (name == "REMEDIATE_TOKEN").then(|| "s3cret\n".to_owned())
        })
    }

    const MINIMAL: &str = r#"
        token_env = "REMEDIATE_TOKEN"
        [targets.app]
        action = "command"
        program = "/bin/true"
    "#;

    #[test]
    fn minimal_file_gets_safe_defaults() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.listen, "0.0.0.0:9103".parse().unwrap());
        assert_eq!(config.path, "/alerts");
        assert_eq!(config.token.as_bytes(), b"s3cret");
        assert!(!config.dry_run);
        assert_eq!(config.cooldown, Duration::from_secs(300));
        assert_eq!(config.max_restarts, 3);
        assert_eq!(config.window, Duration::from_secs(3600));
        assert_eq!(config.max_body_bytes, 1 << 20);
        assert_eq!(
            config.targets["app"],
            Target::Command {
                program: "/bin/true".into(),
                args: vec![],
                timeout: Duration::from_secs(30)
            }
        );
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[test]
    fn docker_and_kubernetes_targets_parse() {
        let text = r#"
            token_env = "REMEDIATE_TOKEN"
            cooldown = "90s"
            [targets.app]
            action = "docker_restart"
            container = "rabbit-sidecar-demo-app"
            [targets.web]
            action = "kubernetes_delete_pod"
            namespace = "shop"
            label_selector = "app=web"
        "#;
        let config = Config::parse(text, &|name: &str| match name {
            "REMEDIATE_TOKEN" => Some("t".into()),
            ENV_KUBERNETES_SERVICE_HOST => Some("10.0.0.1".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(config.cooldown, Duration::from_secs(90));
        assert_eq!(
            config.targets["app"],
            Target::DockerRestart {
                container: "rabbit-sidecar-demo-app".into(),
                socket: DEFAULT_DOCKER_SOCKET.into(),
                stop_timeout: Duration::from_secs(10),
            }
        );
        let Target::KubernetesDeletePod {
            api_server, pod, ..
        } = &config.targets["web"]
        else {
            panic!("wrong target kind");
        };
        assert_eq!(api_server.to_string(), "https://10.0.0.1:443/");
        assert_eq!(pod, &PodChoice::Selector("app=web".into()));
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                "[targets.app]\naction = \"command\"\nprogram = \"/bin/true\"",
                "token_file",
            ),
            (&MINIMAL.replace("/bin/true", "true"), "targets.app.program"),
            (&format!("cooldown = \"soon\"\n{MINIMAL}"), "cooldown"),
            (&format!("max_restarts = 0\n{MINIMAL}"), "max_restarts"),
            (&format!("listen = \"nowhere\"\n{MINIMAL}"), "listen"),
            (&format!("bogus = 1\n{MINIMAL}"), "bogus"),
            (&format!("{MINIMAL}\nsurprise = 1"), "surprise"),
            (
                "token_env = \"REMEDIATE_TOKEN\"\n[targets.app]\naction = \"docker_restart\"\ncontainer = \"a/../b\"",
                "targets.app.container",
            ),
            (
                "token_env = \"REMEDIATE_TOKEN\"\n[targets.k]\naction = \"kubernetes_delete_pod\"\nnamespace = \"ns\"\napi_server = \"http://127.0.0.1:1\"",
                "targets.k.pod",
            ),
            (
                "token_env = \"REMEDIATE_TOKEN\"\n[targets.k]\naction = \"kubernetes_delete_pod\"\nnamespace = \"ns\"\npod = \"x\"",
                "targets.k.api_server",
            ),
            ("token_env = \"REMEDIATE_TOKEN\"", "targets"),
            (
                "token_env = \"NOPE\"\n[targets.a]\naction = \"command\"\nprogram = \"/bin/true\"",
                "token_env",
            ),
        ];
        for (text, key) in cases {
            let err = parse(text).expect_err(text).to_string();
            assert!(
                err.contains(key),
                "{err:?} should name {key:?} for {text:?}"
            );
        }
        assert!(Config::parse(MINIMAL, &env).is_err());
    }

    #[test]
    fn name_checks() {
        assert!(is_dns1123_subdomain("web-7d9c-abcde"));
        assert!(is_dns1123_subdomain("a.b-c"));
        for bad in ["", "Web", "-a", "a-", "a/b", "a..b", "a_b", &"a".repeat(64)] {
            assert!(!is_dns1123_subdomain(bad), "{bad:?}");
        }
        assert!(is_docker_name("rabbit-sidecar_1.x"));
        assert!(!is_docker_name("../x"));
        assert!(!is_docker_name("a?b"));
        assert!(is_label_selector("app=web,tier!=db"));
        assert!(!is_label_selector("app in (a,b)"));
        assert!(!is_label_selector("app=web&x=y"));
    }
}
