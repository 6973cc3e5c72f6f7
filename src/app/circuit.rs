//! The circuit breaker's state machine: pure, with time passed in, so every transition is a unit
//! test. [`super::breaker`] runs it for the pipeline.
//!
//! - **Closed**: every message goes to the app. Each answer is recorded in a sliding window: the
//!   answers of the last `window`, at most the last `2 × min_calls` of them (so a busy healthy
//!   past does not delay the opening: it takes about `min_calls` failures in a row at any message
//!   rate). When it holds at least `min_calls` answers, the share of retryable failures (5xx,
//!   408, 429, timeout, connection reset) reaches `failure_ratio`, and those failures are of at
//!   least `min_calls × failure_ratio` different messages, the circuit opens. The last condition
//!   tells an outage (many messages fail) from a few poison messages retried over and over
//!   (which must go on spending their attempts and be dead-lettered). A 4xx
//!   rejection is a healthy answer (the app decided; the message is at fault), so a storm of them
//!   never opens it. "Unreachable" is the app gate's business and is not recorded.
//! - **Open** for `open_base × 2^(opens-1)` (capped at `open_max`), or for the app's
//!   `Retry-After` when the failure that opened it carried one. Nothing is admitted.
//! - **HalfOpen** once that time has passed: exactly one message (the probe) is admitted; the
//!   others wait. A healthy answer closes the circuit (and forgets the window and the count of
//!   opens); a retryable failure opens it again for twice as long.
//!
//! A failure recorded while the circuit is open or half-open, or that opens it, is an *outage*
//! failure: the pipeline retries that message without spending an attempt on it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The breaker's thresholds and delays.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CircuitConfig {
    pub window: Duration,
    pub min_calls: u32,
    /// In `(0, 1]`.
    pub failure_ratio: f64,
    pub open_base: Duration,
    pub open_max: Duration,
}

/// Which state the circuit is in: the `state` label of `rabbit_sidecar_circuit_state` and the
/// `to` label of `rabbit_sidecar_circuit_transitions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

impl CircuitState {
    pub const ALL: [CircuitState; 3] = [
        CircuitState::Closed,
        CircuitState::Open,
        CircuitState::HalfOpen,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }
}

/// What the app's answer means to the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// 2xx or a 4xx rejection: the app is working.
    Healthy,
    /// 5xx, 408, 429, timeout, reset; with the app's `Retry-After` (already capped), if any, and
    /// which message failed (a hash of its identity).
    Failed {
        retry_after: Option<Duration>,
        message: u64,
    },
}

/// Whether a message may go to the app now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed: go.
    Pass,
    /// Half-open: this message is the probe; its answer decides.
    Probe,
    /// Open, or half-open with the probe out: do not call the app.
    Hold,
}

/// A change of state, for events and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: CircuitState,
    pub to: CircuitState,
    /// How long the circuit was open, when it leaves `Open`.
    pub was_open: Option<Duration>,
}

/// What recording an answer did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// The failure happened while the circuit was open or half-open, or it opened the circuit:
    /// the app is failing as a whole, the message is not to blame.
    pub outage: bool,
    pub transition: Option<Transition>,
}

#[derive(Debug)]
pub struct Circuit {
    config: CircuitConfig,
    state: CircuitState,
    since: Instant,
    /// While open: when the half-open probe is due.
    open_until: Option<Instant>,
    /// Opens since the circuit was last closed (the exponent of the open time).
    opens: u32,
    probe_out: bool,
    /// (when, the failed message) of the answers within the window, oldest first; `None` for a
    /// healthy answer.
    window: VecDeque<(Instant, Option<u64>)>,
    failures: u32,
}

impl Circuit {
    pub fn new(config: CircuitConfig, now: Instant) -> Circuit {
        Circuit {
            config,
            state: CircuitState::Closed,
            since: now,
            open_until: None,
            opens: 0,
            probe_out: false,
            window: VecDeque::new(),
            failures: 0,
        }
    }

    pub fn state(&self) -> CircuitState {
        self.state
    }

    /// When the current state began.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// While open: when the circuit turns half-open.
    pub fn next_probe(&self) -> Option<Instant> {
        self.open_until
    }

    /// Moves from open to half-open once the open time has passed.
    pub fn tick(&mut self, now: Instant) -> Option<Transition> {
        match self.open_until {
            Some(until) if self.state == CircuitState::Open && now >= until => {
                Some(self.enter(CircuitState::HalfOpen, now))
            }
            _ => None,
        }
    }

    /// Whether a message may go to the app now. A [`Admission::Probe`] must be followed by
    /// [`Circuit::record`] or [`Circuit::abandon_probe`].
    pub fn admit(&mut self, now: Instant) -> Admission {
        self.tick(now);
        match self.state {
            CircuitState::Closed => Admission::Pass,
            CircuitState::Open => Admission::Hold,
            CircuitState::HalfOpen if self.probe_out => Admission::Hold,
            CircuitState::HalfOpen => {
                self.probe_out = true;
                Admission::Probe
            }
        }
    }

    /// The probe got no answer that says anything (app unreachable, shutdown): the next message
    /// probes instead.
    pub fn abandon_probe(&mut self) {
        self.probe_out = false;
    }

    /// Records the app's answer to a call admitted earlier.
    pub fn record(&mut self, call: Call, now: Instant) -> Recorded {
        self.tick(now);
        let failed = matches!(call, Call::Failed { .. });
        let (retry_after, message) = match call {
            Call::Failed {
                retry_after,
                message,
            } => (retry_after, Some(message)),
            Call::Healthy => (None, None),
        };
        match self.state {
            CircuitState::Closed => {
                self.push(now, message);
                if failed && self.tripped() {
                    let t = self.open(now, retry_after);
                    Recorded {
                        outage: true,
                        transition: Some(t),
                    }
                } else {
                    Recorded {
                        outage: false,
                        transition: None,
                    }
                }
            }
            CircuitState::Open => {
                // A call that was under way when the circuit opened. A later Retry-After
                // lengthens the open time; nothing shortens it.
                if let (Some(ra), Some(until)) = (retry_after, self.open_until) {
                    self.open_until = Some(until.max(now + ra));
                }
                Recorded {
                    outage: failed,
                    transition: None,
                }
            }
            CircuitState::HalfOpen => {
                self.probe_out = false;
                let transition = if failed {
                    self.open(now, retry_after)
                } else {
                    self.opens = 0;
                    self.window.clear();
                    self.failures = 0;
                    self.enter(CircuitState::Closed, now)
                };
                Recorded {
                    outage: failed,
                    transition: Some(transition),
                }
            }
        }
    }

    fn push(&mut self, now: Instant, failed: Option<u64>) {
        while let Some(&(at, f)) = self.window.front() {
            if now.saturating_duration_since(at) < self.config.window {
                break;
            }
            self.window.pop_front();
            self.failures -= u32::from(f.is_some());
        }
        self.window.push_back((now, failed));
        self.failures += u32::from(failed.is_some());
        let most = self.config.min_calls.max(1) as usize * 2;
        while self.window.len() > most {
            if let Some((_, f)) = self.window.pop_front() {
                self.failures -= u32::from(f.is_some());
            }
        }
    }

    fn tripped(&self) -> bool {
        let calls = self.window.len() as u32;
        let needed = self.config.failure_ratio * f64::from(self.config.min_calls.max(1));
        calls >= self.config.min_calls.max(1)
            && f64::from(self.failures) >= self.config.failure_ratio * f64::from(calls)
            && {
                // At most 2 × min_calls entries: a small set.
                let messages: std::collections::HashSet<u64> =
                    self.window.iter().filter_map(|(_, f)| *f).collect();
                messages.len() as f64 >= needed.ceil()
            }
    }

    /// The open time of the next open: `open_base × 2^opens`, capped; the app's Retry-After
    /// instead when it gave one.
    fn open_time(&self, retry_after: Option<Duration>) -> Duration {
        retry_after.unwrap_or_else(|| {
            self.config
                .open_base
                .saturating_mul(1u32 << self.opens.min(30))
                .min(self.config.open_max)
        })
    }

    fn open(&mut self, now: Instant, retry_after: Option<Duration>) -> Transition {
        let until = now + self.open_time(retry_after);
        self.opens = self.opens.saturating_add(1);
        let t = self.enter(CircuitState::Open, now);
        self.open_until = Some(until);
        t
    }

    fn enter(&mut self, to: CircuitState, now: Instant) -> Transition {
        let from = self.state;
        let was_open =
            (from == CircuitState::Open).then(|| now.saturating_duration_since(self.since));
        self.state = to;
        self.since = now;
        self.open_until = None;
        if to != CircuitState::HalfOpen {
            self.probe_out = false;
        }
        Transition { from, to, was_open }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: CircuitConfig = CircuitConfig {
        window: Duration::from_secs(10),
        min_calls: 10,
        failure_ratio: 0.5,
        open_base: Duration::from_secs(1),
        open_max: Duration::from_secs(8),
    };
    const FAIL: Call = Call::Failed {
        retry_after: None,
        message: 0,
    };

    /// Failures of `n` different messages.
    fn fails(n: u64) -> Vec<Call> {
        (1..=n)
            .map(|message| Call::Failed {
                retry_after: None,
                message,
            })
            .collect()
    }
    const MS: Duration = Duration::from_millis(1);

    fn record_n(c: &mut Circuit, now: Instant, calls: &[Call]) -> Vec<Recorded> {
        calls.iter().map(|call| c.record(*call, now)).collect()
    }

    #[test]
    fn opens_only_with_enough_calls_and_failures() {
        let t0 = Instant::now();
        let mut c = Circuit::new(CONFIG, t0);
        // Nine failures: below min_calls.
        let r = record_n(&mut c, t0, &fails(9));
        assert!(r.iter().all(|r| !r.outage && r.transition.is_none()));
        assert_eq!(c.state(), CircuitState::Closed);
        // The tenth opens it, and is an outage failure.
        let r = c.record(FAIL, t0);
        assert!(r.outage);
        assert_eq!(r.transition.map(|t| t.to), Some(CircuitState::Open));
        assert_eq!(c.admit(t0), Admission::Hold);
        assert_eq!(c.next_probe(), Some(t0 + Duration::from_secs(1)));
    }

    #[test]
    fn failures_below_the_ratio_never_open_it_and_4xx_are_healthy() {
        let t0 = Instant::now();
        let mut c = Circuit::new(CONFIG, t0);
        for i in 0..200u64 {
            // A third of the calls fail (poison messages among healthy ones, say).
            let call = if i % 3 == 0 {
                Call::Failed {
                    retry_after: None,
                    message: i,
                }
            } else {
                Call::Healthy
            };
            let r = c.record(call, t0 + MS * i as u32);
            assert!(!r.outage, "call {i}");
            assert_eq!(c.admit(t0 + MS * i as u32), Admission::Pass);
        }
        let mut c = Circuit::new(CONFIG, t0);
        // A 4xx storm: the caller records rejections as healthy.
        record_n(&mut c, t0, &[Call::Healthy; 100]);
        assert_eq!(c.state(), CircuitState::Closed);
    }

    #[test]
    fn a_busy_healthy_past_does_not_delay_the_opening() {
        let t0 = Instant::now();
        let mut c = Circuit::new(CONFIG, t0);
        record_n(&mut c, t0, &[Call::Healthy; 1000]);
        // The window keeps the last 2 × min_calls answers: ten failures make half of them.
        let r = record_n(&mut c, t0, &fails(10));
        assert!(r[..9].iter().all(|r| !r.outage));
        assert!(r[9].outage);
        assert_eq!(c.state(), CircuitState::Open);
    }

    #[test]
    fn a_few_poison_messages_retried_over_and_over_never_open_it() {
        let t0 = Instant::now();
        let mut c = Circuit::new(CONFIG, t0);
        // Four messages that always fail, retried 30 times each, and little else: every
        // answer fails, but of four messages, not of the five an outage would show.
        for round in 0..30u32 {
            for message in 1..=4 {
                let r = c.record(
                    Call::Failed {
                        retry_after: None,
                        message,
                    },
                    t0 + MS * round,
                );
                assert!(!r.outage);
            }
        }
        assert_eq!(c.state(), CircuitState::Closed);
        assert!(
            c.record(
                Call::Failed {
                    retry_after: None,
                    message: 5
                },
                t0 + MS * 31
            )
            .outage
        );
    }

    #[test]
    fn old_answers_leave_the_window() {
        let t0 = Instant::now();
        let mut c = Circuit::new(CONFIG, t0);
        record_n(&mut c, t0, &fails(9));
        // Eleven seconds later the nine failures are forgotten: one more does not open it.
        let later = t0 + Duration::from_secs(11);
        assert!(!c.record(FAIL, later).outage);
        assert_eq!(c.state(), CircuitState::Closed);
    }

    #[test]
    fn half_open_admits_one_probe_and_its_answer_decides() {
        let t0 = Instant::now();
        let mut c = Circuit::new(CONFIG, t0);
        record_n(&mut c, t0, &fails(10));
        assert_eq!(c.admit(t0 + 999 * MS), Admission::Hold);
        let t1 = t0 + Duration::from_secs(1);
        let half = c.tick(t1).expect("half-open after the open time");
        assert_eq!(
            (half.from, half.to),
            (CircuitState::Open, CircuitState::HalfOpen)
        );
        assert_eq!(half.was_open, Some(Duration::from_secs(1)));
        assert_eq!(c.admit(t1), Admission::Probe);
        assert_eq!(c.admit(t1), Admission::Hold, "one probe at a time");

        // The probe fails: open again, twice as long.
        let r = c.record(FAIL, t1);
        assert!(r.outage);
        assert_eq!(c.state(), CircuitState::Open);
        assert_eq!(c.next_probe(), Some(t1 + Duration::from_secs(2)));
        // ... then 4 s, then capped at 8 s.
        let mut t = t1;
        for want in [2u64, 4, 8, 8] {
            assert_eq!(c.next_probe(), Some(t + Duration::from_secs(want)));
            t += Duration::from_secs(want);
            assert_eq!(c.admit(t), Admission::Probe);
            c.record(FAIL, t);
        }

        // An abandoned probe lets the next message probe.
        t += Duration::from_secs(8);
        assert_eq!(c.admit(t), Admission::Probe);
        c.abandon_probe();
        assert_eq!(c.admit(t), Admission::Probe);

        // Success closes it and forgets the past: the next open is 1 s again.
        let r = c.record(Call::Healthy, t);
        assert!(!r.outage);
        assert_eq!(r.transition.map(|t| t.to), Some(CircuitState::Closed));
        assert_eq!(c.admit(t), Admission::Pass);
        record_n(&mut c, t, &fails(10));
        assert_eq!(c.next_probe(), Some(t + Duration::from_secs(1)));
    }

    #[test]
    fn failures_of_calls_under_way_while_open_are_outage_failures() {
        let t0 = Instant::now();
        let mut c = Circuit::new(CONFIG, t0);
        record_n(&mut c, t0, &fails(10));
        assert!(c.record(FAIL, t0 + MS).outage);
        assert!(!c.record(Call::Healthy, t0 + MS).outage);
        assert_eq!(
            c.state(),
            CircuitState::Open,
            "a late success does not close it"
        );
    }

    #[test]
    fn retry_after_sets_the_open_time_and_only_lengthens_it() {
        let t0 = Instant::now();
        let mut c = Circuit::new(CONFIG, t0);
        record_n(&mut c, t0, &fails(9));
        let ra = |s| Call::Failed {
            retry_after: Some(Duration::from_secs(s)),
            message: s,
        };
        c.record(ra(30), t0);
        assert_eq!(c.state(), CircuitState::Open);
        assert_eq!(
            c.next_probe(),
            Some(t0 + Duration::from_secs(30)),
            "beyond open_max: the caller caps it"
        );
        c.record(ra(5), t0);
        assert_eq!(c.next_probe(), Some(t0 + Duration::from_secs(30)));
        c.record(ra(40), t0);
        assert_eq!(c.next_probe(), Some(t0 + Duration::from_secs(40)));
    }
}
