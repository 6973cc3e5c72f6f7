//! Checks the ops assets against the tools that consume them and against each other: alert rules
//! and their unit tests (`promtool`), the Alertmanager config (`amtool`), the Grafana dashboards
//! and their provisioning, docker-compose.yml, the Kubernetes example and the Dockerfile.
//!
//! `promtool` and `amtool` come from the Debian packages `prometheus` and
//! `prometheus-alertmanager`; Docker Compose, `kubernetes-validate`, `check-jsonschema`, Grafana's
//! schema package and `ts-json-schema-generator` from `scripts/test-deps.sh`, which installs them
//! (pinned) into `target/tools`. The tests that need a tool fail, saying so, when it is missing.
//! Nothing here starts a container or touches the network.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value;

/// Every family the sidecar really exports, with the series names a histogram adds: taken from
/// the sidecar's own registry, so renaming a metric without its dashboards and rules fails here.
fn exported_series_names() -> BTreeSet<String> {
    let metrics = rabbit_sidecar::telemetry::metrics::Metrics::new(&["q"]);
    // The circuit breaker's families have series once an app has a breaker.
    metrics.add_app("app:80");
    let mut names = BTreeSet::new();
    for family in metrics.registry().gather() {
        let name = family.name().to_string();
        if family.get_field_type() == prometheus::proto::MetricType::HISTOGRAM {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        } else {
            names.insert(name);
        }
    }
    names
}

/// Which container each self-healing alert restarts; the remediation receiver acts on these.
const RESTART_ALERTS: &[(&str, &str)] = &[
    ("RabbitSidecarDown", "sidecar"),
    ("RabbitSidecarAppDown", "app"),
    ("RabbitSidecarAppHung", "app"),
    ("RabbitSidecarConsumerStalled", "sidecar"),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Files directly in `dir` (relative to the repository) whose names end with `suffix`, sorted.
fn files_in(dir: &str, suffix: &str) -> Vec<PathBuf> {
    let dir = root().join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.is_file() && path.to_string_lossy().ends_with(suffix))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *{suffix} files in {}", dir.display());
    files
}

fn relative(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn yaml(path: &Path) -> Value {
    serde_yaml::from_str(&read(path))
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", relative(path)))
}

fn yaml_documents(path: &Path) -> Vec<Value> {
    use serde::Deserialize;
    let text = read(path);
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", relative(path)))
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(value, |v, key| v.get(*key))?.as_str()
}

/// Runs a tool in the repository root and returns its stdout; panics with its output on failure.
fn run_tool(tool: &str, debian_package: &str, args: &[&str]) -> String {
    let output = Command::new(tool)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                panic!("`{tool}` is not installed: apt-get install -y {debian_package}")
            }
            panic!("cannot run `{tool}`: {e}")
        });
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "`{tool} {}` failed with {}:\n{stdout}\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// A tool that `scripts/test-deps.sh` installs into `target/tools/bin`.
fn asset_tool(name: &str) -> PathBuf {
    let path = root().join("target/tools/bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: run scripts/test-deps.sh, which installs it (scripts/test.sh and CI do)",
        path.display()
    );
    path
}

/// Runs an asset tool in the repository root: (whether it succeeded, stdout and stderr together).
fn run_asset_tool(name: &str, args: &[&str]) -> (bool, String) {
    let tool = asset_tool(name);
    let output = Command::new(&tool)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", tool.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn paths_as_args(paths: &[PathBuf]) -> Vec<String> {
    paths.iter().map(|path| relative(path)).collect()
}

/// Metric-looking identifiers in a PromQL expression. Good enough for our own expressions: we
/// never put metric-like words in label values or strings.
fn metrics_in(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|token| token.starts_with("rabbit_sidecar_") || token.starts_with("process_"))
        .map(str::to_owned)
        .collect()
}

fn is_contract_metric(name: &str) -> bool {
    thread_local! {
        static EXPORTED: BTreeSet<String> = exported_series_names();
    }
    EXPORTED.with(|e| e.contains(name))
}

struct AlertRule {
    name: String,
    expr: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

fn string_map(value: Option<&Value>) -> BTreeMap<String, String> {
    value
        .and_then(Value::as_mapping)
        .map(|mapping| {
            mapping
                .iter()
                .map(|(k, v)| {
                    let k = k.as_str().expect("string key").to_owned();
                    let v = v
                        .as_str()
                        .unwrap_or_else(|| panic!("{k}: not a string"))
                        .to_owned();
                    (k, v)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn alert_rules() -> Vec<AlertRule> {
    let mut rules = Vec::new();
    for file in files_in("alerts", ".rules.yml") {
        let doc = yaml(&file);
        for group in doc["groups"].as_sequence().expect("groups") {
            for rule in group["rules"].as_sequence().expect("rules") {
                let Some(name) = rule.get("alert").and_then(Value::as_str) else {
                    continue;
                };
                rules.push(AlertRule {
                    name: name.to_owned(),
                    expr: rule["expr"].as_str().expect("expr").to_owned(),
                    labels: string_map(rule.get("labels")),
                    annotations: string_map(rule.get("annotations")),
                });
            }
        }
    }
    assert!(!rules.is_empty(), "no alerting rules found");
    rules
}

#[test]
fn promtool_accepts_alert_rules() {
    let files = paths_as_args(&files_in("alerts", ".rules.yml"));
    let mut args = vec!["check", "rules"];
    args.extend(files.iter().map(String::as_str));
    run_tool("promtool", "prometheus", &args);
}

#[test]
fn promtool_rule_unit_tests_pass() {
    let files = paths_as_args(&files_in("alerts/tests", ".yml"));
    let mut args = vec!["test", "rules"];
    args.extend(files.iter().map(String::as_str));
    run_tool("promtool", "prometheus", &args);
}

#[test]
fn every_alert_has_a_firing_and_a_silent_test_case() {
    let mut firing = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for file in files_in("alerts/tests", ".yml") {
        let doc = yaml(&file);
        for test in doc["tests"].as_sequence().expect("tests") {
            for case in test["alert_rule_test"].as_sequence().into_iter().flatten() {
                let name = case["alertname"].as_str().expect("alertname").to_owned();
                let expected = case.get("exp_alerts").and_then(Value::as_sequence);
                match expected {
                    Some(alerts) if !alerts.is_empty() => {
                        for alert in alerts {
                            assert!(
                                alert.get("exp_annotations").is_some(),
                                "{}: a firing case of {name} does not check annotations",
                                relative(&file)
                            );
                        }
                        firing.insert(name);
                    }
                    _ => {
                        silent.insert(name);
                    }
                }
            }
        }
    }
    for rule in alert_rules() {
        assert!(
            firing.contains(&rule.name),
            "{} has no test case where it fires",
            rule.name
        );
        assert!(
            silent.contains(&rule.name),
            "{} has no test case where it must stay silent",
            rule.name
        );
    }
}

#[test]
fn alert_rules_follow_conventions() {
    let rules = alert_rules();
    let mut names = BTreeSet::new();
    for rule in &rules {
        let name = &rule.name;
        assert!(names.insert(name.clone()), "alert {name} is defined twice");
        assert!(
            name.starts_with(|c: char| c.is_ascii_uppercase())
                && name.chars().all(|c| c.is_ascii_alphanumeric()),
            "alert name {name} is not CamelCase"
        );
        let severity = rule.labels.get("severity").map(String::as_str);
        assert!(
            matches!(severity, Some("critical" | "warning")),
            "{name}: severity must be critical or warning, got {severity:?}"
        );
        for key in ["summary", "description"] {
            assert!(
                rule.annotations
                    .get(key)
                    .is_some_and(|text| !text.trim().is_empty()),
                "{name}: missing {key} annotation"
            );
        }
        assert!(
            rule.annotations["description"].contains("Restart:"),
            "{name}: the description must say what (if anything) is restarted"
        );
        match (
            rule.labels.get("action").map(String::as_str),
            rule.labels.get("restart_target").map(String::as_str),
        ) {
            (None, None) => {}
            (Some("restart"), Some("app" | "sidecar")) => {}
            other => panic!(
                "{name}: action/restart_target must be restart + app|sidecar or absent, got {other:?}"
            ),
        }
        for metric in metrics_in(&rule.expr) {
            assert!(
                is_contract_metric(&metric),
                "{name} uses {metric}, which is not in the metric contract"
            );
        }
    }
    for (alert, target) in RESTART_ALERTS {
        let rule = rules
            .iter()
            .find(|rule| rule.name == *alert)
            .unwrap_or_else(|| panic!("missing alert {alert}"));
        assert_eq!(
            rule.labels.get("restart_target").map(String::as_str),
            Some(*target),
            "{alert} restarts the wrong thing"
        );
    }
    let restarting: BTreeSet<&str> = rules
        .iter()
        .filter(|rule| rule.labels.contains_key("action"))
        .map(|rule| rule.name.as_str())
        .collect();
    let expected: BTreeSet<&str> = RESTART_ALERTS.iter().map(|(alert, _)| *alert).collect();
    assert_eq!(
        restarting, expected,
        "the set of self-healing alerts changed: update RESTART_ALERTS and docs/ops.md"
    );
}

#[test]
fn amtool_accepts_alertmanager_config() {
    run_tool(
        "amtool",
        "prometheus-alertmanager",
        &["check-config", "alerts/alertmanager.yml"],
    );
}

#[test]
fn alertmanager_sends_restart_alerts_to_the_remediation_webhook() {
    let route = |labels: &[&str]| {
        let mut args = vec![
            "config",
            "routes",
            "test",
            "--config.file=alerts/alertmanager.yml",
        ];
        args.extend_from_slice(labels);
        run_tool("amtool", "prometheus-alertmanager", &args)
            .trim()
            .to_owned()
    };
    assert_eq!(
        route(&[
            "alertname=RabbitSidecarAppDown",
            "severity=critical",
            "action=restart",
            "restart_target=app"
        ]),
        "remediate,default"
    );
    assert_eq!(
        route(&[
            "alertname=RabbitSidecarNoActiveConsumer",
            "severity=critical",
            "queue=orders"
        ]),
        "default"
    );
    // An open circuit is a sick dependency behind the app: a restart of either cannot fix it.
    assert_eq!(
        route(&[
            "alertname=RabbitSidecarCircuitOpen",
            "severity=warning",
            "app=127.0.0.1:8080"
        ]),
        "default"
    );

    let config = yaml(&root().join("alerts/alertmanager.yml"));
    let remediate = config["receivers"]
        .as_sequence()
        .expect("receivers")
        .iter()
        .find(|receiver| receiver["name"].as_str() == Some("remediate"))
        .expect("a receiver named remediate");
    let webhook = &remediate["webhook_configs"][0];
    assert_eq!(
        webhook["url"].as_str(),
        Some("http://remediate:9103/alerts")
    );
    let token_file = str_at(
        webhook,
        &["http_config", "authorization", "credentials_file"],
    )
    .expect("bearer credentials_file");
    assert_eq!(
        str_at(webhook, &["http_config", "authorization", "type"]),
        Some("Bearer")
    );
    let compose = yaml(&root().join("docker-compose.yml"));
    let mounts = compose["services"]["alertmanager"]["volumes"]
        .as_sequence()
        .expect("alertmanager volumes");
    assert!(
        mounts
            .iter()
            .filter_map(Value::as_str)
            .any(|mount| mount.split(':').nth(1) == Some(token_file)),
        "compose does not mount the webhook token at {token_file}"
    );
}

/// Host side of a short-syntax (`src:dst[:mode]`) or long-syntax bind mount, if it is one.
fn bind_source(volume: &Value) -> Option<String> {
    match volume {
        Value::String(spec) => {
            let source = spec.split(':').next()?;
            (source.starts_with('.') || source.starts_with('/')).then(|| source.to_owned())
        }
        Value::Mapping(_) => (volume["type"].as_str() == Some("bind"))
            .then(|| volume["source"].as_str().map(str::to_owned))
            .flatten(),
        _ => None,
    }
}

#[test]
fn compose_references_only_existing_files_and_services() {
    let compose = yaml(&root().join("docker-compose.yml"));
    let services = compose["services"].as_mapping().expect("services");
    let names: BTreeSet<&str> = services.keys().filter_map(Value::as_str).collect();
    for expected in [
        "rabbitmq",
        "sidecar",
        "demo-app",
        "producer",
        "prometheus",
        "alertmanager",
        "grafana",
        "jaeger",
        "remediate",
    ] {
        assert!(
            names.contains(expected),
            "compose has no {expected} service"
        );
    }
    for (name, service) in services {
        let name = name.as_str().expect("service name");
        for volume in service
            .get("volumes")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let Some(source) = bind_source(volume) else {
                continue;
            };
            if source.starts_with('/') {
                // Host system paths are not part of the repository; the socket is the only one.
                assert_eq!(
                    source, "/var/run/docker.sock",
                    "{name}: unexpected absolute bind mount"
                );
                continue;
            }
            assert!(
                root().join(&source).exists(),
                "{name}: bind-mounted {source} does not exist"
            );
        }
        if let Some(build) = service.get("build") {
            let context = build
                .get("context")
                .and_then(Value::as_str)
                .or(build.as_str())
                .expect("build.context");
            let context = root().join(context);
            assert!(
                context.is_dir(),
                "{name}: build context {} is not a directory",
                context.display()
            );
            let dockerfile = build
                .get("dockerfile")
                .and_then(Value::as_str)
                .unwrap_or("Dockerfile");
            assert!(
                context.join(dockerfile).is_file(),
                "{name}: {dockerfile} not found in the build context"
            );
        }
        let depends: Vec<String> = match service.get("depends_on") {
            Some(Value::Sequence(list)) => list
                .iter()
                .map(|v| v.as_str().expect("name").to_owned())
                .collect(),
            Some(Value::Mapping(map)) => map
                .keys()
                .map(|k| k.as_str().expect("name").to_owned())
                .collect(),
            None => Vec::new(),
            Some(other) => panic!("{name}: unexpected depends_on {other:?}"),
        };
        for dependency in depends {
            assert!(
                names.contains(dependency.as_str()),
                "{name} depends on unknown service {dependency}"
            );
        }
    }

    // The demo services run binaries that the image must actually contain.
    let image_binaries = dockerfile_installed_binaries();
    for service in ["demo-app", "producer"] {
        let entrypoint = compose["services"][service]["entrypoint"][0]
            .as_str()
            .expect("entrypoint");
        assert!(
            image_binaries.contains(entrypoint),
            "{service} runs {entrypoint}, which the Dockerfile does not install"
        );
    }
}

#[test]
fn compose_prometheus_config_is_valid_and_scrapes_the_sidecar() {
    run_tool(
        "promtool",
        "prometheus",
        &["check", "config", "deploy/compose/prometheus.yml"],
    );
    let config = yaml(&root().join("deploy/compose/prometheus.yml"));
    let jobs: Vec<&str> = config["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .filter_map(|job| job["job_name"].as_str())
        .collect();
    assert!(
        jobs.contains(&"rabbit-sidecar"),
        "no scrape job named rabbit-sidecar: {jobs:?}"
    );
    let rule_files: Vec<&str> = config["rule_files"]
        .as_sequence()
        .expect("rule_files")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        rule_files,
        ["/etc/prometheus/alerts/*.rules.yml"],
        "rule_files must match the ./alerts mount"
    );
}

/// Every panel, including those nested in collapsed rows.
fn panels(dashboard: &serde_json::Value) -> Vec<&serde_json::Value> {
    fn walk<'a>(list: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            if let Some(nested) = panel.get("panels") {
                walk(nested, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

fn dashboards() -> Vec<(String, serde_json::Value)> {
    files_in("dashboards", ".json")
        .into_iter()
        .map(|path| {
            let json = serde_json::from_str(&read(&path))
                .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", relative(&path)));
            (relative(&path), json)
        })
        .collect()
}

#[test]
fn dashboards_follow_conventions() {
    let mut uids = BTreeSet::new();
    for (file, dashboard) in dashboards() {
        let uid = dashboard["uid"].as_str().unwrap_or_default();
        assert!(!uid.is_empty(), "{file}: no uid");
        assert!(
            uids.insert(uid.to_owned()),
            "{file}: uid {uid} is used by another dashboard"
        );
        assert!(
            dashboard["schemaVersion"].as_u64().unwrap_or(0) >= 39,
            "{file}: schemaVersion below 39"
        );

        let variables = dashboard["templating"]["list"]
            .as_array()
            .expect("templating.list");
        let variable = |name: &str| variables.iter().find(|v| v["name"] == name);
        let datasource = variable("DS_PROMETHEUS")
            .unwrap_or_else(|| panic!("{file}: no DS_PROMETHEUS variable"));
        assert_eq!(
            datasource["type"], "datasource",
            "{file}: DS_PROMETHEUS must be a datasource variable"
        );
        assert_eq!(
            datasource["query"], "prometheus",
            "{file}: DS_PROMETHEUS must list Prometheus datasources"
        );
        for name in ["job", "instance", "queue"] {
            assert!(
                variable(name).is_some(),
                "{file}: no {name} template variable"
            );
        }

        let mut ids = BTreeSet::new();
        let all = panels(&dashboard);
        assert!(all.len() > 5, "{file}: suspiciously few panels");
        for panel in all {
            let title = panel["title"].as_str().unwrap_or("<untitled>");
            assert!(
                ids.insert(panel["id"].as_u64().expect("panel id")),
                "{file}: duplicate panel id in {title}"
            );
            if panel["type"] == "row" {
                continue;
            }
            let unit = panel["fieldConfig"]["defaults"]["unit"]
                .as_str()
                .unwrap_or_default();
            assert!(!unit.is_empty(), "{file}: panel {title:?} has no unit");
            assert_eq!(
                panel["datasource"]["uid"], "${DS_PROMETHEUS}",
                "{file}: panel {title:?} does not use ${{DS_PROMETHEUS}}"
            );
            let targets = panel["targets"].as_array().filter(|t| !t.is_empty());
            let targets =
                targets.unwrap_or_else(|| panic!("{file}: panel {title:?} has no queries"));
            for target in targets {
                assert_eq!(
                    target["datasource"]["uid"], "${DS_PROMETHEUS}",
                    "{file}: a query of {title:?} has its own datasource"
                );
                let expr = target["expr"].as_str().expect("expr");
                for metric in metrics_in(expr) {
                    assert!(
                        is_contract_metric(&metric),
                        "{file}: panel {title:?} uses {metric}, not in the metric contract"
                    );
                }
            }
        }
    }
}

#[test]
fn grafana_provisioning_serves_the_dashboards_with_their_datasource() {
    let datasources =
        yaml(&root().join("deploy/compose/grafana/provisioning/datasources/datasources.yml"));
    let prometheus = datasources["datasources"]
        .as_sequence()
        .expect("datasources")
        .iter()
        .find(|ds| ds["type"].as_str() == Some("prometheus"))
        .expect("a provisioned Prometheus datasource");
    let uid = prometheus["uid"].as_str().expect("a fixed datasource uid");
    for (file, dashboard) in dashboards() {
        let variables = dashboard["templating"]["list"]
            .as_array()
            .expect("templating.list");
        let ds = variables
            .iter()
            .find(|v| v["name"] == "DS_PROMETHEUS")
            .expect("DS_PROMETHEUS");
        assert_eq!(
            ds["current"]["value"], uid,
            "{file}: DS_PROMETHEUS does not default to the provisioned uid {uid}"
        );
    }

    let providers =
        yaml(&root().join("deploy/compose/grafana/provisioning/dashboards/rabbit-sidecar.yml"));
    let path = str_at(&providers["providers"][0], &["options", "path"]).expect("provider path");
    let compose = yaml(&root().join("docker-compose.yml"));
    let mounts = compose["services"]["grafana"]["volumes"]
        .as_sequence()
        .expect("grafana volumes");
    assert!(
        mounts
            .iter()
            .filter_map(Value::as_str)
            .any(|m| m.starts_with("./dashboards:") && m.split(':').nth(1) == Some(path)),
        "grafana does not mount ./dashboards at the provider path {path}"
    );
}

#[test]
fn kubernetes_manifests_are_consistent() {
    let mut documents = Vec::new();
    for file in files_in("deploy/kubernetes", ".yaml") {
        for doc in yaml_documents(&file) {
            for key in ["apiVersion", "kind"] {
                assert!(
                    doc[key].as_str().is_some(),
                    "{}: a document has no {key}",
                    relative(&file)
                );
            }
            documents.push((relative(&file), doc));
        }
    }
    let find = |kind: &'static str| {
        documents
            .iter()
            .filter(move |(_, doc)| doc["kind"].as_str() == Some(kind))
            .map(|(_, doc)| doc)
    };

    let deployment = find("Deployment").next().expect("a Deployment");
    let pod = &deployment["spec"]["template"];
    let sidecar = pod["spec"]["initContainers"]
        .as_sequence()
        .expect("initContainers")
        .iter()
        .find(|c| {
            c["image"]
                .as_str()
                .is_some_and(|image| image.contains("rabbit-sidecar"))
        })
        .expect("rabbit-sidecar among the initContainers");
    assert_eq!(
        sidecar["restartPolicy"].as_str(),
        Some("Always"),
        "the sidecar must be a native sidecar"
    );
    assert_eq!(
        str_at(sidecar, &["livenessProbe", "httpGet", "path"]),
        Some("/healthz")
    );
    assert_eq!(
        str_at(sidecar, &["readinessProbe", "httpGet", "path"]),
        Some("/readyz")
    );
    let port_names: BTreeSet<&str> = sidecar["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for probe in ["livenessProbe", "readinessProbe"] {
        let port = str_at(sidecar, &[probe, "httpGet", "port"]).expect("named probe port");
        assert!(
            port_names.contains(port),
            "{probe} uses unknown port {port}"
        );
    }
    assert_eq!(
        str_at(pod, &["metadata", "annotations", "prometheus.io/port"]),
        Some("9102")
    );

    let env = sidecar["env"].as_sequence().expect("env");
    let amqp = env
        .iter()
        .find(|e| e["name"].as_str() == Some("RABBIT_SIDECAR_AMQP_URL"))
        .expect("RABBIT_SIDECAR_AMQP_URL");
    let secret_name =
        str_at(amqp, &["valueFrom", "secretKeyRef", "name"]).expect("AMQP URL from a Secret");
    let secret_key = str_at(amqp, &["valueFrom", "secretKeyRef", "key"]).expect("secret key");
    let secret = find("Secret")
        .find(|s| str_at(s, &["metadata", "name"]) == Some(secret_name))
        .unwrap_or_else(|| panic!("Secret {secret_name} is not defined"));
    assert!(
        secret["stringData"].get(secret_key).is_some() || secret["data"].get(secret_key).is_some(),
        "Secret {secret_name} has no key {secret_key}"
    );

    let monitor = find("PodMonitor").next().expect("a PodMonitor");
    let pod_labels = &pod["metadata"]["labels"];
    for (key, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .expect("matchLabels")
    {
        assert_eq!(
            pod_labels.get(key.as_str().unwrap()),
            Some(value),
            "PodMonitor selects labels the pods do not have"
        );
    }
    for endpoint in monitor["spec"]["podMetricsEndpoints"]
        .as_sequence()
        .expect("podMetricsEndpoints")
    {
        let port = endpoint["port"].as_str().expect("port");
        assert!(
            port_names.contains(port),
            "PodMonitor scrapes unknown port {port}"
        );
        let relabels_job = endpoint["relabelings"]
            .as_sequence()
            .into_iter()
            .flatten()
            .any(|r| {
                r["targetLabel"].as_str() == Some("job")
                    && r["replacement"].as_str() == Some("rabbit-sidecar")
            });
        assert!(
            relabels_job,
            "PodMonitor must set job=\"rabbit-sidecar\" for the alerts and dashboards"
        );
    }

    let kustomization = find("Kustomization").next().expect("a Kustomization");
    for resource in kustomization["resources"].as_sequence().expect("resources") {
        let resource = resource.as_str().expect("resource path");
        assert!(
            root().join("deploy/kubernetes").join(resource).is_file(),
            "kustomization lists missing {resource}"
        );
    }
}

/// Dockerfile instructions with line continuations joined.
fn dockerfile_instructions() -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in read(&root().join("Dockerfile")).lines() {
        let line = line.trim();
        if current.is_empty() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        if let Some(continued) = line.strip_suffix('\\') {
            current.push_str(continued);
            current.push(' ');
        } else {
            current.push_str(line);
            out.push(std::mem::take(&mut current));
        }
    }
    out
}

/// Names of the binaries the runtime image installs into /usr/local/bin.
fn dockerfile_installed_binaries() -> BTreeSet<String> {
    dockerfile_instructions()
        .iter()
        .filter(|i| i.starts_with("COPY --from="))
        .filter_map(|i| {
            i.split_whitespace()
                .last()?
                .strip_prefix("/usr/local/bin/")
                .map(str::to_owned)
        })
        .collect()
}

#[test]
fn dockerfile_copies_existing_sources_and_runs_as_non_root() {
    let instructions = dockerfile_instructions();
    let ignore = read(&root().join(".dockerignore"));
    let allowlist = ignore.lines().any(|line| line.trim() == "*");
    let reincluded: BTreeSet<&str> = ignore
        .lines()
        .filter_map(|line| line.trim().strip_prefix('!'))
        .map(|p| p.trim_end_matches('/'))
        .collect();

    for instruction in &instructions {
        let words: Vec<&str> = instruction.split_whitespace().collect();
        if words[0] != "COPY" {
            continue;
        }
        let args: Vec<&str> = words[1..]
            .iter()
            .copied()
            .filter(|w| !w.starts_with("--"))
            .collect();
        let (sources, _destination) = args.split_at(args.len() - 1);
        if words.iter().any(|w| w.starts_with("--from=")) {
            // From the builder stage: an example binary must come from an example source.
            for source in sources {
                if let Some(example) = source.strip_prefix("/src/target/release/examples/") {
                    assert!(
                        root().join(format!("examples/{example}.rs")).is_file(),
                        "no examples/{example}.rs"
                    );
                }
            }
            continue;
        }
        for source in sources {
            assert!(
                root().join(source).exists(),
                "Dockerfile copies {source}, which does not exist"
            );
            let top = source.trim_end_matches('/');
            assert!(
                !allowlist || reincluded.contains(top),
                "Dockerfile copies {source}, which .dockerignore excludes"
            );
        }
    }

    let find = |keyword: &'static str| instructions.iter().filter(move |i| i.starts_with(keyword));
    let build = find("RUN cargo build").next().expect("a cargo build step");
    for flag in [
        "--release",
        "--locked",
        "--bin rabbit-sidecar",
        "--examples",
    ] {
        assert!(build.contains(flag), "the cargo build step lacks {flag}");
    }
    let user = find("USER ").next_back().expect("a USER instruction");
    assert!(
        !user.starts_with("USER root") && !user.starts_with("USER 0"),
        "the image must not run as root: {user}"
    );
    assert!(
        find("HEALTHCHECK").any(|i| i.contains(r#"["rabbit-sidecar", "healthcheck"]"#)),
        "HEALTHCHECK must run `rabbit-sidecar healthcheck`"
    );
    assert!(
        find("EXPOSE").any(|i| i.split_whitespace().any(|w| w == "9102")),
        "EXPOSE 9102 missing"
    );
    let installed = dockerfile_installed_binaries();
    for binary in ["rabbit-sidecar", "demo_app", "demo_producer"] {
        assert!(
            installed.contains(binary),
            "the runtime image does not install {binary}"
        );
    }
}

/// The Compose services the README and docs describe.
const COMPOSE_SERVICES: &[&str] = &[
    "alertmanager",
    "demo-app",
    "grafana",
    "jaeger",
    "producer",
    "prometheus",
    "rabbitmq",
    "remediate",
    "sidecar",
];

#[test]
fn docker_compose_accepts_the_compose_file() {
    // `config` loads the file the way `docker compose up` does (the Compose specification's
    // schema, then the model: interpolation, references between services, volumes, networks).
    let (ok, output) = run_asset_tool(
        "docker-compose",
        &["--file", "docker-compose.yml", "config", "--quiet"],
    );
    assert!(ok, "docker compose rejects docker-compose.yml:\n{output}");
    let (ok, output) = run_asset_tool(
        "docker-compose",
        &["--file", "docker-compose.yml", "config", "--services"],
    );
    assert!(ok, "{output}");
    let services: BTreeSet<&str> = output.lines().map(str::trim).collect();
    assert_eq!(
        services,
        COMPOSE_SERVICES.iter().copied().collect(),
        "docker compose sees other services"
    );
}

/// The Kubernetes versions the README promises the manifests for: native sidecars
/// (`restartPolicy: Always` on an init container) are on by default from 1.29; 1.37 is the newest
/// schema set that the pinned kubernetes-validate bundles.
const KUBERNETES_VERSIONS: std::ops::RangeInclusive<u32> = 29..=37;

/// Kinds that are not part of the Kubernetes API, so it has no schema for them.
const NOT_KUBERNETES_API_KINDS: &[&str] = &[
    // kustomize's own file, read by `kubectl apply -k`, never sent to the API server
    "Kustomization",
    // a Prometheus Operator custom resource
    "PodMonitor",
];

#[test]
fn kubernetes_manifests_validate_against_the_api_schemas() {
    let files = paths_as_args(&files_in("deploy/kubernetes", ".yaml"));
    let readme = read(&root().join("README.md"));
    let promise = format!(
        "Kubernetes 1.{} to 1.{}",
        KUBERNETES_VERSIONS.start(),
        KUBERNETES_VERSIONS.end()
    );
    assert!(
        readme.contains(&promise),
        "the README must name the versions checked here: {promise}"
    );
    // One process per version, side by side: each takes a couple of seconds to load its schemas.
    let runs: Vec<(String, bool, String)> = std::thread::scope(|scope| {
        let runs: Vec<_> = KUBERNETES_VERSIONS
            .map(|minor| {
                let files = &files;
                scope.spawn(move || {
                    let version = format!("1.{minor}.0");
                    let mut args = vec!["--strict", "--kubernetes-version", &version];
                    args.extend(files.iter().map(String::as_str));
                    let (ok, output) = run_asset_tool("kubernetes-validate", &args);
                    (version, ok, output)
                })
            })
            .collect();
        runs.into_iter().map(|run| run.join().unwrap()).collect()
    });
    for (version, ok, output) in runs {
        assert!(
            ok,
            "deploy/kubernetes is not valid for Kubernetes {version}:\n{output}"
        );
        let validated: BTreeSet<&str> = output
            .lines()
            .filter(|line| line.contains(" passed for resource "))
            .filter_map(|line| line.split(" passed for resource ").nth(1))
            .filter_map(|rest| rest.split('/').next())
            .collect();
        assert_eq!(
            validated,
            BTreeSet::from(["deployment", "secret"]),
            "Kubernetes {version}: not every API object was validated:\n{output}"
        );
        for line in output
            .lines()
            .filter(|line| line.contains("Couldn't find schema"))
        {
            assert!(
                NOT_KUBERNETES_API_KINDS
                    .iter()
                    .any(|kind| line.contains(&format!("for kind {kind} "))),
                "Kubernetes {version}: no schema for an object that should have one: {line}"
            );
        }
    }
}

/// Where `npm` put `@grafana/schema`'s generated TypeScript types.
fn grafana_schema_types() -> PathBuf {
    let dir = root().join("target/tools/node/node_modules/@grafana/schema/dist/esm/raw");
    assert!(
        dir.is_dir(),
        "{} is missing: run scripts/test-deps.sh",
        dir.display()
    );
    dir
}

/// The `*_types.gen.d.ts` file of a panel plugin, and whether it defines a `FieldConfig`.
fn panel_types_file(types: &Path, panel_type: &str) -> (PathBuf, bool) {
    let dir = types.join(format!(
        "composable/{}/panelcfg/x",
        panel_type.replace('-', "")
    ));
    let file = std::fs::read_dir(&dir)
        .ok()
        .into_iter()
        .flatten()
        .map(|entry| entry.unwrap().path())
        .find(|path| path.to_string_lossy().ends_with("_types.gen.d.ts"))
        .unwrap_or_else(|| {
            panic!("Grafana's schema has no panel type {panel_type:?} (looked in {dir:?})")
        });
    let has_field_config = read(&file).contains("export interface FieldConfig ");
    (file, has_field_config)
}

/// Drops every `required` list: the TypeScript types mark as required the fields to which
/// Grafana's CUE schema gives defaults (Grafana fills them in on load), without saying which.
/// Property names, types and allowed values stay checked, and no unknown property is allowed.
fn without_required(schema: &mut serde_json::Value) {
    match schema {
        serde_json::Value::Object(map) => {
            map.remove("required");
            map.values_mut().for_each(without_required);
        }
        serde_json::Value::Array(list) => list.iter_mut().for_each(without_required),
        _ => {}
    }
}

#[test]
fn dashboards_validate_against_grafanas_schema() {
    let types = grafana_schema_types();
    let dir = tempfile::tempdir().unwrap();

    // One TypeScript entry point naming the dashboard type and, for every panel type the
    // dashboards use, its options and field config; the generator turns them into one schema.
    let dashboards = dashboards();
    let mut panel_types = BTreeMap::new();
    for (_, dashboard) in &dashboards {
        for panel in panels(dashboard) {
            let kind = panel["type"].as_str().expect("panel type");
            if kind != "row" {
                panel_types
                    .entry(kind.to_owned())
                    .or_insert_with(|| panel_types_file(&types, kind));
            }
        }
    }
    let mut entry = format!(
        "import type {{ Dashboard }} from '{}';\nexport interface GrafanaDashboard extends Dashboard {{}}\n",
        types.join("dashboard/x/dashboard_types.gen").display()
    );
    let name = |kind: &str, what: &str| format!("{}_{what}", kind.replace('-', "_"));
    for (kind, (file, has_field_config)) in &panel_types {
        let module = file.to_string_lossy().trim_end_matches(".d.ts").to_owned();
        let alias = kind.replace('-', "_");
        entry.push_str(&format!(
            "import type * as {alias} from '{module}';\nexport interface {} extends {alias}.Options {{}}\n",
            name(kind, "Options")
        ));
        if *has_field_config {
            entry.push_str(&format!(
                "export interface {} extends {alias}.FieldConfig {{}}\n",
                name(kind, "FieldConfig")
            ));
        }
    }
    let entry_file = dir.path().join("grafana.ts");
    std::fs::write(&entry_file, entry).unwrap();
    let schema_file = dir.path().join("grafana.schema.json");
    let (ok, output) = run_asset_tool(
        "ts-json-schema-generator",
        &[
            "--path",
            entry_file.to_str().unwrap(),
            "--type",
            "*",
            "--expose",
            "export",
            "--out",
            schema_file.to_str().unwrap(),
        ],
    );
    assert!(ok, "cannot generate the schema:\n{output}");
    let mut schema: serde_json::Value = serde_json::from_str(&read(&schema_file)).unwrap();
    without_required(&mut schema);

    // What to check against which definition: the dashboards whole, then each panel's options
    // and field config (which the dashboard type leaves open, as each plugin defines its own).
    // All of it goes into one document whose keys say what each part is, checked in one run
    // against a schema that sends each key to its definition.
    let mut document = serde_json::Map::new();
    let mut properties = serde_json::Map::new();
    let mut check = |what: String, value: &serde_json::Value, definition: String| {
        properties.insert(
            what.clone(),
            serde_json::json!({ "$ref": format!("#/definitions/{definition}") }),
        );
        document.insert(what, value.clone());
    };
    for (file, dashboard) in &dashboards {
        check(file.clone(), dashboard, "GrafanaDashboard".into());
        for panel in panels(dashboard) {
            let kind = panel["type"].as_str().unwrap();
            if kind == "row" {
                continue;
            }
            let id = panel["id"].as_u64().unwrap();
            let title = panel["title"].as_str().unwrap_or_default();
            let what = format!("{file} panel {id} {title:?} ({kind})");
            check(
                format!("{what} options"),
                &panel["options"],
                name(kind, "Options"),
            );
            let custom = &panel["fieldConfig"]["defaults"]["custom"];
            if panel_types[kind].1 && !custom.is_null() {
                check(
                    format!("{what} fieldConfig.defaults.custom"),
                    custom,
                    name(kind, "FieldConfig"),
                );
            }
        }
    }
    schema.as_object_mut().unwrap().remove("$ref");
    schema["properties"] = properties.into();
    schema["required"] = document.keys().cloned().collect::<Vec<_>>().into();
    let schema_path = dir.path().join("dashboards.schema.json");
    std::fs::write(&schema_path, schema.to_string()).unwrap();
    let document_path = dir.path().join("dashboards.json");
    std::fs::write(
        &document_path,
        serde_json::Value::from(document).to_string(),
    )
    .unwrap();
    let (ok, output) = run_asset_tool(
        "check-jsonschema",
        &[
            "--schemafile",
            schema_path.to_str().unwrap(),
            document_path.to_str().unwrap(),
        ],
    );
    assert!(ok, "the dashboards do not fit Grafana's schema:\n{output}");
}
