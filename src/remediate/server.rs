//! The HTTP side of the receiver.
//!
//! Endpoints:
//! - `POST <path>` (default `/alerts`): Alertmanager's webhook. Requires `Authorization: Bearer
//!   <token>` (401 otherwise, checked before the body is read), a body of at most
//!   `max_body_bytes` (413) that is a version-4 payload (400). Decisions are made before the
//!   answer, restarts run afterwards in the background, and the 200 answer lists the decision per
//!   alert as JSON (`restart`, `dry_run`, `cooldown`, `rate_limited`, `unknown_target`, `ignored`).
//!   Alertmanager does not retry a 4xx, so a bad request is never acted on nor repeated.
//! - `GET /healthz`: 200 while the server runs.
//! - `GET /metrics`: the receiver's own Prometheus registry (see `metrics`).
//!
//! Restarts of one target are serialised by a per-target lock, and the policy has recorded a
//! restart before it starts, so concurrent or resent alerts cannot restart a target twice at once.
//! On shutdown the listener closes, open connections finish their request, and running restarts
//! get `shutdown_grace` to complete.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{Encoder, Registry, TextEncoder};
use serde::Serialize;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::actions::{self, AlertFacts};
use super::config::{Config, Target};
use super::metrics::{Metrics, RemediationResult, RequestResult};
use super::payload::{self, Ask};
use super::policy::{Limits, Policy, Verdict};

/// Alertmanager holds one connection per receiver; more than this is not Alertmanager.
const MAX_CONNECTIONS: usize = 64;
/// Slow clients must not hold connections open forever.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

struct State {
    config: Config,
    policy: Mutex<Policy>,
    locks: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
    metrics: Metrics,
    registry: Registry,
    tasks: TaskTracker,
}

/// Serves the receiver on `listener` until `shutdown` is cancelled, then drains.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let registry = Registry::new();
    let metrics = Metrics::register(
        &registry,
        config
            .targets
            .iter()
            .map(|(name, t)| (name.as_str(), t.kind())),
    )
    .map_err(std::io::Error::other)?;
    #[cfg(target_os = "linux")]
    registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .map_err(std::io::Error::other)?;
    let state = Arc::new(State {
        policy: Mutex::new(Policy::new(Limits {
            cooldown: config.cooldown,
            max_restarts: config.max_restarts,
            window: config.window,
        })),
        locks: config
            .targets
            .keys()
            .map(|name| (name.clone(), Arc::default()))
            .collect(),
        metrics,
        registry,
        tasks: TaskTracker::new(),
        config,
    });
    tracing::info!(
        listen = %listener.local_addr()?,
        path = state.config.path,
        dry_run = state.config.dry_run,
        targets = ?state.config.targets.keys().collect::<Vec<_>>(),
        "remediation receiver listening"
    );

    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = connections.clone().acquire_owned() => permit.expect("never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Usually out of file descriptors; back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        let shutdown = shutdown.clone();
        state.tasks.clone().spawn(async move {
            let _permit = permit;
            let service = service_fn(move |request| handle(state.clone(), request));
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }

    drop(listener);
    state.tasks.close();
    let grace = state.config.shutdown_grace;
    if tokio::time::timeout(grace, state.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            grace = %humantime::format_duration(grace),
            "shutdown grace elapsed with restarts or connections still running"
        );
    }
    tracing::info!("remediation receiver stopped");
    Ok(())
}

async fn handle(
    state: Arc<State>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path();
    let response = if path == state.config.path {
        if request.method() == Method::POST {
            webhook(&state, request).await
        } else {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
            response
                .headers_mut()
                .insert(ALLOW, "POST".parse().expect("valid header"));
            response
        }
    } else {
        match (request.method(), path) {
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/metrics") => metrics(&state.registry),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    };
    Ok(response)
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}

fn metrics(registry: &Registry) -> Response<Full<Bytes>> {
    let encoder = TextEncoder::new();
    let mut buffer = Vec::new();
    if let Err(error) = encoder.encode(&registry.gather(), &mut buffer) {
        tracing::warn!(%error, "cannot encode metrics");
        return text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n");
    }
    let mut response = Response::new(Full::new(Bytes::from(buffer)));
    response.headers_mut().insert(
        CONTENT_TYPE,
        encoder.format_type().parse().expect("valid header"),
    );
    response
}

fn authorized(request: &Request<Incoming>, token: &[u8]) -> bool {
    let Some(value) = request.headers().get(AUTHORIZATION) else {
        return false;
    };
    let value = value.as_bytes();
    let Some((scheme, credentials)) = value.split_at_checked(7) else {
        return false;
    };
    scheme.eq_ignore_ascii_case(b"bearer ") && bool::from(credentials.ct_eq(token))
}

fn reject(
    state: &State,
    result: RequestResult,
    status: StatusCode,
    reason: &str,
) -> Response<Full<Bytes>> {
    state.metrics.request_rejected(result, reason);
    let mut response = Response::new(Full::new(Bytes::from(format!("{reason}\n"))));
    *response.status_mut() = status;
    response
}

async fn webhook(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if !authorized(&request, state.config.token.as_bytes()) {
        let mut response = reject(
            state,
            RequestResult::Unauthorized,
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token",
        );
        response
            .headers_mut()
            .insert(WWW_AUTHENTICATE, "Bearer".parse().expect("valid header"));
        return response;
    }
    let limit = state.config.max_body_bytes;
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return reject(
            state,
            RequestResult::TooLarge,
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload larger than max_body_bytes",
        );
    }
    let collected = tokio::time::timeout(
        BODY_READ_TIMEOUT,
        Limited::new(request.into_body(), limit).collect(),
    )
    .await;
    let body = match collected {
        Err(_) => {
            return reject(
                state,
                RequestResult::BadRequest,
                StatusCode::REQUEST_TIMEOUT,
                "payload not received in time",
            );
        }
        Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => {
            return reject(
                state,
                RequestResult::TooLarge,
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload larger than max_body_bytes",
            );
        }
        Ok(Err(error)) => {
            return reject(
                state,
                RequestResult::BadRequest,
                StatusCode::BAD_REQUEST,
                &format!("cannot read payload: {error}"),
            );
        }
        Ok(Ok(body)) => body.to_bytes(),
    };
    let webhook = match payload::parse(&body) {
        Ok(webhook) => webhook,
        Err(error) => {
            return reject(
                state,
                RequestResult::BadRequest,
                StatusCode::BAD_REQUEST,
                &error.to_string(),
            );
        }
    };
    state
        .metrics
        .request_accepted(&webhook.receiver, &webhook.group_key, webhook.alerts.len());

    let decisions: Vec<AlertDecision> = webhook
        .alerts
        .iter()
        .map(|alert| {
            let (target, decision) = decide(state, alert);
            AlertDecision {
                alertname: alert.name().to_owned(),
                fingerprint: alert.fingerprint.clone(),
                target,
                decision,
            }
        })
        .collect();
    let body = serde_json::to_vec(&Decisions { alerts: decisions }).expect("serialisable");
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        CONTENT_TYPE,
        "application/json".parse().expect("valid header"),
    );
    response
}

#[derive(Serialize)]
struct Decisions {
    alerts: Vec<AlertDecision>,
}

#[derive(Serialize)]
struct AlertDecision {
    alertname: String,
    fingerprint: String,
    target: Option<String>,
    decision: Decision,
}

#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Decision {
    Restart,
    DryRun,
    Cooldown,
    RateLimited,
    UnknownTarget,
    Ignored,
}

/// Decides for one alert and, if it is to be restarted, starts the restart in the background.
fn decide(state: &State, alert: &payload::Alert) -> (Option<String>, Decision) {
    let alertname = alert.name();
    let requested = match payload::classify(alert) {
        Ask::NotRestart | Ask::Resolved => return (None, Decision::Ignored),
        Ask::NoTarget => {
            state.metrics.unknown_target(alertname, None);
            return (None, Decision::UnknownTarget);
        }
        Ask::Restart(requested) => requested,
    };
    let Some((name, target)) = state.config.targets.get_key_value(requested) else {
        state.metrics.unknown_target(alertname, Some(requested));
        return (Some(requested.to_owned()), Decision::UnknownTarget);
    };
    let verdict = state
        .policy
        .lock()
        .expect("policy lock never poisoned: check does not panic")
        .check(name, Instant::now());
    let decision = match verdict {
        Verdict::Cooldown { remaining } => {
            state.metrics.cooldown_skip(alertname, name, remaining);
            Decision::Cooldown
        }
        Verdict::RateLimited { restarts } => {
            state
                .metrics
                .rate_limited(alertname, name, restarts, state.config.window);
            Decision::RateLimited
        }
        Verdict::Restart if state.config.dry_run => {
            state.metrics.remediation_done(
                alertname,
                name,
                target.kind(),
                RemediationResult::DryRun,
                "",
            );
            Decision::DryRun
        }
        Verdict::Restart => {
            spawn_restart(state, name, target, alert);
            Decision::Restart
        }
    };
    (Some(name.clone()), decision)
}

fn spawn_restart(state: &State, name: &str, target: &Target, alert: &payload::Alert) {
    let facts = AlertFacts {
        alertname: alert.name().to_owned(),
        namespace: alert.label("namespace").map(str::to_owned),
        pod: alert.label("pod").map(str::to_owned),
    };
    let lock = state.locks[name].clone();
    let metrics = state.metrics.clone();
    let name = name.to_owned();
    let target = target.clone();
    state.tasks.spawn(async move {
        let _only_one_at_a_time = lock.lock().await;
        let kind = target.kind();
        metrics.remediation_started(&facts.alertname, &name, kind);
        let (result, detail) = match actions::restart(&target, &facts).await {
            Ok(detail) => (RemediationResult::Success, detail),
            Err(error) => (RemediationResult::Failure, error.to_string()),
        };
        metrics.remediation_done(&facts.alertname, &name, kind, result, &detail);
    });
}
