//! The supervisor: builds the pieces from the configuration, starts them, and on shutdown drains
//! in order: stop taking messages, let in-flight messages finish within `--shutdown-grace`,
//! return the rest to the queue, close the connection, stop.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::health::{Health, State};
use crate::admin::{self, Admin};
use crate::app::{AppGate, Breaker, Dispatcher, Prober};
use crate::broker;
use crate::broker::management::Management;
use crate::broker::monitor;
use crate::broker::topology::QueueSpec;
use crate::config::Config;
use crate::pipeline::{self, Shared, Subscription};
use crate::policy::Limits;
use crate::telemetry::metrics::Metrics;

/// Why the sidecar stopped other than by a signal.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("admin server: {0}")]
    Io(#[from] std::io::Error),
    /// The broker holds a declaration that conflicts with the configuration.
    #[error("{0}")]
    Topology(String),
}

/// [`run`] until SIGTERM or SIGINT (or `shutdown` is cancelled).
pub async fn run_until_signalled(
    config: Config,
    admin_listener: std::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    if let Err(e) = crate::signals::cancel_on_terminate(shutdown.clone()) {
        tracing::error!(error = %e, "cannot install signal handlers: SIGTERM will not drain");
    }
    run(config, admin_listener, shutdown).await
}

/// Runs the sidecar until `shutdown` is cancelled, then drains. The admin server is served on
/// `admin_listener` (bind it first, so tests can use port 0).
pub async fn run(
    config: Config,
    admin_listener: std::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let config = Arc::new(config);
    let queues = config.queues();
    let queue_refs: Vec<&str> = queues.iter().map(String::as_str).collect();
    let metrics = Metrics::new(&queue_refs);
    let health = Arc::new(Health::new(&queue_refs, config.max_handler_timeout()));

    let admin_stop = CancellationToken::new();
    let admin_thread = admin::spawn(
        admin_listener,
        Admin {
            metrics: metrics.clone(),
            health: health.clone(),
            queues: queues.clone(),
        },
        admin_stop.clone(),
    )?;

    let (sessions_tx, sessions) = watch::channel(None);
    let broker_stop = CancellationToken::new();
    let broker_task = tokio::spawn(broker::session::run(
        config.clone(),
        metrics.clone(),
        health.clone(),
        sessions_tx,
        broker_stop.clone(),
    ));
    let monitor_stop = CancellationToken::new();
    let monitor_task = tokio::spawn(monitor::run(
        config.clone(),
        metrics.clone(),
        health.clone(),
        sessions.clone(),
        monitor_stop.clone(),
    ));

    // One gate for the app: every subscription that hands messages to it pauses together.
    let prober = Prober::new(config.target_url.clone(), config.app_health_url.clone());
    let shared = Shared {
        metrics: metrics.clone(),
        health: health.clone(),
        gate: AppGate::new(
            prober,
            config.app_probe_interval,
            metrics.clone(),
            health.clone(),
            shutdown.clone(),
        ),
        shutdown: shutdown.clone(),
        hard_stop: CancellationToken::new(),
        tasks: TaskTracker::new(),
        fatal: Arc::default(),
        management: Management::from_config(&config),
    };
    // One circuit breaker per app (scheme, host, port): subscriptions posting to paths of the
    // same app open and close it together.
    let mut breakers: std::collections::HashMap<String, Breaker> = Default::default();
    let loops: Vec<_> = config
        .subscriptions
        .iter()
        .map(|sub| {
            let app = Breaker::app_of(&sub.target_url);
            let breaker = breakers
                .entry(app.clone())
                .or_insert_with(|| {
                    Breaker::new(
                        app,
                        config.circuit,
                        metrics.clone(),
                        health.clone(),
                        shutdown.clone(),
                    )
                })
                .clone();
            let subscription = Arc::new(Subscription::new(
                QueueSpec {
                    queue: sub.queue.clone(),
                    retry_queue: sub.retry_queue.clone(),
                    dead_letter_queue: sub.dead_letter_queue.clone(),
                    declare: sub.declare,
                    queue_type: sub.queue_type,
                    single_active_consumer: sub.single_active_consumer,
                    exchange: sub.exchange.clone(),
                    binding_keys: sub.binding_keys.clone(),
                },
                sub.prefetch,
                sub.concurrency,
                pipeline::AckBatching {
                    max: sub.ack_batch_max,
                    wait: sub.ack_batch_wait,
                },
                Limits {
                    max_deliveries: sub.max_deliveries,
                    backoff: sub.retry_backoff,
                    backoff_max: sub.retry_backoff_max,
                    retry_after_max: config.retry_after_max,
                },
                Dispatcher::new(
                    sub.target_url.clone(),
                    sub.handler_timeout,
                    config.app_health_url.clone(),
                ),
                breaker,
            ));
            tokio::spawn(pipeline::run(
                subscription,
                shared.clone(),
                sessions.clone(),
            ))
        })
        .collect();

    shutdown.cancelled().await;
    tracing::info!(
        grace_s = config.shutdown_grace.as_secs_f64(),
        "shutting down: no new messages; waiting for in-flight ones"
    );
    health.set_draining();
    for l in loops {
        let _ = l.await;
    }
    shared.tasks.close();
    if tokio::time::timeout(config.shutdown_grace, shared.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace over: returning unfinished messages to the queue");
        shared.hard_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), shared.tasks.wait()).await;
    }
    for q in &queues {
        health.set_state(q, State::Stopped);
    }
    broker_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), broker_task).await;
    monitor_stop.cancel();
    let _ = monitor_task.await;
    admin_stop.cancel();
    let _ = tokio::task::spawn_blocking(move || admin_thread.join()).await;
    tracing::info!("stopped");
    match shared.fatal.get() {
        Some(reason) => Err(RunError::Topology(reason.clone())),
        None => Ok(()),
    }
}
