//! The Prometheus metric families: the user-facing contract that dashboards and alert rules read.
//! Names here are exact; renaming one breaks users. Label values come from enums or the configured
//! queue names, never from message content, so cardinality is fixed at start-up.
//!
//! Nothing outside [`crate::telemetry::events`] and the health/status collectors writes to these.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub use crate::app::circuit::CircuitState;
pub use crate::policy::{DeadLetterReason, RetryReason};
use crate::policy::{Decision, Outcome};

/// Why a connection was lost: the label values of `rabbit_sidecar_connection_losses_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossReason {
    Heartbeat,
    ClosedByBroker,
    Io,
    Other,
}

impl LossReason {
    pub const ALL: [LossReason; 4] = [
        LossReason::Heartbeat,
        LossReason::ClosedByBroker,
        LossReason::Io,
        LossReason::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LossReason::Heartbeat => "heartbeat",
            LossReason::ClosedByBroker => "closed_by_broker",
            LossReason::Io => "io",
            LossReason::Other => "other",
        }
    }

    /// Classifies a lapin error by its predicates, not by matching every variant.
    pub(crate) fn of(error: &lapin::Error) -> LossReason {
        if matches!(error.kind(), lapin::ErrorKind::MissingHeartbeatError) {
            LossReason::Heartbeat
        } else if error.is_amqp_error() {
            LossReason::ClosedByBroker
        } else if error.is_io_error() {
            LossReason::Io
        } else {
            LossReason::Other
        }
    }
}

/// Why a consumer was cancelled: `rabbit_sidecar_consumer_cancellations_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    Broker,
    AppDown,
    CircuitOpen,
    Shutdown,
}

impl CancelReason {
    pub const ALL: [CancelReason; 4] = [
        CancelReason::Broker,
        CancelReason::AppDown,
        CancelReason::CircuitOpen,
        CancelReason::Shutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CancelReason::Broker => "broker",
            CancelReason::AppDown => "app_down",
            CancelReason::CircuitOpen => "circuit_open",
            CancelReason::Shutdown => "shutdown",
        }
    }
}

/// How a call to the app ended: the `outcome` label of `rabbit_sidecar_handler_duration_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandlerOutcome {
    Ack,
    Retry,
    DeadLetter,
    /// A retry because the app did not answer within `--handler-timeout`.
    Timeout,
    /// Nothing listened: the message went back to the queue.
    Unreachable,
}

impl HandlerOutcome {
    pub const ALL: [HandlerOutcome; 5] = [
        HandlerOutcome::Ack,
        HandlerOutcome::Retry,
        HandlerOutcome::DeadLetter,
        HandlerOutcome::Timeout,
        HandlerOutcome::Unreachable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HandlerOutcome::Ack => "ack",
            HandlerOutcome::Retry => "retry",
            HandlerOutcome::DeadLetter => "dead_letter",
            HandlerOutcome::Timeout => "timeout",
            HandlerOutcome::Unreachable => "unreachable",
        }
    }

    /// The outcome of a call that answered `outcome` and on which the policy decided `decision`.
    /// `timeout` is the handler deadline passing; an HTTP 408 is an answer, labelled `retry`.
    pub(crate) fn of(decision: &Decision, outcome: &Outcome) -> HandlerOutcome {
        match decision {
            Decision::Ack => HandlerOutcome::Ack,
            Decision::Retry {
                reason: RetryReason::Timeout,
                ..
            } if outcome.status().is_none() => HandlerOutcome::Timeout,
            Decision::Retry { .. } => HandlerOutcome::Retry,
            Decision::DeadLetter { .. } => HandlerOutcome::DeadLetter,
            Decision::Requeue => HandlerOutcome::Unreachable,
        }
    }
}

/// One queue's per-message series, resolved once per consumer session: a lookup by label
/// values hashes them and takes a lock.
#[derive(Clone, Debug)]
pub(crate) struct QueueSeries {
    pub(crate) deliveries: IntCounter,
    pub(crate) redeliveries: IntCounter,
    pub(crate) last_delivery: Gauge,
    pub(crate) message_age: Histogram,
    pub(crate) acks: IntCounter,
    pub(crate) last_ack: Gauge,
    pub(crate) delivery_attempts: Histogram,
    pub(crate) ack_batch_size: Histogram,
    /// In the order of [`HandlerOutcome::ALL`].
    handler_duration: [Histogram; HandlerOutcome::ALL.len()],
}

impl QueueSeries {
    pub(crate) fn handler_duration(&self, outcome: HandlerOutcome) -> &Histogram {
        &self.handler_duration[outcome as usize]
    }
}

/// Every metric family, registered in its own registry.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    pub(crate) deliveries: IntCounterVec,
    pub(crate) redeliveries: IntCounterVec,
    pub(crate) acks: IntCounterVec,
    pub(crate) nacks: IntCounterVec,
    pub(crate) retries: IntCounterVec,
    pub(crate) dead_letters: IntCounterVec,
    pub(crate) dead_letter_failures: IntCounterVec,
    pub(crate) settle_failures: IntCounterVec,
    pub(crate) reconnects: IntCounter,
    pub(crate) connection_losses: IntCounterVec,
    pub(crate) connect_failures: IntCounter,
    pub(crate) consumer_cancellations: IntCounterVec,
    pub(crate) ack_timeout_warnings: IntCounterVec,
    pub(crate) connection_up: IntGauge,
    pub(crate) connection_blocked: IntGauge,
    pub(crate) consumer_up: IntGaugeVec,
    pub(crate) consumer_active: IntGaugeVec,
    pub(crate) app_up: IntGauge,
    pub(crate) ready: IntGauge,
    pub(crate) in_flight: IntGaugeVec,
    pub(crate) last_delivery: GaugeVec,
    pub(crate) last_ack: GaugeVec,
    pub(crate) oldest_unacked_age: GaugeVec,
    pub(crate) consumer_timeout: Gauge,
    pub(crate) queue_messages_ready: IntGaugeVec,
    pub(crate) queue_consumers: IntGaugeVec,
    pub(crate) retry_queue_messages: IntGaugeVec,
    pub(crate) dead_letter_queue_messages: IntGaugeVec,
    pub(crate) circuit_state: IntGaugeVec,
    pub(crate) circuit_transitions: IntCounterVec,
    pub(crate) circuit_open_seconds: prometheus::CounterVec,
    pub(crate) handler_duration: HistogramVec,
    pub(crate) delivery_attempts: HistogramVec,
    pub(crate) message_age: HistogramVec,
    pub(crate) ack_batch_size: HistogramVec,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let m = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(m.clone())).expect("unique metric name");
    m
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let m = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(m.clone())).expect("unique metric name");
    m
}

fn float_gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let m = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(m.clone())).expect("unique metric name");
    m
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let m = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric definition");
    r.register(Box::new(m.clone())).expect("unique metric name");
    m
}

fn single<M: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: M) -> M {
    r.register(Box::new(m.clone())).expect("unique metric name");
    m
}

impl Metrics {
    /// Registers every family and creates the series of every known label value at zero, so
    /// `rate()` and alerts work from the first scrape.
    pub fn new(queues: &[&str]) -> Metrics {
        let r = Registry::new();
        let q = &["queue"];
        let m = Metrics {
            deliveries: counter_vec(&r, "rabbit_sidecar_deliveries_total", "Messages received from the broker.", q),
            redeliveries: counter_vec(
                &r,
                "rabbit_sidecar_redeliveries_total",
                "Deliveries flagged redelivered, with a delivery count above zero, or carrying earlier failed attempts.",
                q,
            ),
            acks: counter_vec(&r, "rabbit_sidecar_acks_total", "Messages acked after the app accepted them (2xx). Retried and dead-lettered originals count in retries_total and dead_letters_total.", q),
            nacks: counter_vec(
                &r,
                "rabbit_sidecar_nacks_total",
                "Messages negatively acknowledged; requeue=true returns them to the queue.",
                &["queue", "requeue"],
            ),
            retries: counter_vec(
                &r,
                "rabbit_sidecar_retries_total",
                "Retries scheduled after a retryable failure of the app, by reason.",
                &["queue", "reason"],
            ),
            dead_letters: counter_vec(
                &r,
                "rabbit_sidecar_dead_letters_total",
                "Messages published to the dead-letter queue (confirmed by the broker), by reason.",
                &["queue", "reason"],
            ),
            dead_letter_failures: counter_vec(
                &r,
                "rabbit_sidecar_dead_letter_failures_total",
                "Dead-letter publishes the broker did not confirm; the original went back to the queue.",
                q,
            ),
            settle_failures: counter_vec(
                &r,
                "rabbit_sidecar_settle_failures_total",
                "Acks and nacks that could not be sent because the message's channel was gone; the broker redelivers those messages.",
                q,
            ),
            reconnects: single(
                &r,
                IntCounter::new("rabbit_sidecar_reconnects_total", "Connections re-established after a loss.")
                    .expect("valid metric definition"),
            ),
            connection_losses: counter_vec(
                &r,
                "rabbit_sidecar_connection_losses_total",
                "Broker connections lost, by reason.",
                &["reason"],
            ),
            connect_failures: single(
                &r,
                IntCounter::new(
                    "rabbit_sidecar_connect_failures_total",
                    "Failed attempts to connect to a broker node.",
                )
                .expect("valid metric definition"),
            ),
            consumer_cancellations: counter_vec(
                &r,
                "rabbit_sidecar_consumer_cancellations_total",
                "Consumers cancelled: by the broker, by the app gate (app down) or by shutdown.",
                &["queue", "reason"],
            ),
            ack_timeout_warnings: counter_vec(
                &r,
                "rabbit_sidecar_ack_timeout_warnings_total",
                "In-flight messages that passed 80% of the broker's delivery-acknowledgement timeout.",
                q,
            ),
            connection_up: single(
                &r,
                IntGauge::new("rabbit_sidecar_connection_up", "1 while connected to a broker node.")
                    .expect("valid metric definition"),
            ),
            connection_blocked: single(
                &r,
                IntGauge::new(
                    "rabbit_sidecar_connection_blocked",
                    "1 while the broker blocks publishing on the connection (resource alarm).",
                )
                .expect("valid metric definition"),
            ),
            consumer_up: gauge_vec(
                &r,
                "rabbit_sidecar_consumer_up",
                "1 while a consumer is registered with the broker.",
                q,
            ),
            consumer_active: gauge_vec(
                &r,
                "rabbit_sidecar_consumer_active",
                "1 when this replica receives the queue's messages; 0 when standby (single active consumer) or paused.",
                q,
            ),
            app_up: single(
                &r,
                IntGauge::new("rabbit_sidecar_app_up", "1 when the app answered the last dispatch or probe.")
                    .expect("valid metric definition"),
            ),
            ready: single(
                &r,
                IntGauge::new("rabbit_sidecar_ready", "1 when /readyz answers 200.").expect("valid metric definition"),
            ),
            in_flight: gauge_vec(
                &r,
                "rabbit_sidecar_in_flight_messages",
                "Messages received and not yet settled.",
                q,
            ),
            last_delivery: float_gauge_vec(
                &r,
                "rabbit_sidecar_last_delivery_timestamp_seconds",
                "Unix time of the last delivery (0 = never).",
                q,
            ),
            last_ack: float_gauge_vec(
                &r,
                "rabbit_sidecar_last_ack_timestamp_seconds",
                "Unix time of the last ack (0 = never).",
                q,
            ),
            oldest_unacked_age: float_gauge_vec(
                &r,
                "rabbit_sidecar_oldest_unacked_age_seconds",
                "Age of the oldest message held unacknowledged (0 when none).",
                q,
            ),
            consumer_timeout: single(
                &r,
                Gauge::new(
                    "rabbit_sidecar_consumer_timeout_seconds",
                    "The broker's delivery-acknowledgement timeout the sidecar is configured to expect.",
                )
                .expect("valid metric definition"),
            ),
            queue_messages_ready: gauge_vec(
                &r,
                "rabbit_sidecar_queue_messages_ready",
                "Messages ready in the queue, polled from the broker.",
                q,
            ),
            queue_consumers: gauge_vec(
                &r,
                "rabbit_sidecar_queue_consumers",
                "Consumers on the queue, polled from the broker.",
                q,
            ),
            retry_queue_messages: gauge_vec(
                &r,
                "rabbit_sidecar_retry_queue_messages",
                "Messages waiting in the queue's retry queue (labelled by the consumed queue), polled from the broker.",
                q,
            ),
            dead_letter_queue_messages: gauge_vec(
                &r,
                "rabbit_sidecar_dead_letter_queue_messages",
                "Messages in the queue's dead-letter queue (labelled by the consumed queue), polled from the broker.",
                q,
            ),
            circuit_state: gauge_vec(
                &r,
                "rabbit_sidecar_circuit_state",
                "1 for the current state of the app's circuit breaker (closed, open, half_open), 0 for the others.",
                &["app", "state"],
            ),
            circuit_transitions: counter_vec(
                &r,
                "rabbit_sidecar_circuit_transitions_total",
                "Changes of state of the app's circuit breaker, by the state entered.",
                &["app", "to"],
            ),
            circuit_open_seconds: {
                let m = prometheus::CounterVec::new(
                    Opts::new(
                        "rabbit_sidecar_circuit_open_seconds_total",
                        "Seconds the app's circuit breaker spent open (added when an open period ends).",
                    ),
                    &["app"],
                )
                .expect("valid metric definition");
                single(&r, m)
            },
            handler_duration: histogram_vec(
                &r,
                "rabbit_sidecar_handler_duration_seconds",
                "Time the app took to answer, by outcome.",
                &["queue", "outcome"],
                vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0],
            ),
            delivery_attempts: histogram_vec(
                &r,
                "rabbit_sidecar_delivery_attempts",
                "The attempt number at which each message was settled.",
                q,
                vec![1.0, 2.0, 3.0, 5.0, 10.0, 20.0],
            ),
            message_age: histogram_vec(
                &r,
                "rabbit_sidecar_message_age_seconds",
                "Age of a message at delivery, from its timestamp property (when present).",
                q,
                vec![0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0],
            ),
            ack_batch_size: histogram_vec(
                &r,
                "rabbit_sidecar_ack_batch_size",
                "Messages acknowledged by each basic.ack frame sent (1 unless acks are coalesced).",
                q,
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
            ),
            registry: r,
        };
        let build = IntGaugeVec::new(
            Opts::new(
                "rabbit_sidecar_build_info",
                "Build information; the value is always 1.",
            ),
            &["version"],
        )
        .expect("valid metric definition");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        m.registry
            .register(Box::new(build))
            .expect("unique metric name");
        #[cfg(target_os = "linux")]
        m.registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric name");
        for reason in LossReason::ALL {
            m.connection_losses.with_label_values(&[reason.as_str()]);
        }
        for queue in queues {
            m.add_queue(queue);
        }
        m
    }

    /// Creates the zero series of one queue.
    pub fn add_queue(&self, queue: &str) {
        self.deliveries.with_label_values(&[queue]);
        self.redeliveries.with_label_values(&[queue]);
        self.acks.with_label_values(&[queue]);
        self.nacks.with_label_values(&[queue, "true"]);
        self.nacks.with_label_values(&[queue, "false"]);
        for r in RetryReason::ALL {
            self.retries.with_label_values(&[queue, r.as_str()]);
        }
        for r in DeadLetterReason::ALL {
            self.dead_letters.with_label_values(&[queue, r.as_str()]);
        }
        self.dead_letter_failures.with_label_values(&[queue]);
        self.settle_failures.with_label_values(&[queue]);
        for r in CancelReason::ALL {
            self.consumer_cancellations
                .with_label_values(&[queue, r.as_str()]);
        }
        self.ack_timeout_warnings.with_label_values(&[queue]);
        self.consumer_up.with_label_values(&[queue]);
        self.consumer_active.with_label_values(&[queue]);
        self.in_flight.with_label_values(&[queue]);
        self.last_delivery.with_label_values(&[queue]);
        self.last_ack.with_label_values(&[queue]);
        self.oldest_unacked_age.with_label_values(&[queue]);
        self.queue_messages_ready.with_label_values(&[queue]);
        self.queue_consumers.with_label_values(&[queue]);
        self.retry_queue_messages.with_label_values(&[queue]);
        self.dead_letter_queue_messages.with_label_values(&[queue]);
        for o in HandlerOutcome::ALL {
            self.handler_duration
                .with_label_values(&[queue, o.as_str()]);
        }
        self.delivery_attempts.with_label_values(&[queue]);
        self.message_age.with_label_values(&[queue]);
        self.ack_batch_size.with_label_values(&[queue]);
    }

    /// Creates the zero series of one app's circuit breaker.
    pub fn add_app(&self, app: &str) {
        for state in CircuitState::ALL {
            self.circuit_state.with_label_values(&[app, state.as_str()]);
            self.circuit_transitions
                .with_label_values(&[app, state.as_str()]);
        }
        self.circuit_open_seconds.with_label_values(&[app]);
    }

    /// The series of `queue` that move on every message, looked up once.
    pub(crate) fn queue_series(&self, queue: &str) -> QueueSeries {
        QueueSeries {
            deliveries: self.deliveries.with_label_values(&[queue]),
            redeliveries: self.redeliveries.with_label_values(&[queue]),
            last_delivery: self.last_delivery.with_label_values(&[queue]),
            message_age: self.message_age.with_label_values(&[queue]),
            acks: self.acks.with_label_values(&[queue]),
            last_ack: self.last_ack.with_label_values(&[queue]),
            delivery_attempts: self.delivery_attempts.with_label_values(&[queue]),
            ack_batch_size: self.ack_batch_size.with_label_values(&[queue]),
            handler_duration: HandlerOutcome::ALL.map(|o| {
                self.handler_duration
                    .with_label_values(&[queue, o.as_str()])
            }),
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The text exposition of every family.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }

    /// Every family name this sidecar exports (for the dashboards/alerts contract check).
    pub fn family_names(&self) -> Vec<String> {
        self.registry
            .gather()
            .iter()
            .map(|f| f.name().to_string())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README is the user's contract: a metric family without its row there fails here.
    #[test]
    fn every_metric_family_is_in_the_readme_metrics_table() {
        let readme = include_str!("../../README.md");
        let metrics = Metrics::new(&["q"]);
        metrics.add_app("app:80");
        for name in metrics.family_names() {
            if name.starts_with("process_") {
                continue;
            }
            assert!(
                readme.contains(&format!("| `{name}` |")),
                "README's metrics table lacks {name}"
            );
        }
    }
}
