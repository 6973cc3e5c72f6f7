//! One message's task: continue the producer's trace, hand the message to the app (dispatch), ask
//! the [policy](crate::policy) what its answer means (decide), and do it ([`super::settle`]).

use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;

use super::copies::Failure;
use super::intake::Received;
use super::{Ctx, InHand, emit_healthy, settle};
use crate::app::breaker::{Admission, CircuitState};
use crate::app::dispatch::Answer;
use crate::headers::DeliveryInfo;
use crate::policy::{self, Circumstances, DeadLetterReason, Decision, Outcome, RetryReason};
use crate::telemetry::events::{HandlerAnswered, ReturnReason};
use crate::telemetry::metrics::HandlerOutcome;
use crate::telemetry::trace::MessageTrace;

/// Handles one received message: with a slot (`permit`) when it goes to the app, without one
/// when it is dead-lettered on arrival.
pub(super) async fn handle(
    ctx: std::sync::Arc<Ctx>,
    mut received: Box<Received>,
    permit: Option<OwnedSemaphorePermit>,
) {
    let queue = ctx.sub.queue();
    let id = received.id;
    // The body goes to the app and, for a retry or dead letter, to the broker again: taken out
    // of the delivery once and shared rather than copied per use.
    let body = Bytes::from(std::mem::take(&mut received.delivery.data));
    // Borrowed where it stands: the delivery stays in its box (see `Received`).
    let delivery = &received.delivery;
    let info = DeliveryInfo {
        queue,
        exchange: delivery.exchange.as_str(),
        routing_key: delivery.routing_key.as_str(),
        delivery_tag: delivery.delivery_tag,
        redelivered: delivery.redelivered,
        attempt: received.attempt,
        properties: &delivery.properties,
        body_len: body.len(),
    };
    let trace = MessageTrace::start(&info, &ctx.process_target);
    let slot = std::sync::Mutex::new(permit);
    let msg = InHand {
        delivery,
        info,
        body: &body,
        attempt: received.attempt,
        trace: &trace,
        slot: &slot,
    };
    // Boxed: inline, the whole call's state (HTTP request, timeouts, settlement) would make every
    // task's future several kilobytes, copied each time the task is created and moved.
    let acked = if let Some(reason) = received.exhausted {
        Box::pin(dead_letter_on_arrival(&ctx, &msg, reason)).await
    } else if received.parked {
        Box::pin(park(&ctx, &msg)).await
    } else {
        Box::pin(process(&ctx, &msg, id)).await
    };
    ctx.shared.health.settled(queue, id, acked);
    drop(slot);
}

/// A message delivered more often than `--max-deliveries` without a decision (consumers died
/// holding it; it may be what kills them), or one the broker would remove at its next return (the
/// queue's delivery limit). It is dead-lettered without asking the app.
async fn dead_letter_on_arrival(ctx: &Ctx, msg: &InHand<'_>, reason: DeadLetterReason) -> bool {
    let detail = match reason {
        DeadLetterReason::DeliveryLimit => {
            "returned as often as the queue's delivery limit allows: the next return would remove it"
        }
        _ => {
            "delivered more often than --max-deliveries without a decision (consumers died holding it)"
        }
    };
    msg.trace
        .record_decision(Decision::DeadLetter { reason }.as_str(), detail);
    let failure = Failure {
        status: None,
        detail,
    };
    settle::dead_letter(ctx, msg, reason, failure).await
}

/// The app's circuit is open: the message is not sent. It waits in the retry queue until the
/// circuit's next probe, its attempt count unchanged (a requeue would count on a quorum queue).
async fn park(ctx: &Ctx, msg: &InHand<'_>) -> bool {
    let delay = ctx
        .sub
        .breaker
        .until_probe()
        .max(std::time::Duration::from_millis(100));
    let decision = Decision::Retry {
        reason: RetryReason::CircuitOpen,
        delay,
        counted: false,
    };
    msg.trace
        .record_decision(decision.as_str(), "circuit open: not sent to the app");
    // No failure of its own: the copy keeps the original's last status and error.
    let failure = Failure {
        status: None,
        detail: "",
    };
    settle::retry(ctx, msg, RetryReason::CircuitOpen, delay, false, failure).await
}

/// What the circuit breaker lets a started message do.
enum Admitted {
    Go { probe: bool },
    Park,
    HandBack(ReturnReason),
}

/// Asks the breaker; while another message is the half-open circuit's probe, waits for its
/// answer (re-asking now and then: a probe that met an unreachable app is abandoned).
async fn admit(ctx: &Ctx) -> Admitted {
    let (breaker, shared) = (&ctx.sub.breaker, &ctx.shared);
    loop {
        match breaker.admit() {
            Admission::Pass => return Admitted::Go { probe: false },
            Admission::Probe => return Admitted::Go { probe: true },
            Admission::Hold if breaker.state() != CircuitState::HalfOpen => return Admitted::Park,
            Admission::Hold => {}
        }
        let gate = shared.gate.closing();
        tokio::select! {
            _ = breaker.wait_leaves(CircuitState::HalfOpen) => {}
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            _ = gate.cancelled() => return Admitted::HandBack(if shared.shutdown.is_cancelled() {
                ReturnReason::Shutdown
            } else {
                ReturnReason::AppUnreachable
            }),
        }
    }
}

/// Dispatch, decide, settle. Returns whether the message was acked (it left the queue for good).
async fn process(ctx: &Ctx, msg: &InHand<'_>, id: u64) -> bool {
    let shared = &ctx.shared;
    let queue = ctx.sub.queue();
    // The gate may have closed since the pump started this task.
    if !shared.gate.is_up() {
        return settle::hand_back(ctx, msg, ReturnReason::AppUnreachable).await;
    }
    let probe = match admit(ctx).await {
        Admitted::Go { probe } => probe,
        Admitted::Park => return park(ctx, msg).await,
        Admitted::HandBack(why) => return settle::hand_back(ctx, msg, why).await,
    };
    shared.health.dispatch_started(queue, id);
    let Some(answer) = dispatch(ctx, msg).await else {
        if probe {
            ctx.sub.breaker.abandon_probe();
        }
        msg.trace.record_decision(
            Decision::Requeue.as_str(),
            ReturnReason::ShutdownDeadline.as_str(),
        );
        return settle::hand_back(ctx, msg, ReturnReason::ShutdownDeadline).await;
    };
    shared.health.dispatch_finished(queue, id);
    let decision = decide(ctx, msg, &answer, probe);
    let failure = Failure {
        status: answer.outcome.status(),
        detail: &answer.detail,
    };
    match decision {
        Decision::Ack => settle::accept(ctx, msg).await,
        Decision::Requeue => settle::hand_back(ctx, msg, ReturnReason::AppUnreachable).await,
        // Rare paths are boxed: inline, their futures would enlarge every message's task.
        Decision::DeadLetter { reason } => {
            Box::pin(settle::dead_letter(ctx, msg, reason, failure)).await
        }
        Decision::Retry {
            reason,
            delay,
            counted,
        } => Box::pin(settle::retry(ctx, msg, reason, delay, counted, failure)).await,
    }
}

/// Hands the message to the app inside a CLIENT span. `None` when the shutdown grace ran out
/// first: the call is abandoned and the message goes back to the queue.
async fn dispatch(ctx: &Ctx, msg: &InHand<'_>) -> Option<Answer> {
    let mut headers = ctx.headers.for_delivery(&msg.info);
    let mut span = msg.trace.dispatch_span(&ctx.http_target);
    msg.trace.inject_http(&span, &mut headers);
    let answer = tokio::select! {
        a = ctx.sub.dispatcher.dispatch(msg.body.clone(), headers) => a,
        _ = ctx.shared.hard_stop.cancelled() => {
            span.record_error("shutdown");
            return None;
        }
    };
    match (answer.outcome.status(), answer.outcome.wire_failure()) {
        (Some(status), _) => span.record_http_status(status),
        (None, Some(failure)) => span.record_error(failure),
        (None, None) => {}
    }
    Some(answer)
}

/// What tells one message from another for the breaker: its message id, or else its body.
fn message_key(msg: &InHand<'_>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match msg.delivery.properties.message_id() {
        Some(id) => id.as_str().hash(&mut h),
        None => msg.body.hash(&mut h),
    }
    h.finish()
}

/// Tells the gate whether anything answered and the breaker what it answered, asks the policy,
/// and records the answer and the decision.
fn decide(ctx: &Ctx, msg: &InHand<'_>, answer: &Answer, probe: bool) -> Decision {
    let shared = &ctx.shared;
    if answer.outcome == Outcome::Unreachable {
        shared.gate.report_down();
    } else {
        shared.gate.report_up();
    }
    let limits = &ctx.sub.limits;
    let capped = policy::capped_retry_after(answer.retry_after, limits);
    let outage = ctx
        .sub
        .breaker
        .record(&answer.outcome, capped, probe, || message_key(msg));
    let decision = policy::decide_in(
        answer.outcome,
        msg.attempt,
        limits,
        rand::random::<f64>(),
        Circumstances {
            outage,
            retry_after: answer.retry_after,
        },
    );
    emit_healthy(
        msg.trace,
        HandlerAnswered {
            queue: ctx.sub.queue(),
            series: &ctx.series,
            outcome: HandlerOutcome::of(&decision, &answer.outcome),
            elapsed: answer.elapsed,
            status: answer.outcome.status(),
            detail: &answer.detail,
        },
        &shared.metrics,
    );
    msg.trace.record_decision(decision.as_str(), &answer.detail);
    if decision != Decision::Ack {
        msg.trace.record_error(answer.outcome.failure_class());
    }
    decision
}
