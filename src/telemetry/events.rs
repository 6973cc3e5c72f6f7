//! Every observable event, one type each. Emitting an event writes its structured log line and
//! moves its metrics in the same call, so logs and metrics cannot drift apart, and call sites stay
//! one line: `MessageAcked { queue, attempt }.emit(&metrics)`.
//!
//! Events carry only bounded, secret-free data: queue names, broker nodes as `host:port`, enum
//! reasons, numbers, and error texts from lapin or hyper (which never contain URIs).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{debug, error, info, warn};

use crate::app::circuit::{CircuitState, Transition};
use crate::policy::{DeadLetterReason, RetryReason};
use crate::telemetry::metrics::{CancelReason, HandlerOutcome, LossReason, Metrics, QueueSeries};

/// Something that happened, logged and counted in one step.
pub trait Event {
    fn emit(self, m: &Metrics);
}

fn now_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub struct Connected<'a> {
    pub node: &'a str,
    pub reconnect: bool,
}

impl Event for Connected<'_> {
    fn emit(self, m: &Metrics) {
        m.connection_up.set(1);
        if self.reconnect {
            m.reconnects.inc();
            info!(node = self.node, "reconnected to the broker");
        } else {
            info!(node = self.node, "connected to the broker");
        }
    }
}

pub struct ConnectFailed<'a> {
    pub node: &'a str,
    pub error: &'a str,
}

impl Event for ConnectFailed<'_> {
    fn emit(self, m: &Metrics) {
        m.connect_failures.inc();
        warn!(
            node = self.node,
            error = self.error,
            "could not connect to broker node"
        );
    }
}

pub struct ConnectionLost<'a> {
    pub node: &'a str,
    pub reason: LossReason,
    pub error: &'a str,
}

impl Event for ConnectionLost<'_> {
    fn emit(self, m: &Metrics) {
        m.connection_up.set(0);
        m.connection_blocked.set(0);
        m.connection_losses
            .with_label_values(&[self.reason.as_str()])
            .inc();
        warn!(
            node = self.node,
            reason = self.reason.as_str(),
            error = self.error,
            "lost the broker connection; reconnecting"
        );
    }
}

pub struct ConnectionBlocked<'a> {
    pub blocked: bool,
    pub reason: &'a str,
}

impl Event for ConnectionBlocked<'_> {
    fn emit(self, m: &Metrics) {
        m.connection_blocked.set(i64::from(self.blocked));
        if self.blocked {
            warn!(
                reason = self.reason,
                "the broker blocked the connection (resource alarm): publishing waits"
            );
        } else {
            info!("the broker unblocked the connection");
        }
    }
}

pub struct ConsumerStarted<'a> {
    pub queue: &'a str,
    pub tag: &'a str,
}

impl Event for ConsumerStarted<'_> {
    fn emit(self, m: &Metrics) {
        m.consumer_up.with_label_values(&[self.queue]).set(1);
        info!(queue = self.queue, consumer_tag = self.tag, "consuming");
    }
}

pub struct ConsumerStopped<'a> {
    pub queue: &'a str,
    /// `None` when the consumer died with its channel or connection.
    pub reason: Option<CancelReason>,
}

impl Event for ConsumerStopped<'_> {
    fn emit(self, m: &Metrics) {
        m.consumer_up.with_label_values(&[self.queue]).set(0);
        m.consumer_active.with_label_values(&[self.queue]).set(0);
        match self.reason {
            Some(reason) => {
                m.consumer_cancellations
                    .with_label_values(&[self.queue, reason.as_str()])
                    .inc();
                match reason {
                    CancelReason::Broker => warn!(
                        queue = self.queue,
                        "the broker cancelled the consumer; re-establishing it"
                    ),
                    CancelReason::AppDown => warn!(
                        queue = self.queue,
                        "the app is unreachable: consumer cancelled so other replicas take the work"
                    ),
                    CancelReason::CircuitOpen => warn!(
                        queue = self.queue,
                        "the app's circuit is open: consumer cancelled until a probe succeeds"
                    ),
                    CancelReason::Shutdown => {
                        info!(queue = self.queue, "consumer cancelled for shutdown")
                    }
                }
            }
            None => debug!(queue = self.queue, "consumer gone with its channel"),
        }
    }
}

pub struct MessageReceived<'a> {
    pub queue: &'a str,
    pub series: &'a QueueSeries,
    pub redelivered: bool,
    pub attempt: u32,
    /// From the message's timestamp property, when present.
    pub age: Option<Duration>,
}

impl Event for MessageReceived<'_> {
    fn emit(self, _: &Metrics) {
        let s = self.series;
        s.deliveries.inc();
        if self.redelivered {
            s.redeliveries.inc();
        }
        s.last_delivery.set(now_seconds());
        if let Some(age) = self.age {
            s.message_age.observe(age.as_secs_f64());
        }
        debug!(
            queue = self.queue,
            attempt = self.attempt,
            redelivered = self.redelivered,
            "message received"
        );
    }
}

pub struct HandlerAnswered<'a> {
    pub queue: &'a str,
    pub series: &'a QueueSeries,
    pub outcome: HandlerOutcome,
    pub elapsed: Duration,
    pub status: Option<u16>,
    pub detail: &'a str,
}

impl Event for HandlerAnswered<'_> {
    fn emit(self, _: &Metrics) {
        self.series
            .handler_duration(self.outcome)
            .observe(self.elapsed.as_secs_f64());
        debug!(
            queue = self.queue,
            outcome = self.outcome.as_str(),
            status = self.status,
            elapsed_ms = self.elapsed.as_millis() as u64,
            detail = self.detail,
            "app answered"
        );
    }
}

pub struct MessageAcked<'a> {
    pub queue: &'a str,
    pub series: &'a QueueSeries,
    pub attempt: u32,
}

impl Event for MessageAcked<'_> {
    fn emit(self, _: &Metrics) {
        let s = self.series;
        s.acks.inc();
        s.last_ack.set(now_seconds());
        s.delivery_attempts.observe(f64::from(self.attempt));
        debug!(queue = self.queue, attempt = self.attempt, "acked");
    }
}

/// Why the sidecar gave a message back to its queue untouched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReturnReason {
    /// The app is unreachable: the consumer pauses and other replicas take the work.
    AppUnreachable,
    /// SIGTERM arrived before the message was started.
    Shutdown,
    /// The shutdown grace ran out while the app held the message.
    ShutdownDeadline,
    /// The broker cancelled the consumer before the message was started.
    ConsumerCancelled,
    /// The retry or dead-letter copy was not confirmed.
    CopyNotConfirmed,
    /// The app's circuit opened before the message was started: it is parked as a retry copy
    /// that keeps its attempt count (a `basic.nack` would count on a quorum queue).
    CircuitOpen,
}

impl ReturnReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ReturnReason::AppUnreachable => "app unreachable",
            ReturnReason::Shutdown => "shutdown",
            ReturnReason::ShutdownDeadline => "shutdown deadline reached",
            ReturnReason::ConsumerCancelled => "consumer cancelled",
            ReturnReason::CopyNotConfirmed => "copy not confirmed",
            ReturnReason::CircuitOpen => "circuit open",
        }
    }
}

pub struct MessageRequeued<'a> {
    pub queue: &'a str,
    pub why: ReturnReason,
}

impl Event for MessageRequeued<'_> {
    fn emit(self, m: &Metrics) {
        m.nacks.with_label_values(&[self.queue, "true"]).inc();
        info!(
            queue = self.queue,
            why = self.why.as_str(),
            "message returned to the queue"
        );
    }
}

pub struct RetryScheduled<'a> {
    pub queue: &'a str,
    pub reason: RetryReason,
    pub attempt: u32,
    /// Whether this attempt counts towards `--max-deliveries` (not while the circuit is open).
    pub counted: bool,
    pub delay: Duration,
    pub detail: &'a str,
}

impl Event for RetryScheduled<'_> {
    fn emit(self, m: &Metrics) {
        m.retries
            .with_label_values(&[self.queue, self.reason.as_str()])
            .inc();
        m.last_ack
            .with_label_values(&[self.queue])
            .set(now_seconds());
        info!(
            queue = self.queue,
            reason = self.reason.as_str(),
            attempt = self.attempt,
            counted = self.counted,
            delay_ms = self.delay.as_millis() as u64,
            detail = self.detail,
            "retry scheduled"
        );
    }
}

pub struct DeadLettered<'a> {
    pub queue: &'a str,
    pub reason: DeadLetterReason,
    pub attempt: u32,
    pub dead_letter_queue: &'a str,
    pub detail: &'a str,
}

impl Event for DeadLettered<'_> {
    fn emit(self, m: &Metrics) {
        m.dead_letters
            .with_label_values(&[self.queue, self.reason.as_str()])
            .inc();
        m.last_ack
            .with_label_values(&[self.queue])
            .set(now_seconds());
        m.delivery_attempts
            .with_label_values(&[self.queue])
            .observe(f64::from(self.attempt));
        warn!(
            queue = self.queue,
            reason = self.reason.as_str(),
            attempt = self.attempt,
            dead_letter_queue = self.dead_letter_queue,
            detail = self.detail,
            "message dead-lettered"
        );
    }
}

/// The two kinds of copy the sidecar publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    Retry,
    DeadLetter,
}

impl CopyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CopyKind::Retry => "retry",
            CopyKind::DeadLetter => "dead_letter",
        }
    }
}

pub struct RepublishFailed<'a> {
    pub queue: &'a str,
    pub what: CopyKind,
    pub error: &'a str,
}

impl Event for RepublishFailed<'_> {
    fn emit(self, m: &Metrics) {
        if self.what == CopyKind::DeadLetter {
            m.dead_letter_failures
                .with_label_values(&[self.queue])
                .inc();
        }
        error!(
            queue = self.queue,
            what = self.what.as_str(),
            error = self.error,
            "the broker did not confirm the copy; the original goes back to the queue"
        );
    }
}

pub struct SettleFailed<'a> {
    pub queue: &'a str,
    pub error: &'a str,
}

impl Event for SettleFailed<'_> {
    fn emit(self, m: &Metrics) {
        m.settle_failures.with_label_values(&[self.queue]).inc();
        warn!(
            queue = self.queue,
            error = self.error,
            "could not settle a message (its channel is gone); the broker will redeliver it"
        );
    }
}

pub struct AppAvailability {
    pub up: bool,
}

impl Event for AppAvailability {
    fn emit(self, m: &Metrics) {
        m.app_up.set(i64::from(self.up));
        if self.up {
            info!("the app answers again: resuming consumption");
        } else {
            warn!("the app is unreachable: pausing consumption and probing it");
        }
    }
}

/// Where an app's circuit breaker stands, with the transition that brought it there (`None`
/// when only the next probe time moved, or at start-up).
pub struct CircuitChanged<'a> {
    pub app: &'a str,
    pub state: CircuitState,
    pub transition: Option<Transition>,
    pub next_probe_in: Option<Duration>,
}

impl Event for CircuitChanged<'_> {
    fn emit(self, m: &Metrics) {
        for s in CircuitState::ALL {
            m.circuit_state
                .with_label_values(&[self.app, s.as_str()])
                .set(i64::from(s == self.state));
        }
        let Some(t) = self.transition else { return };
        m.circuit_transitions
            .with_label_values(&[self.app, t.to.as_str()])
            .inc();
        if let Some(open) = t.was_open {
            m.circuit_open_seconds
                .with_label_values(&[self.app])
                .inc_by(open.as_secs_f64());
        }
        let next_probe_ms = self.next_probe_in.map(|d| d.as_millis() as u64);
        match t.to {
            CircuitState::Open => warn!(
                app = self.app,
                from = t.from.as_str(),
                next_probe_ms,
                "circuit open: the app fails most calls; consuming paused, no attempts spent"
            ),
            CircuitState::HalfOpen => info!(
                app = self.app,
                "circuit half-open: one message goes to the app as a probe"
            ),
            CircuitState::Closed => info!(
                app = self.app,
                "circuit closed: the app answers again; consuming resumed"
            ),
        }
    }
}

pub struct AckTimeoutWarning<'a> {
    pub queue: &'a str,
    pub age: Duration,
    pub timeout: Duration,
}

impl Event for AckTimeoutWarning<'_> {
    fn emit(self, m: &Metrics) {
        m.ack_timeout_warnings
            .with_label_values(&[self.queue])
            .inc();
        warn!(
            queue = self.queue,
            age_s = self.age.as_secs(),
            timeout_s = self.timeout.as_secs(),
            "a message has been in flight for over 80% of the broker's delivery-acknowledgement timeout; the broker will close the channel when it is reached"
        );
    }
}
