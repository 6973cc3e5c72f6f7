//! The dashboards and alert rules against a real Prometheus server scraping the real sidecar:
//! every dashboard query parses and returns data, every rule loads and evaluates without error,
//! and taking the app down makes `RabbitSidecarAppDown` go pending, then clear when it is back.
//!
//! Needs `/usr/bin/prometheus` (Debian package `prometheus`); fails saying so when it is missing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

struct Prometheus {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let bin = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("the prometheus server is missing: apt-get install prometheus");
        let dir = tempfile::tempdir().unwrap();
        let rules = repo("alerts/rabbit-sidecar.rules.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: rabbit-sidecar\n    static_configs:\n      - targets: ['{target}']\n",
            rules.display()
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        Prometheus {
            child,
            base: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    async fn get(&self, path_and_query: &str) -> Option<Value> {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let uri: hyper::Uri = format!("{}{path_and_query}", self.base).parse().unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), client.get(uri))
            .await
            .ok()?
            .ok()?;
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .ok()?
            .to_bytes();
        serde_json::from_slice(&body).ok()
    }

    /// Runs an instant query; `Err` carries Prometheus's error text.
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let v = self
            .get(&format!("/api/v1/query?query={}", encode(expr)))
            .await
            .ok_or("no answer")?;
        if v["status"] != "success" {
            return Err(v["error"].as_str().unwrap_or("error").to_string());
        }
        Ok(match &v["data"]["result"] {
            Value::Array(a) => a.clone(),
            other => vec![other.clone()],
        })
    }

    async fn alert_state(&self, name: &str) -> Option<String> {
        let v = self.get("/api/v1/alerts").await?;
        v["data"]["alerts"]
            .as_array()?
            .iter()
            .find(|a| a["labels"]["alertname"] == name)
            .and_then(|a| a["state"].as_str().map(str::to_string))
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every Prometheus query in a dashboard, with Grafana's variables replaced for this test.
fn dashboard_queries(path: &Path, queue: &str, instance: &str) -> Vec<(String, String)> {
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut out = Vec::new();
    let mut stack = vec![&doc];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(m) => {
                if let (Some(Value::String(expr)), Some(title)) = (
                    m.get("expr"),
                    Some(m.get("refId").and_then(|r| r.as_str()).unwrap_or("?")),
                ) {
                    let expr = expr
                        .replace("$__rate_interval", "30s")
                        .replace("$__interval", "5s")
                        .replace("$__range", "5m")
                        .replace("${job}", "rabbit-sidecar")
                        .replace("$job", "rabbit-sidecar")
                        .replace("${instance}", instance)
                        .replace("$instance", instance)
                        .replace("${queue}", queue)
                        .replace("$queue", queue);
                    out.push((title.to_string(), expr));
                }
                stack.extend(m.values());
            }
            Value::Array(a) => stack.extend(a),
            _ => {}
        }
    }
    out
}

#[tokio::test]
async fn dashboards_and_rules_work_against_a_real_prometheus() {
    let broker = Broker::connect().await;
    let queue = unique("prom");
    broker.track(&queue);
    let mut app = App::start().await;
    app.answer(|r| match r.id().as_str() {
        "reject" => 400,
        "fail" => 500,
        _ => 200,
    });
    let url = app.url();
    let sidecar = Sidecar::spawn(&declared(
        &queue,
        &url,
        &[
            "--retry-backoff",
            "100ms",
            "--max-deliveries",
            "2",
            "--queue-poll-interval",
            "1s",
            "--app-probe-interval",
            "200ms",
        ],
    ));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let prom = Prometheus::start(&sidecar.admin.to_string());
    broker.publish_n(&queue, 30, "ok").await;
    broker
        .publish(
            &queue,
            b"reject",
            lapin::BasicProperties::default().with_timestamp(1),
        )
        .await;
    broker.publish(&queue, b"fail", Default::default()).await;
    let dlq = format!("{queue}.dead-letter");
    assert!(
        eventually(Duration::from_secs(20), || async {
            broker.count(&dlq).await.map(|c| c.0) == Some(2)
        })
        .await
    );

    // Prometheus is up, scrapes the sidecar, and has loaded every rule without error.
    assert!(
        eventually(Duration::from_secs(30), || async {
            prom.query("up{job=\"rabbit-sidecar\"} == 1")
                .await
                .is_ok_and(|r| r.len() == 1)
        })
        .await,
        "prometheus scrapes the sidecar"
    );
    // Let a few scrapes accumulate so rate() has two points.
    assert!(
        eventually(Duration::from_secs(30), || async {
            prom.query(&format!(
                "count_over_time(rabbit_sidecar_acks_total{{queue=\"{queue}\"}}[1m]) >= 4"
            ))
            .await
            .is_ok_and(|r| !r.is_empty())
        })
        .await
    );
    let rules = prom.get("/api/v1/rules").await.expect("rules API answers");
    let groups = rules["data"]["groups"].as_array().expect("rule groups");
    let mut rule_count = 0;
    for g in groups {
        for r in g["rules"].as_array().unwrap() {
            rule_count += 1;
            assert_eq!(
                r["health"], "ok",
                "rule {} evaluates: {}",
                r["name"], r["lastError"]
            );
        }
    }
    assert!(
        rule_count >= 10,
        "the repo's rules are loaded ({rule_count})"
    );

    // Every dashboard query parses and returns data.
    let mut empty = Vec::new();
    for file in [
        "dashboards/rabbit-sidecar-overview.json",
        "dashboards/rabbit-sidecar-instance.json",
    ] {
        let queries = dashboard_queries(&repo(file), &queue, &sidecar.admin.to_string());
        assert!(queries.len() >= 10, "{file} has queries");
        for (ref_id, expr) in queries {
            if expr.starts_with("label_values(") {
                continue;
            }
            match prom.query(&expr).await {
                Ok(r) if r.is_empty() => empty.push(format!("{file} {ref_id}: {expr}")),
                Ok(_) => {}
                Err(e) => panic!("{file} {ref_id}: {expr}\n  does not run: {e}"),
            }
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without data:\n{}",
        empty.join("\n")
    );

    // The app goes down: the app-down alert goes pending (it has a `for:`), then clears.
    app.down();
    broker.publish_n(&queue, 3, "down").await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            matches!(
                prom.alert_state("RabbitSidecarAppDown").await.as_deref(),
                Some("pending" | "firing")
            )
        })
        .await,
        "RabbitSidecarAppDown goes pending"
    );
    app.up().await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            prom.alert_state("RabbitSidecarAppDown").await.is_none()
        })
        .await,
        "RabbitSidecarAppDown clears when the app is back"
    );
    broker.cleanup().await;
}
