//! One subscription on one broker session: prepare the queues, open the consuming channel (with
//! `basic.qos` prefetch) and the publishing channel (with publisher confirms), then start the
//! consumer and run the [pump](super::intake::pump) until it stops: for the app gate (cancel,
//! give back what has not started, wait for the app, start again), for shutdown, or because the
//! broker or the connection ended it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lapin::Consumer;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;

use super::acks::Acks;
use super::intake::{self, Pump};
use super::{Ctx, Shared, Subscription};
use crate::admin::health::State;
use crate::app::circuit::CircuitState;
use crate::broker::facts::QueueFacts;
use crate::broker::topology::{self, TopologyError};
use crate::broker::{self, Session};
use crate::config::QueueType;
use crate::headers::QueueHeaders;
use crate::telemetry::events::{ConsumerStarted, ConsumerStopped, Event, ReturnReason};
use crate::telemetry::metrics::CancelReason;
use crate::telemetry::trace::{HttpTarget, ProcessTarget, Server};

/// How a consumer session ended.
pub(super) enum Exit {
    Shutdown,
    /// The connection is gone: wait for the next session.
    Lost,
    /// Something failed on a live connection: try again after a backoff.
    Retry(String),
}

fn lost_or(session: &Session, error: impl ToString) -> Exit {
    if session.is_connected() {
        Exit::Retry(error.to_string())
    } else {
        Exit::Lost
    }
}

pub(super) async fn consume(
    sub: &Arc<Subscription>,
    shared: &Arc<Shared>,
    session: &Arc<Session>,
) -> Exit {
    if let Err(e) = topology::prepare(&session.connection, &sub.spec).await {
        return unprepared(sub, shared, session, e);
    }
    let first = !sub.prepared_once.swap(true, Ordering::Relaxed);
    learn_queue(sub, shared, first).await;
    let ctx = match open(sub, shared, session).await {
        Ok(ctx) => Arc::new(ctx),
        Err(e) => return lost_or(session, e),
    };
    let queue = sub.queue();
    let mut consumers = 0u32;
    let exit = loop {
        if !shared.gate.is_up() {
            shared.health.set_state(queue, State::PausedAppDown);
            tokio::select! {
                _ = shared.gate.wait_up() => {}
                _ = shared.shutdown.cancelled() => break Exit::Shutdown,
                _ = wait_lost(session) => break Exit::Lost,
            }
            continue;
        }
        if sub.breaker.is_open() {
            shared.health.set_state(queue, State::PausedCircuitOpen);
            tokio::select! {
                _ = sub.breaker.wait_leaves(CircuitState::Open) => {}
                _ = shared.shutdown.cancelled() => break Exit::Shutdown,
                _ = wait_lost(session) => break Exit::Lost,
            }
            continue;
        }
        consumers += 1;
        let tag = consumer_tag(session, consumers);
        let mut consumer = match start(&ctx, &tag).await {
            Ok(c) => c,
            Err(e) => break lost_or(session, e),
        };
        let ended = intake::pump(&ctx, &mut consumer).await;
        shared.health.set_consumer(queue, None);
        if let Some(exit) = stopped(&ctx, ended, &mut consumer, &tag).await {
            break exit;
        }
    };
    if matches!(exit, Exit::Retry(_)) && ctx.consuming.status().connected() {
        // Acks waiting to be coalesced go out before the channel closes under them.
        ctx.acks.flush_all().await;
        let _ = ctx
            .consuming
            .close(200, "restarting subscription".into())
            .await;
    }
    exit
}

/// The queues could not be prepared. A declaration that conflicts with what exists is a
/// configuration error at start-up: stop with it rather than retry forever. Later (someone
/// redeclared under us) it is reported and retried, and readiness fails.
fn unprepared(
    sub: &Subscription,
    shared: &Shared,
    session: &Session,
    error: TopologyError,
) -> Exit {
    tracing::error!(queue = %sub.queue(), error = %error, "cannot prepare the queues");
    if matches!(error, TopologyError::Conflict { .. }) && !sub.prepared_once.load(Ordering::Relaxed)
    {
        let _ = shared.fatal.set(error.to_string());
        shared.shutdown.cancel();
        return Exit::Shutdown;
    }
    lost_or(session, error)
}

/// What the arrival guard and the returns need to know of the consumed queue: whether it counts
/// returns (a quorum queue) and its delivery limit. For a queue `--declare` made, what it declared;
/// else the broker's word through the management API; else `--queue-type` and RabbitMQ 4's
/// default limit (a classic queue never reports returns, so the guard cannot fire there). On the
/// first session it also warns about a limit that would drop messages.
async fn learn_queue(sub: &Subscription, shared: &Shared, first: bool) {
    let spec = &sub.spec;
    let quorum = spec.queue_type == QueueType::Quorum;
    if spec.declare {
        sub.learned(quorum, quorum.then_some(topology::DECLARED_DELIVERY_LIMIT));
        return;
    }
    let (facts, unknown) = QueueFacts::learn(shared.management.clone(), &spec.queue).await;
    if first {
        if let Some(why) = unknown {
            tracing::warn!(queue = %spec.queue, "{why}");
        }
        for warning in facts.warnings(
            &spec.queue,
            &spec.dead_letter_queue,
            sub.limits.max_deliveries,
        ) {
            tracing::warn!(queue = %spec.queue, "{warning}");
        }
    }
    let quorum = facts
        .queue_type
        .as_deref()
        .map_or(quorum, |t| t == "quorum");
    sub.learned(
        quorum,
        facts.limit.map(|l| u32::try_from(l).unwrap_or(u32::MAX)),
    );
}

/// Opens the session's channels and gathers what every delivery's task shares.
async fn open(
    sub: &Arc<Subscription>,
    shared: &Arc<Shared>,
    session: &Arc<Session>,
) -> Result<Ctx, lapin::Error> {
    let consuming = session.connection.create_channel().await?;
    consuming
        .basic_qos(sub.prefetch, BasicQosOptions::default())
        .await?;
    let publisher = session.connection.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let headers = QueueHeaders::new(sub.queue());
    let series = shared.metrics.queue_series(sub.queue());
    let acks = Acks::new(
        consuming.clone(),
        sub.ack_batching,
        series.ack_batch_size.clone(),
        shared.shutdown.clone(),
    );
    Ok(Ctx {
        sub: sub.clone(),
        shared: shared.clone(),
        session: session.clone(),
        publisher,
        consuming,
        acks,
        series,
        process_target: ProcessTarget::new(
            sub.queue(),
            Server {
                address: &session.host,
                port: session.port,
            },
        ),
        http_target: HttpTarget::new("POST", sub.dispatcher.target()),
        headers: match sub.dispatcher.host() {
            Some(host) => headers.with_fixed(hyper::header::HOST, host.clone()),
            None => headers,
        },
    })
}

/// A consumer tag that names this process and says which of its consumers it is.
fn consumer_tag(session: &Session, number: u32) -> String {
    format!(
        "rabbit-sidecar.{}.{}.{}.{number}",
        broker::hostname(),
        std::process::id(),
        session.generation,
    )
}

async fn start(ctx: &Ctx, tag: &str) -> Result<Consumer, lapin::Error> {
    let queue = ctx.sub.queue();
    let consumer = ctx
        .consuming
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let shared = &ctx.shared;
    ConsumerStarted { queue, tag }.emit(&shared.metrics);
    shared.health.set_consumer(queue, Some(tag.to_string()));
    shared.health.set_state(queue, State::Consuming);
    Ok(consumer)
}

/// Reports why the consumer stopped and cleans up after it. `None`: the gate closed or the
/// circuit opened, so wait for the app and start another consumer on the same session.
async fn stopped(ctx: &Arc<Ctx>, ended: Pump, consumer: &mut Consumer, tag: &str) -> Option<Exit> {
    let (shared, session, queue) = (&ctx.shared, &ctx.session, ctx.sub.queue());
    // (what the unstarted messages are given back for, why the consumer stopped, the paused
    // state it leaves, what next)
    let (give_back, reason, paused, exit) = match ended {
        Pump::Shutdown => (
            Some(ReturnReason::Shutdown),
            Some(CancelReason::Shutdown),
            None,
            Some(Exit::Shutdown),
        ),
        Pump::AppDown => (
            Some(ReturnReason::AppUnreachable),
            Some(CancelReason::AppDown),
            Some(State::PausedAppDown),
            None,
        ),
        Pump::CircuitOpen => (
            Some(ReturnReason::CircuitOpen),
            Some(CancelReason::CircuitOpen),
            Some(State::PausedCircuitOpen),
            None,
        ),
        Pump::BrokerCancelled => (
            None,
            Some(CancelReason::Broker),
            None,
            Some(lost_or(
                session,
                "consumer cancelled by the broker (queue deleted or failed over?)",
            )),
        ),
        Pump::Error(e) => (None, None, None, Some(lost_or(session, e))),
    };
    // Nothing new reaches the app from here on: /status says so now, as /readyz already does,
    // not after the cancel and its drain of what the broker had sent (up to 2 s).
    if let Some(state) = paused {
        shared.health.set_state(queue, state);
    }
    if let Some(why) = give_back {
        intake::cancel(ctx, consumer, tag, why).await;
    }
    ConsumerStopped { queue, reason }.emit(&shared.metrics);
    exit
}

async fn wait_lost(session: &Session) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    while session.is_connected() {
        tick.tick().await;
    }
}
