//! The app gate: whether the app can take messages. When a dispatch finds nothing listening, the
//! gate closes, every consumer loop sharing the app cancels its consumer and returns what it has
//! not started, so replicas whose apps are up take the work; a probe loop then checks the app
//! every `--app-probe-interval` and opens the gate when it answers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::admin::health::Health;
use crate::app::dispatch::Prober;
use crate::telemetry::events::{AppAvailability, Event};
use crate::telemetry::metrics::Metrics;

#[derive(Clone, Debug)]
pub struct AppGate {
    up: Arc<watch::Sender<bool>>,
    /// Cancelled when the gate closes or the sidecar shuts down (a child of `shutdown`); a fresh
    /// one replaces it when the gate opens again. Consumer loops wait on this one token rather
    /// than on the gate and the shutdown separately: they check it once per delivery, and each
    /// wait costs a lock.
    closing: Arc<Mutex<CancellationToken>>,
    prober: Prober,
    interval: Duration,
    metrics: Metrics,
    health: Arc<Health>,
    shutdown: CancellationToken,
}

impl AppGate {
    pub fn new(
        prober: Prober,
        interval: Duration,
        metrics: Metrics,
        health: Arc<Health>,
        shutdown: CancellationToken,
    ) -> AppGate {
        metrics.app_up.set(1);
        AppGate {
            up: Arc::new(watch::Sender::new(true)),
            closing: Arc::new(Mutex::new(shutdown.child_token())),
            prober,
            interval,
            metrics,
            health,
            shutdown,
        }
    }

    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    /// The app answered something: it is up.
    pub fn report_up(&self) {
        // Every answer reports: look first, so the usual case (up already) takes no write lock.
        if self.is_up() {
            return;
        }
        // The token and the flag change together, under the token's lock: a close and an open
        // racing each other must not leave the gate open with its token cancelled.
        let mut closing = self.closing.lock().unwrap_or_else(|p| p.into_inner());
        if closing.is_cancelled() && !self.shutdown.is_cancelled() {
            *closing = self.shutdown.child_token();
        }
        let opened = self.up.send_if_modified(|up| !std::mem::replace(up, true));
        drop(closing);
        if opened {
            self.health.set_app_up(true);
            AppAvailability { up: true }.emit(&self.metrics);
        }
    }

    /// Nothing listens at the app: close the gate and start probing (once).
    pub fn report_down(&self) {
        let closing = self.closing.lock().unwrap_or_else(|p| p.into_inner());
        let closed = self.up.send_if_modified(|up| std::mem::replace(up, false));
        if closed {
            closing.cancel();
        }
        drop(closing);
        if closed {
            self.health.set_app_up(false);
            AppAvailability { up: false }.emit(&self.metrics);
            let gate = self.clone();
            tokio::spawn(async move { gate.probe_until_up().await });
        }
    }

    async fn probe_until_up(&self) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.is_up() {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.cancelled() => return,
            }
            if self.prober.probe().await {
                self.report_up();
            }
        }
    }

    pub async fn wait_up(&self) {
        let mut rx = self.up.subscribe();
        let _ = rx.wait_for(|up| *up).await;
    }

    /// A token cancelled once the gate closes or the sidecar shuts down (already cancelled if
    /// either has happened).
    pub fn closing(&self) -> CancellationToken {
        self.closing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(shutdown: &CancellationToken) -> AppGate {
        // Nothing listens on port 9 here: the probe loop started by a close keeps failing.
        let prober = Prober::new("http://127.0.0.1:9/".parse().unwrap(), None);
        AppGate::new(
            prober,
            Duration::from_secs(60),
            Metrics::new(&[]),
            Arc::new(Health::new(&[], Duration::from_secs(1))),
            shutdown.clone(),
        )
    }

    #[tokio::test]
    async fn the_closing_token_follows_the_gate_and_the_shutdown() {
        let shutdown = CancellationToken::new();
        let gate = gate(&shutdown);
        let open = gate.closing();
        assert!(!open.is_cancelled());

        gate.report_down();
        assert!(!gate.is_up());
        assert!(
            open.is_cancelled(),
            "the token taken while open is cancelled"
        );
        assert!(
            gate.closing().is_cancelled(),
            "a token taken while closed is too"
        );

        gate.report_up();
        assert!(gate.is_up());
        let reopened = gate.closing();
        assert!(
            !reopened.is_cancelled(),
            "opening again gives a fresh token"
        );
        gate.report_up();
        assert!(!gate.closing().is_cancelled());

        shutdown.cancel();
        assert!(reopened.is_cancelled(), "the shutdown cancels it as well");
        gate.report_down();
        gate.report_up();
        assert!(
            gate.closing().is_cancelled(),
            "after the shutdown no fresh token is made"
        );
    }
}
