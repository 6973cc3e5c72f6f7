//! `rabbit-sidecar check`: validates what `run` would use, one line per finding, and fails on the
//! first thing that would stop the sidecar from working.

use std::fmt::Write;

use crate::app::Prober;
use crate::broker::facts::QueueFacts;
use crate::broker::management::Management;
use crate::broker::{self, topology};
use crate::config::{Config, SubscriptionConfig};

/// Why the check failed; the binary maps it to an exit code (69, `EX_UNAVAILABLE`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CheckFailed(pub String);

/// Runs the checks, writing a report line per finding into `report`.
pub async fn check(config: &Config, report: &mut String) -> Result<(), CheckFailed> {
    let queues = config.queues().join(", ");
    let _ = writeln!(
        report,
        "configuration: ok ({} subscription(s): {queues}; {} broker node(s))",
        config.subscriptions.len(),
        config.nodes.len()
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
    let mut failures = Vec::new();
    for sub in &config.subscriptions {
        let result = topology::inspect(&connection, &sub.queue).await;
        match result {
            Ok((ready, consumers)) => {
                let _ = writeln!(
                    report,
                    "queue {:?}: exists, {ready} ready, {consumers} consumer(s)",
                    sub.queue
                );
                if !sub.declare {
                    delivery_limit(config, sub, report).await;
                }
            }
            Err(e) if sub.declare => {
                let _ = writeln!(
                    report,
                    "queue {:?}: missing ({e}); --declare will create it",
                    sub.queue
                );
            }
            Err(e) => {
                let _ = writeln!(
                    report,
                    "queue {:?}: FAILED: {e} (start with --declare to create it)",
                    sub.queue
                );
                failures.push(format!("queue {:?} is not usable", sub.queue));
            }
        }
    }
    let _ = connection.close(200, "check done".into()).await;
    let mut targets: Vec<_> = config
        .subscriptions
        .iter()
        .map(|s| s.target_url.clone())
        .collect();
    targets.dedup();
    for target in targets {
        if Prober::new(target.clone(), config.app_health_url.clone())
            .probe()
            .await
        {
            let _ = writeln!(report, "app {target}: reachable");
        } else {
            let _ = writeln!(report, "app {target}: FAILED: not reachable");
            failures.push(format!("the app at {target} is not reachable"));
        }
    }
    match failures.is_empty() {
        true => Ok(()),
        false => Err(CheckFailed(failures.join("; "))),
    }
}

/// Warns about a delivery limit on a queue the sidecar did not declare (see
/// [`QueueFacts::warnings`]); says when it could not be checked.
async fn delivery_limit(config: &Config, sub: &SubscriptionConfig, report: &mut String) {
    let Some(api) = Management::from_config(config) else {
        let _ = writeln!(
            report,
            "queue {:?}: delivery limit and dead-letter exchange not checked (needs --management-url)",
            sub.queue
        );
        return;
    };
    let (facts, unknown) = QueueFacts::learn(Some(api), &sub.queue).await;
    if let Some(why) = unknown {
        let _ = writeln!(report, "queue {:?}: WARNING: {why}", sub.queue);
        return;
    }
    let warnings = facts.warnings(&sub.queue, &sub.dead_letter_queue, sub.max_deliveries);
    if warnings.is_empty() {
        let limit = facts.limit.map_or("no delivery limit".to_string(), |l| {
            format!("delivery limit {l}")
        });
        let _ = writeln!(report, "queue {:?}: {limit}, ok", sub.queue);
    }
    for warning in warnings {
        let _ = writeln!(report, "queue {:?}: WARNING: {warning}", sub.queue);
    }
}
