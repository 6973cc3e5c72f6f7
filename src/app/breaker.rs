//! The circuit breaker in front of the app: the [app gate](super::gate)'s sibling. The gate asks
//! "is anything listening?", the breaker "is it worth calling?". Both close the same valve: while
//! the circuit is open, every consumer loop that dispatches to this app cancels its consumer and
//! parks what it has not started (a retry copy that keeps its attempt count), so a sick app is
//! neither hammered nor allowed to burn healthy messages' attempts.
//!
//! The decisions are [`super::circuit`]'s (pure, time passed in); this module runs it: it keeps
//! the state behind a lock, turns the circuit half-open when its open time is over, and reports
//! every change (event, metrics, health). One breaker per app (scheme, host and port of the
//! target): subscriptions that post to different paths of one app share it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use super::circuit::{Admission, CircuitConfig, CircuitState};
use super::circuit::{Call, Circuit, Transition};
use crate::admin::health::{CircuitStatus, Health};
use crate::policy::Outcome;
use crate::telemetry::events::{CircuitChanged, Event};
use crate::telemetry::metrics::Metrics;

#[derive(Clone, Debug)]
pub struct Breaker {
    inner: Option<Arc<Inner>>,
    shutdown: CancellationToken,
}

#[derive(Debug)]
struct Inner {
    /// The app as metrics and `/status` name it: `host:port` of the target.
    app: String,
    circuit: Mutex<Circuit>,
    state: watch::Sender<CircuitState>,
    /// Cancelled when the circuit opens or the sidecar shuts down; a fresh one replaces it when
    /// the circuit leaves `Open` (see the gate's token, which works the same way).
    closing: Mutex<CancellationToken>,
    metrics: Metrics,
    health: Arc<Health>,
}

impl Breaker {
    /// A breaker for `app`; `config` `None` (`--circuit-breaker=false`) admits everything.
    pub fn new(
        app: String,
        config: Option<CircuitConfig>,
        metrics: Metrics,
        health: Arc<Health>,
        shutdown: CancellationToken,
    ) -> Breaker {
        let inner = config.map(|config| {
            metrics.add_app(&app);
            let inner = Arc::new(Inner {
                circuit: Mutex::new(Circuit::new(config, Instant::now())),
                state: watch::Sender::new(CircuitState::Closed),
                closing: Mutex::new(shutdown.child_token()),
                metrics,
                health,
                app,
            });
            inner.publish(None);
            inner
        });
        Breaker { inner, shutdown }
    }

    /// The app's `host:port`, as the breaker names it.
    pub fn app_of(target: &hyper::Uri) -> String {
        let port = target.port_u16().unwrap_or(match target.scheme_str() {
            Some("https") => 443,
            _ => 80,
        });
        format!("{}:{port}", target.host().unwrap_or("?"))
    }

    pub fn state(&self) -> CircuitState {
        match &self.inner {
            Some(i) => *i.state.borrow(),
            None => CircuitState::Closed,
        }
    }

    pub fn is_open(&self) -> bool {
        self.state() == CircuitState::Open
    }

    /// Whether a message may go to the app now (see [`Circuit::admit`]).
    pub fn admit(&self) -> Admission {
        let Some(inner) = &self.inner else {
            return Admission::Pass;
        };
        let (admission, transition) = inner.with(|c| {
            let now = Instant::now();
            let t = c.tick(now);
            (c.admit(now), t)
        });
        if let Some(t) = transition {
            inner.changed(self, t);
        }
        admission
    }

    /// Records the app's answer to an admitted call (`probe`: it was admitted as the probe);
    /// Returns whether a failure is the outage's rather than the message's. `retry_after` is
    /// the app's, already capped.
    /// `message` names the message (a hash of its identity): an outage fails many.
    pub fn record(
        &self,
        outcome: &Outcome,
        retry_after: Option<Duration>,
        probe: bool,
        message: impl FnOnce() -> u64,
    ) -> bool {
        let Some(inner) = &self.inner else {
            return false;
        };
        let call = match outcome {
            Outcome::Success { .. } | Outcome::Rejected { .. } => Call::Healthy,
            Outcome::Retryable { .. } => Call::Failed {
                retry_after,
                message: message(),
            },
            Outcome::Unreachable => {
                // The gate's business: says nothing about the app's health when it answers.
                if probe {
                    inner.with(|c| c.abandon_probe());
                }
                return false;
            }
        };
        let recorded = inner.with(|c| c.record(call, Instant::now()));
        if let Some(t) = recorded.transition {
            inner.changed(self, t);
        } else if recorded.outage && retry_after.is_some() {
            // A Retry-After may have lengthened the open time.
            inner.publish(None);
        }
        recorded.outage
    }

    /// An admitted probe got no answer (shutdown): the next message probes instead.
    pub fn abandon_probe(&self) {
        if let Some(inner) = &self.inner {
            inner.with(|c| c.abandon_probe());
        }
    }

    /// How long until the open circuit lets a probe through (zero when it is not open).
    pub fn until_probe(&self) -> Duration {
        let Some(inner) = &self.inner else {
            return Duration::ZERO;
        };
        inner
            .with(|c| c.next_probe())
            .map(|at| at.saturating_duration_since(Instant::now()))
            .unwrap_or_default()
    }

    /// Waits until the circuit is in another state than `state` (or shutdown).
    pub async fn wait_leaves(&self, state: CircuitState) {
        let Some(inner) = &self.inner else { return };
        let mut rx = inner.state.subscribe();
        tokio::select! {
            _ = rx.wait_for(|s| *s != state) => {}
            _ = self.shutdown.cancelled() => {}
        }
    }

    /// A token cancelled once the circuit opens or the sidecar shuts down.
    pub fn closing(&self) -> CancellationToken {
        match &self.inner {
            Some(i) => i.closing.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            None => self.shutdown.child_token(),
        }
    }

    /// Sleeps until the open time is over and turns the circuit half-open; the open time may be
    /// lengthened meanwhile by a late Retry-After, so it is read again after each sleep.
    async fn turn_half_open(self) {
        let Some(inner) = &self.inner else { return };
        loop {
            let until = inner.with(|c| c.next_probe());
            let Some(until) = until else { return };
            tokio::select! {
                _ = tokio::time::sleep_until(until.into()) => {}
                _ = self.shutdown.cancelled() => return,
            }
            let t = inner.with(|c| c.tick(Instant::now()));
            if let Some(t) = t {
                inner.changed(&self, t);
                return;
            }
        }
    }
}

impl Inner {
    fn with<R>(&self, f: impl FnOnce(&mut Circuit) -> R) -> R {
        f(&mut self.circuit.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Tells health and metrics where the circuit stands; emits the transition, if any.
    fn publish(&self, transition: Option<Transition>) {
        let (state, since, next_probe) = self.with(|c| (c.state(), c.since(), c.next_probe()));
        let wall = |t: Instant| {
            let now = Instant::now();
            if t >= now {
                SystemTime::now() + (t - now)
            } else {
                SystemTime::now() - (now - t)
            }
        };
        self.health.set_circuit(
            &self.app,
            CircuitStatus {
                state,
                since: wall(since),
                next_probe: next_probe.map(wall),
            },
        );
        CircuitChanged {
            app: &self.app,
            state,
            transition,
            next_probe_in: next_probe.map(|t| t.saturating_duration_since(Instant::now())),
        }
        .emit(&self.metrics);
    }

    fn changed(&self, breaker: &Breaker, t: Transition) {
        {
            // The token and the watched state change together (as in the gate).
            let mut closing = self.closing.lock().unwrap_or_else(|p| p.into_inner());
            if t.to == CircuitState::Open {
                closing.cancel();
            } else if closing.is_cancelled() && !breaker.shutdown.is_cancelled() {
                *closing = breaker.shutdown.child_token();
            }
            self.state.send_replace(t.to);
        }
        self.publish(Some(t));
        if t.to == CircuitState::Open {
            tokio::spawn(breaker.clone().turn_half_open());
        }
    }
}
