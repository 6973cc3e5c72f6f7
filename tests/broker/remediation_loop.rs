//! The self-healing loop end to end, with the real parts: the sidecar consuming for the demo app
//! (both real processes), the real Prometheus scraping the sidecar and evaluating the shipped alert
//! rules, the real Alertmanager routing with the shipped `alerts/alertmanager.yml`, and the real
//! `rabbit-sidecar remediate` restarting through `command` targets.
//!
//! The configurations are the compose stack's own (`deploy/compose/prometheus.yml`,
//! `alerts/alertmanager.yml`, `deploy/compose/remediate.toml`), changed only where a test must:
//! addresses and file paths; the targets, which run `tests/remediation/restart.sh` (a
//! `docker restart` for plain processes, with the shipped `stop_timeout`) instead of the Docker
//! API; and time. Every rule's `for:` and every Alertmanager route timing is divided by
//! [`SPEED_UP`], and Prometheus scrapes and evaluates every second; the rule expressions are
//! untouched.
//!
//! Two faults, each timed from the fault to the restart, to consuming again and to the alert
//! resolving (printed; `cargo nextest run --test remediation_loop --no-capture` shows them):
//! - the app is killed (connection refused): `RabbitSidecarAppDown` fires, Alertmanager posts the
//!   webhook with the bearer token, `remediate` restarts the app;
//! - the sidecar is frozen (SIGSTOP: scrapes time out, nothing is consumed): `RabbitSidecarDown`
//!   fires and `remediate` restarts the sidecar, which ignores SIGTERM and is killed after the
//!   stop timeout.
//!
//! A producer publishes throughout; at the end the app has accepted every id.
//!
//! Only the test's own processes are stopped, so this is not a disruptive test.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::monitoring::{Alertmanager, Process, Prometheus, repo};
use crate::common::*;
use serde_yaml::Value;

/// How much faster than shipped the alerts' `for:` and Alertmanager's route timings run.
const SPEED_UP: u32 = 24;
/// Each step of a recovery must happen within this long.
const STEP: Duration = Duration::from_secs(60);

fn scaled(duration: &str) -> String {
    let d = humantime::parse_duration(duration)
        .unwrap_or_else(|e| panic!("not a duration: {duration}: {e}"));
    format!("{}ms", (d / SPEED_UP).as_millis())
}

fn yaml_file(path: &Path) -> Value {
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn seq_mut<'a>(v: &'a mut Value, key: &str) -> &'a mut Vec<Value> {
    v.get_mut(key)
        .and_then(Value::as_sequence_mut)
        .unwrap_or_else(|| panic!("no list {key}"))
}

/// The shipped rules with every `for:` divided by [`SPEED_UP`].
fn faster_rules() -> String {
    let shipped = yaml_file(&repo("alerts/rabbit-sidecar.rules.yml"));
    let mut rules = shipped.clone();
    for group in seq_mut(&mut rules, "groups") {
        for rule in seq_mut(group, "rules") {
            if let Some(wait) = rule.get_mut("for") {
                *wait = Value::from(scaled(wait.as_str().expect("for: is a string")));
            }
        }
    }
    let exprs = |doc: &Value| -> Vec<String> {
        doc["groups"]
            .as_sequence()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_sequence().unwrap().iter())
            .map(|r| r["expr"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(exprs(&rules), exprs(&shipped));
    serde_yaml::to_string(&rules).unwrap()
}

/// `deploy/compose/prometheus.yml` with loopback addresses, 1 s intervals and the faster rules.
fn prometheus_config(own: &str, sidecar: &str, alertmanager: &str, rules: &Path) -> String {
    let mut config = yaml_file(&repo("deploy/compose/prometheus.yml"));
    config["global"]["scrape_interval"] = "1s".into();
    config["global"]["evaluation_interval"] = "1s".into();
    config["rule_files"] = vec![Value::from(rules.to_str().unwrap())].into();
    let alerting = &mut config["alerting"]["alertmanagers"][0]["static_configs"][0];
    assert_eq!(alerting["targets"][0], "alertmanager:9093");
    alerting["targets"] = vec![Value::from(alertmanager)].into();
    for job in seq_mut(&mut config, "scrape_configs") {
        let target = match job["job_name"].as_str().unwrap() {
            "rabbit-sidecar" => sidecar,
            "prometheus" => own,
            other => panic!("unexpected scrape job {other}"),
        };
        job["static_configs"][0]["targets"] = vec![Value::from(target)].into();
    }
    serde_yaml::to_string(&config).unwrap()
}

/// `alerts/alertmanager.yml` with the webhook on loopback, the token in `token_file`, and every
/// route timing and the resolve timeout divided by [`SPEED_UP`].
fn alertmanager_config(webhook: &str, token_file: &Path) -> String {
    fn faster_route(route: &mut Value) {
        for key in ["group_wait", "group_interval", "repeat_interval"] {
            if let Some(wait) = route.get_mut(key) {
                *wait = Value::from(scaled(wait.as_str().unwrap()));
            }
        }
        if let Some(routes) = route.get_mut("routes").and_then(Value::as_sequence_mut) {
            routes.iter_mut().for_each(faster_route);
        }
    }
    let mut config = yaml_file(&repo("alerts/alertmanager.yml"));
    let resolve = config["global"]["resolve_timeout"].as_str().unwrap();
    config["global"]["resolve_timeout"] = scaled(resolve).into();
    faster_route(&mut config["route"]);
    let mut found = false;
    for receiver in seq_mut(&mut config, "receivers") {
        if receiver["name"] == "remediate" {
            let hook = &mut receiver["webhook_configs"][0];
            assert_eq!(hook["url"], "http://remediate:9103/alerts");
            hook["url"] = webhook.into();
            hook["http_config"]["authorization"]["credentials_file"] =
                token_file.to_str().unwrap().into();
            found = true;
        }
    }
    assert!(found, "alertmanager.yml has no remediate receiver");
    serde_yaml::to_string(&config).unwrap()
}

/// A process that `restart.sh` starts and restarts: its command line and its pid file.
struct Managed {
    name: &'static str,
    command: Vec<String>,
    pidfile: PathBuf,
    log: PathBuf,
}

impl Managed {
    fn restart_args(&self, stop_timeout_secs: u64) -> Vec<String> {
        let mut args = vec![
            self.pidfile.display().to_string(),
            self.log.display().to_string(),
            stop_timeout_secs.to_string(),
        ];
        args.extend(self.command.iter().cloned());
        args
    }

    /// Starts it through `restart.sh`, as `remediate` restarts it.
    fn start(&self) {
        let status = Command::new(repo("tests/remediation/restart.sh"))
            .args(self.restart_args(0))
            .status()
            .expect("restart.sh runs");
        assert!(status.success(), "restart.sh could not start {}", self.name);
    }

    fn pid(&self) -> u32 {
        std::fs::read_to_string(&self.pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("no pid for {}", self.name))
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {}", self.name);
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        // Whatever pid the file names now was started by this test (or by remediate for it).
        if let Ok(pid) = std::fs::read_to_string(&self.pidfile) {
            let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
        }
    }
}

/// The ids the app answered 2xx, from its record file.
fn accepted(record: &Path) -> Vec<String> {
    std::fs::read_to_string(record)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Polls `f` until it holds, at most [`STEP`]; the time it took from `since`, or a panic naming
/// `what` with `context()`.
async fn until<F, Fut>(since: Instant, what: &str, mut f: F, context: impl Fn() -> String) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    assert!(
        eventually(STEP, &mut f).await,
        "{what}: not within {STEP:?}\n{}",
        context()
    );
    since.elapsed().as_secs_f64()
}

fn remediation_metric(text: &str, target: &str, result: &str) -> f64 {
    metric_value(
        text,
        &format!(
            "rabbit_sidecar_remediations_total{{action=\"command\",result=\"{result}\",target=\"{target}\"}}"
        ),
    )
    .unwrap_or(0.0)
}

async fn remediate_metrics(base: &str) -> String {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let Ok(Ok(resp)) = tokio::time::timeout(
        Duration::from_secs(5),
        client.get(format!("{base}/metrics").parse().unwrap()),
    )
    .await
    else {
        return String::new();
    };
    http_body_util::BodyExt::collect(resp.into_body())
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default()
}

/// Whether Alertmanager holds `alertname` as active.
async fn alertmanager_has(alertmanager: &Alertmanager, alertname: &str) -> Option<bool> {
    let alerts = alertmanager.active_alerts().await?;
    Some(alerts.iter().any(|a| a["labels"]["alertname"] == alertname))
}

/// Whether `alertname` was firing at some point in the last five minutes, by Prometheus's own
/// `ALERTS` series.
async fn has_fired(prometheus: &Prometheus, alertname: &str) -> bool {
    prometheus
        .query(&format!(
            "max_over_time(ALERTS{{alertname=\"{alertname}\",alertstate=\"firing\"}}[5m])"
        ))
        .await
        .is_ok_and(|r| !r.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_restart_the_app_and_the_sidecar_and_nothing_is_lost() {
    let demo_app = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("examples/demo_app"))
        .filter(|p| p.is_file())
        .expect("the demo_app example is built (cargo test and nextest build examples; or `cargo build --example demo_app`)");
    let broker = Arc::new(Broker::connect().await);
    let queue = unique("loop");
    broker.track(&queue);
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);

    let app_addr = format!("127.0.0.1:{}", free_port());
    let admin_addr = format!("127.0.0.1:{}", free_port());
    let remediate_addr = format!("127.0.0.1:{}", free_port());
    let record = path("accepted-ids");
    let token = path("remediate-token");
    std::fs::write(&token, format!("{}\n", unique("token"))).unwrap();

    let app = Managed {
        name: "app",
        command: vec![
            "/usr/bin/env".into(),
            format!("DEMO_LISTEN={app_addr}"),
            format!("DEMO_RECORD_FILE={}", record.display()),
            "DEMO_FAIL_PERCENT=0".into(),
            demo_app.display().to_string(),
        ],
        pidfile: path("app.pid"),
        log: path("app.log"),
    };
    let app_url = format!("http://{app_addr}/messages");
    let sidecar = Managed {
        name: "sidecar",
        command: [
            "/usr/bin/env",
            "RUST_LOG=info,rabbit_sidecar=debug",
            env!("CARGO_BIN_EXE_rabbit-sidecar"),
            "--listen",
            &admin_addr,
        ]
        .into_iter()
        .chain(args(&queue, &app_url, &[]))
        .map(str::to_owned)
        .collect(),
        pidfile: path("sidecar.pid"),
        log: path("sidecar.log"),
    };

    // remediate: the compose configuration, with restart.sh targets instead of Docker's.
    let mut remediate_config: toml::Table =
        toml::from_str(&std::fs::read_to_string(repo("deploy/compose/remediate.toml")).unwrap())
            .unwrap();
    remediate_config.insert("listen".into(), remediate_addr.clone().into());
    remediate_config.insert("token_file".into(), token.display().to_string().into());
    let targets = remediate_config["targets"].as_table_mut().unwrap();
    assert_eq!(
        targets.keys().collect::<BTreeSet<_>>(),
        BTreeSet::from([&"app".to_string(), &"sidecar".to_string()])
    );
    for (name, managed) in [("app", &app), ("sidecar", &sidecar)] {
        let stop_timeout = humantime::parse_duration(
            targets[name]["stop_timeout"]
                .as_str()
                .expect("a stop_timeout"),
        )
        .unwrap();
        let mut target = toml::Table::new();
        target.insert("action".into(), "command".into());
        target.insert(
            "program".into(),
            repo("tests/remediation/restart.sh")
                .display()
                .to_string()
                .into(),
        );
        target.insert(
            "args".into(),
            managed.restart_args(stop_timeout.as_secs()).into(),
        );
        target.insert("timeout".into(), "60s".into());
        targets.insert(name.into(), target.into());
    }
    std::fs::write(path("remediate.toml"), remediate_config.to_string()).unwrap();
    let mut remediate = Process::spawn(
        Command::new(env!("CARGO_BIN_EXE_rabbit-sidecar"))
            .args(["remediate", "--config"])
            .arg(path("remediate.toml"))
            .env("RUST_LOG", "info"),
        path("remediate.log"),
    );
    let remediate_base = format!("http://{remediate_addr}");

    let mut alertmanager = Alertmanager::start(
        dir.path(),
        &alertmanager_config(&format!("{remediate_base}/alerts"), &token),
    );
    std::fs::write(path("rules.yml"), faster_rules()).unwrap();
    let mut prometheus = Prometheus::start(dir.path(), |own| {
        prometheus_config(own, &admin_addr, alertmanager.address(), &path("rules.yml"))
    });

    app.start();
    sidecar.start();
    prometheus.wait_ready(STEP).await;
    alertmanager.wait_ready(STEP).await;
    assert!(
        eventually(STEP, || async {
            !remediate_metrics(&remediate_base).await.is_empty()
        })
        .await,
        "remediate does not answer:\n{}",
        remediate.logs()
    );
    remediate.assert_running("remediate");
    // The sidecar declares the queue. A message published before that is unroutable and the broker
    // drops it: CI on RabbitMQ 4, where declaring took longer than the waits above, lost `loop-0`
    // so. Publishing starts once the sidecar consumes.
    assert!(
        eventually(STEP, || async {
            broker
                .count(&queue)
                .await
                .is_some_and(|(_, consumers)| consumers >= 1)
        })
        .await,
        "the sidecar never consumed {queue}:\n{}",
        sidecar.logs()
    );

    // A producer publishes throughout, 20 messages a second.
    let published = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let producer = tokio::spawn({
        let (broker, queue, published, stop) = (
            broker.clone(),
            queue.clone(),
            published.clone(),
            stop.clone(),
        );
        async move {
            for n in 0..10_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let id = format!("loop-{n}");
                broker
                    .publish(
                        &queue,
                        id.as_bytes(),
                        lapin::BasicProperties::default().with_message_id(id.as_str().into()),
                    )
                    .await;
                published.store(n + 1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let context = || {
        format!(
            "--- sidecar:\n{}\n--- app:\n{}\n--- remediate:\n{}\n--- alertmanager:\n{}\n--- prometheus:\n{}",
            tail(&sidecar.logs()),
            tail(&app.logs()),
            tail(&remediate.logs()),
            tail(&alertmanager.process.logs()),
            tail(&prometheus.process.logs()),
        )
    };
    let started = Instant::now();
    until(
        started,
        "the sidecar scraped and consuming",
        || async {
            accepted(&record).len() >= 20
                && prometheus
                    .query("up{job=\"rabbit-sidecar\"} == 1")
                    .await
                    .is_ok_and(|r| r.len() == 1)
        },
        context,
    )
    .await;
    assert_eq!(
        remediation_metric(&remediate_metrics(&remediate_base).await, "app", "success"),
        0.0,
        "nothing restarted the app before it was killed\n{}",
        context()
    );

    // ---- Fault 1: the app is killed.
    let fault = Instant::now();
    app.signal("KILL");
    let app_pid = app.pid();
    let app_restarted = until(
        fault,
        "remediate restarted the app",
        || async {
            remediation_metric(&remediate_metrics(&remediate_base).await, "app", "success") == 1.0
        },
        context,
    )
    .await;
    assert_ne!(
        app.pid(),
        app_pid,
        "restart.sh started a new app\n{}",
        context()
    );
    let before = accepted(&record).len();
    let app_consuming = until(
        fault,
        "the app accepts messages again",
        || async { accepted(&record).len() > before },
        context,
    )
    .await;
    let app_resolved = until(
        fault,
        "RabbitSidecarAppDown resolved in Prometheus and Alertmanager",
        || async {
            prometheus
                .alert_state("RabbitSidecarAppDown")
                .await
                .is_none()
                && alertmanager_has(&alertmanager, "RabbitSidecarAppDown").await == Some(false)
        },
        context,
    )
    .await;
    assert!(
        has_fired(&prometheus, "RabbitSidecarAppDown").await,
        "RabbitSidecarAppDown fired\n{}",
        context()
    );
    let metrics = remediate_metrics(&remediate_base).await;
    assert!(
        metric_value(
            &metrics,
            "rabbit_sidecar_remediation_requests_total{result=\"accepted\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{metrics}\n{}",
        context()
    );
    assert_eq!(
        metric_value(
            &metrics,
            "rabbit_sidecar_remediation_requests_total{result=\"unauthorized\"}"
        ),
        Some(0.0),
        "Alertmanager's bearer token was refused\n{}",
        context()
    );
    assert_eq!(
        remediation_metric(&metrics, "sidecar", "success"),
        0.0,
        "only the app was restarted\n{}",
        context()
    );
    assert!(
        remediate.logs().contains("RabbitSidecarAppDown"),
        "remediate names the alert it acted on:\n{}",
        remediate.logs()
    );

    // A scrape that times out (a loaded machine) leaves a gap that restarts an alert's `for:`;
    // counted so that a slow run can be told from a slow loop.
    let failed_scrapes = prometheus
        .query(
            "count_over_time(up{job=\"rabbit-sidecar\"}[5m]) - sum_over_time(up{job=\"rabbit-sidecar\"}[5m])",
        )
        .await
        .ok()
        .and_then(|r| r.first()?["value"][1].as_str()?.parse::<f64>().ok())
        .unwrap_or(f64::NAN);

    // ---- Fault 2: the sidecar freezes.
    let sidecar_pid = sidecar.pid();
    let fault = Instant::now();
    sidecar.signal("STOP");
    // What the app was already answering when the sidecar froze lands within moments.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let frozen = accepted(&record).len();
    let sidecar_restarted = until(
        fault,
        "remediate restarted the sidecar",
        || async {
            remediation_metric(
                &remediate_metrics(&remediate_base).await,
                "sidecar",
                "success",
            ) == 1.0
        },
        context,
    )
    .await;
    assert_ne!(
        sidecar.pid(),
        sidecar_pid,
        "restart.sh started a new sidecar\n{}",
        context()
    );
    assert!(
        sidecar.logs().contains("ignored SIGTERM"),
        "the frozen sidecar was killed after the stop timeout\n{}",
        context()
    );
    let sidecar_consuming = until(
        fault,
        "the new sidecar delivers again",
        || async { accepted(&record).len() > frozen },
        context,
    )
    .await;
    let sidecar_resolved = until(
        fault,
        "RabbitSidecarDown resolved in Prometheus and Alertmanager",
        || async {
            prometheus.alert_state("RabbitSidecarDown").await.is_none()
                && alertmanager_has(&alertmanager, "RabbitSidecarDown").await == Some(false)
        },
        context,
    )
    .await;
    assert!(
        has_fired(&prometheus, "RabbitSidecarDown").await,
        "RabbitSidecarDown fired\n{}",
        context()
    );
    let metrics = remediate_metrics(&remediate_base).await;
    assert_eq!(
        remediation_metric(&metrics, "app", "success"),
        1.0,
        "the app was restarted once\n{}",
        context()
    );
    for target in ["app", "sidecar"] {
        assert_eq!(
            remediation_metric(&metrics, target, "failure"),
            0.0,
            "no restart of the {target} failed\n{}",
            context()
        );
    }

    // ---- Nothing lost: every published id accepted by the app.
    stop.store(true, Ordering::SeqCst);
    producer.await.unwrap();
    let total = published.load(Ordering::SeqCst);
    let missing = || {
        let got: BTreeSet<String> = accepted(&record).into_iter().collect();
        (0..total)
            .map(|n| format!("loop-{n}"))
            .filter(|id| !got.contains(id))
            .collect::<Vec<_>>()
    };
    let dlq = format!("{queue}.dead-letter");
    let retry = format!("{queue}.retry");
    if !eventually(STEP, || async { missing().is_empty() }).await {
        let mut counts = Vec::new();
        for q in [&queue, &retry, &dlq] {
            counts.push(format!("{q}: {:?}", broker.count(q).await));
        }
        let dead: Vec<String> = broker
            .drain(&dlq)
            .await
            .iter()
            .map(|(body, props)| {
                format!(
                    "{} ({:?})",
                    String::from_utf8_lossy(body),
                    header_str(props, "x-sidecar-dead-letter-reason")
                )
            })
            .collect();
        let missing = missing();
        let logs = sidecar.logs();
        let mentions: Vec<&str> = logs
            .lines()
            .filter(|line| missing.iter().any(|id| line.contains(id.as_str())))
            .take(30)
            .collect();
        panic!(
            "not every published id was accepted; missing {missing:?}\n(ready, consumers): {counts:?}\ndead-lettered: {dead:?}\nsidecar log lines naming them:\n{}\n{}",
            mentions.join("\n"),
            context()
        );
    }
    assert_eq!(
        broker.count(&dlq).await.map(|c| c.0),
        Some(0),
        "nothing dead-lettered"
    );
    let duplicates = accepted(&record).len() - total;

    println!(
        "remediation loop (alert for: and Alertmanager timings divided by {SPEED_UP}, 1 s scrape and evaluation):\n\
         app killed:      restarted after {app_restarted:.1} s, consuming after {app_consuming:.1} s, RabbitSidecarAppDown resolved after {app_resolved:.1} s\n\
         sidecar frozen:  restarted after {sidecar_restarted:.1} s, consuming after {sidecar_consuming:.1} s, RabbitSidecarDown resolved after {sidecar_resolved:.1} s\n\
         {total} messages published, all accepted, {duplicates} duplicates; {failed_scrapes} scrapes failed before the sidecar froze"
    );
    broker.cleanup().await;
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
