//! The consumer pipeline: one loop per subscription, the only place where the broker, the app and
//! the policy meet. A message goes through four steps, each in a file of its own:
//!
//! 1. **intake** ([`intake`]): the pump takes deliveries off the consumer as they come, counts
//!    them, tracks them as in flight, and starts a task for each once one of the
//!    `--concurrency` slots is free;
//! 2. **dispatch** and 3. **decide** ([`handle`]): the task continues the producer's trace, hands
//!    the message to the [app](crate::app), and asks the [policy](crate::policy) what the answer
//!    means;
//! 4. **settle** ([`settle`]): ack; retry (a copy carrying the attempt count waits out the backoff
//!    in the retry queue, as a TTL, and returns to the queue; the original is acked once the
//!    broker confirmed the copy); dead-letter (a copy with the reasons goes to the dead-letter
//!    queue, then the original is acked); or give it back (`basic.nack` with requeue) while the
//!    app is unreachable. [`copies`] decides what a copy carries (pure, unit-tested).
//!
//! [`session`] runs this on one broker session: it prepares the queues, opens the consuming and
//! publishing channels, starts the consumer, cancels it while the app gate is closed, and ends
//! with the session; [`run`] goes from one session to the next.
//!
//! A waiting retry is always durable in the broker, never only in this process's memory, and
//! takes no prefetch slot.

mod ack_tracker;
mod acks;
pub(crate) mod copies;
mod handle;
mod intake;
mod session;
mod settle;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use lapin::Channel;
use lapin::message::Delivery;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(crate) use self::acks::AckBatching;
use self::acks::Acks;
use self::session::Exit;
use crate::admin::health::{Health, State};
use crate::app::{AppGate, Breaker, Dispatcher};
use crate::broker::management::Management;
use crate::broker::topology::QueueSpec;
use crate::broker::{Session, Sessions, backoff};
use crate::headers::DeliveryInfo;
use crate::headers::QueueHeaders;
use crate::policy::Limits;
use crate::telemetry::events::Event;
use crate::telemetry::metrics::{Metrics, QueueSeries};
use crate::telemetry::trace::{HttpTarget, MessageTrace, ProcessTarget};

/// One queue consumed on behalf of the app.
#[derive(Debug)]
pub(crate) struct Subscription {
    spec: QueueSpec,
    prefetch: u16,
    ack_batching: AckBatching,
    limits: Limits,
    dispatcher: Dispatcher,
    /// The app's circuit breaker, shared with every subscription posting to the same app.
    breaker: Breaker,
    /// The `--concurrency` slots: a message holds one while the app has it.
    slots: Arc<Semaphore>,
    next_id: AtomicU64,
    prepared_once: AtomicBool,
    /// The consumed queue's delivery limit as last learned (0: none known), for the arrival
    /// guard.
    delivery_limit: AtomicU32,
    /// Whether the consumed queue counts returns (a quorum queue), as last learned: messages that
    /// are not at fault are then returned by copy (see [`settle::give_back`]).
    counts_returns: AtomicBool,
}

impl Subscription {
    pub(crate) fn new(
        spec: QueueSpec,
        prefetch: u16,
        concurrency: usize,
        ack_batching: AckBatching,
        limits: Limits,
        dispatcher: Dispatcher,
        breaker: Breaker,
    ) -> Self {
        Subscription {
            spec,
            prefetch,
            ack_batching,
            limits,
            dispatcher,
            breaker,
            slots: Arc::new(Semaphore::new(concurrency)),
            next_id: AtomicU64::new(1),
            prepared_once: AtomicBool::new(false),
            delivery_limit: AtomicU32::new(0),
            counts_returns: AtomicBool::new(false),
        }
    }

    fn delivery_limit(&self) -> Option<u32> {
        match self.delivery_limit.load(Ordering::Relaxed) {
            0 => None,
            limit => Some(limit),
        }
    }

    fn counts_returns(&self) -> bool {
        self.counts_returns.load(Ordering::Relaxed)
    }

    /// What the last preparation learned about the consumed queue.
    fn learned(&self, quorum: bool, delivery_limit: Option<u32>) {
        self.counts_returns.store(quorum, Ordering::Relaxed);
        self.delivery_limit
            .store(delivery_limit.unwrap_or(0), Ordering::Relaxed);
    }

    fn queue(&self) -> &str {
        &self.spec.queue
    }
}

/// What every consumer loop shares.
#[derive(Clone, Debug)]
pub(crate) struct Shared {
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
    /// The management API, when `--management-url` is set: what the broker says about a queue.
    pub management: Option<Management>,
}

/// Runs one subscription until shutdown. Handler tasks are spawned on `shared.tasks`; the
/// supervisor waits for them.
pub(crate) async fn run(sub: Arc<Subscription>, shared: Shared, mut sessions: Sessions) {
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
        match session::consume(&sub, &shared, &session).await {
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

/// What a delivery's task shares with the others of its consumer session.
struct Ctx {
    sub: Arc<Subscription>,
    shared: Arc<Shared>,
    session: Arc<Session>,
    /// The channel with publisher confirms, for retried and dead-lettered copies.
    publisher: Channel,
    /// The channel the deliveries come on, and their acks go back on. A task also keeps it open
    /// until its message is settled: dropping the last handle would close it and requeue the
    /// message.
    consuming: Channel,
    /// Sends the acks and nacks on `consuming`, coalescing acks.
    acks: Acks,
    series: QueueSeries,
    /// The CONSUMER span attributes of this queue's deliveries from this session's node.
    process_target: ProcessTarget,
    /// The CLIENT span attributes of calls to the app.
    http_target: HttpTarget,
    /// The HTTP headers every delivery from this queue starts with.
    headers: QueueHeaders,
}

/// A delivery in a task's hands.
struct InHand<'a> {
    delivery: &'a Delivery,
    /// The delivery as the app's headers and the trace describe it.
    info: DeliveryInfo<'a>,
    body: &'a Bytes,
    attempt: u32,
    trace: &'a MessageTrace<'a>,
    /// The `--concurrency` slot the message holds while the app has it (none when it is
    /// dead-lettered on arrival).
    slot: &'a std::sync::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
}

impl InHand<'_> {
    /// Frees the message's slot for the next one: the app is done with it.
    fn release_slot(&self) {
        drop(self.slot.lock().unwrap_or_else(|e| e.into_inner()).take());
    }
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
/// debug line can be written, the delivery's log span is not entered for them at all.
fn emit_healthy(trace: &MessageTrace<'_>, event: impl Event, metrics: &Metrics) {
    if tracing::level_enabled!(tracing::Level::DEBUG) {
        trace.in_scope(|| event.emit(metrics));
    } else {
        event.emit(metrics);
    }
}
