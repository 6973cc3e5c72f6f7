//! The bench rig: the local broker, a minimal HTTP app that timestamps what it receives, a minimal
//! OTLP/HTTP receiver, the sidecar as a child process, and what `/proc` says about it.
//!
//! Every message body starts with the publish time (20 decimal digits of nanoseconds since the
//! Unix epoch) and is padded to the wanted size, so whoever receives it can compute the latency
//! without any header mapping.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::task::JoinSet;

pub const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Every connection the bench itself opens carries this name, so the broker-restart scenario can
/// tell the bench's connections from other clients'.
pub const CONNECTION_NAME: &str = "rabbit-sidecar-bench";
const TS_DIGITS: usize = 20;

pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "rs-bench-{prefix}-{}-{}-{}",
        std::process::id(),
        now_ns() % 1_000_000_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A body of `size` bytes (at least the timestamp) stamped with the current time.
pub fn stamped_body(size: usize) -> Vec<u8> {
    let mut body = format!("{:0width$}", now_ns(), width = TS_DIGITS).into_bytes();
    body.resize(size.max(TS_DIGITS), b'x');
    body
}

/// Nanoseconds from the stamp in `body` to now, if it carries one.
pub fn age_ns(body: &[u8]) -> Option<u64> {
    let stamp: u64 = std::str::from_utf8(body.get(..TS_DIGITS)?)
        .ok()?
        .parse()
        .ok()?;
    Some(now_ns().saturating_sub(stamp))
}

/// Polls `f` every 20 ms until it is true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- broker

pub async fn connect() -> Result<Connection, lapin::Error> {
    Connection::connect(
        AMQP,
        ConnectionProperties::default().with_connection_name(CONNECTION_NAME.into()),
    )
    .await
}

/// A connection with a confirming channel, and the queues to delete at the end.
pub struct Broker {
    pub conn: Connection,
    pub ch: Channel,
    queues: Mutex<Vec<String>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueKind {
    Quorum,
    Classic,
}

impl Broker {
    pub async fn connect() -> Result<Broker, String> {
        let conn = connect()
            .await
            .map_err(|e| format!("cannot connect to the broker at 127.0.0.1:5672: {e}"))?;
        let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        Ok(Broker {
            conn,
            ch,
            queues: Mutex::default(),
        })
    }

    /// Declares a durable queue and remembers it (and the sidecar's companion queues) for
    /// [`Broker::cleanup`].
    pub async fn declare(&self, queue: &str, kind: QueueKind, single_active: bool) {
        {
            let mut q = self.queues.lock().unwrap();
            q.push(queue.to_string());
            q.push(format!("{queue}.retry"));
            q.push(format!("{queue}.dead-letter"));
        }
        let mut args = FieldTable::default();
        let kind = match kind {
            QueueKind::Quorum => "quorum",
            QueueKind::Classic => "classic",
        };
        args.insert("x-queue-type".into(), AMQPValue::LongString(kind.into()));
        if single_active {
            args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        }
        self.ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .expect("queue declared");
    }

    /// Publishes `n` persistent messages of `size` bytes, `window` at a time before waiting for
    /// their confirms.
    pub async fn publish_n(&self, queue: &str, n: usize, size: usize) -> Result<(), String> {
        publish_n(&self.ch, queue, n, size).await
    }

    pub async fn cleanup(&self) {
        let queues = std::mem::take(&mut *self.queues.lock().unwrap());
        delete_queues(&queues).await;
    }

    pub fn forget(&self) -> Vec<String> {
        std::mem::take(&mut *self.queues.lock().unwrap())
    }
}

/// Deletes `queues` over a fresh connection (the rig's may have died with a broker restart).
pub async fn delete_queues(queues: &[String]) {
    let Ok(conn) = connect().await else { return };
    for q in queues {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
            let _ = ch.close(200, "".into()).await;
        }
    }
    let _ = conn.close(200, "".into()).await;
}

const WINDOW: usize = 256;

pub async fn publish_n(ch: &Channel, queue: &str, n: usize, size: usize) -> Result<(), String> {
    let mut sent = 0;
    while sent < n {
        let batch = WINDOW.min(n - sent);
        let mut confirms = Vec::with_capacity(batch);
        for _ in 0..batch {
            let c = ch
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &stamped_body(size),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .map_err(|e| e.to_string())?;
            confirms.push(c);
        }
        for c in confirms {
            let c = c.await.map_err(|e| e.to_string())?;
            if !c.is_ack() {
                return Err("the broker nacked a publish".into());
            }
        }
        sent += batch;
    }
    Ok(())
}

/// Publishes `n` messages at `rate` per second (in 10 ms ticks), then returns. Stops early when
/// `stop` is set.
pub async fn publish_at_rate(
    ch: &Channel,
    queue: &str,
    n: usize,
    size: usize,
    rate: f64,
    stop: &AtomicBool,
) -> Result<usize, String> {
    let started = Instant::now();
    let mut sent = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while sent < n && !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * rate) as usize + 1).min(n);
        if due > sent {
            publish_n(ch, queue, due - sent, size).await?;
            sent = due;
        }
    }
    Ok(sent)
}

/// Every client connected to the broker, by its connection name or client properties.
pub fn broker_clients() -> Result<Vec<String>, String> {
    let out = Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "-q",
            "--no-table-headers",
            "client_properties",
        ])
        .output()
        .map_err(|e| format!("rabbitmqctl: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect())
}

/// Rolls the broker's quorum write-ahead log over and waits (at most 30 s) until the segment
/// writer has moved the old one into segment files and deleted it.
///
/// Why: every quorum queue on a node writes into one WAL, which rolls over at 512 MiB
/// (`wal_max_size_bytes`); the segment writer then copies everything in it into per-queue segment
/// files, hundreds of megabytes of writes and CPU on a two-core machine. With 16 KiB messages a
/// case writes about 400 MB, so a rollover fell into nearly every case, at a different point each
/// time: during the publish, or during the drain being measured. Starting each case on a fresh
/// WAL keeps the rollover out of it (a case writes less than the limit).
pub fn settle_quorum_wal() -> Result<(), String> {
    const SETTLE: &str = r#"
        Dir = maps:get(wal_data_dir, ra_system:fetch(quorum_queues)),
        Wals = fun() -> filelib:wildcard(filename:join(Dir, "*.wal")) end,
        Before = Wals(),
        ok = ra_log_wal:force_roll_over(ra_log_wal),
        Wait = fun W(0) -> timeout;
                   W(N) -> case Before -- Wals() of
                               Before -> ok;
                               _ -> timer:sleep(20), W(N - 1)
                           end
               end,
        Wait(1500)."#;
    let out = Command::new("rabbitmqctl")
        .args(["eval", SETTLE])
        .output()
        .map_err(|e| format!("rabbitmqctl: {e}"))?;
    let said = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && said.trim() == "ok" {
        Ok(())
    } else {
        Err(format!(
            "rolling the quorum WAL over: {} {}",
            said.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub fn rabbitmqctl(args: &[&str]) -> Result<(), String> {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .map_err(|e| format!("rabbitmqctl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

// ---------------------------------------------------------------- app

/// What the app saw: a count, latencies (microseconds, publish → receipt), and optionally when
/// each path was hit (for the failover scenarios).
#[derive(Default)]
pub struct Recorder {
    pub count: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
    first: Mutex<Option<Instant>>,
    last: Mutex<Option<Instant>>,
    pub track_paths: AtomicBool,
    hits: Mutex<Vec<(String, Instant)>>,
}

impl Recorder {
    pub fn record(&self, body: &[u8], path: &str) {
        let now = Instant::now();
        if let Some(age) = age_ns(body) {
            self.latencies_us.lock().unwrap().push(age / 1_000);
        }
        {
            let mut first = self.first.lock().unwrap();
            if first.is_none() {
                *first = Some(now);
            }
        }
        *self.last.lock().unwrap() = Some(now);
        if self.track_paths.load(Ordering::Relaxed) {
            self.hits.lock().unwrap().push((path.to_string(), now));
        }
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn reset(&self) {
        self.count.store(0, Ordering::Relaxed);
        self.latencies_us.lock().unwrap().clear();
        *self.first.lock().unwrap() = None;
        *self.last.lock().unwrap() = None;
        self.hits.lock().unwrap().clear();
    }

    /// Seconds from the first to the last receipt.
    pub fn span(&self) -> Option<Duration> {
        let first = (*self.first.lock().unwrap())?;
        let last = (*self.last.lock().unwrap())?;
        Some(last.duration_since(first))
    }

    pub fn latencies(&self) -> Vec<u64> {
        self.latencies_us.lock().unwrap().clone()
    }

    /// The first receipt on `path` at or after `after`.
    pub fn first_hit(&self, path: &str, after: Instant) -> Option<Instant> {
        self.hits
            .lock()
            .unwrap()
            .iter()
            .find(|(p, at)| p == path && *at >= after)
            .map(|(_, at)| *at)
    }

    pub fn hits_on(&self, path: &str) -> usize {
        self.hits
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .count()
    }
}

/// A minimal HTTP app on 127.0.0.1 answering 200 (or the status set with [`App::set_status`])
/// after an optional delay. It can go down (stop listening and drop its connections) and come
/// back on the same port.
pub struct App {
    pub addr: SocketAddr,
    pub rec: Arc<Recorder>,
    pub delay_us: Arc<AtomicU64>,
    status: Arc<AtomicU16>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl App {
    pub async fn start() -> App {
        let mut app = App {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            rec: Arc::default(),
            delay_us: Arc::default(),
            status: Arc::new(AtomicU16::new(200)),
            server: None,
        };
        app.up().await;
        app
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn set_delay(&self, d: Duration) {
        self.delay_us.store(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// The status every request is answered with from now on (a sick app: 503).
    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::Relaxed);
    }

    pub fn down(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
        }
    }

    pub async fn up(&mut self) {
        let listener = bind_retry(self.addr).await;
        self.addr = listener.local_addr().expect("bound");
        let (rec, delay, status) = (self.rec.clone(), self.delay_us.clone(), self.status.clone());
        self.server = Some(tokio::spawn(async move {
            // Dropping the set (when this task is aborted) closes every connection.
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (rec, delay, status) = (rec.clone(), delay.clone(), status.clone());
                conns.spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (rec, delay, status) = (rec.clone(), delay.clone(), status.clone());
                        async move {
                            let path = req.uri().path().to_string();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            rec.record(&body, &path);
                            let d = delay.load(Ordering::Relaxed);
                            if d > 0 {
                                tokio::time::sleep(Duration::from_micros(d)).await;
                            }
                            let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
                            *response.status_mut() =
                                hyper::StatusCode::from_u16(status.load(Ordering::Relaxed))
                                    .unwrap_or(hyper::StatusCode::OK);
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        }));
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.down();
    }
}

async fn bind_retry(addr: SocketAddr) -> tokio::net::TcpListener {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) if Instant::now() >= deadline => panic!("cannot bind {addr}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// A minimal OTLP/HTTP receiver: answers 200 to every POST and counts the requests.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicU64>,
    server: tokio::task::JoinHandle<()>,
}

impl OtlpReceiver {
    pub async fn start() -> OtlpReceiver {
        let listener = bind_retry(SocketAddr::from(([127, 0, 0, 1], 0))).await;
        let addr = listener.local_addr().expect("bound");
        let requests = Arc::new(AtomicU64::new(0));
        let r = requests.clone();
        let server = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let r = r.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let r = r.clone();
                        async move {
                            let _ = req.into_body().collect().await;
                            r.fetch_add(1, Ordering::Relaxed);
                            Ok::<_, std::convert::Infallible>(
                                Response::builder()
                                    .header("content-type", "application/x-protobuf")
                                    .body(Empty::<Bytes>::new())
                                    .expect("a valid response"),
                            )
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        OtlpReceiver {
            addr,
            requests,
            server,
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

// ---------------------------------------------------------------- sidecar

/// The sidecar binary as a child process; killed (by its own PID) when dropped.
pub struct SidecarProc {
    pub child: Child,
    pub admin: SocketAddr,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl SidecarProc {
    pub fn spawn(args: &[String], env: &[(String, String)]) -> SidecarProc {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let log = dir.path().join("sidecar.log");
        let file = std::fs::File::create(&log).expect("a log file");
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new(env!("CARGO_BIN_EXE_rabbit-sidecar"))
            .args(args)
            .args(["--listen", &admin.to_string()])
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("a log file"))
            .stderr(file)
            .spawn()
            .expect("the sidecar binary starts");
        SidecarProc {
            child,
            admin,
            log,
            _dir: dir,
        }
    }

    /// Spawns the sidecar and waits until it is ready. Another process may take the admin port
    /// between our probe and the sidecar's bind: then it tries again on another port.
    pub async fn start(args: &[String], env: &[(String, String)]) -> Result<SidecarProc, String> {
        let mut last = String::new();
        for _ in 0..3 {
            let mut s = SidecarProc::spawn(args, env);
            match s.wait_ready(Duration::from_secs(30)).await {
                Ok(()) => return Ok(s),
                Err(e) if s.logs().contains("cannot bind the admin server") => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A GET of the admin server's `path`, within 2 s.
    async fn get(&self, path: &str) -> Option<hyper::Response<Incoming>> {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Empty<Bytes>>();
        let uri: hyper::Uri = format!("http://{}{path}", self.admin).parse().ok()?;
        tokio::time::timeout(Duration::from_secs(2), client.get(uri))
            .await
            .ok()?
            .ok()
    }

    /// The body of the admin server's `path` (e.g. `/metrics`).
    pub async fn body_of(&self, path: &str) -> Option<String> {
        let body = self.get(path).await?.into_body().collect().await.ok()?;
        Some(String::from_utf8_lossy(&body.to_bytes()).into_owned())
    }

    pub async fn status_of(&self, path: &str) -> Option<u16> {
        Some(self.get(path).await?.status().as_u16())
    }

    /// Waits until `/readyz` answers 200 (consuming, or standing by).
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.status_of("/readyz").await == Some(200) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "the sidecar exited ({status}) before it was ready; its log:\n{}",
                    self.logs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(format!(
            "the sidecar was not ready within {timeout:?}; its log:\n{}",
            self.logs()
        ))
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status();
    }

    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn stats(&self) -> ProcStats {
        ProcStats::read(self.pid())
    }
}

impl Drop for SidecarProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What `/proc` says about a process: CPU seconds (user + system), resident and peak resident
/// memory, open file descriptors.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStats {
    pub cpu_s: f64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub fds: usize,
    /// Context switches of its live threads, voluntary and not.
    pub ctx_switches: u64,
}

impl ProcStats {
    pub fn read(pid: u32) -> ProcStats {
        let mut s = ProcStats::default();
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
            if let Some((_, rest)) = stat.rsplit_once(')') {
                let f: Vec<&str> = rest.split_whitespace().collect();
                let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
                    + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
                s.cpu_s = ticks as f64 / clock_ticks() as f64;
            }
        }
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            let kib = |key: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            s.rss_kib = kib("VmRSS:");
            s.hwm_kib = kib("VmHWM:");
        }
        s.fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0);
        s.ctx_switches = std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
            .flat_map(|status| {
                status
                    .lines()
                    .filter(|l| l.contains("ctxt_switches:"))
                    .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    .collect::<Vec<_>>()
            })
            .sum();
        s
    }
}

fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100)
    })
}

/// Latency percentiles in milliseconds from microsecond samples.
pub fn percentiles(mut us: Vec<u64>) -> HashMap<&'static str, f64> {
    let mut out = HashMap::new();
    if us.is_empty() {
        return out;
    }
    us.sort_unstable();
    let at = |q: f64| us[((us.len() as f64 - 1.0) * q).round() as usize] as f64 / 1000.0;
    out.insert("p50", at(0.50));
    out.insert("p90", at(0.90));
    out.insert("p99", at(0.99));
    out.insert("max", at(1.0));
    out
}
