//! Periodic observations: the gauges that are a function of time (in-flight, oldest unacked age,
//! readiness), the delivery-ack timeout warning, and the queue's depth and consumer count polled
//! from the broker, from which "active or standby" is decided, with the depth of its retry and
//! dead-letter queues.
//!
//! Active/standby rule (AMQP 0-9-1 does not tell a consumer whether it is the single active one):
//! with `--management-url`, the management API's `consumers` list for the queue says whether this
//! consumer tag is `active`. Without it, a consumer is active when it is not single-active, or when
//! it is the queue's only consumer, holds messages, or received one within the last two poll
//! intervals; otherwise it is standby.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::admin::health::{Health, State};
use crate::broker::Sessions;
use crate::broker::facts::QueueFacts;
use crate::broker::management::Management;
use crate::broker::topology;
use crate::config::Config;
use crate::telemetry::events::{AckTimeoutWarning, Event};
use crate::telemetry::metrics::Metrics;

/// Sets the time-derived gauges from the health state. Also called on every scrape.
pub fn refresh(metrics: &Metrics, health: &Health, queues: &[String]) {
    for q in queues {
        metrics
            .in_flight
            .with_label_values(&[q])
            .set(health.in_flight(q) as i64);
        metrics
            .oldest_unacked_age
            .with_label_values(&[q])
            .set(health.oldest_unacked_age(q).as_secs_f64());
    }
    metrics.ready.set(i64::from(health.readiness().ok));
}

pub async fn run(
    config: Arc<Config>,
    metrics: Metrics,
    health: Arc<Health>,
    sessions: Sessions,
    stop: CancellationToken,
) {
    metrics
        .consumer_timeout
        .set(config.consumer_timeout.as_secs_f64());
    // Each queue's delivery-acknowledgement timeout: its own where the management API tells one,
    // else --broker-consumer-timeout.
    let mut timeouts: HashMap<String, Duration> = HashMap::new();
    let queues = config.queues();
    let management = Management::from_config(&config);
    let mut fast = tokio::time::interval(Duration::from_secs(1));
    let mut slow = tokio::time::interval(config.queue_poll_interval);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = fast.tick() => {
                refresh(&metrics, &health, &queues);
                let timeout = |q: &str| timeouts.get(q).copied().unwrap_or(config.consumer_timeout);
                for overdue in health.take_overdue(|q| timeout(q).mul_f64(0.8)) {
                    AckTimeoutWarning { queue: &overdue.queue, age: overdue.age, timeout: timeout(&overdue.queue) }.emit(&metrics);
                }
            }
            _ = slow.tick() => {
                let session = sessions.borrow().clone();
                let Some(session) = session else { continue };
                for sub in &config.subscriptions {
                    let q = &sub.queue;
                    // One management API answer about the queue per poll: its own delivery-ack
                    // timeout, and (below) whether this replica is its active consumer.
                    let described = match &management {
                        Some(api) => {
                            let described = api.queue(q).await;
                            let own_timeout = described
                                .as_ref()
                                .and_then(|d| QueueFacts::from_management(d, None))
                                .and_then(|facts| facts.consumer_timeout);
                            match own_timeout {
                                Some(t) => timeouts.insert(q.clone(), t),
                                None => timeouts.remove(q),
                            };
                            described
                        }
                        None => None,
                    };
                    let consumers = match topology::inspect(&session.connection, q).await {
                        Ok((ready, consumers)) => {
                            metrics.queue_messages_ready.with_label_values(&[q]).set(i64::from(ready));
                            metrics.queue_consumers.with_label_values(&[q]).set(i64::from(consumers));
                            Some(i64::from(consumers))
                        }
                        Err(e) => {
                            tracing::debug!(queue = %q, error = %e, "queue poll failed");
                            None
                        }
                    };
                    // The depth of its companions: retries waiting out their backoff, and dead
                    // letters nobody has looked at yet.
                    for (companion, gauge) in [
                        (&sub.retry_queue, &metrics.retry_queue_messages),
                        (&sub.dead_letter_queue, &metrics.dead_letter_queue_messages),
                    ] {
                        match topology::inspect(&session.connection, companion).await {
                            Ok((ready, _)) => gauge.with_label_values(&[q]).set(i64::from(ready)),
                            Err(e) => tracing::debug!(queue = %companion, error = %e, "queue poll failed"),
                        }
                    }
                    // The management API's word when it has one; otherwise the inference rule.
                    let from_api = match (&described, health.consumer_tag(q)) {
                        (Some(d), Some(tag)) => Management::consumer_active(d, &tag),
                        _ => None,
                    };
                    let active = from_api.unwrap_or_else(|| {
                        health.infer_active(q, sub.single_active_consumer, consumers, config.queue_poll_interval * 2)
                    });
                    metrics.consumer_active.with_label_values(&[q]).set(i64::from(active));
                    match health.state(q) {
                        Some(State::Consuming) if !active => health.set_state(q, State::Standby),
                        Some(State::Standby) if active => health.set_state(q, State::Consuming),
                        _ => {}
                    }
                }
            }
        }
    }
}
