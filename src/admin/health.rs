//! Shared health state: written by the broker session and the consumer loops, read by the admin
//! server. A leaf: it imports nothing from the pipeline.
//!
//! Liveness answers "is this process wedged?" and nothing else: a consumer loop that has not
//! turned for [`LOOP_STALL`], or a handler call running far past its deadline (the deadline should
//! have cut it). Broker and app outages are readiness failures, never liveness failures: restarting
//! the sidecar cannot fix the broker and would only cause restart storms.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

pub use crate::app::circuit::CircuitState;

/// A consumer loop that has not turned for this long is wedged.
pub const LOOP_STALL: Duration = Duration::from_secs(30);

/// What a subscription is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Connecting,
    Consuming,
    Standby,
    PausedAppDown,
    /// The app's circuit breaker is open: consuming waits for its probe.
    PausedCircuitOpen,
    Draining,
    Stopped,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Consuming => "consuming",
            State::Standby => "standby",
            State::PausedAppDown => "paused_app_down",
            State::PausedCircuitOpen => "paused_circuit_open",
            State::Draining => "draining",
            State::Stopped => "stopped",
        }
    }
}

#[derive(Debug)]
struct InFlight {
    received: Instant,
    dispatched: Option<Instant>,
    warned: bool,
}

#[derive(Debug)]
struct Sub {
    state: State,
    consumer_tag: Option<String>,
    consumer_up: bool,
    /// By in-flight id; ids count up, so a B-tree keeps them in arrival order without hashing.
    in_flight: BTreeMap<u64, InFlight>,
    /// When the last delivery arrived (also to infer "active" under single active consumer).
    last_delivery: Option<Instant>,
    last_ack: Option<SystemTime>,
    loop_tick: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    connected: bool,
    node: Option<String>,
    blocked: bool,
    app_up: bool,
    draining: bool,
    subs: BTreeMap<String, Sub>,
    /// By app (`host:port`); only apps with a circuit breaker.
    circuits: BTreeMap<String, CircuitStatus>,
}

/// Where an app's circuit breaker stands (written by the breaker).
#[derive(Debug, Clone, Copy)]
pub struct CircuitStatus {
    pub state: CircuitState,
    pub since: SystemTime,
    /// While open: when one message will be let through to probe the app.
    pub next_probe: Option<SystemTime>,
}

/// The shared state. Cheap to lock: every method holds the lock for a few field updates.
#[derive(Debug)]
pub struct Health {
    inner: Mutex<Inner>,
    handler_timeout: Duration,
    started: Instant,
}

/// A liveness or readiness verdict with a one-line reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub ok: bool,
    pub reason: String,
}

/// An in-flight message that passed a fraction of the broker's delivery-ack timeout.
#[derive(Debug, Clone, PartialEq)]
pub struct Overdue {
    pub queue: String,
    pub age: Duration,
}

impl Health {
    pub fn new(queues: &[&str], handler_timeout: Duration) -> Health {
        let now = Instant::now();
        let subs = queues
            .iter()
            .map(|q| {
                (
                    q.to_string(),
                    Sub {
                        state: State::Connecting,
                        consumer_tag: None,
                        consumer_up: false,
                        in_flight: BTreeMap::new(),
                        last_delivery: None,
                        last_ack: None,
                        loop_tick: now,
                    },
                )
            })
            .collect();
        Health {
            inner: Mutex::new(Inner {
                // The app is presumed up until a dispatch or probe says otherwise.
                app_up: true,
                subs,
                ..Inner::default()
            }),
            handler_timeout,
            started: now,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    fn with_sub<R>(&self, queue: &str, f: impl FnOnce(&mut Sub) -> R) -> Option<R> {
        self.with(|i| i.subs.get_mut(queue).map(f))
    }

    pub fn set_connected(&self, node: Option<String>) {
        self.with(|i| {
            i.connected = node.is_some();
            i.node = node;
            if !i.connected {
                i.blocked = false;
            }
        });
    }

    pub fn set_blocked(&self, blocked: bool) {
        self.with(|i| i.blocked = blocked);
    }

    pub fn set_app_up(&self, up: bool) {
        self.with(|i| i.app_up = up);
    }

    pub fn set_circuit(&self, app: &str, status: CircuitStatus) {
        self.with(|i| i.circuits.insert(app.to_string(), status));
    }

    pub fn set_draining(&self) {
        self.with(|i| {
            i.draining = true;
            for s in i.subs.values_mut() {
                s.state = State::Draining;
            }
        });
    }

    pub fn set_state(&self, queue: &str, state: State) {
        self.with(|i| {
            let draining = i.draining;
            if let Some(s) = i.subs.get_mut(queue) {
                // Once draining, only "stopped" may follow.
                if !draining || state == State::Stopped {
                    s.state = state;
                }
            }
        });
    }

    pub fn state(&self, queue: &str) -> Option<State> {
        self.with_sub(queue, |s| s.state)
    }

    pub fn set_consumer(&self, queue: &str, tag: Option<String>) {
        self.with_sub(queue, |s| {
            s.consumer_up = tag.is_some();
            s.consumer_tag = tag;
        });
    }

    /// The tag of the queue's registered consumer, if any.
    pub fn consumer_tag(&self, queue: &str) -> Option<String> {
        self.with_sub(queue, |s| s.consumer_tag.clone()).flatten()
    }

    /// The consumer loop calls this every time it turns, and at least every second while idle.
    pub fn tick(&self, queue: &str) {
        self.with_sub(queue, |s| s.loop_tick = Instant::now());
    }

    pub fn delivered(&self, queue: &str, id: u64) {
        let now = Instant::now();
        self.with_sub(queue, |s| {
            s.in_flight.insert(
                id,
                InFlight {
                    received: now,
                    dispatched: None,
                    warned: false,
                },
            );
            s.last_delivery = Some(now);
        });
    }

    pub fn dispatch_started(&self, queue: &str, id: u64) {
        self.with_sub(queue, |s| {
            if let Some(m) = s.in_flight.get_mut(&id) {
                m.dispatched = Some(Instant::now());
            }
        });
    }

    pub fn dispatch_finished(&self, queue: &str, id: u64) {
        self.with_sub(queue, |s| {
            if let Some(m) = s.in_flight.get_mut(&id) {
                m.dispatched = None;
            }
        });
    }

    /// The message left this sidecar's hands (acked, requeued, or its channel died).
    pub fn settled(&self, queue: &str, id: u64, acked: bool) {
        self.with_sub(queue, |s| {
            s.in_flight.remove(&id);
            if acked {
                s.last_ack = Some(SystemTime::now());
            }
        });
    }

    pub fn in_flight(&self, queue: &str) -> usize {
        self.with_sub(queue, |s| s.in_flight.len()).unwrap_or(0)
    }

    pub fn oldest_unacked_age(&self, queue: &str) -> Duration {
        self.with_sub(queue, |s| {
            s.in_flight
                .values()
                .map(|m| m.received.elapsed())
                .max()
                .unwrap_or_default()
        })
        .unwrap_or_default()
    }

    /// In-flight messages older than their queue's `threshold`, each reported once.
    pub fn take_overdue(&self, threshold: impl Fn(&str) -> Duration) -> Vec<Overdue> {
        self.with(|i| {
            let mut out = Vec::new();
            for (queue, s) in &mut i.subs {
                let threshold = threshold(queue);
                for m in s.in_flight.values_mut() {
                    let age = m.received.elapsed();
                    if !m.warned && age >= threshold {
                        m.warned = true;
                        out.push(Overdue {
                            queue: queue.clone(),
                            age,
                        });
                    }
                }
            }
            out
        })
    }

    /// Whether this replica receives the queue's messages. Without the management API the
    /// sidecar infers it: a registered consumer that is not single-active is active; a
    /// single-active one is active when it is the queue's only consumer or has received a
    /// delivery within `recent`, and standby otherwise.
    pub fn infer_active(
        &self,
        queue: &str,
        single_active: bool,
        consumers_on_queue: Option<i64>,
        recent: Duration,
    ) -> bool {
        self.with_sub(queue, |s| {
            if !s.consumer_up || matches!(s.state, State::PausedAppDown | State::PausedCircuitOpen)
            {
                return false;
            }
            if !single_active {
                return true;
            }
            consumers_on_queue == Some(1)
                || !s.in_flight.is_empty()
                || s.last_delivery.is_some_and(|t| t.elapsed() < recent)
        })
        .unwrap_or(false)
    }

    pub fn liveness(&self) -> Verdict {
        let stuck_after = self.handler_timeout * 2 + Duration::from_secs(5);
        self.with(|i| {
            for (queue, s) in &i.subs {
                // Only the pump loop ticks: while connecting or paused for the app, a silent
                // loop is waiting on an outage, which is not a wedge.
                let pumping = matches!(s.state, State::Consuming | State::Standby);
                if pumping && s.loop_tick.elapsed() > LOOP_STALL {
                    return Verdict {
                        ok: false,
                        reason: format!("consumer loop for {queue} has not run for {}s", s.loop_tick.elapsed().as_secs()),
                    };
                }
                if let Some(age) = s
                    .in_flight
                    .values()
                    .filter_map(|m| m.dispatched.map(|d| d.elapsed()))
                    .max()
                    .filter(|age| *age > stuck_after)
                {
                    return Verdict {
                        ok: false,
                        reason: format!(
                            "a handler call on {queue} has run {}s, well past the {}s handler timeout",
                            age.as_secs(),
                            self.handler_timeout.as_secs()
                        ),
                    };
                }
            }
            Verdict {
                ok: true,
                reason: "alive".into(),
            }
        })
    }

    pub fn readiness(&self) -> Verdict {
        self.with(|i| {
            let fail = |reason: String| Verdict { ok: false, reason };
            if i.draining {
                return fail("draining: shutting down".into());
            }
            if !i.connected {
                return fail("not connected to any broker node".into());
            }
            if !i.app_up {
                return fail("the app is unreachable; consuming is paused".into());
            }
            if let Some((app, _)) = i
                .circuits
                .iter()
                .find(|(_, c)| c.state == CircuitState::Open)
            {
                return fail(format!(
                    "circuit_open: the app at {app} fails most calls; consuming is paused until a probe succeeds"
                ));
            }
            for (queue, s) in &i.subs {
                match s.state {
                    State::Consuming | State::Standby => {}
                    other => return fail(format!("{queue}: {}", other.as_str())),
                }
            }
            let standby: Vec<&str> = i
                .subs
                .iter()
                .filter(|(_, s)| s.state == State::Standby)
                .map(|(q, _)| q.as_str())
                .collect();
            Verdict {
                ok: true,
                reason: if standby.is_empty() {
                    "consuming".into()
                } else {
                    format!(
                        "standing by (single active consumer) on {}",
                        standby.join(", ")
                    )
                },
            }
        })
    }

    /// The `/status` document.
    pub fn status(&self) -> StatusDoc {
        let v = self.readiness();
        let l = self.liveness();
        self.with(|i| StatusDoc {
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: self.started.elapsed().as_secs(),
            live: l.ok,
            ready: v.ok,
            reason: v.reason,
            broker: BrokerStatus {
                connected: i.connected,
                node: i.node.clone(),
                blocked: i.blocked,
            },
            app_up: i.app_up,
            circuit_breakers: i
                .circuits
                .iter()
                .map(|(app, c)| CircuitDoc {
                    app: app.clone(),
                    state: c.state,
                    since: rfc3339(c.since),
                    next_probe: c.next_probe.map(rfc3339),
                })
                .collect(),
            draining: i.draining,
            subscriptions: i
                .subs
                .iter()
                .map(|(queue, s)| SubStatus {
                    queue: queue.clone(),
                    state: s.state,
                    consumer_tag: s.consumer_tag.clone(),
                    in_flight: s.in_flight.len(),
                    last_delivery: s.last_delivery.map(|t| rfc3339(wall_clock(t))),
                    last_ack: s.last_ack.map(rfc3339),
                })
                .collect(),
        })
    }
}

/// The wall-clock time of an earlier instant (for display: the two clocks may drift apart).
fn wall_clock(t: Instant) -> SystemTime {
    SystemTime::now()
        .checked_sub(t.elapsed())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[derive(Debug, Serialize)]
pub struct StatusDoc {
    pub version: &'static str,
    pub uptime_seconds: u64,
    pub live: bool,
    pub ready: bool,
    pub reason: String,
    pub broker: BrokerStatus,
    pub app_up: bool,
    /// One per app, when the circuit breaker is on.
    pub circuit_breakers: Vec<CircuitDoc>,
    pub draining: bool,
    pub subscriptions: Vec<SubStatus>,
}

#[derive(Debug, Serialize)]
pub struct CircuitDoc {
    /// `host:port` of the app.
    pub app: String,
    pub state: CircuitState,
    pub since: String,
    pub next_probe: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct BrokerStatus {
    pub connected: bool,
    /// `host:port` only, never credentials.
    pub node: Option<String>,
    pub blocked: bool,
}

#[derive(Debug, Serialize)]
pub struct SubStatus {
    pub queue: String,
    pub state: State,
    pub consumer_tag: Option<String>,
    pub in_flight: usize,
    pub last_delivery: Option<String>,
    pub last_ack: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_fail_readiness_not_liveness() {
        let h = Health::new(&["q"], Duration::from_secs(1));
        assert!(!h.readiness().ok);
        assert!(h.readiness().reason.contains("not connected"));
        assert!(h.liveness().ok);
        h.set_connected(Some("h:1".into()));
        h.set_state("q", State::Consuming);
        assert!(h.readiness().ok);
        h.set_app_up(false);
        assert!(!h.readiness().ok);
        assert!(h.liveness().ok);
        h.set_app_up(true);
        h.set_state("q", State::Standby);
        let v = h.readiness();
        assert!(v.ok && v.reason.contains("standing by"), "{v:?}");
        h.set_draining();
        assert!(!h.readiness().ok);
        h.set_state("q", State::Consuming);
        assert_eq!(h.state("q"), Some(State::Draining));
    }

    #[test]
    fn an_open_circuit_fails_readiness_with_circuit_open_not_liveness() {
        let h = Health::new(&["q"], Duration::from_secs(1));
        h.set_connected(Some("h:1".into()));
        h.set_state("q", State::Consuming);
        let status = |state, next_probe| CircuitStatus {
            state,
            since: SystemTime::now(),
            next_probe,
        };
        h.set_circuit("app:80", status(CircuitState::Closed, None));
        assert!(h.readiness().ok);
        h.set_circuit(
            "app:80",
            status(CircuitState::Open, Some(SystemTime::now())),
        );
        let v = h.readiness();
        assert!(!v.ok && v.reason.starts_with("circuit_open"), "{v:?}");
        assert!(h.liveness().ok);
        let doc = serde_json::to_value(h.status()).unwrap();
        assert_eq!(doc["circuit_breakers"][0]["state"], "open");
        assert!(doc["circuit_breakers"][0]["next_probe"].is_string());
        h.set_circuit("app:80", status(CircuitState::HalfOpen, None));
        assert!(h.readiness().ok);
    }

    #[test]
    fn a_long_outage_is_not_a_wedge_but_a_silent_pump_is() {
        let h = Health::new(&["q"], Duration::from_secs(1));
        let long_ago = Instant::now() - LOOP_STALL - Duration::from_secs(1);
        h.with_sub("q", |s| s.loop_tick = long_ago);
        for waiting in [
            State::Connecting,
            State::PausedAppDown,
            State::PausedCircuitOpen,
        ] {
            h.set_state("q", waiting);
            assert!(h.liveness().ok, "{waiting:?}");
        }
        h.set_state("q", State::Consuming);
        assert!(!h.liveness().ok);
        h.tick("q");
        assert!(h.liveness().ok);
    }

    #[test]
    fn in_flight_tracking_and_overdue_warnings_fire_once() {
        let h = Health::new(&["q"], Duration::from_secs(1));
        h.delivered("q", 1);
        h.delivered("q", 2);
        assert_eq!(h.in_flight("q"), 2);
        assert_eq!(h.take_overdue(|_| Duration::ZERO).len(), 2);
        assert!(h.take_overdue(|_| Duration::ZERO).is_empty());
        h.settled("q", 1, true);
        h.settled("q", 2, false);
        assert_eq!(h.in_flight("q"), 0);
        assert_eq!(h.oldest_unacked_age("q"), Duration::ZERO);
        assert!(h.status().subscriptions[0].last_ack.is_some());
    }
}
