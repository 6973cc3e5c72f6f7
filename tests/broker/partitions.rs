//! Silent network partitions and slow links between the sidecar and the broker, through the
//! in-test TCP proxy (`tests/common/proxy.rs`). Only the sidecar's own connections are disturbed,
//! so these run beside the other tests.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::proxy::{Mode, Proxy};
use crate::common::*;

const HEARTBEAT: Duration = Duration::from_secs(2);

fn broker_addr() -> SocketAddr {
    amqp_addr().parse().unwrap()
}

fn losses(m: &str) -> f64 {
    ["heartbeat", "closed_by_broker", "io", "other"]
        .iter()
        .filter_map(|r| {
            metric_value(
                m,
                &format!("rabbit_sidecar_connection_losses_total{{reason=\"{r}\"}}"),
            )
        })
        .sum()
}

fn spawn(queue: &str, urls: &str, app: &App) -> Sidecar {
    Sidecar::start(&[
        "--amqp-url",
        urls,
        "--queue",
        queue,
        "--target-url",
        &app.url(),
        "--heartbeat",
        "2s",
        "--connect-timeout",
        "2s",
        "--reconnect-backoff",
        "100ms",
        "--reconnect-backoff-max",
        "1s",
        "--prefetch",
        "10",
        "--concurrency",
        "4",
        "--queue-poll-interval",
        "1s",
    ])
}

async fn all_accepted(app: &App, ids: &[String], timeout: Duration) -> bool {
    let want: HashSet<&String> = ids.iter().collect();
    eventually(timeout, || async {
        let got: HashSet<String> = app.ids().into_iter().collect();
        want.iter().all(|id| got.contains(*id))
    })
    .await
}

/// The heartbeat timeout is about two intervals; the promise is to notice within twice that.
const NOTICE_WITHIN: Duration = Duration::from_secs(HEARTBEAT.as_secs() * 4);

#[tokio::test]
async fn silent_partition_is_noticed_by_heartbeat_and_fails_over_to_the_other_path() {
    let broker = Broker::connect().await;
    let queue = unique("partition");
    broker.declare(&queue, false, false).await;
    let app = App::start().await;
    app.set_delay(Duration::from_millis(20));
    let (p1, p2) = (
        Proxy::start(broker_addr()).await,
        Proxy::start(broker_addr()).await,
    );
    let sidecar = spawn(&queue, &format!("{},{}", p1.url(), p2.url()), &app);
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let ids = broker.publish_n(&queue, 200, "p").await;
    assert!(eventually(Duration::from_secs(10), || async { app.count() >= 20 }).await);
    assert_eq!(p2.accepted.load(std::sync::atomic::Ordering::Relaxed), 0);

    p1.set(Mode::Blackhole);
    let cut = Instant::now();
    assert!(
        eventually(NOTICE_WITHIN, || async {
            losses(&sidecar.metrics().await) >= 1.0
        })
        .await,
        "the silent partition was not noticed within {NOTICE_WITHIN:?}; logs:\n{}",
        sidecar.logs()
    );
    let noticed = cut.elapsed();
    let m = sidecar.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "rabbit_sidecar_connection_losses_total{reason=\"heartbeat\"}"
        ),
        Some(1.0),
        "a silent peer is a missed heartbeat: {m}"
    );
    sidecar.wait_ready(Duration::from_secs(15)).await;
    assert!(p2.accepted.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    assert!(
        all_accepted(&app, &ids, Duration::from_secs(60)).await,
        "lost messages; logs:\n{}",
        sidecar.logs()
    );
    assert!(
        eventually(Duration::from_secs(20), || async {
            broker.count(&queue).await.map(|c| c.0) == Some(0)
        })
        .await
    );
    let m = sidecar.metrics().await;
    assert!(metric_value(&m, "rabbit_sidecar_reconnects_total").unwrap() >= 1.0);
    assert_eq!(metric_value(&m, "rabbit_sidecar_connection_up"), Some(1.0));
    println!(
        "partition noticed after {noticed:?}; {} deliveries to the app for {} ids",
        app.count(),
        ids.len()
    );
    p1.cut();
    broker.cleanup().await;
}

#[tokio::test]
async fn silent_partition_on_the_only_path_reconnects_when_it_heals() {
    let broker = Broker::connect().await;
    let queue = unique("partition-heal");
    broker.declare(&queue, true, false).await;
    let app = App::start().await;
    app.set_delay(Duration::from_millis(20));
    let proxy = Proxy::start(broker_addr()).await;
    let sidecar = spawn(&queue, &proxy.url(), &app);
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let ids = broker.publish_n(&queue, 150, "h").await;
    assert!(eventually(Duration::from_secs(10), || async { app.count() >= 20 }).await);

    proxy.set(Mode::Blackhole);
    assert!(
        eventually(NOTICE_WITHIN, || async {
            losses(&sidecar.metrics().await) >= 1.0
        })
        .await,
        "the silent partition was not noticed; logs:\n{}",
        sidecar.logs()
    );
    let (status, reason) = sidecar.get("/readyz").await.unwrap();
    assert_eq!(status, 503, "{reason}");
    // Attempts through the partition get no handshake: they time out and are counted.
    assert!(
        eventually(Duration::from_secs(15), || async {
            sidecar
                .metric("rabbit_sidecar_connect_failures_total")
                .await
                >= 1.0
        })
        .await,
        "{}",
        sidecar.logs()
    );
    assert_eq!(sidecar.get("/healthz").await.unwrap().0, 200);

    proxy.set(Mode::Forward);
    proxy.cut();
    sidecar.wait_ready(Duration::from_secs(20)).await;
    assert!(
        all_accepted(&app, &ids, Duration::from_secs(60)).await,
        "lost messages; logs:\n{}",
        sidecar.logs()
    );
    assert!(
        eventually(Duration::from_secs(20), || async {
            broker.count(&queue).await.map(|c| c.0) == Some(0)
        })
        .await
    );
    let m = sidecar.metrics().await;
    assert!(metric_value(&m, "rabbit_sidecar_reconnects_total").unwrap() >= 1.0);
    assert!(
        metric_value(
            &m,
            "rabbit_sidecar_connection_losses_total{reason=\"heartbeat\"}"
        )
        .unwrap()
            >= 1.0,
        "{m}\nlogs:\n{}",
        sidecar.logs()
    );
    broker.cleanup().await;
}

#[tokio::test]
async fn a_slow_link_delays_but_neither_drops_the_connection_nor_loses_messages() {
    let broker = Broker::connect().await;
    let queue = unique("slow-link");
    broker.declare(&queue, false, false).await;
    let app = App::start().await;
    let proxy = Proxy::start(broker_addr()).await;
    proxy.set(Mode::Slow(Duration::from_millis(40)));
    let sidecar = spawn(&queue, &proxy.url(), &app);
    sidecar.wait_ready(Duration::from_secs(30)).await;
    let ids = broker.publish_n(&queue, 100, "s").await;
    assert!(
        all_accepted(&app, &ids, Duration::from_secs(90)).await,
        "lost messages; logs:\n{}",
        sidecar.logs()
    );
    assert!(
        eventually(Duration::from_secs(30), || async {
            metric_value(
                &sidecar.metrics().await,
                &format!("rabbit_sidecar_acks_total{{queue=\"{queue}\"}}"),
            ) == Some(100.0)
        })
        .await
    );
    let m = sidecar.metrics().await;
    assert_eq!(losses(&m), 0.0, "a slow link is not a dead one: {m}");
    assert_eq!(
        metric_value(&m, "rabbit_sidecar_reconnects_total"),
        Some(0.0)
    );
    assert_eq!(app.count(), 100, "no redeliveries on a slow link");
    broker.cleanup().await;
}
