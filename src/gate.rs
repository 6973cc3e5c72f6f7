//! The app gate: whether the app can take messages. When a dispatch finds nothing listening, the
//! gate closes, every consumer loop sharing the app cancels its consumer and returns what it has
//! not started, so replicas whose apps are up take the work; a probe loop then checks the app
//! every `--app-probe-interval` and opens the gate when it answers.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::dispatch::Prober;
use crate::events::{AppAvailability, Event};
use crate::health::Health;
use crate::metrics::Metrics;

#[derive(Clone, Debug)]
pub struct AppGate {
    up: Arc<watch::Sender<bool>>,
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
        if self.up.send_if_modified(|up| !std::mem::replace(up, true)) {
            self.health.set_app_up(true);
            AppAvailability { up: true }.emit(&self.metrics);
        }
    }

    /// Nothing listens at the app: close the gate and start probing (once).
    pub fn report_down(&self) {
        if self.up.send_if_modified(|up| std::mem::replace(up, false)) {
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

    pub async fn wait_down(&self) {
        let mut rx = self.up.subscribe();
        let _ = rx.wait_for(|up| !*up).await;
    }
}
