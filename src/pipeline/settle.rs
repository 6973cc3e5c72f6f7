//! Settling a message: ack it, give it back to its queue, or publish a copy in its place (a retry
//! or a dead letter) and ack it once the broker confirmed the copy.
//!
//! The original is acked only after the copy's confirm: a copy that is lost before that leaves
//! the original in the queue, and a crash between the confirm and the ack leaves two (a
//! duplicate, never a loss). A copy that is not confirmed (queue missing, broker refusing,
//! connection blocked past the confirm timeout) holds the original for one backoff step and then
//! gives it back, so a broken dead-letter path slows a poison message down instead of spinning on
//! it.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::message::Delivery;

use super::copies::{self, Failure, Origin};
use super::{Ctx, InHand, Shared, emit_about, emit_healthy};
use crate::broker::confirm;
use crate::headers;
use crate::policy::{self, DeadLetterReason, RetryReason};
use crate::telemetry::events::{
    CopyKind, DeadLettered, Event, MessageAcked, MessageRequeued, RepublishFailed, RetryScheduled,
    ReturnReason, SettleFailed,
};
use crate::telemetry::trace::MessageTrace;

/// How long an ack or nack may take to be handed to the connection.
const SETTLE_TIMEOUT: Duration = super::acks::SEND_TIMEOUT;

/// Acks a message the app accepted. Returns whether the ack was sent.
pub(super) async fn accept(ctx: &Ctx, msg: &InHand<'_>) -> bool {
    let ok = ack(ctx, msg).await;
    if ok {
        emit_healthy(
            msg.trace,
            MessageAcked {
                queue: ctx.sub.queue(),
                series: &ctx.series,
                attempt: msg.attempt,
            },
            &ctx.shared.metrics,
        );
    }
    ok
}

/// Parks a copy in the retry queue for `delay`, then acks the original. Returns whether the
/// original was acked. The copy records this attempt only when it is `counted`.
pub(super) async fn retry(
    ctx: &Ctx,
    msg: &InHand<'_>,
    reason: RetryReason,
    delay: Duration,
    counted: bool,
    failure: Failure<'_>,
) -> bool {
    // An attempt that does not count leaves the copy with the attempts before it.
    let attempts = if counted {
        msg.attempt
    } else {
        msg.attempt.saturating_sub(1)
    };
    let mut stamp = copies::retry_stamp(attempts, failure);
    msg.trace.inject_amqp(&mut stamp);
    let props = copies::copy_properties(&msg.delivery.properties, stamp, Some(delay));
    let scheduled = RetryScheduled {
        queue: ctx.sub.queue(),
        reason,
        attempt: msg.attempt,
        counted,
        delay,
        detail: failure.detail,
    };
    let retry_queue = &ctx.sub.spec.retry_queue;
    replace(ctx, msg, CopyKind::Retry, retry_queue, props, scheduled).await
}

/// Publishes a dead letter with the reasons, then acks the original. Returns whether the
/// original was acked.
pub(super) async fn dead_letter(
    ctx: &Ctx,
    msg: &InHand<'_>,
    reason: DeadLetterReason,
    failure: Failure<'_>,
) -> bool {
    let queue = ctx.sub.queue();
    let origin = Origin {
        exchange: msg.delivery.exchange.as_str(),
        routing_key: msg.delivery.routing_key.as_str(),
        queue,
    };
    let mut stamp = copies::dead_letter_stamp(reason, msg.attempt, failure, origin);
    msg.trace.inject_amqp(&mut stamp);
    let props = copies::copy_properties(&msg.delivery.properties, stamp, None);
    let dead_letter_queue = &ctx.sub.spec.dead_letter_queue;
    let dead_lettered = DeadLettered {
        queue,
        reason,
        attempt: msg.attempt,
        dead_letter_queue,
        detail: failure.detail,
    };
    replace(
        ctx,
        msg,
        CopyKind::DeadLetter,
        dead_letter_queue,
        props,
        dead_lettered,
    )
    .await
}

/// Publishes the copy (`props`) to `queue` in place of the original; once the broker confirmed
/// it, emits `confirmed` and acks the original. Returns whether the original was acked.
async fn replace(
    ctx: &Ctx,
    msg: &InHand<'_>,
    what: CopyKind,
    queue: &str,
    props: BasicProperties,
    confirmed: impl Event,
) -> bool {
    match confirm::publish(&ctx.publisher, queue, msg.body, props).await {
        Ok(()) => {
            emit_about(Some(msg.trace), confirmed, &ctx.shared.metrics);
            ack(ctx, msg).await
        }
        Err(error) => {
            not_confirmed(ctx, msg, what, &error).await;
            false
        }
    }
}

/// A copy was not confirmed: report it, hold the original for one backoff step (so a broken
/// path does not become a hot loop; shutdown cuts the wait short), then give it back.
async fn not_confirmed(ctx: &Ctx, msg: &InHand<'_>, what: CopyKind, error: &str) {
    let Ctx { sub, shared, .. } = ctx;
    emit_about(
        Some(msg.trace),
        RepublishFailed {
            queue: sub.queue(),
            what,
            error,
        },
        &shared.metrics,
    );
    let event = match what {
        CopyKind::Retry => "retry_copy_not_confirmed",
        CopyKind::DeadLetter => "dead_letter_copy_not_confirmed",
    };
    msg.trace.record_event(event, error);
    let delay = policy::retry_delay(msg.attempt, &sub.limits, 0.0);
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = shared.hard_stop.cancelled() => {}
        _ = shared.shutdown.cancelled() => {}
    }
    hand_back(ctx, msg, ReturnReason::CopyNotConfirmed).await;
}

/// Gives a message in a task's hands back to its queue. Returns `false`: it was not acked.
pub(super) async fn hand_back(ctx: &Ctx, msg: &InHand<'_>, why: ReturnReason) -> bool {
    give_back(ctx, msg.delivery, msg.body, why, Some(msg.trace)).await;
    false
}

/// Returns a message to its queue without spending an attempt: the message is not at fault. On a
/// queue that counts returns (quorum: `basic.nack` with requeue raises `x-delivery-count`, which
/// the sidecar counts as spent attempts and the broker against the delivery limit), a copy that
/// carries the attempts spent so far goes to the queue's tail and the original is acked once the
/// copy is confirmed. Otherwise, and when the copy is not confirmed, or it is the copy path that
/// fails (`CopyNotConfirmed`), `basic.nack` with requeue. `body`: the message's body (a task has
/// taken it out of the delivery). `trace`: the delivery's, when it reached a handler task.
pub(super) async fn give_back(
    ctx: &Ctx,
    delivery: &Delivery,
    body: &[u8],
    why: ReturnReason,
    trace: Option<&MessageTrace<'_>>,
) {
    let (shared, queue) = (&ctx.shared, ctx.sub.queue());
    if ctx.sub.counts_returns() && why != ReturnReason::CopyNotConfirmed {
        let prior = headers::prior_attempts(delivery.properties.headers().as_ref());
        let props =
            copies::copy_properties(&delivery.properties, copies::return_stamp(prior), None);
        match confirm::publish(&ctx.publisher, queue, body, props).await {
            Ok(()) => {
                if ack_tag(ctx, delivery.delivery_tag, trace).await {
                    emit_about(trace, MessageRequeued { queue, why }, &shared.metrics);
                }
                return;
            }
            Err(error) => {
                tracing::warn!(queue, error = %error, "the copy returning a message was not confirmed; returning the original instead");
            }
        }
    }
    let nack = ctx.acks.nack(delivery.delivery_tag, true);
    if settle(shared, queue, nack, SETTLE_TIMEOUT, trace).await {
        emit_about(trace, MessageRequeued { queue, why }, &shared.metrics);
    }
}

/// Acks on the consuming channel itself rather than through the delivery's `Acker`, which hands
/// each ack to lapin's internal RPC task and from there to one more spawned task (the cost is in
/// docs/performance.md). The channel is the one this delivery came on, so its delivery tag is
/// valid there; once that channel has closed, lapin refuses the ack and the broker has requeued
/// the message already, as with a poisoned `Acker`.
///
/// With coalescing on, the ack may wait (at most `--ack-batch-wait`) to go out with others in
/// one `basic.ack(multiple)`: the app is done with the message, so its slot is freed first.
async fn ack(ctx: &Ctx, msg: &InHand<'_>) -> bool {
    let batching = ctx.acks.batching();
    if batching.is_on() {
        msg.release_slot();
    }
    ack_tag(ctx, msg.delivery.delivery_tag, Some(msg.trace)).await
}

/// Acks `tag` through the coalescing path and waits, at most the window plus the frames that may
/// be sent ahead of it, for the frame that covers it to be handed over.
async fn ack_tag(ctx: &Ctx, tag: u64, trace: Option<&MessageTrace<'_>>) -> bool {
    let limit = ctx.acks.batching().wait + 2 * SETTLE_TIMEOUT;
    settle(
        &ctx.shared,
        ctx.sub.queue(),
        ctx.acks.ack(tag),
        limit,
        trace,
    )
    .await
}

/// Waits for an ack or nack to be handed over, at most `limit`: on a connection that died
/// meanwhile the promise may never resolve, and lapin refuses to send on a closed channel.
/// Either way the broker has returned the message to the queue with the connection, so the
/// settlement failed rather than happened.
async fn settle(
    shared: &Shared,
    queue: &str,
    op: impl std::future::Future<Output = Result<(), String>>,
    limit: Duration,
    trace: Option<&MessageTrace<'_>>,
) -> bool {
    let error = match tokio::time::timeout(limit, op).await {
        Ok(Ok(())) => return true,
        Ok(Err(e)) => e,
        Err(_) => format!("not sent within {limit:?} (connection gone?)"),
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
