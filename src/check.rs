//! `rabbit-sidecar check`: validates what `run` would use, one line per finding, and fails on the
//! first thing that would stop the sidecar from working.

use std::fmt::Write;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

use crate::broker;
use crate::config::Config;
use crate::dispatch::Dispatcher;

/// Why the check failed; the binary maps it to an exit code (69, `EX_UNAVAILABLE`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CheckFailed(pub String);

/// Runs the checks, writing a report line per finding into `report`.
pub async fn check(config: &Config, report: &mut String) -> Result<(), CheckFailed> {
    let _ = writeln!(
        report,
        "configuration: ok (queue {:?}, {} broker node(s), target {})",
        config.queue,
        config.nodes.len(),
        config.target_url
    );
    let tls = broker::tls_config(config).map_err(|e| CheckFailed(format!("TLS: {e}")))?;
    let mut connection = None;
    for node in &config.nodes {
        match broker::connect(node, config, tls.clone()).await {
            Ok(c) => {
                let _ = writeln!(report, "broker {node}: connected");
                connection = Some(c);
                break;
            }
            Err(e) => {
                let _ = writeln!(report, "broker {node}: FAILED: {e}");
            }
        }
    }
    let connection =
        connection.ok_or_else(|| CheckFailed("no broker node could be reached".into()))?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| CheckFailed(format!("opening a channel: {e}")))?;
    let queue_result = channel
        .queue_declare(
            config.queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    let queue_ok = match &queue_result {
        Ok(q) => {
            let _ = writeln!(
                report,
                "queue {:?}: exists, {} ready, {} consumer(s)",
                config.queue,
                q.message_count(),
                q.consumer_count()
            );
            true
        }
        Err(e) if config.declare => {
            let _ = writeln!(
                report,
                "queue {:?}: missing ({e}); --declare will create it",
                config.queue
            );
            true
        }
        Err(e) => {
            let _ = writeln!(
                report,
                "queue {:?}: FAILED: {e} (start with --declare to create it)",
                config.queue
            );
            false
        }
    };
    let _ = connection.close(200, "check done".into()).await;
    let dispatcher = Dispatcher::new(
        config.target_url.clone(),
        config.handler_timeout,
        config.app_health_url.clone(),
    );
    let app_ok = dispatcher.prober().probe().await;
    if app_ok {
        let _ = writeln!(report, "app {}: reachable", config.target_url);
    } else {
        let _ = writeln!(report, "app {}: FAILED: not reachable", config.target_url);
    }
    match (queue_ok, app_ok) {
        (true, true) => Ok(()),
        (false, _) => Err(CheckFailed(format!(
            "queue {:?} is not usable",
            config.queue
        ))),
        (_, false) => Err(CheckFailed(format!(
            "the app at {} is not reachable",
            config.target_url
        ))),
    }
}
