//! The broker session: owns the AMQP connection. Tries the configured nodes in turn, with
//! exponential backoff and jitter after each full pass, publishes each live connection as a
//! [`Session`] on a watch channel, notices its loss (heartbeat, broker close, I/O), reports it, and
//! starts over. Nothing above this module keeps a channel across a reconnect: consumers open their
//! channels on each new session.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{Connection, ConnectionProperties, Event as LapinEvent};
use rand::Rng;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::admin::health::Health;
use crate::config::{AmqpNode, Config};
use crate::telemetry::events::{
    ConnectFailed, Connected, ConnectionBlocked, ConnectionLost, Event,
};
use crate::telemetry::metrics::{LossReason, Metrics};

/// One live connection to one node.
#[derive(Debug)]
pub struct Session {
    pub connection: Connection,
    /// `host:port`, never credentials.
    pub node: String,
    pub host: String,
    pub port: u16,
    /// Counts connections made by this process, from 1.
    pub generation: u64,
}

impl Session {
    pub fn is_connected(&self) -> bool {
        self.connection.status().connected()
    }
}

/// The current session, or `None` while (re)connecting.
pub type Sessions = watch::Receiver<Option<Arc<Session>>>;

/// Why a connection attempt failed, without secrets.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{node}: {error}")]
    Amqp { node: String, error: lapin::Error },
    #[error("{node}: no answer within {timeout:?}")]
    Timeout { node: String, timeout: Duration },
    #[error("{0}")]
    Tls(String),
}

/// Reads the TLS files named in the configuration.
pub fn tls_config(config: &Config) -> Result<OwnedTLSConfig, ConnectError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| ConnectError::Tls(format!("cannot read {}: {e}", path.display())))
    };
    let cert_chain = match &config.tls_ca_file {
        Some(p) => Some(
            String::from_utf8(read(p)?)
                .map_err(|_| ConnectError::Tls(format!("{} is not a PEM file", p.display())))?,
        ),
        None => None,
    };
    let identity = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
            pem: read(cert)?,
            key: read(key)?,
        }),
        _ => None,
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

/// Connects to one node, bounded by the connect timeout.
pub async fn connect(
    node: &AmqpNode,
    config: &Config,
    tls: OwnedTLSConfig,
) -> Result<Connection, ConnectError> {
    let mut uri = node.uri.clone();
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(config.heartbeat.as_secs().max(1) as u16);
    }
    if uri.query.connection_timeout.is_none() {
        uri.query.connection_timeout = Some(config.connect_timeout.as_millis() as u64);
    }
    let name = format!("rabbit-sidecar {} pid {}", hostname(), std::process::id());
    let props = ConnectionProperties::default()
        .with_connection_name(name.into())
        .with_client_property("product".into(), "rabbit-sidecar".into())
        .with_client_property("version".into(), env!("CARGO_PKG_VERSION").into());
    let runtime = lapin::runtime::default_runtime().map_err(|error| ConnectError::Amqp {
        node: node.to_string(),
        error,
    })?;
    let attempt = Connection::connect_uri_with_config(uri, props, tls, runtime);
    match tokio::time::timeout(config.connect_timeout + Duration::from_secs(1), attempt).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(error)) => Err(ConnectError::Amqp {
            node: node.to_string(),
            error,
        }),
        Err(_) => Err(ConnectError::Timeout {
            node: node.to_string(),
            timeout: config.connect_timeout,
        }),
    }
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}

/// Exponential backoff with jitter: `base × 2^n`, capped, then a random 50–100 % of it so a fleet
/// of sidecars does not reconnect in lockstep after a broker restart.
pub fn backoff(base: Duration, max: Duration, n: u32) -> Duration {
    let full = base.saturating_mul(1u32 << n.min(20)).min(max);
    full.mul_f64(rand::rng().random_range(0.5..=1.0))
}

/// Runs the session loop until `stop` is cancelled, then closes the connection cleanly.
pub async fn run(
    config: Arc<Config>,
    metrics: Metrics,
    health: Arc<Health>,
    sessions: watch::Sender<Option<Arc<Session>>>,
    stop: CancellationToken,
) {
    let tls = match tls_config(&config) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "TLS configuration unusable; only plain amqp:// nodes can be reached");
            OwnedTLSConfig::default()
        }
    };
    let nodes = &config.nodes;
    let mut index = 0usize;
    let mut failed_passes = 0u32;
    let mut generation = 0u64;
    while !stop.is_cancelled() {
        let node = &nodes[index % nodes.len()];
        let result = tokio::select! {
            r = connect(node, &config, tls.clone()) => r,
            _ = stop.cancelled() => break,
        };
        let connection = match result {
            Ok(c) => c,
            Err(e) => {
                ConnectFailed {
                    node: &node.to_string(),
                    error: &connect_error_text(&e),
                }
                .emit(&metrics);
                index += 1;
                if index.is_multiple_of(nodes.len()) {
                    let delay = backoff(
                        config.reconnect_backoff,
                        config.reconnect_backoff_max,
                        failed_passes,
                    );
                    failed_passes = failed_passes.saturating_add(1);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.cancelled() => break,
                    }
                }
                continue;
            }
        };
        failed_passes = 0;
        generation += 1;
        let session = Arc::new(Session {
            connection,
            node: node.to_string(),
            host: node.host().to_string(),
            port: node.port(),
            generation,
        });
        Connected {
            node: &session.node,
            reconnect: generation > 1,
        }
        .emit(&metrics);
        health.set_connected(Some(session.node.clone()));
        sessions.send_replace(Some(session.clone()));

        let lost = watch_session(&session, &metrics, &health, &stop).await;
        sessions.send_replace(None);
        health.set_connected(None);
        match lost {
            Some((reason, error)) => {
                ConnectionLost {
                    node: &session.node,
                    reason,
                    error: &error,
                }
                .emit(&metrics);
                // Try the next node first: the one we lost may be going down.
                index += 1;
            }
            None => {
                if session.is_connected() {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        session
                            .connection
                            .close(200, "rabbit-sidecar shutting down".into()),
                    )
                    .await;
                }
                metrics.connection_up.set(0);
                tracing::info!(node = %session.node, "connection closed");
                return;
            }
        }
    }
    metrics.connection_up.set(0);
}

fn connect_error_text(e: &ConnectError) -> String {
    match e {
        ConnectError::Amqp { error, .. } => error.to_string(),
        other => other.to_string(),
    }
}

/// Waits until the connection is lost (returns why) or `stop` is cancelled (returns `None`).
/// Channel-level errors arrive on the same event stream; they are the consumers' business.
async fn watch_session(
    session: &Session,
    metrics: &Metrics,
    health: &Health,
    stop: &CancellationToken,
) -> Option<(LossReason, String)> {
    let mut events = Box::pin(session.connection.events_listener());
    // A backstop for losses that arrive without an event.
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return None,
            event = events.next() => match event {
                Some(LapinEvent::Error(e)) if !session.is_connected() => {
                    return Some((LossReason::of(&e), e.to_string()));
                }
                Some(LapinEvent::ConnectionBlocked(reason)) => {
                    health.set_blocked(true);
                    ConnectionBlocked { blocked: true, reason: &reason }.emit(metrics);
                }
                Some(LapinEvent::ConnectionUnblocked) => {
                    health.set_blocked(false);
                    ConnectionBlocked { blocked: false, reason: "" }.emit(metrics);
                }
                Some(_) => {}
                None => return Some((LossReason::Other, "event stream ended".into())),
            },
            _ = tick.tick() => {
                if !session.is_connected() {
                    return Some(why_lost(&mut events).await);
                }
            }
        }
    }
}

/// Why a connection the backstop found closed was lost. lapin marks a connection failed before
/// it sends the error event that says why (a missed heartbeat, say), so the tick can come first:
/// the event gets a moment to arrive before the loss is put down as "other".
async fn why_lost(
    events: &mut (impl futures_util::Stream<Item = LapinEvent> + Unpin),
) -> (LossReason, String) {
    // The event follows within microseconds when it comes at all; a connection closed without
    // one must not wait long for it.
    let error = tokio::time::timeout(Duration::from_millis(50), async {
        while let Some(event) = events.next().await {
            if let LapinEvent::Error(e) = event {
                return Some(e);
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    match error {
        Some(e) => (LossReason::of(&e), e.to_string()),
        None => (LossReason::Other, "connection no longer connected".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_stays_capped() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        for n in 0..30 {
            let d = backoff(base, max, n);
            let full = base.saturating_mul(1 << n.min(20)).min(max);
            assert!(d >= full / 2 && d <= full, "n={n} d={d:?}");
        }
    }
}
