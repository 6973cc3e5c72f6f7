//! End-to-end tests of `rabbit-sidecar remediate`: the real receiver in-process on loopback, fed
//! by a real Alertmanager or by hand-made webhook requests, acting on a marker-file program, a
//! fake Docker Engine on a unix socket and a fake Kubernetes API server.
//!
//! "Nothing ran" is asserted after shutting the receiver down, because shutdown waits for every
//! background restart: after it returns, no restart can still be on its way.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rabbit_sidecar::remediate::{self, Config};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "test-token-123";
const DEADLINE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Helpers

struct Receiver {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Receiver {
    async fn start(config_toml: &str) -> Receiver {
        let text = format!("token_env = \"REMEDIATE_TOKEN\"\n{config_toml}");
        let config = Config::parse(&text, &|name: &str| {
            (name == "REMEDIATE_TOKEN").then(|| TOKEN.to_owned())
        })
        .expect("test config is valid");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(remediate::serve(config, listener, shutdown.clone()));
        Receiver {
            addr,
            shutdown,
            task,
        }
    }

    async fn alerts(&self, body: &Value) -> (StatusCode, Value) {
        let (status, text) = http(
            self.addr,
            "POST",
            "/alerts",
            Some(&format!("Bearer {TOKEN}")),
            serde_json::to_vec(body).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{text}");
        (status, serde_json::from_str(&text).unwrap())
    }

    async fn metrics(&self) -> String {
        let (status, text) = http(self.addr, "GET", "/metrics", None, vec![]).await;
        assert_eq!(status, StatusCode::OK);
        text
    }

    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics().await, name, labels)
    }

    /// Polls until `name{labels}` reaches `want`, or fails at the deadline.
    async fn wait_metric(&self, name: &str, labels: &[(&str, &str)], want: f64) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let got = self.metric(name, labels).await;
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name}{labels:?} is {got}, expected {want}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the receiver and waits until it has drained every background restart.
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("receiver stops in time")
            .unwrap()
            .unwrap();
    }
}

/// One request on a fresh connection; returns status and body text.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, String) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json");
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The value of the sample `name{labels...}` in Prometheus text format; 0 if absent.
fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .find(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|line| line.rsplit(' ').next())
        .map(|v| v.parse().unwrap())
        .unwrap_or(0.0)
}

fn alert(status: &str, labels: &[(&str, &str)]) -> Value {
    let labels: BTreeMap<_, _> = labels.iter().copied().collect();
    json!({
        "status": status,
        "labels": labels,
        "annotations": {"summary": "test"},
        "startsAt": "2024-01-01T00:00:00Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus.invalid/graph",
        "fingerprint": "0123456789abcdef",
    })
}

fn restart_alert(target: &str) -> Value {
    alert(
        "firing",
        &[
            ("alertname", "RabbitSidecarDown"),
            ("action", "restart"),
            ("restart_target", target),
            ("severity", "critical"),
        ],
    )
}

fn webhook(alerts: Vec<Value>) -> Value {
    json!({
        "version": "4",
        "groupKey": "{}:{alertname=\"RabbitSidecarDown\"}",
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "remediate",
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.invalid",
        "alerts": alerts,
    })
}

fn decisions(answer: &Value) -> Vec<&str> {
    answer["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["decision"].as_str().unwrap())
        .collect()
}

/// A target `app` that creates `marker` when restarted.
fn touch_target(marker: &Path) -> String {
    format!(
        "[targets.app]\naction = \"command\"\nprogram = \"/usr/bin/touch\"\nargs = [{:?}]\n",
        marker.to_str().unwrap()
    )
}

async fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + DEADLINE;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} was not created in time",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Captures log output of the current thread (tests run on a current-thread runtime, so the
/// receiver's tasks log through it too).
#[derive(Clone, Default)]
struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

// ---------------------------------------------------------------------------------------------
// Real Alertmanager

/// Kills and reaps the child when dropped, also when the test panics.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn alertmanager_binary() -> PathBuf {
    let candidates = [
        std::env::var_os("ALERTMANAGER_BIN").map(PathBuf::from),
        Some(PathBuf::from("/usr/bin/prometheus-alertmanager")),
        Some(PathBuf::from("/usr/bin/alertmanager")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "Alertmanager is not installed: `apt-get install -y prometheus-alertmanager` \
                 (or set ALERTMANAGER_BIN to an alertmanager binary)"
            )
        })
}

async fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn alertmanager_delivers_a_firing_alert_and_the_program_runs() {
    let binary = alertmanager_binary();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("restarted");
    let receiver = Receiver::start(&format!("cooldown = \"1h\"\n{}", touch_target(&marker))).await;

    let config = dir.path().join("alertmanager.yml");
    std::fs::write(
        &config,
        format!(
            r#"route:
  receiver: remediate
  group_by: ["alertname"]
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: remediate
    webhook_configs:
      - url: "http://{addr}/alerts"
        send_resolved: false
        http_config:
          authorization:
            type: Bearer
            credentials: "{TOKEN}"
"#,
            addr = receiver.addr
        ),
    )
    .unwrap();
    let am_port = free_port().await;
    let am_addr: SocketAddr = ([127, 0, 0, 1], am_port).into();
    let log_path = dir.path().join("alertmanager.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new(&binary)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={am_addr}"))
        .arg("--cluster.listen-address=")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
    let mut alertmanager = ChildGuard(child);
    let am_log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(status) = alertmanager.0.try_wait().unwrap() {
            panic!("alertmanager exited with {status}:\n{}", am_log());
        }
        if let Ok(stream) = TcpStream::connect(am_addr).await {
            drop(stream);
            let (status, _) = http(am_addr, "GET", "/-/ready", None, vec![]).await;
            if status == StatusCode::OK {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "alertmanager not ready:\n{}",
            am_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let alerts = json!([{
        "labels": {
            "alertname": "RabbitSidecarAppDown",
            "action": "restart",
            "restart_target": "app",
            "severity": "critical",
            "queue": "orders",
        },
        "annotations": {"summary": "the app does not answer"},
    }]);
    let (status, text) = http(
        am_addr,
        "POST",
        "/api/v2/alerts",
        None,
        serde_json::to_vec(&alerts).unwrap(),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "alertmanager refused the alert: {text}"
    );

    let deadline = Instant::now() + DEADLINE;
    while !marker.exists() {
        assert!(
            Instant::now() < deadline,
            "the receiver did not run the program; alertmanager log:\n{}",
            am_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    receiver
        .wait_metric(
            "rabbit_sidecar_remediations_total",
            &[
                ("target", "app"),
                ("action", "command"),
                ("result", "success"),
            ],
            1.0,
        )
        .await;
    assert!(
        receiver
            .metric(
                "rabbit_sidecar_remediation_requests_total",
                &[("result", "accepted")]
            )
            .await
            >= 1.0
    );
    assert_eq!(
        receiver
            .metric(
                "rabbit_sidecar_remediation_requests_total",
                &[("result", "unauthorized")]
            )
            .await,
        0.0,
        "Alertmanager's bearer token was refused"
    );
    drop(alertmanager);
    receiver.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Safety rules, in-process

#[tokio::test]
async fn requests_without_the_right_token_get_401_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("restarted");
    let receiver = Receiver::start(&touch_target(&marker)).await;
    let body = serde_json::to_vec(&webhook(vec![restart_alert("app")])).unwrap();

    for authorization in [
        None,
        Some("Bearer wrong-token".to_owned()),
        Some(format!("Bearer {TOKEN}x")),
        Some(format!("Basic {TOKEN}")),
        Some(TOKEN.to_owned()),
    ] {
        let (status, _) = http(
            receiver.addr,
            "POST",
            "/alerts",
            authorization.as_deref(),
            body.clone(),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{authorization:?}");
    }
    assert_eq!(
        receiver
            .metric(
                "rabbit_sidecar_remediation_requests_total",
                &[("result", "unauthorized")]
            )
            .await,
        5.0
    );
    assert_eq!(
        receiver
            .metric(
                "rabbit_sidecar_remediation_requests_total",
                &[("result", "accepted")]
            )
            .await,
        0.0
    );
    receiver.stop().await;
    assert!(
        !marker.exists(),
        "an unauthorized request restarted the app"
    );
}

#[tokio::test]
async fn a_resent_alert_within_the_cooldown_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("restarted");
    let receiver = Receiver::start(&format!(
        "cooldown = \"1h\"\nmax_restarts = 10\n{}",
        touch_target(&marker)
    ))
    .await;

    let (_, answer) = receiver.alerts(&webhook(vec![restart_alert("app")])).await;
    assert_eq!(decisions(&answer), ["restart"]);
    wait_for_file(&marker).await;
    receiver
        .wait_metric(
            "rabbit_sidecar_remediations_total",
            &[("target", "app"), ("result", "success")],
            1.0,
        )
        .await;
    std::fs::remove_file(&marker).unwrap();

    // Alertmanager resends the same group; also two alerts for one target in one payload.
    let (_, answer) = receiver
        .alerts(&webhook(vec![restart_alert("app"), restart_alert("app")]))
        .await;
    assert_eq!(decisions(&answer), ["cooldown", "cooldown"]);
    assert_eq!(
        receiver
            .metric(
                "rabbit_sidecar_remediation_cooldown_skips_total",
                &[("target", "app")]
            )
            .await,
        2.0
    );
    receiver.stop().await;
    assert!(!marker.exists(), "restarted again within the cooldown");
}

#[tokio::test]
async fn after_max_restarts_in_the_window_it_refuses_and_says_so() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let receiver = Receiver::start(
        "cooldown = \"0s\"\nmax_restarts = 2\nwindow = \"1h\"\n\
         [targets.app]\naction = \"command\"\nprogram = \"/bin/true\"\n",
    )
    .await;

    let mut seen = Vec::new();
    for _ in 0..3 {
        let (_, answer) = receiver.alerts(&webhook(vec![restart_alert("app")])).await;
        seen.extend(decisions(&answer).into_iter().map(str::to_owned));
    }
    assert_eq!(seen, ["restart", "restart", "rate_limited"]);
    receiver
        .wait_metric(
            "rabbit_sidecar_remediations_total",
            &[("target", "app"), ("result", "success")],
            2.0,
        )
        .await;
    assert_eq!(
        receiver
            .metric(
                "rabbit_sidecar_remediation_rate_limited_total",
                &[("target", "app")]
            )
            .await,
        1.0
    );
    receiver.stop().await;

    let text = logs.text();
    let line = text
        .lines()
        .find(|l| l.contains("restart refused"))
        .unwrap_or_else(|| panic!("no refusal logged:\n{text}"));
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("a human is needed"), "{line}");
    assert!(
        line.contains("target=\"app\"") || line.contains("target=app"),
        "{line}"
    );
    assert!(line.contains("RabbitSidecarDown"), "{line}");
}

#[tokio::test]
async fn dry_run_decides_and_counts_but_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("restarted");
    let receiver = Receiver::start(&format!(
        "dry_run = true\ncooldown = \"1h\"\n{}",
        touch_target(&marker)
    ))
    .await;

    let (_, answer) = receiver.alerts(&webhook(vec![restart_alert("app")])).await;
    assert_eq!(decisions(&answer), ["dry_run"]);
    // The cooldown applies in dry runs too, so a dry run shows what would really happen.
    let (_, answer) = receiver.alerts(&webhook(vec![restart_alert("app")])).await;
    assert_eq!(decisions(&answer), ["cooldown"]);
    let metrics = receiver.metrics().await;
    let remediations = |result| {
        metric_value(
            &metrics,
            "rabbit_sidecar_remediations_total",
            &[("target", "app"), ("result", result)],
        )
    };
    assert_eq!(remediations("dry_run"), 1.0);
    assert_eq!(remediations("success"), 0.0);
    assert_eq!(remediations("failure"), 0.0);
    receiver.stop().await;
    assert!(!marker.exists(), "dry run ran the program");
}

#[tokio::test]
async fn unknown_targets_and_other_alerts_are_not_acted_on() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("restarted");
    let receiver = Receiver::start(&touch_target(&marker)).await;

    let (_, answer) = receiver
        .alerts(&webhook(vec![
            restart_alert("database"),
            restart_alert("app; rm -rf /"),
            alert(
                "firing",
                &[("alertname", "NoTarget"), ("action", "restart")],
            ),
            alert(
                "firing",
                &[("alertname", "JustPage"), ("restart_target", "app")],
            ),
            alert(
                "resolved",
                &[
                    ("alertname", "Over"),
                    ("action", "restart"),
                    ("restart_target", "app"),
                ],
            ),
        ]))
        .await;
    assert_eq!(
        decisions(&answer),
        [
            "unknown_target",
            "unknown_target",
            "unknown_target",
            "ignored",
            "ignored"
        ]
    );
    assert_eq!(answer["alerts"][0]["target"], "database");
    assert_eq!(
        receiver
            .metric("rabbit_sidecar_remediation_unknown_target_total", &[])
            .await,
        3.0
    );
    let metrics = receiver.metrics().await;
    assert!(
        !metrics.contains("database"),
        "alert data leaked into metric labels"
    );
    receiver.stop().await;
    assert!(!marker.exists());
}

#[tokio::test]
async fn malformed_or_oversized_payloads_get_4xx_and_are_not_acted_on() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("restarted");
    let receiver =
        Receiver::start(&format!("max_body_bytes = 2048\n{}", touch_target(&marker))).await;
    let auth = format!("Bearer {TOKEN}");
    let post = |body: Vec<u8>| http(receiver.addr, "POST", "/alerts", Some(&auth), body);

    let valid = serde_json::to_vec(&webhook(vec![restart_alert("app")])).unwrap();
    // A payload that would act if it were accepted, padded past the limit.
    let mut oversized = valid.clone();
    oversized.extend(std::iter::repeat_n(b' ', 4096));
    let wrong_version = serde_json::to_vec(&{
        let mut hook = webhook(vec![restart_alert("app")]);
        hook["version"] = json!("3");
        hook
    })
    .unwrap();

    for (body, want) in [
        (b"{not json".to_vec(), StatusCode::BAD_REQUEST),
        (b"".to_vec(), StatusCode::BAD_REQUEST),
        (b"{\"version\":\"4\"}".to_vec(), StatusCode::BAD_REQUEST),
        (wrong_version, StatusCode::BAD_REQUEST),
        (oversized.clone(), StatusCode::PAYLOAD_TOO_LARGE),
    ] {
        let (status, text) = post(body).await;
        assert_eq!(status, want, "{text}");
    }

    // Without a Content-Length the limit must still hold while streaming the body.
    let stream = TcpStream::connect(receiver.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let chunks = oversized
        .chunks(512)
        .map(|c| {
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::copy_from_slice(c)))
        })
        .collect::<Vec<_>>();
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(chunks));
    let request = Request::post("/alerts")
        .header("host", "receiver")
        .header("authorization", &auth)
        .body(body)
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);

    let metrics = receiver.metrics().await;
    let requests = |result| {
        metric_value(
            &metrics,
            "rabbit_sidecar_remediation_requests_total",
            &[("result", result)],
        )
    };
    assert_eq!(requests("bad_request"), 4.0);
    assert_eq!(requests("too_large"), 2.0);
    assert_eq!(requests("accepted"), 0.0);
    receiver.stop().await;
    assert!(!marker.exists(), "a rejected payload was acted on");
}

#[tokio::test]
async fn health_metrics_and_routing() {
    let receiver =
        Receiver::start("[targets.app]\naction = \"command\"\nprogram = \"/bin/true\"\n").await;
    let (status, body) = http(receiver.addr, "GET", "/healthz", None, vec![]).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok\n"));
    let (status, _) = http(receiver.addr, "GET", "/alerts", None, vec![]).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let (status, _) = http(receiver.addr, "GET", "/nope", None, vec![]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let metrics = receiver.metrics().await;
    for family in [
        "rabbit_sidecar_remediations_total",
        "rabbit_sidecar_remediation_cooldown_skips_total",
        "rabbit_sidecar_remediation_rate_limited_total",
        "rabbit_sidecar_remediation_requests_total",
        "rabbit_sidecar_remediation_unknown_target_total",
    ] {
        assert!(
            metrics.contains(&format!("# HELP {family} ")),
            "{family} has no HELP:\n{metrics}"
        );
    }
    // Series of configured targets exist from the start, so `increase()` alerts work at once.
    assert!(metrics.contains("rabbit_sidecar_remediation_rate_limited_total{target=\"app\"} 0"));
    receiver.stop().await;
}

#[tokio::test]
async fn bad_configuration_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("remediate.toml");
    std::fs::write(
        &config,
        "token_env = \"X\"\n[targets.app]\naction = \"reboot\"\n",
    )
    .unwrap();
    let code = remediate::cli_main(vec!["--config".into(), config.into_os_string()]).await;
    assert_eq!(code, ExitCode::from(64));
    let code = remediate::cli_main(vec!["--no-such-flag".into()]).await;
    assert_eq!(code, ExitCode::from(64));
    let code = remediate::cli_main(vec![
        "--config".into(),
        dir.path().join("missing.toml").into_os_string(),
    ])
    .await;
    assert_eq!(code, ExitCode::from(64));
}

// ---------------------------------------------------------------------------------------------
// Docker and Kubernetes actions against fake APIs

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    uri: String,
    authorization: Option<String>,
}

type Log = Arc<Mutex<Vec<Recorded>>>;

/// Serves `answer` on every connection `accept` yields, recording each request.
async fn fake_api<S, F>(log: Log, stream: S, answer: F)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn(&Recorded) -> (StatusCode, String) + Clone + Send + Sync + 'static,
{
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let recorded = Recorded {
            method: request.method().to_string(),
            uri: request.uri().to_string(),
            authorization: request
                .headers()
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_owned()),
        };
        log.lock().unwrap().push(recorded.clone());
        let (status, body) = answer(&recorded);
        async move {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status;
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn wait_requests(log: &Log, count: usize) -> Vec<Recorded> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let seen = log.lock().unwrap().clone();
        if seen.len() >= count {
            return seen;
        }
        assert!(Instant::now() < deadline, "only {seen:?} arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn docker_restart_posts_to_the_engine_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("docker.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let log = Log::default();
    let server_log = log.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(fake_api(server_log.clone(), stream, |r: &Recorded| {
                if r.uri.contains("/containers/rabbit-sidecar-demo-app/") {
                    (StatusCode::NO_CONTENT, String::new())
                } else {
                    (
                        StatusCode::NOT_FOUND,
                        r#"{"message":"No such container: gone"}"#.to_owned(),
                    )
                }
            }));
        }
    });
    let receiver = Receiver::start(&format!(
        "[targets.app]\naction = \"docker_restart\"\ncontainer = \"rabbit-sidecar-demo-app\"\n\
         docker_socket = {socket:?}\nstop_timeout = \"7s\"\n\
         [targets.sidecar]\naction = \"docker_restart\"\ncontainer = \"gone\"\n\
         docker_socket = {socket:?}\n",
    ))
    .await;

    let (_, answer) = receiver.alerts(&webhook(vec![restart_alert("app")])).await;
    assert_eq!(decisions(&answer), ["restart"]);
    let seen = wait_requests(&log, 1).await;
    assert_eq!(seen[0].method, "POST");
    assert_eq!(
        seen[0].uri,
        "/containers/rabbit-sidecar-demo-app/restart?t=7"
    );
    receiver
        .wait_metric(
            "rabbit_sidecar_remediations_total",
            &[
                ("target", "app"),
                ("action", "docker_restart"),
                ("result", "success"),
            ],
            1.0,
        )
        .await;

    let (_, answer) = receiver
        .alerts(&webhook(vec![restart_alert("sidecar")]))
        .await;
    assert_eq!(decisions(&answer), ["restart"]);
    let seen = wait_requests(&log, 2).await;
    assert_eq!(seen[1].uri, "/containers/gone/restart?t=10");
    receiver
        .wait_metric(
            "rabbit_sidecar_remediations_total",
            &[("target", "sidecar"), ("result", "failure")],
            1.0,
        )
        .await;
    receiver.stop().await;
}

#[tokio::test]
async fn kubernetes_delete_pod_uses_the_service_account_token() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::File::create(&token_file)
        .unwrap()
        .write_all(b"sa-token-xyz\n")
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = listener.local_addr().unwrap();
    let log = Log::default();
    let server_log = log.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(fake_api(server_log.clone(), stream, |r: &Recorded| {
                if r.method == "GET" {
                    let list = json!({"kind": "PodList", "items": [
                        {"metadata": {"name": "web-0", "namespace": "shop"}},
                        {"metadata": {"name": "web-1", "namespace": "shop"}},
                    ]});
                    (StatusCode::OK, list.to_string())
                } else {
                    (StatusCode::OK, json!({"kind": "Pod"}).to_string())
                }
            }));
        }
    });
    let common = format!(
        "namespace = \"shop\"\napi_server = \"http://{api}\"\ntoken_file = {token_file:?}\n\
         ca_file = {:?}\n",
        dir.path().join("absent-ca.crt")
    );
    let receiver = Receiver::start(&format!(
        "cooldown = \"0s\"\n\
         [targets.app]\naction = \"kubernetes_delete_pod\"\npod = \"web-0\"\n{common}\
         [targets.web]\naction = \"kubernetes_delete_pod\"\nlabel_selector = \"app=web\"\n{common}"
    ))
    .await;

    // A fixed pod: one DELETE, whatever the alert's pod label says.
    let mut fixed = restart_alert("app");
    fixed["labels"]["pod"] = json!("web-1");
    receiver.alerts(&webhook(vec![fixed])).await;
    let seen = wait_requests(&log, 1).await;
    assert_eq!(seen[0].method, "DELETE");
    assert_eq!(seen[0].uri, "/api/v1/namespaces/shop/pods/web-0");
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some("Bearer sa-token-xyz")
    );
    receiver
        .wait_metric(
            "rabbit_sidecar_remediations_total",
            &[
                ("target", "app"),
                ("action", "kubernetes_delete_pod"),
                ("result", "success"),
            ],
            1.0,
        )
        .await;

    // A selector: the alert's pod is deleted only because the selector lists it.
    let mut selected = restart_alert("web");
    selected["labels"]["pod"] = json!("web-1");
    selected["labels"]["namespace"] = json!("shop");
    receiver.alerts(&webhook(vec![selected])).await;
    let seen = wait_requests(&log, 3).await;
    assert_eq!(seen[1].method, "GET");
    assert_eq!(
        seen[1].uri,
        "/api/v1/namespaces/shop/pods?labelSelector=app%3Dweb"
    );
    assert_eq!(seen[2].method, "DELETE");
    assert_eq!(seen[2].uri, "/api/v1/namespaces/shop/pods/web-1");
    assert_eq!(
        seen[2].authorization.as_deref(),
        Some("Bearer sa-token-xyz")
    );
    receiver
        .wait_metric(
            "rabbit_sidecar_remediations_total",
            &[("target", "web"), ("result", "success")],
            1.0,
        )
        .await;

    // A pod outside the selector is listed but never deleted.
    let mut outsider = restart_alert("web");
    outsider["labels"]["pod"] = json!("database-0");
    receiver.alerts(&webhook(vec![outsider])).await;
    receiver
        .wait_metric(
            "rabbit_sidecar_remediations_total",
            &[("target", "web"), ("result", "failure")],
            1.0,
        )
        .await;
    receiver.stop().await;
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert_eq!(seen[3].method, "GET");
}

#[test]
fn the_compose_example_configuration_is_valid() {
    let text = include_str!("../../deploy/compose/remediate.toml");
    // The secret file exists only in the container; read the token from a variable instead.
    let text = text.replace(
        "token_file = \"/run/secrets/remediate-token\"",
        "token_env = \"REMEDIATE_TOKEN\"",
    );
    let config = Config::parse(&text, &|name: &str| {
        (name == "REMEDIATE_TOKEN").then(|| TOKEN.to_owned())
    })
    .unwrap();
    assert_eq!(config.listen, "0.0.0.0:9103".parse().unwrap());
    assert_eq!(config.path, "/alerts");
    let containers: Vec<_> = config
        .targets
        .iter()
        .map(|(name, target)| match target {
            remediate::config::Target::DockerRestart { container, .. } => {
                (name.as_str(), container.as_str())
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        containers,
        [
            ("app", "rabbit-sidecar-demo-app"),
            ("sidecar", "rabbit-sidecar-demo-sidecar")
        ]
    );
}

/// A self-signed certificate for 127.0.0.1: (certificate PEM, rustls server config).
fn loopback_tls() -> (String, Arc<rustls::ServerConfig>) {
    let issued = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(rustls_pki_types::PrivatePkcs8KeyDer::from(
        issued.signing_key.serialize_der(),
    ));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![issued.cert.der().clone()], key)
        .unwrap();
    (issued.cert.pem(), Arc::new(config))
}

#[tokio::test]
async fn kubernetes_api_is_reached_over_tls_verified_by_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "sa-token-tls").unwrap();
    let (server_pem, server_tls) = loopback_tls();
    let (other_pem, _) = loopback_tls();
    let ca_file = dir.path().join("ca.crt");
    let wrong_ca_file = dir.path().join("other-ca.crt");
    std::fs::write(&ca_file, server_pem).unwrap();
    std::fs::write(&wrong_ca_file, other_pem).unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server_tls);
    let log = Log::default();
    let server_log = log.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let server_log = server_log.clone();
            tokio::spawn(async move {
                // A client that distrusts our certificate aborts the handshake: not an error here.
                if let Ok(stream) = acceptor.accept(stream).await {
                    fake_api(server_log, stream, |_: &Recorded| {
                        (StatusCode::OK, json!({"kind": "Pod"}).to_string())
                    })
                    .await;
                }
            });
        }
    });
    let target = |name: &str, ca: &Path| {
        format!(
            "[targets.{name}]\naction = \"kubernetes_delete_pod\"\nnamespace = \"shop\"\n\
             pod = \"web-0\"\napi_server = \"https://{api}\"\ntoken_file = {token_file:?}\n\
             ca_file = {ca:?}\n"
        )
    };
    let receiver = Receiver::start(&format!(
        "{}{}",
        target("app", &ca_file),
        target("sidecar", &wrong_ca_file)
    ))
    .await;

    receiver.alerts(&webhook(vec![restart_alert("app")])).await;
    let seen = wait_requests(&log, 1).await;
    assert_eq!(seen[0].method, "DELETE");
    assert_eq!(seen[0].uri, "/api/v1/namespaces/shop/pods/web-0");
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some("Bearer sa-token-tls")
    );
    receiver
        .wait_metric(
            "rabbit_sidecar_remediations_total",
            &[("target", "app"), ("result", "success")],
            1.0,
        )
        .await;

    // An API server whose certificate the configured CA did not sign gets no request, no token.
    receiver
        .alerts(&webhook(vec![restart_alert("sidecar")]))
        .await;
    receiver
        .wait_metric(
            "rabbit_sidecar_remediations_total",
            &[("target", "sidecar"), ("result", "failure")],
            1.0,
        )
        .await;
    receiver.stop().await;
    assert_eq!(log.lock().unwrap().len(), 1);
}
