//! The decision: what to do with a message given what the app answered and how many times it has
//! been tried. A pure function of its inputs, so the whole failure policy is one table in the tests.
//!
//! | app's answer                         | attempt < max            | attempt ≥ max                 |
//! |--------------------------------------|--------------------------|-------------------------------|
//! | 2xx                                  | ack                      | ack                           |
//! | 4xx except 408, 429                  | dead-letter (`rejected`) | dead-letter (`rejected`)      |
//! | 5xx, 408, 429, timeout, reset        | retry after backoff      | dead-letter (`max_deliveries`)|
//! | unreachable (connect refused)        | return to queue, pause   | return to queue, pause        |
//!
//! "Unreachable" never spends an attempt: the app is down, not the message.
//!
//! Nor does a retryable failure during an *outage* (the app's circuit breaker was open or
//! half-open, or this failure opened it): it is retried with its attempt count unchanged, whatever
//! the count, so a dependency outage behind the app dead-letters nothing. The breaker's state is an
//! input here, never owned. A 429 or 503 with `Retry-After` waits that long instead of the backoff,
//! capped at `--retry-after-max`.

use std::time::Duration;

/// What the app's answer (or its absence) was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx.
    Success { status: u16 },
    /// A 4xx other than 408 and 429: the app will never accept this message.
    Rejected { status: u16 },
    /// The app may accept the message later.
    Retryable {
        reason: RetryReason,
        status: Option<u16>,
    },
    /// Nothing listens at the target: the app is down.
    Unreachable,
}

impl Outcome {
    /// Classifies an HTTP status code.
    pub fn from_status(status: u16) -> Outcome {
        match status {
            200..=299 => Outcome::Success { status },
            408 => Outcome::Retryable {
                reason: RetryReason::Timeout,
                status: Some(status),
            },
            429 => Outcome::Retryable {
                reason: RetryReason::Throttled,
                status: Some(status),
            },
            400..=499 => Outcome::Rejected { status },
            // 1xx/3xx are not answers a handler should give: retry rather than lose the message.
            _ => Outcome::Retryable {
                reason: RetryReason::ServerError,
                status: Some(status),
            },
        }
    }

    pub fn status(&self) -> Option<u16> {
        match *self {
            Outcome::Success { status } | Outcome::Rejected { status } => Some(status),
            Outcome::Retryable { status, .. } => status,
            Outcome::Unreachable => None,
        }
    }

    /// What went wrong on the wire when the app gave no HTTP answer (`error.type` of the call's
    /// span): `unreachable`, `timeout` or `connection_reset`. `None` when it answered.
    pub fn wire_failure(&self) -> Option<&'static str> {
        match *self {
            Outcome::Retryable {
                reason,
                status: None,
            } => Some(reason.as_str()),
            Outcome::Unreachable => Some("unreachable"),
            _ => None,
        }
    }

    /// The `error.type` a message's span gets when it was not acked: the failure class, not the
    /// status (the client span carries that).
    pub fn failure_class(&self) -> &'static str {
        match self {
            Outcome::Success { .. } => "",
            Outcome::Rejected { .. } => "rejected",
            Outcome::Retryable { reason, .. } => reason.as_str(),
            Outcome::Unreachable => "unreachable",
        }
    }
}

/// Why a retry was scheduled. The label values of `rabbit_sidecar_retries_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    ServerError,
    Timeout,
    Throttled,
    ConnectionReset,
    /// Not an answer of the app: the message was parked, unsent, while the circuit was open.
    CircuitOpen,
}

impl RetryReason {
    pub const ALL: [RetryReason; 5] = [
        RetryReason::ServerError,
        RetryReason::Timeout,
        RetryReason::Throttled,
        RetryReason::ConnectionReset,
        RetryReason::CircuitOpen,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::ServerError => "server_error",
            RetryReason::Timeout => "timeout",
            RetryReason::Throttled => "throttled",
            RetryReason::ConnectionReset => "connection_reset",
            RetryReason::CircuitOpen => "circuit_open",
        }
    }
}

/// Why a message was dead-lettered. The label values of `rabbit_sidecar_dead_letters_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    Rejected,
    MaxDeliveries,
    /// The queue's delivery limit is reached: one more return (a crash, a lost connection) and
    /// the broker would remove the message (RabbitMQ's own word for it, `delivery_limit`).
    DeliveryLimit,
}

impl DeadLetterReason {
    pub const ALL: [DeadLetterReason; 3] = [
        DeadLetterReason::Rejected,
        DeadLetterReason::MaxDeliveries,
        DeadLetterReason::DeliveryLimit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Rejected => "rejected",
            DeadLetterReason::MaxDeliveries => "max_deliveries",
            DeadLetterReason::DeliveryLimit => "delivery_limit",
        }
    }
}

/// What to do with the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Ack,
    /// Park a copy for `delay`, then try again. `counted`: this attempt counts towards
    /// `--max-deliveries` (recorded on the copy); not during an outage.
    Retry {
        reason: RetryReason,
        delay: Duration,
        counted: bool,
    },
    DeadLetter {
        reason: DeadLetterReason,
    },
    /// Give the message back to the broker untouched and pause: the app is down.
    Requeue,
}

impl Decision {
    /// The decision's name in traces (`rabbit_sidecar.decision`) and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Decision::Ack => "ack",
            Decision::Retry { .. } => "retry",
            Decision::DeadLetter { .. } => "dead_letter",
            Decision::Requeue => "requeue",
        }
    }
}

/// The limits the policy applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_deliveries: u32,
    pub backoff: Duration,
    pub backoff_max: Duration,
    /// Cap of the app's `Retry-After`.
    pub retry_after_max: Duration,
}

/// What the policy knows beyond the answer's class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Circumstances {
    /// The app's circuit breaker counts this failure as the outage's (see the module doc).
    pub outage: bool,
    /// The app's `Retry-After`, uncapped.
    pub retry_after: Option<Duration>,
}

/// Decides the fate of a message on its `attempt`-th try (1-based), knowing whether the app is in
/// an outage and what it asked for. `jitter` in `[0, 1)` spreads retries of messages that failed
/// together.
pub fn decide_in(
    outcome: Outcome,
    attempt: u32,
    limits: &Limits,
    jitter: f64,
    about: Circumstances,
) -> Decision {
    let waited = capped_retry_after(about.retry_after, limits);
    match outcome {
        Outcome::Retryable { reason, .. } if about.outage => Decision::Retry {
            reason,
            // The attempt is not spent: the delay of the attempt before it.
            delay: waited
                .unwrap_or_else(|| retry_delay(attempt.saturating_sub(1).max(1), limits, jitter)),
            counted: false,
        },
        Outcome::Success { .. } => Decision::Ack,
        Outcome::Rejected { .. } => Decision::DeadLetter {
            reason: DeadLetterReason::Rejected,
        },
        Outcome::Unreachable => Decision::Requeue,
        Outcome::Retryable { .. } if attempt >= limits.max_deliveries => Decision::DeadLetter {
            reason: DeadLetterReason::MaxDeliveries,
        },
        Outcome::Retryable { reason, .. } => Decision::Retry {
            reason,
            delay: waited.unwrap_or_else(|| retry_delay(attempt, limits, jitter)),
            counted: true,
        },
    }
}

/// The app's `Retry-After`, at most `--retry-after-max`.
pub fn capped_retry_after(retry_after: Option<Duration>, limits: &Limits) -> Option<Duration> {
    retry_after.map(|d| d.min(limits.retry_after_max))
}

/// Whether a message must be dead-lettered before it is even offered to the app, and why: it has
/// already been delivered more often than allowed without a decision (the sidecar died holding
/// it), or the broker has returned it `returns` times and `delivery_limit` allows no more (the
/// next crash or lost connection would make the broker remove it, and without a dead-letter
/// exchange drop it).
pub fn exhausted_on_arrival(
    attempt: u32,
    returns: u64,
    delivery_limit: Option<u32>,
    limits: &Limits,
) -> Option<DeadLetterReason> {
    if attempt > limits.max_deliveries {
        Some(DeadLetterReason::MaxDeliveries)
    } else if delivery_limit.is_some_and(|limit| returns >= u64::from(limit)) {
        Some(DeadLetterReason::DeliveryLimit)
    } else {
        None
    }
}

/// `backoff × 2^(attempt-1)`, plus up to 20 % jitter, never above `backoff_max`. Jitter only ever
/// lengthens the delay, so no retry comes sooner than its exponential step.
pub fn retry_delay(attempt: u32, limits: &Limits, jitter: f64) -> Duration {
    let exp = attempt.saturating_sub(1).min(30);
    let base = limits
        .backoff
        .saturating_mul(1u32 << exp)
        .min(limits.backoff_max);
    let jitter = jitter.clamp(0.0, 1.0);
    base.mul_f64(1.0 + 0.2 * jitter).min(limits.backoff_max)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_deliveries: 3,
        backoff: Duration::from_secs(1),
        backoff_max: Duration::from_secs(10),
        retry_after_max: Duration::from_secs(60),
    };

    fn decide(outcome: Outcome, attempt: u32, limits: &Limits, jitter: f64) -> Decision {
        decide_in(outcome, attempt, limits, jitter, Circumstances::default())
    }

    fn retry(reason: RetryReason, secs: u64) -> Decision {
        Decision::Retry {
            reason,
            delay: Duration::from_secs(secs),
            counted: true,
        }
    }

    #[test]
    fn outage_failures_spend_no_attempt_and_retry_after_sets_the_delay() {
        let outage = Circumstances {
            outage: true,
            retry_after: None,
        };
        let e503 = Outcome::from_status(503);
        let free = |secs| Decision::Retry {
            reason: RetryReason::ServerError,
            delay: Duration::from_secs(secs),
            counted: false,
        };
        // At and past --max-deliveries, an outage failure is still retried, uncounted.
        assert_eq!(decide_in(e503, 3, &LIMITS, 0.0, outage), free(2));
        assert_eq!(decide_in(e503, 99, &LIMITS, 0.0, outage), free(10));
        assert_eq!(decide_in(e503, 1, &LIMITS, 0.0, outage), free(1));
        // Outside an outage, the same answer counts and ends in the dead-letter queue.
        assert_eq!(
            decide_in(e503, 3, &LIMITS, 0.0, Circumstances::default()),
            Decision::DeadLetter {
                reason: DeadLetterReason::MaxDeliveries
            }
        );
        // 4xx and 2xx are not touched by an outage.
        assert_eq!(
            decide_in(Outcome::from_status(404), 1, &LIMITS, 0.0, outage),
            Decision::DeadLetter {
                reason: DeadLetterReason::Rejected
            }
        );
        assert_eq!(
            decide_in(Outcome::from_status(200), 1, &LIMITS, 0.0, outage),
            Decision::Ack
        );
        // Retry-After replaces the backoff, capped.
        let after = |secs| Circumstances {
            outage: false,
            retry_after: Some(Duration::from_secs(secs)),
        };
        assert_eq!(
            decide_in(Outcome::from_status(429), 1, &LIMITS, 0.0, after(7)),
            retry(RetryReason::Throttled, 7)
        );
        assert_eq!(
            decide_in(Outcome::from_status(429), 1, &LIMITS, 0.5, after(3600)),
            retry(RetryReason::Throttled, 60)
        );
        assert_eq!(
            decide_in(
                e503,
                2,
                &LIMITS,
                0.0,
                Circumstances {
                    outage: true,
                    retry_after: Some(Duration::from_secs(30))
                }
            ),
            free(30)
        );
    }

    #[test]
    fn decision_table() {
        use DeadLetterReason::*;
        use RetryReason::*;
        let dl = |reason| Decision::DeadLetter { reason };
        let cases: &[(Outcome, u32, Decision)] = &[
            (Outcome::from_status(200), 1, Decision::Ack),
            (Outcome::from_status(204), 3, Decision::Ack),
            (Outcome::from_status(299), 9, Decision::Ack),
            (Outcome::from_status(400), 1, dl(Rejected)),
            (Outcome::from_status(404), 2, dl(Rejected)),
            (Outcome::from_status(422), 3, dl(Rejected)),
            (Outcome::from_status(408), 1, retry(Timeout, 1)),
            (Outcome::from_status(429), 2, retry(Throttled, 2)),
            (Outcome::from_status(500), 1, retry(ServerError, 1)),
            (Outcome::from_status(503), 2, retry(ServerError, 2)),
            (Outcome::from_status(500), 3, dl(MaxDeliveries)),
            (Outcome::from_status(429), 4, dl(MaxDeliveries)),
            (Outcome::from_status(302), 1, retry(ServerError, 1)),
            (
                Outcome::Retryable {
                    reason: Timeout,
                    status: None,
                },
                1,
                retry(Timeout, 1),
            ),
            (
                Outcome::Retryable {
                    reason: Timeout,
                    status: None,
                },
                3,
                dl(MaxDeliveries),
            ),
            (
                Outcome::Retryable {
                    reason: ConnectionReset,
                    status: None,
                },
                2,
                retry(ConnectionReset, 2),
            ),
            (Outcome::Unreachable, 1, Decision::Requeue),
            (Outcome::Unreachable, 3, Decision::Requeue),
            (Outcome::Unreachable, 99, Decision::Requeue),
        ];
        for (outcome, attempt, want) in cases {
            assert_eq!(
                decide(*outcome, *attempt, &LIMITS, 0.0),
                *want,
                "{outcome:?} attempt {attempt}"
            );
        }
    }

    #[test]
    fn backoff_grows_caps_and_never_shrinks_with_jitter() {
        let d = |a, j| retry_delay(a, &LIMITS, j);
        assert_eq!(d(1, 0.0), Duration::from_secs(1));
        assert_eq!(d(2, 0.0), Duration::from_secs(2));
        assert_eq!(d(3, 0.0), Duration::from_secs(4));
        assert_eq!(d(5, 0.0), Duration::from_secs(10));
        assert_eq!(d(40, 0.99), Duration::from_secs(10));
        assert_eq!(d(1, 0.5), Duration::from_millis(1100));
        for attempt in 1..10 {
            for j in [0.0, 0.3, 0.999] {
                assert!(d(attempt, j) >= d(attempt, 0.0));
                assert!(d(attempt, j) <= LIMITS.backoff_max);
            }
        }
    }

    #[test]
    fn arrival_guard_bounds_crash_loops() {
        assert_eq!(exhausted_on_arrival(3, 0, None, &LIMITS), None);
        assert_eq!(
            exhausted_on_arrival(4, 0, None, &LIMITS),
            Some(DeadLetterReason::MaxDeliveries)
        );
    }

    #[test]
    fn arrival_guard_keeps_a_return_within_the_delivery_limit() {
        let generous = Limits {
            max_deliveries: 50,
            ..LIMITS
        };
        // A message returned 19 times survives one more return under a limit of 20; at 20 the
        // next one would remove it.
        assert_eq!(exhausted_on_arrival(20, 19, Some(20), &generous), None);
        assert_eq!(
            exhausted_on_arrival(21, 20, Some(20), &generous),
            Some(DeadLetterReason::DeliveryLimit)
        );
        assert_eq!(exhausted_on_arrival(21, 20, None, &generous), None);
        // The attempts bound comes first when both apply.
        assert_eq!(
            exhausted_on_arrival(21, 20, Some(20), &LIMITS),
            Some(DeadLetterReason::MaxDeliveries)
        );
    }
}
