//! The real Prometheus and Alertmanager (Debian's `prometheus` and `prometheus-alertmanager`) as
//! child processes on free loopback ports, with small JSON clients for their HTTP APIs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use serde_json::Value;

use super::free_port;

/// A path in the repository.
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn binary(candidates: &[&str], package: &str) -> PathBuf {
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{} is missing: apt-get install -y {package} (scripts/test-deps.sh does it)",
                candidates[0]
            )
        })
}

/// GET `url`, parsed as JSON; `None` if there is no answer within 5 s or it is not JSON.
pub async fn get_json(url: &str) -> Option<Value> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let uri: hyper::Uri = url.parse().ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.get(uri))
        .await
        .ok()?
        .ok()?;
    let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .ok()?
        .ok()?
        .to_bytes();
    serde_json::from_slice(&body).ok()
}

/// Percent-encodes a query parameter.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A child process that is killed and reaped when dropped, with its output in a log file.
pub struct Process {
    pub child: Child,
    pub log: PathBuf,
}

impl Process {
    pub fn spawn(command: &mut Command, log: PathBuf) -> Process {
        let file = std::fs::File::create(&log).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        Process { child, log }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the log if the process has exited.
    pub fn assert_running(&mut self, what: &str) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("{what} exited with {status}:\n{}", self.logs());
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Prometheus {
    pub process: Process,
    pub base: String,
}

impl Prometheus {
    /// Starts Prometheus with the prometheus.yml that `config` writes for the address
    /// (`127.0.0.1:port`) Prometheus will listen on, with its files in `dir`.
    pub fn start(dir: &Path, config: impl FnOnce(&str) -> String) -> Prometheus {
        let bin = binary(
            &["/usr/bin/prometheus", "/usr/local/bin/prometheus"],
            "prometheus",
        );
        let port = free_port();
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config(&format!("127.0.0.1:{port}"))).unwrap();
        let process = Process::spawn(
            Command::new(bin)
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("prometheus-data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}")),
            dir.join("prometheus.log"),
        );
        Prometheus {
            process,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    pub async fn get(&self, path_and_query: &str) -> Option<Value> {
        get_json(&format!("{}{path_and_query}", self.base)).await
    }

    /// Runs an instant query; `Err` carries Prometheus's error text.
    pub async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
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

    /// The values of `label` on the series matching `selector`, as Grafana's `label_values()`
    /// variable query asks for them; `Err` carries Prometheus's error text.
    pub async fn label_values(&self, label: &str, selector: &str) -> Result<Vec<String>, String> {
        let v = self
            .get(&format!(
                "/api/v1/label/{label}/values?match[]={}",
                encode(selector)
            ))
            .await
            .ok_or("no answer")?;
        if v["status"] != "success" {
            return Err(v["error"].as_str().unwrap_or("error").to_string());
        }
        Ok(v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect())
    }

    /// The state (`pending`, `firing`) of the alert `name`, if it is active.
    pub async fn alert_state(&self, name: &str) -> Option<String> {
        let v = self.get("/api/v1/alerts").await?;
        v["data"]["alerts"]
            .as_array()?
            .iter()
            .find(|a| a["labels"]["alertname"] == name)
            .and_then(|a| a["state"].as_str().map(str::to_string))
    }

    /// Waits until Prometheus answers queries.
    pub async fn wait_ready(&mut self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        let mut ready = false;
        while !ready && std::time::Instant::now() < deadline {
            self.process.assert_running("prometheus");
            ready = self.query("1").await.is_ok();
            if !ready {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        assert!(
            ready,
            "prometheus not ready in {timeout:?}:\n{}",
            self.process.logs()
        );
    }
}

pub struct Alertmanager {
    pub process: Process,
    pub base: String,
}

impl Alertmanager {
    /// Starts Alertmanager with `config` (an alertmanager.yml) written to `dir`, clustering off.
    pub fn start(dir: &Path, config: &str) -> Alertmanager {
        let bin = binary(
            &["/usr/bin/prometheus-alertmanager", "/usr/bin/alertmanager"],
            "prometheus-alertmanager",
        );
        let config_path = dir.join("alertmanager.yml");
        std::fs::write(&config_path, config).unwrap();
        let port = free_port();
        let process = Process::spawn(
            Command::new(bin)
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.path={}",
                    dir.join("alertmanager-data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--cluster.listen-address="),
            dir.join("alertmanager.log"),
        );
        Alertmanager {
            process,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    pub fn address(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    /// Alerts Alertmanager holds as active (not resolved, silenced or inhibited).
    pub async fn active_alerts(&self) -> Option<Vec<Value>> {
        let v = get_json(&format!(
            "{}/api/v2/alerts?active=true&silenced=false&inhibited=false",
            self.base
        ))
        .await?;
        v.as_array().cloned()
    }

    pub async fn wait_ready(&mut self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        let mut ready = false;
        while !ready && std::time::Instant::now() < deadline {
            self.process.assert_running("alertmanager");
            ready = self.active_alerts().await.is_some();
            if !ready {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        assert!(
            ready,
            "alertmanager not ready in {timeout:?}:\n{}",
            self.process.logs()
        );
    }
}
