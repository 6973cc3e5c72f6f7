//! Test harness: the real broker (RabbitMQ 3.10 at 127.0.0.1:5672 or RabbitMQ 4 at 127.0.0.1:5673,
//! see [`rabbit`]), an in-process HTTP app whose answers a test programs, and the real sidecar
//! binary as a child process.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::task::JoinSet;

// ---------------------------------------------------------------- the broker under test

/// Which RabbitMQ the tests run against, from `RABBIT_SIDECAR_TEST_BROKER`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rabbit {
    /// `rabbitmq3` (the default): the machine's RabbitMQ 3.10 node `rabbit@localhost`, AMQP on
    /// 127.0.0.1:5672, management on :15672 (scripts/ensure-broker.sh starts it).
    V3,
    /// `rabbitmq4`: the RabbitMQ 4 node `rabbit4@localhost` that scripts/rabbitmq4.sh runs in a
    /// Debian root, AMQP on 127.0.0.1:5673, management on :15673.
    V4,
}

/// The environment variable that picks the broker.
pub const BROKER_ENV: &str = "RABBIT_SIDECAR_TEST_BROKER";

pub fn rabbit() -> Rabbit {
    static WHICH: LazyLock<Rabbit> = LazyLock::new(|| match std::env::var(BROKER_ENV).as_deref() {
        Err(_) | Ok("") | Ok("rabbitmq3") => Rabbit::V3,
        Ok("rabbitmq4") => Rabbit::V4,
        Ok(other) => panic!("{BROKER_ENV}={other}: expected rabbitmq3 or rabbitmq4"),
    });
    *WHICH
}

/// The broker's AMQP `host:port`.
pub fn amqp_addr() -> &'static str {
    match rabbit() {
        Rabbit::V3 => "127.0.0.1:5672",
        Rabbit::V4 => "127.0.0.1:5673",
    }
}

/// The broker's AMQP URL (guest, default vhost).
pub fn amqp() -> &'static str {
    match rabbit() {
        Rabbit::V3 => "amqp://guest:guest@127.0.0.1:5672/%2f",
        Rabbit::V4 => "amqp://guest:guest@127.0.0.1:5673/%2f",
    }
}

/// The management API's `host:port`.
pub fn management_addr() -> &'static str {
    match rabbit() {
        Rabbit::V3 => "127.0.0.1:15672",
        Rabbit::V4 => "127.0.0.1:15673",
    }
}

/// The management API's URL with guest's credentials.
pub fn management_url() -> &'static str {
    match rabbit() {
        Rabbit::V3 => "http://guest:guest@127.0.0.1:15672",
        Rabbit::V4 => "http://guest:guest@127.0.0.1:15673",
    }
}

/// The broker's Erlang node name.
pub fn node_name() -> &'static str {
    match rabbit() {
        Rabbit::V3 => "rabbit@localhost",
        Rabbit::V4 => "rabbit4@localhost",
    }
}

/// The script that makes sure the broker is up, for messages that tell how to start it.
pub fn broker_script() -> &'static str {
    match rabbit() {
        Rabbit::V3 => "scripts/ensure-broker.sh",
        Rabbit::V4 => "scripts/rabbitmq4.sh",
    }
}

/// The root scripts/rabbitmq4.sh installs RabbitMQ 4 in (`RABBITMQ4_ROOT`, as there).
pub fn rabbitmq4_root() -> std::path::PathBuf {
    std::env::var_os("RABBITMQ4_ROOT")
        .map(Into::into)
        .unwrap_or_else(|| "/var/lib/rabbit-sidecar/rabbitmq4".into())
}

/// `rabbitmqctl` for the broker under test, without arguments: the machine's for 3.10,
/// `scripts/rabbitmq4.sh ctl` (rabbitmqctl -n rabbit4@localhost inside its root) for 4.
pub fn rabbitmqctl_command() -> Command {
    match rabbit() {
        Rabbit::V3 => Command::new("rabbitmqctl"),
        Rabbit::V4 => {
            let mut c = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/rabbitmq4.sh"));
            c.arg("ctl");
            c
        }
    }
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "rs-test-{prefix}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `f` until it is true or `timeout` passes; returns whether it became true.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The local broker, a declared classic `queue` and the `app`, with the sidecar's own defaults
/// for everything else; `extra` is appended (later flags win).
pub fn declared<'a>(queue: &'a str, app: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "--amqp-url",
        amqp(),
        "--queue",
        queue,
        "--target-url",
        app,
        "--declare",
        "--queue-type",
        "classic",
    ];
    a.extend_from_slice(extra);
    a
}

/// The sidecar flags most tests use: [`declared`] plus short backoffs and probe intervals so
/// faults play out in seconds; `extra` is appended (later flags win).
pub fn args<'a>(queue: &'a str, app: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = declared(
        queue,
        app,
        &[
            "--retry-backoff",
            "100ms",
            "--heartbeat",
            "2s",
            "--app-probe-interval",
            "200ms",
            "--queue-poll-interval",
            "500ms",
        ],
    );
    a.extend_from_slice(extra);
    a
}

/// The `queue` label as it appears in a scrape.
pub fn q(queue: &str) -> String {
    format!("queue=\"{queue}\"")
}

/// The series of `metric` for `queue`, as it appears in a scrape: `metric{queue="…"}`.
pub fn series(metric: &str, queue: &str) -> String {
    format!("{metric}{{{}}}", q(queue))
}

// ---------------------------------------------------------------- broker

pub struct Broker {
    pub conn: Connection,
    pub ch: Channel,
    cleanup: Mutex<Vec<String>>,
}

impl Broker {
    pub async fn connect() -> Broker {
        Broker::connect_to(amqp()).await
    }

    /// A connection to `url` (another virtual host of the broker under test, say).
    pub async fn connect_to(url: &str) -> Broker {
        let conn = Connection::connect(
            url,
            ConnectionProperties::default().with_connection_name("rabbit-sidecar-tests".into()),
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "the test broker at {} is up (start it with {}): {e}",
                amqp_addr(),
                broker_script()
            )
        });
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Broker {
            conn,
            ch,
            cleanup: Mutex::new(Vec::new()),
        }
    }

    /// Remembers `queue` and the sidecar's companion queues for deletion in `cleanup`.
    pub fn track(&self, queue: &str) {
        let mut c = self.cleanup.lock().unwrap();
        c.push(queue.to_string());
        c.push(format!("{queue}.retry"));
        c.push(format!("{queue}.dead-letter"));
    }

    /// Declares `queue` (durable) with `arguments`, as someone other than the sidecar would.
    pub async fn declare_with(&self, queue: &str, arguments: &[(&str, AMQPValue)]) {
        self.track(queue);
        let mut args = FieldTable::default();
        for (name, value) in arguments {
            args.insert((*name).into(), value.clone());
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
            .unwrap();
    }

    /// Publishes one message whose body and message id are `id`.
    pub async fn publish_id(&self, queue: &str, id: &str) {
        self.publish(
            queue,
            id.as_bytes(),
            BasicProperties::default().with_message_id(id.into()),
        )
        .await;
    }

    /// Waits up to `timeout` for `queue` to hold `ready` ready messages.
    pub async fn wait_ready_count(&self, queue: &str, ready: u32, timeout: Duration) -> bool {
        eventually(timeout, || async {
            self.count(queue).await.is_some_and(|(r, _)| r == ready)
        })
        .await
    }

    pub async fn declare(&self, queue: &str, quorum: bool, single_active: bool) {
        let kind = if quorum { "quorum" } else { "classic" };
        let mut arguments = vec![("x-queue-type", AMQPValue::LongString(kind.into()))];
        if single_active {
            arguments.push(("x-single-active-consumer", AMQPValue::Boolean(true)));
        }
        self.declare_with(queue, &arguments).await;
    }

    pub async fn publish(&self, queue: &str, body: &[u8], props: BasicProperties) {
        let confirm = self
            .ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                props.with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "publish confirmed");
    }

    /// Publishes `n` messages with ids `{prefix}-{i}` and returns the ids.
    pub async fn publish_n(&self, queue: &str, n: usize, prefix: &str) -> Vec<String> {
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let id = format!("{prefix}-{i}");
            self.publish(
                queue,
                id.as_bytes(),
                BasicProperties::default().with_message_id(id.as_str().into()),
            )
            .await;
            ids.push(id);
        }
        ids
    }

    /// (ready, consumers) by a passive declare on a fresh channel; `None` if the queue is missing.
    pub async fn count(&self, queue: &str) -> Option<(u32, u32)> {
        let ch = self.conn.create_channel().await.ok()?;
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .ok()?;
        let _ = ch.close(200, "".into()).await;
        Some((q.message_count(), q.consumer_count()))
    }

    /// Takes every message out of `queue` (basic.get + ack).
    pub async fn drain(&self, queue: &str) -> Vec<(Vec<u8>, BasicProperties)> {
        let ch = self.conn.create_channel().await.unwrap();
        let mut out = Vec::new();
        for _ in 0..100_000 {
            match ch
                .basic_get(queue.into(), BasicGetOptions::default())
                .await
                .unwrap()
            {
                Some(m) => {
                    m.delivery
                        .acker
                        .ack(BasicAckOptions::default())
                        .await
                        .unwrap();
                    out.push((m.delivery.data.clone(), m.delivery.properties.clone()));
                }
                None => break,
            }
        }
        let _ = ch.close(200, "".into()).await;
        out
    }

    pub async fn cleanup(&self) {
        let queues = self.cleanup.lock().unwrap().clone();
        for q in queues {
            if let Ok(ch) = self.conn.create_channel().await {
                let _ = ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
                let _ = ch.close(200, "".into()).await;
            }
        }
    }
}

pub fn header_str(props: &BasicProperties, name: &str) -> Option<String> {
    props
        .headers()
        .as_ref()?
        .inner()
        .get(name)
        .and_then(|v| match v {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            AMQPValue::LongLongInt(n) => Some(n.to_string()),
            AMQPValue::LongInt(n) => Some(n.to_string()),
            AMQPValue::ShortInt(n) => Some(n.to_string()),
            AMQPValue::Boolean(b) => Some(b.to_string()),
            _ => None,
        })
}

/// Runs `rabbitmqctl` with `args` against the broker under test; panics with its output when it
/// fails.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = rabbitmqctl_command()
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Closes the broker connections whose client-provided name contains `needle`.
pub fn close_connections_named(needle: &str) -> usize {
    let list = rabbitmqctl(&[
        "list_connections",
        "-q",
        "--no-table-headers",
        "pid",
        "client_properties",
    ]);
    let mut closed = 0;
    for line in list.lines().filter(|l| l.contains(needle)) {
        if let Some(pid) = line.split_whitespace().next() {
            let _ = rabbitmqctl_command()
                .args(["close_connection", pid, "test closes the connection"])
                .output();
            closed += 1;
        }
    }
    closed
}

// ---------------------------------------------------------------- app

#[derive(Debug, Clone)]
pub struct Received {
    pub body: Vec<u8>,
    pub headers: HashMap<String, String>,
    /// The request's path and query, as the app saw it (`/events/orders`).
    pub uri: String,
    pub at: Instant,
}

impl Received {
    pub fn id(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

type Behaviour = Arc<dyn Fn(&Received) -> u16 + Send + Sync>;
type ReplyHeaders = Arc<dyn Fn(&Received) -> Vec<(String, String)> + Send + Sync>;

/// An HTTP app on 127.0.0.1 whose status answers come from a closure the test sets.
pub struct App {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
    /// Each request with the status the app answered, in the order the answers were given; a
    /// request whose connection closed before the answer is not here.
    answered: Arc<Mutex<Vec<(Received, u16)>>>,
    behaviour: Arc<Mutex<Behaviour>>,
    reply_headers: Arc<Mutex<ReplyHeaders>>,
    delay: Arc<Mutex<Duration>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl App {
    pub async fn start() -> App {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    pub async fn start_on(addr: SocketAddr) -> App {
        let mut app = App {
            addr,
            received: Arc::default(),
            answered: Arc::default(),
            behaviour: Arc::new(Mutex::new(Arc::new(|_: &Received| 200))),
            reply_headers: Arc::new(Mutex::new(Arc::new(|_: &Received| Vec::new()))),
            delay: Arc::default(),
            server: None,
        };
        app.up().await;
        app
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    pub fn answer(&self, f: impl Fn(&Received) -> u16 + Send + Sync + 'static) {
        *self.behaviour.lock().unwrap() = Arc::new(f);
    }

    /// Headers added to every answer (e.g. `Retry-After`), chosen per request.
    pub fn reply_headers(
        &self,
        f: impl Fn(&Received) -> Vec<(String, String)> + Send + Sync + 'static,
    ) {
        *self.reply_headers.lock().unwrap() = Arc::new(f);
    }

    pub fn set_delay(&self, d: Duration) {
        *self.delay.lock().unwrap() = d;
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// The id of every request the app received, whatever it answered (duplicates included).
    pub fn ids(&self) -> Vec<String> {
        self.received().iter().map(Received::id).collect()
    }

    /// Waits up to `timeout` for the app to have received every one of `ids`.
    pub async fn received_all(&self, ids: &[String], timeout: Duration) -> bool {
        eventually(timeout, || async {
            let got = self.ids();
            ids.iter().all(|id| got.contains(id))
        })
        .await
    }

    /// Each request the app answered, with the status it answered.
    pub fn answered(&self) -> Vec<(Received, u16)> {
        self.answered.lock().unwrap().clone()
    }

    /// The ids the app answered 2xx at least once (duplicates included).
    pub fn accepted(&self) -> Vec<String> {
        self.answered()
            .iter()
            .filter(|(_, status)| (200..300).contains(status))
            .map(|(r, _)| r.id())
            .collect()
    }

    /// Stops listening and drops every open connection: the app is down.
    pub fn down(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
        }
    }

    /// Listens again on the same address.
    pub async fn up(&mut self) {
        let listener = bind_retry(self.addr).await;
        self.addr = listener.local_addr().unwrap();
        let (received, answered, behaviour, delay) = (
            self.received.clone(),
            self.answered.clone(),
            self.behaviour.clone(),
            self.delay.clone(),
        );
        let reply_headers = self.reply_headers.clone();
        self.server = Some(tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (received, answered, behaviour, delay) = (
                    received.clone(),
                    answered.clone(),
                    behaviour.clone(),
                    delay.clone(),
                );
                let reply_headers = reply_headers.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (received, answered, behaviour, delay) = (
                            received.clone(),
                            answered.clone(),
                            behaviour.clone(),
                            delay.clone(),
                        );
                        let reply_headers = reply_headers.clone();
                        async move {
                            let uri = req
                                .uri()
                                .path_and_query()
                                .map(|p| p.as_str().to_string())
                                .unwrap_or_default();
                            let headers = req
                                .headers()
                                .iter()
                                .map(|(k, v)| {
                                    (k.as_str().to_string(), v.to_str().unwrap_or("").to_string())
                                })
                                .collect();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes().to_vec())
                                .unwrap_or_default();
                            let r = Received {
                                body,
                                headers,
                                uri,
                                at: Instant::now(),
                            };
                            received.lock().unwrap().push(r.clone());
                            let d = *delay.lock().unwrap();
                            if !d.is_zero() {
                                tokio::time::sleep(d).await;
                            }
                            let f = behaviour.lock().unwrap().clone();
                            // Headers first: a test may decide them by what the status closure has
                            // not seen yet.
                            let extra = reply_headers.lock().unwrap().clone()(&r);
                            let status = f(&r);
                            let mut response = Response::builder().status(status);
                            for (name, value) in extra {
                                response = response.header(name, value);
                            }
                            answered.lock().unwrap().push((r, status));
                            Ok::<_, std::convert::Infallible>(
                                response
                                    .body(Full::new(Bytes::from_static(b"answer")))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
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
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot bind {addr}: {e}"),
        }
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------- sidecar

/// A sidecar under test: the binary as a child process ([`Sidecar::spawn`]), for what only a
/// process has (signals, exit codes, kill -9, its own environment), or `rabbit_sidecar::run` inside
/// the test process ([`Sidecar::start`]), which every other test uses: no process to start, the
/// same admin server, log lines in the same kind of file.
pub struct Sidecar {
    run: Run,
    pub admin: SocketAddr,
    pub log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

enum Run {
    Process(Child),
    InProcess {
        shutdown: tokio_util::sync::CancellationToken,
        thread: Option<std::thread::JoinHandle<u8>>,
    },
}

/// The log filter both kinds of sidecar run with.
const TEST_LOG: &str = "info,rabbit_sidecar=debug";

impl Sidecar {
    /// Starts the sidecar binary with `args` (plus `--listen` on a free port).
    pub fn spawn(args: &[&str]) -> Sidecar {
        Self::spawn_env(args, &[])
    }

    pub fn spawn_env(args: &[&str], env: &[(&str, &str)]) -> Sidecar {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sidecar.log");
        let file = std::fs::File::create(&log).unwrap();
        let admin = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new(env!("CARGO_BIN_EXE_rabbit-sidecar"))
            .args(args)
            .args(["--listen", &admin.to_string()])
            .env("RUST_LOG", TEST_LOG)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("the sidecar binary starts");
        Sidecar {
            run: Run::Process(child),
            admin,
            log,
            _dir: dir,
        }
    }

    /// Runs the sidecar in this process: the command line parsed as the binary parses it, the
    /// configuration read with `env` as the only environment, `run` on a runtime and thread of
    /// its own, its telemetry scoped to that thread and writing to the log file.
    pub fn start(args: &[&str]) -> Sidecar {
        Self::start_env(args, &[])
    }

    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Sidecar {
        use rabbit_sidecar::cli::{self, Invocation};
        use rabbit_sidecar::config::Layers;
        use rabbit_sidecar::telemetry::Telemetry;

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let admin = listener.local_addr().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sidecar.log");
        let file = std::fs::File::create(&log).unwrap();
        let mut vars: HashMap<String, String> =
            HashMap::from([("RUST_LOG".into(), TEST_LOG.into())]);
        vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let lookup = move |name: &str| vars.get(name).cloned();

        let argv = std::iter::once("rabbit-sidecar").chain(args.iter().copied());
        let Ok(Invocation::Run(flags)) = cli::parse(argv.map(Into::into)) else {
            panic!("not a run of the sidecar: {args:?}");
        };
        let config = Layers::collect(flags, &lookup)
            .and_then(|l| l.build())
            .unwrap_or_else(|e| panic!("configuration error: {e}"));
        let (telemetry, dispatch) =
            Telemetry::build_with_writer(config.log_format, &lookup, std::sync::Mutex::new(file))
                .expect("telemetry");
        let shutdown = tokio_util::sync::CancellationToken::new();
        let stop = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name("sidecar".into())
            .spawn(move || {
                let _scope = tracing::dispatcher::set_default(&dispatch);
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let result = rabbit_sidecar::run(config, listener, stop).await;
                    telemetry.shutdown().await;
                    match result {
                        Ok(()) => 0,
                        Err(rabbit_sidecar::RunError::Topology(e)) => {
                            tracing::error!(error = %e, "stopping: topology conflict");
                            78
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "stopping");
                            1
                        }
                    }
                })
            })
            .unwrap();
        Sidecar {
            run: Run::InProcess {
                shutdown,
                thread: Some(thread),
            },
            admin,
            log,
            _dir: dir,
        }
    }

    /// The child's process id; only a spawned sidecar has one.
    pub fn pid(&self) -> u32 {
        match &self.run {
            Run::Process(child) => child.id(),
            Run::InProcess { .. } => panic!("an in-process sidecar has no pid: use Sidecar::spawn"),
        }
    }

    /// Whether the sidecar is still running.
    pub fn running(&mut self) -> bool {
        match &mut self.run {
            Run::Process(child) => child.try_wait().unwrap().is_none(),
            Run::InProcess { thread, .. } => thread.as_ref().is_some_and(|t| !t.is_finished()),
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<Bytes>>();
        let uri: hyper::Uri = format!("http://{}{path}", self.admin).parse().unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(2), client.get(uri))
            .await
            .ok()?
            .ok()?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// `/status` (as JSON, and as sent) once `until` holds for it, or as it last was when
    /// `timeout` is up.
    pub async fn status_when(
        &self,
        timeout: Duration,
        until: impl Fn(&serde_json::Value) -> bool,
    ) -> (serde_json::Value, String) {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, body) = self.get("/status").await.expect("/status answers");
            assert_eq!(status, 200, "{body}");
            let doc: serde_json::Value = serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("/status is JSON ({e}):\n{body}"));
            if until(&doc) || Instant::now() >= deadline {
                return (doc, body);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_ready(&self, timeout: Duration) {
        let ok = eventually(timeout, || async {
            matches!(self.get("/readyz").await, Some((200, _)))
        })
        .await;
        assert!(
            ok,
            "sidecar not ready within {timeout:?} (process {}); logs:\n{}",
            self.process_state(),
            self.logs()
        );
    }

    /// The child's scheduler state from `/proc` ("R", "S", ... or "Z" once it exited and was not
    /// yet reaped), for failure messages: an empty log from a dead process reads differently.
    pub fn process_state(&self) -> String {
        let Run::Process(child) = &self.run else {
            return "in-process".into();
        };
        std::fs::read_to_string(format!("/proc/{}/stat", child.id()))
            .ok()
            .and_then(|s| {
                s.rsplit_once(") ")
                    .map(|(_, rest)| rest.split(' ').next().unwrap_or("?").to_string())
            })
            .unwrap_or_else(|| "gone".into())
    }

    pub async fn metrics(&self) -> String {
        self.get("/metrics")
            .await
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// The value of the series `name{labels}` (labels as written, e.g. `queue="q",reason="x"`).
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series).unwrap_or(f64::NAN)
    }

    /// Polls `/metrics` until `series` equals `want`, at most `timeout`; whether it did.
    pub async fn wait_metric(&self, series: &str, want: f64, timeout: Duration) -> bool {
        eventually(timeout, || async { self.metric(series).await == want }).await
    }

    /// Sends `sig` to a spawned sidecar; an in-process one takes TERM and INT as the binary's
    /// signal handler does (the shutdown token), and nothing else.
    pub fn signal(&self, sig: &str) {
        match &self.run {
            Run::Process(child) => {
                let ok = Command::new("kill")
                    .args([&format!("-{sig}"), &child.id().to_string()])
                    .status()
                    .unwrap();
                assert!(ok.success());
            }
            Run::InProcess { shutdown, .. } if sig == "TERM" || sig == "INT" => shutdown.cancel(),
            Run::InProcess { .. } => panic!("SIG{sig} needs a process: use Sidecar::spawn"),
        }
    }

    /// Waits for the sidecar to exit, at most `timeout`. An in-process run's result reads as the
    /// binary's exit code would.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        use std::os::unix::process::ExitStatusExt as _;
        let deadline = Instant::now() + timeout;
        loop {
            match &mut self.run {
                Run::Process(child) => {
                    if let Some(s) = child.try_wait().unwrap() {
                        return Some(s);
                    }
                }
                Run::InProcess { thread, .. } => {
                    if thread.as_ref().is_some_and(|t| t.is_finished()) {
                        let code = thread.take().unwrap().join().unwrap_or(101);
                        return Some(ExitStatus::from_raw(i32::from(code) << 8));
                    }
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn kill9(&mut self) {
        self.signal("KILL");
        self.wait_exit(Duration::from_secs(10))
            .await
            .expect("killed process exits");
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        match &mut self.run {
            Run::Process(child) => {
                if let Ok(None) = child.try_wait() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
            // Not joined: its drain may wait for answers from an app that runs on the test's own
            // runtime, which a join here would block. The process ends with the test.
            Run::InProcess { shutdown, .. } => shutdown.cancel(),
        }
    }
}

/// Finds `series` (`name{labels}` or bare `name`) in a text exposition.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

/// Consumes and counts what arrives in `queue` using a plain lapin consumer (ack everything).
pub async fn consume_ids(
    conn: &Connection,
    queue: &str,
    want: usize,
    timeout: Duration,
) -> Vec<String> {
    let ch = conn.create_channel().await.unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            unique("c").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut ids = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while ids.len() < want {
        match tokio::time::timeout_at(deadline, consumer.next()).await {
            Ok(Some(Ok(d))) => {
                ids.push(String::from_utf8_lossy(&d.data).into_owned());
                d.acker.ack(BasicAckOptions::default()).await.unwrap();
            }
            _ => break,
        }
    }
    let _ = ch.close(200, "".into()).await;
    ids
}

pub mod monitoring;
pub mod node;
pub mod proxy;
