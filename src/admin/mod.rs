//! The admin server, on its own thread and runtime so probes answer within milliseconds however
//! busy the consumer side is.
//!
//! | path       | answer |
//! |------------|--------|
//! | `/metrics` | Prometheus text format |
//! | `/healthz` | liveness: 200 `alive`, or 503 with why the process is wedged |
//! | `/readyz`  | readiness: 200 when connected, consuming or standing by, the app up, no circuit open and not draining; else 503 and a one-line reason (`circuit_open: …` while the breaker is open) |
//! | `/status`  | JSON: state per subscription, broker node (host:port only), consumer tag, in-flight, last delivery and ack, circuit breakers (state, since, next probe), version |
//!
//! Only `GET` (and `HEAD`) are served; anything else is 405, unknown paths 404. Request heads are
//! capped at 16 KiB and bodies are never read, so an oversized or malformed request costs nothing.

pub(crate) mod health;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;

use self::health::{Health, Verdict};
use crate::broker::monitor;
use crate::telemetry::metrics::Metrics;

#[derive(Clone, Debug)]
pub struct Admin {
    pub metrics: Metrics,
    pub health: Arc<Health>,
    pub queues: Vec<String>,
}

fn text(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .header(hyper::header::CACHE_CONTROL, "no-store")
        .body(Full::new(body.into()))
        .expect("static headers always build")
}

/// 200 or 503 with the verdict's one-line reason.
fn verdict(v: Verdict) -> Response<Full<Bytes>> {
    let status = if v.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    text(status, format!("{}\n", v.reason), PLAIN)
}

const PLAIN: &str = "text/plain; charset=utf-8";

impl Admin {
    pub fn answer(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        if method != Method::GET && method != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET is served\n",
                PLAIN,
            );
        }
        match path {
            "/metrics" => {
                monitor::refresh(&self.metrics, &self.health, &self.queues);
                text(
                    StatusCode::OK,
                    self.metrics.render(),
                    "text/plain; version=0.0.4; charset=utf-8",
                )
            }
            "/healthz" | "/livez" => verdict(self.health.liveness()),
            "/readyz" => verdict(self.health.readiness()),
            "/status" => {
                let doc =
                    serde_json::to_string_pretty(&self.health.status()).expect("status serializes");
                text(StatusCode::OK, doc + "\n", "application/json")
            }
            "/" => text(
                StatusCode::OK,
                "rabbit-sidecar: /metrics /healthz /readyz /status\n",
                PLAIN,
            ),
            _ => text(StatusCode::NOT_FOUND, "not found\n", PLAIN),
        }
    }
}

/// Serves on `listener` from a dedicated thread until `stop` is cancelled.
pub fn spawn(
    listener: std::net::TcpListener,
    admin: Admin,
    stop: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("the admin runtime builds");
            rt.block_on(serve(listener, admin, stop));
        })
}

async fn serve(listener: std::net::TcpListener, admin: Admin, stop: CancellationToken) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "admin server cannot use its listener");
            return;
        }
    };
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let resp = admin.answer(req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = http1::Builder::new()
                .max_buf_size(16 * 1024)
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
        });
    }
}
