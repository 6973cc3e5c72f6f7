//! Demo application for the compose stack: the HTTP service that rabbit-sidecar delivers to.
//!
//! It answers `POST <any path>` with 200, except for a configurable share of 500s, so the
//! dashboards and alerts have retries and dead letters to show. `POST /admin/hang` makes every
//! later message request hang forever, the "app is wedged" case that the `AppDown` alert and
//! the remediation receiver exist for; only a restart (or `POST /admin/recover`) clears it.
//! `GET /healthz` keeps answering while hung, like many real apps whose health check does not
//! touch the code path that is stuck, which is why the sidecar's view of the app is the one that
//! drives the restart.
//!
//! Environment: `DEMO_LISTEN` (default `0.0.0.0:8080`), `DEMO_FAIL_PERCENT` (0..=100, default 0),
//! `DEMO_DELAY_MS` (added to every message request, default 0), `DEMO_RECORD_FILE` (if set, the
//! `X-Amqp-Message-Id` of every message answered 2xx is appended to this file, one per line, before
//! the answer is sent: a record that survives the app being killed, to check that nothing was lost).
//!
//! Run: `DEMO_FAIL_PERCENT=10 cargo run --example demo_app`

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand::Rng;
use tokio::net::TcpListener;

struct Settings {
    listen: SocketAddr,
    fail_percent: u32,
    delay: Duration,
    record: Option<PathBuf>,
}

impl Settings {
    fn from_env() -> Result<Self, String> {
        let listen = env_or("DEMO_LISTEN", "0.0.0.0:8080")
            .parse()
            .map_err(|e| format!("DEMO_LISTEN: {e}"))?;
        let fail_percent: u32 = env_or("DEMO_FAIL_PERCENT", "0")
            .parse()
            .map_err(|e| format!("DEMO_FAIL_PERCENT: {e}"))?;
        if fail_percent > 100 {
            return Err(format!("DEMO_FAIL_PERCENT: {fail_percent} is above 100"));
        }
        let delay_ms: u64 = env_or("DEMO_DELAY_MS", "0")
            .parse()
            .map_err(|e| format!("DEMO_DELAY_MS: {e}"))?;
        Ok(Self {
            listen,
            fail_percent,
            delay: Duration::from_millis(delay_ms),
            record: std::env::var_os("DEMO_RECORD_FILE").map(PathBuf::from),
        })
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

struct State {
    settings: Settings,
    hung: AtomicBool,
    handled: AtomicU64,
    record: Option<Mutex<std::fs::File>>,
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: &'static str) -> Reply {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}

async fn handle(state: Arc<State>, request: Request<Incoming>) -> Result<Reply, Infallible> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let message_id = request
        .headers()
        .get("x-amqp-message-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    match (&method, path.as_str()) {
        (&Method::GET, "/healthz") => return Ok(reply(StatusCode::OK, "ok\n")),
        (&Method::POST, "/admin/hang") => {
            state.hung.store(true, Ordering::SeqCst);
            tracing::warn!("hanging every message request from now on");
            return Ok(reply(StatusCode::OK, "hanging\n"));
        }
        (&Method::POST, "/admin/recover") => {
            state.hung.store(false, Ordering::SeqCst);
            tracing::info!("answering message requests again");
            return Ok(reply(StatusCode::OK, "recovered\n"));
        }
        (&Method::POST, _) => {}
        _ => {
            return Ok(reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "POST a message, or GET /healthz\n",
            ));
        }
    }

    // Read the whole body first so a slow or hung answer still looks like "the app received it".
    let body = match request.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) => {
            tracing::warn!(%error, "could not read the request body");
            return Ok(reply(StatusCode::BAD_REQUEST, "unreadable body\n"));
        }
    };
    if state.hung.load(Ordering::SeqCst) {
        // Never answer: the sidecar's dispatch timeout is what notices.
        std::future::pending::<()>().await;
    }
    if !state.settings.delay.is_zero() {
        tokio::time::sleep(state.settings.delay).await;
    }
    let seq = state.handled.fetch_add(1, Ordering::Relaxed);
    let fail = rand::rng().random_range(0..100) < state.settings.fail_percent;
    if fail {
        tracing::info!(%path, bytes = body.len(), seq, "answering 500 (DEMO_FAIL_PERCENT)");
        Ok(reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "simulated failure\n",
        ))
    } else {
        if let (Some(record), Some(id)) = (&state.record, &message_id) {
            // One write per line: with O_APPEND it lands whole even if the process dies after it.
            let written = record
                .lock()
                .unwrap()
                .write_all(format!("{id}\n").as_bytes());
            if let Err(error) = written {
                tracing::error!(%error, "cannot record the message id; answering 500");
                return Ok(reply(StatusCode::INTERNAL_SERVER_ERROR, "cannot record\n"));
            }
        }
        tracing::debug!(%path, bytes = body.len(), seq, "handled");
        Ok(reply(StatusCode::OK, "ok\n"))
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(problem) => {
            eprintln!("demo_app: bad configuration: {problem}");
            std::process::exit(64);
        }
    };
    let listener = match TcpListener::bind(settings.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("demo_app: cannot listen on {}: {error}", settings.listen);
            std::process::exit(1);
        }
    };
    tracing::info!(
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        fail_percent = settings.fail_percent,
        delay_ms = settings.delay.as_millis() as u64,
        "demo app listening"
    );
    let record = match &settings.record {
        Some(path) => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(file) => Some(Mutex::new(file)),
            Err(error) => {
                eprintln!("demo_app: DEMO_RECORD_FILE {}: {error}", path.display());
                std::process::exit(64);
            }
        },
        None => None,
    };
    let state = Arc::new(State {
        settings,
        hung: AtomicBool::new(false),
        handled: AtomicU64::new(0),
        record,
    });

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| handle(state.clone(), request));
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    tracing::info!("demo app stopping");
}
