//! Topology and subscriptions on the real broker: a topic exchange with two bindings routes only
//! matching messages; two subscriptions reach different app paths; a conflicting declaration
//! stops start-up with a clear error; deleting one subscription's queue leaves the other consuming.

use std::time::Duration;

use crate::common::*;
use lapin::options::{
    BasicPublishOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, ExchangeKind};

async fn publish_to(broker: &Broker, exchange: &str, key: &str, body: &str) {
    broker
        .ch
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

async fn delete_exchange(broker: &Broker, exchange: &str) {
    let ch = broker.conn.create_channel().await.unwrap();
    let _ = ch
        .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
        .await;
}

fn config_file(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("sidecar.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

#[tokio::test]
async fn topic_bindings_route_only_matching_messages() {
    let broker = Broker::connect().await;
    let queue = unique("topic");
    let exchange = unique("shop");
    broker.track(&queue);
    let app = App::start().await;
    let url = app.url();
    let sidecar = Sidecar::start(&declared(
        &queue,
        &url,
        &[
            "--exchange",
            &exchange,
            "--exchange-type",
            "topic",
            "--binding-key",
            "order.created",
            "--binding-key",
            "payment.*",
        ],
    ));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    for (key, body) in [
        ("order.created", "a"),
        ("order.cancelled", "x"),
        ("payment.done", "b"),
        ("payment.done.late", "y"),
    ] {
        publish_to(&broker, &exchange, key, body).await;
    }
    assert!(eventually(Duration::from_secs(10), || async { app.count() == 2 }).await);
    let mut got = app.ids();
    got.sort();
    assert_eq!(got, ["a", "b"]);
    let keys: Vec<String> = app
        .received()
        .iter()
        .map(|r| r.header("x-amqp-routing-key").unwrap().to_string())
        .collect();
    assert!(
        keys.contains(&"order.created".to_string()) && keys.contains(&"payment.done".to_string())
    );
    assert!(
        app.received()
            .iter()
            .all(|r| r.header("x-amqp-exchange") == Some(exchange.as_str()))
    );

    // Starting again with the same declarations is fine (idempotent).
    drop(sidecar);
    let again = Sidecar::start(&declared(
        &queue,
        &url,
        &[
            "--exchange",
            &exchange,
            "--exchange-type",
            "topic",
            "--binding-key",
            "order.created",
        ],
    ));
    again.wait_ready(Duration::from_secs(20)).await;
    broker.cleanup().await;
    delete_exchange(&broker, &exchange).await;
}

#[tokio::test]
async fn two_subscriptions_reach_different_app_paths_and_survive_each_other() {
    let broker = Broker::connect().await;
    let (orders, payments) = (unique("orders"), unique("payments"));
    let exchange = unique("shop");
    broker.track(&orders);
    broker.track(&payments);
    let app = App::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(
        &dir,
        &format!(
            r#"
amqp-url = "{amqp}"
target-url = "{}"
declare = true
queue-type = "classic"
queue-poll-interval = "500ms"

[[subscription]]
queue = "{orders}"
exchange = "{exchange}"
binding-keys = ["order.*"]
path = "/orders"
concurrency = 2

[[subscription]]
queue = "{payments}"
exchange = "{exchange}"
binding-keys = ["payment.*"]
path = "/payments"
"#,
            app.url(),
            amqp = amqp()
        ),
    );
    let sidecar = Sidecar::start(&["--config", &config]);
    sidecar.wait_ready(Duration::from_secs(20)).await;
    publish_to(&broker, &exchange, "order.created", "o1").await;
    publish_to(&broker, &exchange, "payment.done", "p1").await;
    assert!(eventually(Duration::from_secs(10), || async { app.count() == 2 }).await);
    // Each subscription reaches its own `path` on the app, joined to the target URL's host.
    for r in app.received() {
        let (queue, path) = if r.id() == "o1" {
            (orders.as_str(), "/orders")
        } else {
            (payments.as_str(), "/payments")
        };
        assert_eq!(r.header("x-amqp-queue"), Some(queue));
        assert_eq!(r.uri, path, "{} went to its subscription's path", r.id());
    }
    let status = sidecar.get("/status").await.unwrap().1;
    assert!(
        status.contains(&orders) && status.contains(&payments),
        "{status}"
    );
    // The app has both; each ack is counted once its (coalesced) frame is sent.
    for q in [&orders, &payments] {
        assert!(
            sidecar
                .wait_metric(
                    &series("rabbit_sidecar_acks_total", q),
                    1.0,
                    Duration::from_secs(10)
                )
                .await,
            "one ack for {q}"
        );
    }

    // Delete one subscription's queue under it: the broker cancels that consumer; the other
    // keeps consuming, and the sidecar re-declares the deleted one (it runs with declare).
    let ch = broker.conn.create_channel().await.unwrap();
    ch.queue_delete(orders.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    publish_to(&broker, &exchange, "payment.done", "p2").await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            app.ids().contains(&"p2".to_string())
        })
        .await
    );
    assert!(
        sidecar.wait_metric(&format!("rabbit_sidecar_consumer_cancellations_total{{queue=\"{orders}\",reason=\"broker\"}}"), 1.0, Duration::from_secs(10)).await
    );
    assert!(
        eventually(Duration::from_secs(20), || async {
            broker.count(&orders).await.map(|c| c.1) == Some(1)
        })
        .await,
        "the deleted queue is declared and consumed again"
    );
    publish_to(&broker, &exchange, "order.created", "o2").await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            app.ids().contains(&"o2".to_string())
        })
        .await
    );
    sidecar.wait_ready(Duration::from_secs(10)).await;
    let paths: Vec<(String, String)> = app
        .received()
        .iter()
        .map(|r| (r.id(), r.uri.clone()))
        .collect();
    for (id, path) in [("o2", "/orders"), ("p2", "/payments")] {
        assert!(
            paths.contains(&(id.to_string(), path.to_string())),
            "{id} went to {path} after the other subscription's queue came back: {paths:?}"
        );
    }
    broker.cleanup().await;
    delete_exchange(&broker, &exchange).await;
}

#[tokio::test]
async fn a_missing_queue_fails_readiness_for_that_subscription_only() {
    let broker = Broker::connect().await;
    let (present, missing) = (unique("present"), unique("missing"));
    broker.declare(&present, false, false).await;
    broker.track(&missing);
    let app = App::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(
        &dir,
        &format!(
            "amqp-url = \"{amqp}\"\ntarget-url = \"{}\"\n[[subscription]]\nqueue = \"{present}\"\n[[subscription]]\nqueue = \"{missing}\"\n",
            app.url(),
            amqp = amqp()
        ),
    );
    let sidecar = Sidecar::start(&["--config", &config]);
    broker.publish(&present, b"here", Default::default()).await;
    assert!(
        eventually(Duration::from_secs(15), || async { app.count() == 1 }).await,
        "{}",
        sidecar.logs()
    );
    let (status, reason) = sidecar.get("/readyz").await.unwrap();
    assert_eq!(status, 503);
    assert!(
        reason.contains(&missing),
        "readiness names the subscription: {reason}"
    );
    assert_eq!(sidecar.get("/healthz").await.unwrap().0, 200);
    assert!(
        sidecar.logs().contains("does not exist"),
        "{}",
        sidecar.logs()
    );
    broker.cleanup().await;
}

#[tokio::test]
async fn a_conflicting_declaration_stops_start_up_with_a_clear_error() {
    let broker = Broker::connect().await;
    let queue = unique("conflict");
    let exchange = unique("conflict-ex");
    broker.track(&queue);
    broker
        .ch
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let app = App::start().await;
    let url = app.url();
    let mut sidecar = Sidecar::start(&declared(
        &queue,
        &url,
        &[
            "--exchange",
            &exchange,
            "--exchange-type",
            "topic",
            "--binding-key",
            "a.b",
        ],
    ));
    let status = sidecar
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("start-up stops");
    assert_eq!(
        status.code(),
        Some(78),
        "EX_CONFIG; logs:\n{}",
        sidecar.logs()
    );
    let logs = sidecar.logs();
    assert!(
        logs.contains(&exchange) && logs.contains("inequivalent arg 'type'"),
        "names the difference:\n{logs}"
    );

    // A queue declared as quorum, then asked for as classic.
    let queue2 = unique("conflict-q");
    broker.declare(&queue2, true, false).await;
    let mut sidecar = Sidecar::start(&declared(&queue2, &url, &[]));
    let status = sidecar
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("start-up stops");
    assert_eq!(status.code(), Some(78));
    assert!(
        sidecar.logs().contains("x-queue-type"),
        "{}",
        sidecar.logs()
    );
    broker.cleanup().await;
    delete_exchange(&broker, &exchange).await;
}

#[tokio::test]
async fn the_app_gate_pauses_every_subscription_sharing_the_app() {
    let broker = Broker::connect().await;
    let (a, b) = (unique("gate-a"), unique("gate-b"));
    broker.track(&a);
    broker.track(&b);
    let mut app = App::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(
        &dir,
        &format!(
            "amqp-url = \"{amqp}\"\ntarget-url = \"{}\"\ndeclare = true\nqueue-type = \"classic\"\napp-probe-interval = \"200ms\"\n[[subscription]]\nqueue = \"{a}\"\npath = \"/a\"\n[[subscription]]\nqueue = \"{b}\"\npath = \"/b\"\n",
            app.url(),
            amqp = amqp()
        ),
    );
    let sidecar = Sidecar::start(&["--config", &config]);
    sidecar.wait_ready(Duration::from_secs(20)).await;
    app.down();
    broker.publish(&a, b"a1", Default::default()).await;
    assert!(
        eventually(Duration::from_secs(15), || async {
            broker.count(&a).await.map(|c| c.1) == Some(0)
                && broker.count(&b).await.map(|c| c.1) == Some(0)
        })
        .await,
        "both consumers are cancelled while the app is down"
    );
    broker.publish(&b, b"b1", Default::default()).await;
    app.up().await;
    assert!(eventually(Duration::from_secs(15), || async { app.count() >= 2 }).await);
    let mut ids = app.ids();
    ids.sort();
    ids.dedup();
    assert_eq!(ids, ["a1", "b1"]);
    broker.cleanup().await;
}
