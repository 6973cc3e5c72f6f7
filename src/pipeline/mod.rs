//! The consumer loop of one subscription: the only place where the broker, the app and the policy
//! meet.
//!
//! For each broker session it prepares the queues, opens a consuming channel (with `basic.qos`
//! prefetch) and a publishing channel (with publisher confirms), and consumes. Each delivery is
//! tracked as in flight from the moment it arrives; once one of `--concurrency` slots is free it
//! becomes a task that hands the message to the app, asks the [policy](crate::policy) what to
//! do, and does it:
//!
//! - **ack** after a 2xx;
//! - **retry**: publish a copy carrying the attempt count to the retry queue with a per-message
//!   TTL equal to the backoff, and ack the original only once the broker confirmed the copy. The
//!   retry queue dead-letters expired copies back to the consumed queue. A waiting retry is thus
//!   always durable in the broker, never only in this process's memory, and takes no prefetch slot;
//! - **dead-letter**: publish a copy with the reasons to the dead-letter queue, ack the original
//!   after the confirm;
//! - **requeue** (the app is unreachable): `basic.nack` with requeue, and the [gate](crate::app::gate)
//!   pauses consuming.
//!
//! If a copy is not confirmed the original is held for the retry backoff and then requeued, so a
//! broken dead-letter path slows a poison message down instead of spinning on it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use hyper::header::HOST;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Consumer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::sync::PollSemaphore;
use tokio_util::task::TaskTracker;

use crate::admin::health::{Health, State};
use crate::app::AppGate;
use crate::app::Dispatcher;
use crate::broker::topology::{self, QueueSpec};
use crate::broker::{Session, Sessions, backoff};
use crate::headers::{self, DeliveryInfo, QueueHeaders};
use crate::policy::{self, DeadLetterReason, Decision, Limits, Outcome};
use crate::telemetry::events::{
    ConsumerStarted, ConsumerStopped, DeadLettered, Event, HandlerAnswered, MessageAcked,
    MessageReceived, MessageRequeued, RepublishFailed, RetryScheduled, SettleFailed,
};
use crate::telemetry::metrics::{CancelReason, Metrics, QueueSeries};
use crate::telemetry::trace::{DeliveryMeta, HttpTarget, MessageTrace};

/// How long a copy may wait for the broker's confirm (a blocked connection waits here).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an ack or nack may take to be handed to the connection.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// One queue consumed on behalf of the app.
#[derive(Debug)]
pub struct Subscription {
    pub spec: QueueSpec,
    pub prefetch: u16,
    pub concurrency: usize,
    pub limits: Limits,
    pub dispatcher: Dispatcher,
    slots: Arc<Semaphore>,
    next_id: AtomicU64,
    prepared_once: std::sync::atomic::AtomicBool,
}

impl Subscription {
    pub fn new(
        spec: QueueSpec,
        prefetch: u16,
        concurrency: usize,
        limits: Limits,
        dispatcher: Dispatcher,
    ) -> Self {
        Subscription {
            spec,
            prefetch,
            concurrency,
            limits,
            dispatcher,
            slots: Arc::new(Semaphore::new(concurrency)),
            next_id: AtomicU64::new(1),
            prepared_once: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn queue(&self) -> &str {
        &self.spec.queue
    }
}

/// What every consumer loop shares.
#[derive(Clone, Debug)]
pub struct Shared {
    pub metrics: Metrics,
    pub health: Arc<Health>,
    pub gate: AppGate,
    /// Cancelled on SIGTERM: stop taking messages, finish what is in flight.
    pub shutdown: CancellationToken,
    /// Cancelled when the shutdown grace is over: return whatever is unfinished.
    pub hard_stop: CancellationToken,
    pub tasks: TaskTracker,
    /// Set when the configuration cannot work against this broker (a conflicting declaration at
    /// start-up); the supervisor then stops and reports it.
    pub fatal: Arc<std::sync::OnceLock<String>>,
}

enum Exit {
    Shutdown,
    Lost,
    Retry(String),
}

enum Pump {
    Shutdown,
    AppDown,
    BrokerCancelled,
    Error(lapin::Error),
}

/// Runs one subscription until shutdown. Handler tasks are spawned on `shared.tasks`; the
/// supervisor waits for them.
pub async fn run(sub: Arc<Subscription>, shared: Shared, mut sessions: Sessions) {
    let shared = Arc::new(shared);
    let queue = sub.queue().to_string();
    let mut last_generation = 0u64;
    let mut failures = 0u32;
    while !shared.shutdown.is_cancelled() {
        shared.health.set_state(&queue, State::Connecting);
        let session = tokio::select! {
            s = sessions.wait_for(|s| s.as_ref().is_some_and(|s| s.generation > last_generation || s.is_connected())) => match s {
                Ok(s) => s.clone().expect("waited for Some"),
                Err(_) => break,
            },
            _ = shared.shutdown.cancelled() => break,
        };
        last_generation = session.generation;
        match consume_session(&sub, &shared, &session).await {
            Exit::Shutdown => break,
            Exit::Lost => {
                failures = 0;
                // Wait for the broker module to notice and publish the next session.
                tokio::select! {
                    _ = sessions.wait_for(|s| s.as_ref().is_none_or(|s| s.generation != last_generation)) => {}
                    _ = shared.shutdown.cancelled() => break,
                }
            }
            Exit::Retry(error) => {
                let delay = backoff(
                    Duration::from_millis(500),
                    Duration::from_secs(15),
                    failures,
                );
                failures = failures.saturating_add(1);
                tracing::warn!(queue = %queue, error = %error, retry_in_ms = delay.as_millis() as u64, "subscription failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shared.shutdown.cancelled() => break,
                }
            }
        }
    }
    shared.health.set_state(&queue, State::Draining);
}

async fn consume_session(
    sub: &Arc<Subscription>,
    shared: &Arc<Shared>,
    session: &Arc<Session>,
) -> Exit {
    let conn = &session.connection;
    let lost_or = |e: lapin::Error| {
        if session.is_connected() {
            Exit::Retry(e.to_string())
        } else {
            Exit::Lost
        }
    };
    if let Err(e) = topology::prepare(conn, &sub.spec).await {
        tracing::error!(queue = %sub.queue(), error = %e, "cannot prepare the queues");
        // A declaration that conflicts with what exists is a configuration error at start-up:
        // stop with it rather than retry forever. Later (someone redeclared under us) it is
        // reported and retried, and readiness fails.
        if matches!(e, topology::TopologyError::Conflict { .. })
            && !sub.prepared_once.load(Ordering::Relaxed)
        {
            let _ = shared.fatal.set(e.to_string());
            shared.shutdown.cancel();
            return Exit::Shutdown;
        }
        return if session.is_connected() {
            Exit::Retry(e.to_string())
        } else {
            Exit::Lost
        };
    }
    sub.prepared_once.store(true, Ordering::Relaxed);
    let channel = match openconsuming_channel(conn, sub.prefetch).await {
        Ok(c) => c,
        Err(e) => return lost_or(e),
    };
    let publisher = match open_publishing_channel(conn).await {
        Ok(c) => c,
        Err(e) => return lost_or(e),
    };
    // What every delivery's task needs, behind one reference count.
    let ctx = Arc::new(Ctx {
        sub: sub.clone(),
        shared: shared.clone(),
        session: session.clone(),
        publisher,
        consuming: channel.clone(),
        series: shared.metrics.queue_series(sub.queue()),
        http_target: HttpTarget::new("POST", sub.dispatcher.target()),
        headers: match sub.dispatcher.host() {
            Some(host) => QueueHeaders::new(sub.queue()).with_fixed(HOST, host.clone()),
            None => QueueHeaders::new(sub.queue()),
        },
    });
    let queue = sub.queue();
    let mut consumer_number = 0u32;
    let exit = loop {
        if !shared.gate.is_up() {
            shared.health.set_state(queue, State::PausedAppDown);
            tokio::select! {
                _ = shared.gate.wait_up() => {}
                _ = shared.shutdown.cancelled() => break Exit::Shutdown,
                _ = wait_lost(session) => break Exit::Lost,
            }
        }
        consumer_number += 1;
        let tag = format!(
            "rabbit-sidecar.{}.{}.{}.{}",
            crate::broker::hostname(),
            std::process::id(),
            session.generation,
            consumer_number
        );
        let mut consumer = match channel
            .basic_consume(
                queue.into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
        {
            Ok(c) => c,
            Err(e) => break lost_or(e),
        };
        ConsumerStarted { queue, tag: &tag }.emit(&shared.metrics);
        shared.health.set_consumer(queue, Some(tag.clone()));
        shared.health.set_state(queue, State::Consuming);

        let ended = pump(&ctx, &mut consumer).await;
        shared.health.set_consumer(queue, None);
        match ended {
            Pump::Shutdown => {
                cancel_and_return_unstarted(
                    shared,
                    queue,
                    &channel,
                    &mut consumer,
                    &tag,
                    "shutdown",
                )
                .await;
                ConsumerStopped {
                    queue,
                    reason: Some(CancelReason::Shutdown),
                }
                .emit(&shared.metrics);
                break Exit::Shutdown;
            }
            Pump::AppDown => {
                cancel_and_return_unstarted(
                    shared,
                    queue,
                    &channel,
                    &mut consumer,
                    &tag,
                    "app unreachable",
                )
                .await;
                ConsumerStopped {
                    queue,
                    reason: Some(CancelReason::AppDown),
                }
                .emit(&shared.metrics);
            }
            Pump::BrokerCancelled => {
                ConsumerStopped {
                    queue,
                    reason: Some(CancelReason::Broker),
                }
                .emit(&shared.metrics);
                break if session.is_connected() {
                    Exit::Retry(
                        "consumer cancelled by the broker (queue deleted or failed over?)".into(),
                    )
                } else {
                    Exit::Lost
                };
            }
            Pump::Error(e) => {
                ConsumerStopped {
                    queue,
                    reason: None,
                }
                .emit(&shared.metrics);
                break lost_or(e);
            }
        }
    };
    if matches!(exit, Exit::Retry(_)) && channel.status().connected() {
        let _ = channel.close(200, "restarting subscription".into()).await;
    }
    exit
}

async fn openconsuming_channel(
    conn: &lapin::Connection,
    prefetch: u16,
) -> Result<Channel, lapin::Error> {
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    Ok(channel)
}

async fn open_publishing_channel(conn: &lapin::Connection) -> Result<Channel, lapin::Error> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

async fn wait_lost(session: &Session) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    while session.is_connected() {
        tick.tick().await;
    }
}

/// What a delivery's task shares with the others of its consumer session.
struct Ctx {
    sub: Arc<Subscription>,
    shared: Arc<Shared>,
    session: Arc<Session>,
    /// The channel with publisher confirms, for retried and dead-lettered copies.
    publisher: Channel,
    /// The channel the deliveries come on, and their acks go back on (see [`ack`]). A task also
    /// keeps it open until its message is settled: dropping the last handle would close it and
    /// requeue the message.
    consuming: Channel,
    series: QueueSeries,
    /// The CLIENT span attributes of calls to the app.
    http_target: HttpTarget,
    /// The HTTP headers every delivery from this queue starts with.
    headers: QueueHeaders,
}

/// Takes deliveries off the consumer as they come (so health sees every message the broker
/// handed over) and starts a task for each once one of the `--concurrency` slots is free. Only
/// messages that hold a slot have a task; the others wait here, and this loop gives them back if
/// it stops.
async fn pump(ctx: &Arc<Ctx>, consumer: &mut Consumer) -> Pump {
    let (sub, shared) = (&ctx.sub, &ctx.shared);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // Never longer than the prefetch: the broker sends no more unacknowledged messages.
    let mut waiting: VecDeque<Box<Received>> = VecDeque::with_capacity(usize::from(sub.prefetch));
    // The loop turns once per delivery (or burst), so what it waits on lives across turns: made
    // afresh each turn, these futures joined and left their wait lists every time (a measurable
    // share of the per-message cost). A slot request stays queued at the semaphore the same way.
    // One token for the gate closing and the shutdown: one wait polled per turn, not two.
    let closing = shared.gate.closing();
    let stop = closing.cancelled();
    tokio::pin!(stop);
    let mut slots = PollSemaphore::new(sub.slots.clone());
    let ended = 'pump: loop {
        tokio::select! {
            biased;
            _ = &mut stop => break if shared.shutdown.is_cancelled() {
                Pump::Shutdown
            } else {
                Pump::AppDown
            },
            _ = tick.tick() => shared.health.tick(sub.queue()),
            permit = std::future::poll_fn(|cx| slots.poll_acquire(cx)), if !waiting.is_empty() => {
                let permit = permit.expect("the semaphore is never closed");
                let received = waiting.pop_front().expect("waited only when not empty");
                shared.tasks.spawn(handle(ctx.clone(), received, Some(permit)));
            }
            next = consumer.next() => {
                // The broker sends deliveries in bursts: take the ones already here without
                // another turn of this loop, which would poll the stop token and the tick again
                // for each. Bounded, so that a stop or a tick waits for at most one burst.
                let mut next = next;
                let mut taken = 0;
                loop {
                    match next {
                        Some(Ok(delivery)) => take(ctx, delivery, &mut waiting),
                        Some(Err(e)) => break 'pump Pump::Error(e),
                        None => break 'pump Pump::BrokerCancelled,
                    }
                    taken += 1;
                    if taken == BURST {
                        break;
                    }
                    // Polled without a waker: when nothing is here, the next turn's `select!`
                    // polls the consumer again with this task's waker before it sleeps.
                    match consumer.next().now_or_never() {
                        Some(more) => next = more,
                        None => break,
                    }
                }
            }
        }
    };
    let why = match &ended {
        Pump::Shutdown => Some("shutdown"),
        Pump::AppDown => Some("app unreachable"),
        Pump::BrokerCancelled if ctx.consuming.status().connected() => Some("consumer cancelled"),
        // The channel is gone, and with it the broker's record of these deliveries: it has
        // requeued them already.
        _ => None,
    };
    if why.is_none() && !waiting.is_empty() {
        tracing::info!(
            queue = %sub.queue(),
            messages = waiting.len(),
            "the channel closed with messages not yet handed to the app; the broker requeued them"
        );
    }
    for received in waiting {
        if let Some(why) = why {
            requeue(shared, sub.queue(), &received.delivery, why, None).await;
        }
        shared.health.settled(sub.queue(), received.id, false);
    }
    ended
}

/// How many deliveries that are already waiting [`pump`] takes in one turn.
const BURST: usize = 32;

/// Starts a task for a delivery if a slot is free and none is waiting before it; otherwise it
/// waits in `waiting`.
fn take(ctx: &Arc<Ctx>, delivery: Delivery, waiting: &mut VecDeque<Box<Received>>) {
    let (sub, shared) = (&ctx.sub, &ctx.shared);
    let received = receive(ctx, delivery);
    if policy::exhausted_on_arrival(received.attempt, &sub.limits) {
        // Dead-lettered without asking the app: it needs no slot.
        shared.tasks.spawn(handle(ctx.clone(), received, None));
    } else if waiting.is_empty()
        && let Ok(permit) = sub.slots.clone().try_acquire_owned()
    {
        shared
            .tasks
            .spawn(handle(ctx.clone(), received, Some(permit)));
    } else {
        waiting.push_back(received);
    }
}

/// A delivery taken off the consumer: counted, tracked by health, its attempt worked out.
///
/// Kept in a box from here to its task: a delivery with its properties is half a kilobyte, which
/// every move (into the waiting queue, out of it, into the task's future, into the task) would
/// otherwise copy, and which would size every task's future.
struct Received {
    delivery: Delivery,
    /// The in-flight id health tracks it by.
    id: u64,
    attempt: u32,
}

fn receive(ctx: &Ctx, delivery: Delivery) -> Box<Received> {
    let Ctx {
        sub,
        shared,
        series,
        ..
    } = ctx;
    let queue = sub.queue();
    let id = sub.next_id.fetch_add(1, Ordering::Relaxed);
    let prior = headers::prior_attempts(delivery.properties.headers().as_ref());
    let attempt = prior.saturating_add(1);
    shared.health.delivered(queue, id);
    MessageReceived {
        queue,
        series,
        redelivered: delivery.redelivered || prior > 0,
        attempt,
        age: message_age(&delivery.properties),
    }
    .emit(&shared.metrics);
    Box::new(Received {
        delivery,
        id,
        attempt,
    })
}

/// Cancels the consumer and gives back what the broker pushed before the cancel took effect.
async fn cancel_and_return_unstarted(
    shared: &Shared,
    queue: &str,
    channel: &Channel,
    consumer: &mut Consumer,
    tag: &str,
    why: &'static str,
) {
    if channel.status().connected() {
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            channel.basic_cancel(tag.into(), BasicCancelOptions::default()),
        )
        .await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Some(Ok(delivery))) = tokio::time::timeout_at(deadline, consumer.next()).await {
        requeue(shared, queue, &delivery, why, None).await;
    }
}

/// Sends an ack or nack and waits for lapin to hand it over, at most [`SETTLE_TIMEOUT`]: on a
/// connection that died meanwhile the promise may never resolve, and lapin answers `Ok(false)`
/// without sending anything once the channel is closed. Either way the broker has returned the
/// message to the queue with the connection, so the settlement failed rather than happened.
async fn settle(
    shared: &Shared,
    queue: &str,
    op: impl std::future::Future<Output = lapin::Result<bool>>,
    trace: Option<&MessageTrace<'_>>,
) -> bool {
    let error = match tokio::time::timeout(SETTLE_TIMEOUT, op).await {
        Ok(Ok(true)) => return true,
        Ok(Ok(false)) => "the channel closed before the settlement was sent".to_string(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("not sent within {SETTLE_TIMEOUT:?} (connection gone?)"),
    };
    emit_about(
        trace,
        SettleFailed {
            queue,
            error: &error,
        },
        &shared.metrics,
    );
    false
}

/// Returns a message to its queue. `trace`: the delivery's, when it reached a handler task.
async fn requeue(
    shared: &Shared,
    queue: &str,
    delivery: &Delivery,
    why: &'static str,
    trace: Option<&MessageTrace<'_>>,
) {
    let nack = delivery.acker.nack(BasicNackOptions {
        requeue: true,
        multiple: false,
    });
    if settle(shared, queue, nack, trace).await {
        emit_about(trace, MessageRequeued { queue, why }, &shared.metrics);
    }
}

/// Acks on the consuming channel itself rather than through the delivery's `Acker`, which hands
/// every ack to lapin's internal RPC task, and that task spawns one more task to send it: two task
/// hops per message, about a tenth of the sidecar's instructions per message in callgrind. The
/// channel is the one this delivery came on (one per consumer session), so its delivery tag is
/// valid there; once that channel has closed, lapin refuses the ack and the broker has requeued
/// the message already, as with a poisoned `Acker`.
async fn ack(ctx: &Ctx, delivery: &Delivery, trace: &MessageTrace<'_>) -> bool {
    let ack = async {
        ctx.consuming
            .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
            .await
            .map(|()| true)
    };
    settle(&ctx.shared, ctx.sub.queue(), ack, Some(trace)).await
}

/// Emits an event about a delivery inside its log span (when it has one), so that the line
/// names the message and its trace.
fn emit_about(trace: Option<&MessageTrace<'_>>, event: impl Event, metrics: &Metrics) {
    match trace {
        Some(trace) => trace.in_scope(|| event.emit(metrics)),
        None => event.emit(metrics),
    }
}

/// [`emit_about`] for the events of the healthy path, which log at debug level only: while no
/// debug line can be written, the delivery's log span is not made for them at all.
fn emit_healthy(trace: &MessageTrace<'_>, event: impl Event, metrics: &Metrics) {
    if tracing::level_enabled!(tracing::Level::DEBUG) {
        trace.in_scope(|| event.emit(metrics));
    } else {
        event.emit(metrics);
    }
}

fn message_age(props: &BasicProperties) -> Option<Duration> {
    let ts = (*props.timestamp())?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    now.checked_sub(ts).map(Duration::from_secs)
}

/// Handles one received message: with a slot (`permit`) when it goes to the app, without one
/// when it is dead-lettered on arrival.
async fn handle(ctx: Arc<Ctx>, mut received: Box<Received>, permit: Option<OwnedSemaphorePermit>) {
    let Ctx {
        sub,
        shared,
        session,
        ..
    } = &*ctx;
    let (id, attempt) = (received.id, received.attempt);
    let queue = sub.queue();
    // The body is handed to the app and, for a retry or dead letter, to the broker again: take
    // it out of the delivery once and share it rather than copy it per use.
    let body = Bytes::from(std::mem::take(&mut received.delivery.data));
    // Left in its box: this task's future stays small (see `Received`).
    let delivery = &received.delivery;
    let msg_headers = delivery.properties.headers().as_ref();

    let trace = MessageTrace::start(&DeliveryMeta {
        queue,
        exchange: delivery.exchange.as_str(),
        routing_key: delivery.routing_key.as_str(),
        delivery_tag: delivery.delivery_tag,
        message_id: delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        correlation_id: delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|s| s.as_str()),
        body_size: body.len(),
        server_address: &session.host,
        server_port: session.port,
        headers: msg_headers,
    });

    // Boxed: inline, the whole call's state (the HTTP request, the timeouts, the ack) would make
    // this task's future several kilobytes, copied whole each time the task is created and
    // moved; callgrind counted those copies as a twentieth of the sidecar's instructions.
    let settled_by_ack = Box::pin(process(
        &ctx,
        InHand {
            delivery,
            body: &body,
            id,
            attempt,
            trace: &trace,
        },
    ))
    .await;
    shared.health.settled(queue, id, settled_by_ack);
    drop(permit);
}

/// A delivery in the sidecar's hands, with what `handle` worked out about it.
struct InHand<'a> {
    delivery: &'a Delivery,
    body: &'a Bytes,
    /// The in-flight id health tracks it by.
    id: u64,
    attempt: u32,
    trace: &'a MessageTrace<'a>,
}

/// Takes the message through slot, dispatch, decision and settlement. Returns whether it was
/// acked (it left the queue for good).
async fn process(ctx: &Ctx, message: InHand<'_>) -> bool {
    let Ctx {
        sub,
        shared,
        publisher,
        series,
        ..
    } = ctx;
    let InHand {
        delivery,
        body,
        id,
        attempt,
        trace,
    } = message;
    let queue = sub.queue();
    if policy::exhausted_on_arrival(attempt, &sub.limits) {
        let reason = DeadLetterReason::MaxDeliveries;
        let detail = "delivered more often than --max-deliveries without a decision (consumers died holding it)";
        trace.record_decision("dead_letter", detail);
        // Rare paths are boxed: inline, their futures would enlarge every message's task.
        return Box::pin(dead_letter(
            ctx, delivery, body, attempt, reason, None, detail, trace,
        ))
        .await;
    }

    // The gate may have closed since the pump started this task.
    if !shared.gate.is_up() {
        requeue(shared, queue, delivery, "app unreachable", Some(trace)).await;
        return false;
    }

    let props = &delivery.properties;
    let mut http_headers = ctx.headers.for_delivery(&DeliveryInfo {
        queue,
        exchange: delivery.exchange.as_str(),
        routing_key: delivery.routing_key.as_str(),
        redelivered: delivery.redelivered,
        attempt,
        properties: props,
        body_len: body.len(),
    });
    let mut client_span = trace.dispatch_span(&ctx.http_target);
    trace.inject_http(&client_span, &mut http_headers);

    shared.health.dispatch_started(queue, id);
    let answer = tokio::select! {
        a = sub.dispatcher.dispatch(body.clone(), http_headers) => a,
        _ = shared.hard_stop.cancelled() => {
            client_span.record_error("shutdown");
            trace.record_decision("requeue", "shutdown deadline reached");
            requeue(shared, queue, delivery, "shutdown deadline reached", Some(trace)).await;
            return false;
        }
    };
    match answer.outcome {
        Outcome::Unreachable => client_span.record_error("unreachable"),
        Outcome::Retryable {
            reason,
            status: None,
        } => client_span.record_error(reason.as_str()),
        other => {
            if let Some(status) = other.status() {
                client_span.record_http_status(status);
            }
        }
    }
    shared.health.dispatch_finished(queue, id);
    drop(client_span);

    if answer.outcome == Outcome::Unreachable {
        shared.gate.report_down();
    } else {
        shared.gate.report_up();
    }
    let decision = policy::decide(answer.outcome, attempt, &sub.limits, rand::random::<f64>());
    let outcome_label = match (decision, answer.outcome) {
        (
            Decision::Retry {
                reason: policy::RetryReason::Timeout,
                ..
            },
            Outcome::Retryable { status: None, .. },
        ) => "timeout",
        _ => decision.label(),
    };
    emit_healthy(
        trace,
        HandlerAnswered {
            queue,
            series,
            outcome: outcome_label,
            elapsed: answer.elapsed,
            status: answer.outcome.status(),
            detail: &answer.detail,
        },
        &shared.metrics,
    );
    trace.record_decision(decision.label(), &answer.detail);
    if !matches!(decision, Decision::Ack) {
        trace.record_error(error_type(&answer.outcome));
    }

    match decision {
        Decision::Ack => {
            let ok = ack(ctx, delivery, trace).await;
            if ok {
                emit_healthy(
                    trace,
                    MessageAcked {
                        queue,
                        series,
                        attempt,
                    },
                    &shared.metrics,
                );
            }
            ok
        }
        Decision::Requeue => {
            requeue(shared, queue, delivery, "app unreachable", Some(trace)).await;
            false
        }
        Decision::DeadLetter { reason } => {
            Box::pin(dead_letter(
                ctx,
                delivery,
                body,
                attempt,
                reason,
                answer.outcome.status(),
                &answer.detail,
                trace,
            ))
            .await
        }
        Decision::Retry { reason, delay } => {
            let mut extra = FieldTable::default();
            extra.insert(
                headers::ATTEMPTS.into(),
                AMQPValue::LongLongInt(i64::from(attempt)),
            );
            put_status(&mut extra, answer.outcome.status(), &answer.detail);
            trace.inject_amqp(&mut extra);
            match Box::pin(republish(
                publisher,
                &sub.spec.retry_queue,
                delivery,
                body,
                extra,
                Some(delay),
            ))
            .await
            {
                Ok(()) => {
                    emit_about(
                        Some(trace),
                        RetryScheduled {
                            queue,
                            reason,
                            attempt,
                            delay,
                            detail: &answer.detail,
                        },
                        &shared.metrics,
                    );
                    ack(ctx, delivery, trace).await
                }
                Err(error) => {
                    emit_about(
                        Some(trace),
                        RepublishFailed {
                            queue,
                            what: "retry",
                            error: &error,
                        },
                        &shared.metrics,
                    );
                    trace.record_event("retry_copy_not_confirmed", &error);
                    Box::pin(hold_then_requeue(sub, shared, delivery, attempt, trace)).await;
                    false
                }
            }
        }
    }
}

fn error_type(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Success { .. } => "",
        Outcome::Rejected { .. } => "rejected",
        Outcome::Retryable { reason, .. } => reason.as_str(),
        Outcome::Unreachable => "unreachable",
    }
}

fn put_status(extra: &mut FieldTable, status: Option<u16>, detail: &str) {
    if let Some(status) = status {
        extra.insert(
            headers::LAST_STATUS.into(),
            AMQPValue::LongInt(i32::from(status)),
        );
    }
    if !detail.is_empty() {
        extra.insert(
            headers::LAST_ERROR.into(),
            AMQPValue::LongString(LongString::from(detail)),
        );
    }
}

#[allow(clippy::too_many_arguments)]
async fn dead_letter(
    ctx: &Ctx,
    delivery: &Delivery,
    body: &[u8],
    attempt: u32,
    reason: DeadLetterReason,
    status: Option<u16>,
    detail: &str,
    trace: &MessageTrace<'_>,
) -> bool {
    let Ctx {
        sub,
        shared,
        publisher,
        ..
    } = ctx;
    let queue = sub.queue();
    let mut extra = FieldTable::default();
    extra.insert(
        headers::DL_REASON.into(),
        AMQPValue::LongString(reason.as_str().into()),
    );
    extra.insert(
        headers::ATTEMPTS.into(),
        AMQPValue::LongLongInt(i64::from(attempt)),
    );
    extra.insert(
        headers::ORIGINAL_EXCHANGE.into(),
        AMQPValue::LongString(delivery.exchange.as_str().into()),
    );
    extra.insert(
        headers::ORIGINAL_ROUTING_KEY.into(),
        AMQPValue::LongString(delivery.routing_key.as_str().into()),
    );
    extra.insert(
        headers::ORIGINAL_QUEUE.into(),
        AMQPValue::LongString(queue.into()),
    );
    put_status(&mut extra, status, detail);
    trace.inject_amqp(&mut extra);
    match republish(
        publisher,
        &sub.spec.dead_letter_queue,
        delivery,
        body,
        extra,
        None,
    )
    .await
    {
        Ok(()) => {
            emit_about(
                Some(trace),
                DeadLettered {
                    queue,
                    reason,
                    attempt,
                    dead_letter_queue: &sub.spec.dead_letter_queue,
                    detail,
                },
                &shared.metrics,
            );
            ack(ctx, delivery, trace).await
        }
        Err(error) => {
            emit_about(
                Some(trace),
                RepublishFailed {
                    queue,
                    what: "dead_letter",
                    error: &error,
                },
                &shared.metrics,
            );
            trace.record_event("dead_letter_copy_not_confirmed", &error);
            hold_then_requeue(sub, shared, delivery, attempt, trace).await;
            false
        }
    }
}

/// Keeps a message whose copy failed for one backoff step before requeueing it, so a broken
/// dead-letter or retry path does not become a hot loop. Shutdown cuts the wait short.
async fn hold_then_requeue(
    sub: &Subscription,
    shared: &Shared,
    delivery: &Delivery,
    attempt: u32,
    trace: &MessageTrace<'_>,
) {
    let delay = policy::retry_delay(attempt, &sub.limits, 0.0);
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = shared.hard_stop.cancelled() => {}
        _ = shared.shutdown.cancelled() => {}
    }
    requeue(
        shared,
        sub.queue(),
        delivery,
        "copy not confirmed",
        Some(trace),
    )
    .await;
}

/// Publishes a copy of `delivery` (its `body`) to `queue` (default exchange, mandatory,
/// persistent) with the original properties and headers plus `extra`, and waits for the broker's
/// confirm.
async fn republish(
    publisher: &Channel,
    queue: &str,
    delivery: &Delivery,
    body: &[u8],
    extra: FieldTable,
    expiration: Option<Duration>,
) -> Result<(), String> {
    let mut fields = delivery
        .properties
        .headers()
        .as_ref()
        .map(|t| t.inner().clone())
        .unwrap_or_default();
    // The copy is a new message: the broker counts its deliveries afresh.
    fields.remove(&ShortString::from(headers::DELIVERY_COUNT));
    fields.extend(extra.inner().iter().map(|(k, v)| (k.clone(), v.clone())));
    let table = FieldTable::from(fields);
    let props = strip_expiration(delivery.properties.clone())
        .with_headers(table)
        .with_delivery_mode(2);
    let props = match expiration {
        Some(d) => props.with_expiration(d.as_millis().max(1).to_string().into()),
        None => props,
    };
    let publish = async {
        publisher
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                props,
            )
            .await?
            .await
    };
    match tokio::time::timeout(CONFIRM_TIMEOUT, publish).await {
        Ok(Ok(Confirmation::Ack(None))) => Ok(()),
        Ok(Ok(Confirmation::Ack(Some(_)))) => Err(format!(
            "queue {queue:?} does not exist: the copy was returned"
        )),
        Ok(Ok(Confirmation::Nack(_))) => Err("the broker refused the copy (nack)".into()),
        Ok(Ok(Confirmation::NotRequested)) => Err("publisher confirms are off".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "no confirm within {CONFIRM_TIMEOUT:?} (is the connection blocked?)"
        )),
    }
}

/// The original message's properties without an expiration (dead letters must not expire
/// because their original had a TTL).
fn strip_expiration(props: BasicProperties) -> BasicProperties {
    let mut out = BasicProperties::default();
    if let Some(v) = props.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = props.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = props.headers() {
        out = out.with_headers(v.clone());
    }
    if let Some(v) = props.delivery_mode() {
        out = out.with_delivery_mode(*v);
    }
    if let Some(v) = props.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = props.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = props.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = props.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = props.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = props.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = props.user_id() {
        out = out.with_user_id(v.clone());
    }
    if let Some(v) = props.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(v) = props.cluster_id() {
        out = out.with_cluster_id(v.clone());
    }
    out
}
