//! Faults that disturb the shared broker (stopping its application). These run on their own,
//! after the other tests and one at a time (see `scripts/test.sh` and `.config/nextest.toml`).

use std::collections::HashSet;
use std::time::Duration;

use crate::common::*;

/// Starts the broker application again even if the test fails half-way.
struct RestartGuard;

impl Drop for RestartGuard {
    fn drop(&mut self) {
        let _ = rabbitmqctl_command().arg("start_app").output();
        let _ = rabbitmqctl_command()
            .args(["await_startup", "--timeout", "60"])
            .output();
    }
}

async fn broker_restart(quorum: bool) {
    let broker = Broker::connect().await;
    let queue = unique(if quorum { "restart-qq" } else { "restart-cq" });
    broker.declare(&queue, quorum, false).await;
    let app = App::start().await;
    app.set_delay(Duration::from_millis(10));
    let url = app.url();
    let qtype = if quorum { "quorum" } else { "classic" };
    let sidecar = Sidecar::start(&[
        "--amqp-url",
        amqp(),
        "--queue",
        &queue,
        "--target-url",
        &url,
        "--declare",
        "--queue-type",
        qtype,
        "--heartbeat",
        "2s",
        "--reconnect-backoff",
        "100ms",
        "--reconnect-backoff-max",
        "1s",
    ]);
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let ids = broker.publish_n(&queue, 300, "r").await;
    assert!(eventually(Duration::from_secs(10), || async { app.count() >= 20 }).await);

    let guard = RestartGuard;
    rabbitmqctl(&["stop_app"]);
    assert!(
        sidecar
            .wait_metric("rabbit_sidecar_connection_up", 0.0, Duration::from_secs(15))
            .await,
        "the loss is noticed"
    );
    let (status, reason) = sidecar.get("/readyz").await.unwrap();
    assert_eq!(status, 503);
    assert!(reason.contains("not connected"), "{reason}");
    assert_eq!(
        sidecar.get("/healthz").await.unwrap().0,
        200,
        "a broker outage never fails liveness"
    );
    drop(guard);

    sidecar.wait_ready(Duration::from_secs(30)).await;
    let broker = Broker::connect().await;
    broker.track(&queue);
    assert!(
        eventually(Duration::from_secs(60), || async {
            app.ids().iter().collect::<HashSet<_>>().len() == 300
        })
        .await,
        "every message processed after the restart (got {}); logs:\n{}",
        app.ids().iter().collect::<HashSet<_>>().len(),
        sidecar.logs()
    );
    let got: HashSet<String> = app.ids().into_iter().collect();
    assert_eq!(got, ids.into_iter().collect());
    assert!(
        eventually(Duration::from_secs(10), || async {
            broker.count(&queue).await.map(|c| c.0) == Some(0)
        })
        .await
    );
    let m = sidecar.metrics().await;
    assert!(metric_value(&m, "rabbit_sidecar_reconnects_total").unwrap() >= 1.0);
    let losses: f64 = ["heartbeat", "closed_by_broker", "io", "other"]
        .iter()
        .filter_map(|r| {
            metric_value(
                &m,
                &format!("rabbit_sidecar_connection_losses_total{{reason=\"{r}\"}}"),
            )
        })
        .sum();
    assert!(losses >= 1.0, "{m}");
    assert_eq!(metric_value(&m, "rabbit_sidecar_connection_up"), Some(1.0));
    broker.cleanup().await;
}

#[tokio::test]
async fn broker_stop_app_start_app_classic_loses_nothing() {
    broker_restart(false).await;
}

#[tokio::test]
async fn broker_stop_app_start_app_quorum_loses_nothing() {
    broker_restart(true).await;
}
