//! Intake: takes deliveries off the consumer as they come, so health sees every message the
//! broker handed over, and starts a task for each once one of the `--concurrency` slots is free.
//! Only messages that hold a slot have a task; the others wait here (never more than the
//! prefetch), and are given back when the consumer stops.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::BasicCancelOptions;
use lapin::{BasicProperties, Consumer};
use tokio_util::sync::PollSemaphore;

use super::handle::handle;
use super::{Ctx, settle};
use crate::headers;
use crate::policy::{self, DeadLetterReason};
use crate::telemetry::events::{Event, MessageReceived, ReturnReason};

/// How many deliveries that are already waiting the pump takes in one turn: a stop or a tick
/// waits for at most one burst.
const BURST: usize = 32;

/// Why the pump stopped.
pub(super) enum Pump {
    Shutdown,
    AppDown,
    CircuitOpen,
    BrokerCancelled,
    Error(lapin::Error),
}

/// A delivery taken off the consumer: counted, tracked by health, its attempt worked out.
///
/// Kept in a box from here to its task: a delivery with its properties is half a kilobyte, which
/// every move (into the waiting queue, out of it, into the task) would otherwise copy, and which
/// would size every task's future.
pub(super) struct Received {
    pub delivery: Delivery,
    /// The in-flight id health tracks it by.
    pub id: u64,
    pub attempt: u32,
    /// Delivered more often than `--max-deliveries` allows, or at the queue's delivery limit:
    /// dead-lettered without a slot, for this reason.
    pub exhausted: Option<DeadLetterReason>,
    /// Taken back unstarted because the app's circuit opened: parked without a slot, its
    /// attempt count unchanged.
    pub parked: bool,
}

/// Runs until the consumer ends, the gate closes or the sidecar shuts down; gives back the
/// deliveries still waiting for a slot, and says why it stopped.
pub(super) async fn pump(ctx: &Arc<Ctx>, consumer: &mut Consumer) -> Pump {
    let (sub, shared) = (&ctx.sub, &ctx.shared);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut waiting: VecDeque<Box<Received>> = VecDeque::with_capacity(usize::from(sub.prefetch));
    // What the loop waits on lives across its turns (a turn per delivery or burst): made afresh
    // each turn, these futures would join and leave their wait lists every time. One token
    // stands for the gate closing and the shutdown.
    let closing = shared.gate.closing();
    let stop = closing.cancelled();
    tokio::pin!(stop);
    let circuit = sub.breaker.closing();
    let circuit_open = circuit.cancelled();
    tokio::pin!(circuit_open);
    let mut slots = PollSemaphore::new(sub.slots.clone());
    let ended = 'pump: loop {
        tokio::select! {
            biased;
            _ = &mut stop => break if shared.shutdown.is_cancelled() {
                Pump::Shutdown
            } else {
                Pump::AppDown
            },
            _ = &mut circuit_open => break if shared.shutdown.is_cancelled() {
                Pump::Shutdown
            } else {
                Pump::CircuitOpen
            },
            _ = tick.tick() => shared.health.tick(sub.queue()),
            permit = std::future::poll_fn(|cx| slots.poll_acquire(cx)), if !waiting.is_empty() => {
                let permit = permit.expect("the semaphore is never closed");
                let received = waiting.pop_front().expect("waited only when not empty");
                shared.tasks.spawn(handle(ctx.clone(), received, Some(permit)));
            }
            next = consumer.next() => {
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
        Pump::Shutdown => Some(ReturnReason::Shutdown),
        Pump::AppDown => Some(ReturnReason::AppUnreachable),
        Pump::CircuitOpen => Some(ReturnReason::CircuitOpen),
        Pump::BrokerCancelled if ctx.consuming.status().connected() => {
            Some(ReturnReason::ConsumerCancelled)
        }
        // The channel is gone, and with it the broker's record of these deliveries: it has
        // requeued them already.
        _ => None,
    };
    if why.is_none() && !ctx.consuming.status().connected() {
        // The acks waiting to be coalesced can no longer be sent: the broker requeued their
        // messages with the channel. Their tasks hear it now rather than when their window ends.
        ctx.acks.abandon_all();
    }
    if why.is_none() && !waiting.is_empty() {
        tracing::info!(
            queue = %sub.queue(),
            messages = waiting.len(),
            "the channel closed with messages not yet handed to the app; the broker requeued them"
        );
    }
    for mut received in waiting {
        if why == Some(ReturnReason::CircuitOpen) {
            received.parked = true;
            shared.tasks.spawn(handle(ctx.clone(), received, None));
            continue;
        }
        if let Some(why) = why {
            settle::give_back(ctx, &received.delivery, &received.delivery.data, why, None).await;
        }
        shared.health.settled(sub.queue(), received.id, false);
    }
    ended
}

/// Starts a task for a delivery if a slot is free and none is waiting before it; otherwise it
/// waits in `waiting`.
fn take(ctx: &Arc<Ctx>, delivery: Delivery, waiting: &mut VecDeque<Box<Received>>) {
    let (sub, shared) = (&ctx.sub, &ctx.shared);
    let received = receive(ctx, delivery);
    if received.exhausted.is_some() {
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

fn receive(ctx: &Ctx, delivery: Delivery) -> Box<Received> {
    let Ctx {
        sub,
        shared,
        series,
        ..
    } = ctx;
    let queue = sub.queue();
    let id = sub.next_id.fetch_add(1, Ordering::Relaxed);
    ctx.acks.delivered(delivery.delivery_tag);
    let headers = delivery.properties.headers().as_ref();
    let prior = headers::prior_attempts(headers);
    let returns = headers::int_header(headers, headers::DELIVERY_COUNT).unwrap_or(0);
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
        exhausted: policy::exhausted_on_arrival(
            attempt,
            returns,
            sub.delivery_limit(),
            &sub.limits,
        ),
        parked: false,
    })
}

/// Cancels the consumer and gives back what the broker pushed before the cancel took effect
/// (parks it when the circuit opened).
pub(super) async fn cancel(ctx: &Arc<Ctx>, consumer: &mut Consumer, tag: &str, why: ReturnReason) {
    let (shared, channel) = (&ctx.shared, &ctx.consuming);
    if channel.status().connected() {
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            channel.basic_cancel(tag.into(), BasicCancelOptions::default()),
        )
        .await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Some(Ok(delivery))) = tokio::time::timeout_at(deadline, consumer.next()).await {
        if why == ReturnReason::CircuitOpen {
            let mut received = receive(ctx, delivery);
            received.parked = true;
            shared.tasks.spawn(handle(ctx.clone(), received, None));
        } else {
            settle::give_back(ctx, &delivery, &delivery.data, why, None).await;
        }
    }
}

fn message_age(props: &BasicProperties) -> Option<Duration> {
    let ts = (*props.timestamp())?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    now.checked_sub(ts).map(Duration::from_secs)
}
