//! What RabbitMQ 4 lets a queue or virtual host set that the sidecar must meet: a queue's own
//! delivery-acknowledgement timeout, and a virtual host whose default queue type is quorum.

use std::time::Duration;

use lapin::types::AMQPValue;

use crate::common::*;

#[tokio::test]
async fn a_queues_own_consumer_timeout_is_the_one_warned_about() {
    let b = Broker::connect().await;
    let queue = unique("own-timeout");
    // 4 s: far below --broker-consumer-timeout's 30 minutes.
    b.declare_with(
        &queue,
        &[
            ("x-queue-type", AMQPValue::LongString("classic".into())),
            ("x-consumer-timeout", AMQPValue::LongInt(4_000)),
        ],
    )
    .await;
    let app = App::start().await;
    app.set_delay(Duration::from_secs(60));
    let url = app.url();
    let sidecar = Sidecar::start(&[
        "--amqp-url",
        amqp(),
        "--queue",
        &queue,
        "--target-url",
        &url,
        "--management-url",
        management_url(),
        "--queue-poll-interval",
        "500ms",
        "--handler-timeout",
        "30s",
    ]);
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let warnings = series("rabbit_sidecar_ack_timeout_warnings_total", &queue);
    b.publish(&queue, b"slow", Default::default()).await;
    assert!(
        sidecar
            .wait_metric(&warnings, 1.0, Duration::from_secs(15))
            .await,
        "warned at 80% of the queue's 4 s; logs:\n{}",
        sidecar.logs()
    );
    assert!(sidecar.logs().contains("timeout_s=4"), "{}", sidecar.logs());
    drop(sidecar);
    b.cleanup().await;
}

#[tokio::test]
async fn a_virtual_host_whose_default_queue_type_is_quorum_works_for_both_types() {
    let vhost = unique("vhost-quorum");
    rabbitmqctl(&["add_vhost", &vhost, "--default-queue-type", "quorum"]);
    rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
    let url = format!("{}/{vhost}", amqp().trim_end_matches("/%2f"));
    let b = Broker::connect_to(&url).await;
    let app = App::start().await;
    app.answer(|r| match r.id() {
        id if id.starts_with("bad") => 400,
        _ => 200,
    });
    let target = app.url();
    for queue_type in ["classic", "quorum"] {
        let queue = unique(&format!("vq-{queue_type}"));
        b.track(&queue);
        let sidecar = Sidecar::start(&[
            "--amqp-url",
            &url,
            "--queue",
            &queue,
            "--target-url",
            &target,
            "--declare",
            "--queue-type",
            queue_type,
        ]);
        sidecar.wait_ready(Duration::from_secs(20)).await;
        let ids = b.publish_n(&queue, 3, &format!("good-{queue_type}")).await;
        b.publish_n(&queue, 1, &format!("bad-{queue_type}")).await;
        let dlq = format!("{queue}.dead-letter");
        assert!(
            app.received_all(&ids, Duration::from_secs(15)).await
                && b.wait_ready_count(&dlq, 1, Duration::from_secs(15)).await,
            "{queue_type} queue in a quorum-default vhost: {:?}\n{}",
            app.ids(),
            sidecar.logs()
        );
        drop(sidecar);
    }
    b.cleanup().await;
    rabbitmqctl(&["delete_vhost", &vhost]);
}

#[tokio::test]
async fn nothing_the_sidecar_does_uses_a_feature_rabbitmq_4_deprecates() {
    if rabbit() == Rabbit::V3 {
        // 3.10 has no deprecated-features registry; the RabbitMQ 4 pass runs this.
        return;
    }
    let b = Broker::connect().await;
    let (classic, quorum) = (unique("deprecated-c"), unique("deprecated-q"));
    b.track(&classic);
    b.track(&quorum);
    let app = App::start().await;
    let url = app.url();
    let one = Sidecar::start(&args(&classic, &url, &["--single-active-consumer"]));
    let two = Sidecar::start(&args(&quorum, &url, &["--queue-type", "quorum"]));
    one.wait_ready(Duration::from_secs(20)).await;
    two.wait_ready(Duration::from_secs(20)).await;
    b.publish_n(&classic, 2, "c").await;
    b.publish_n(&quorum, 2, "q").await;
    assert!(eventually(Duration::from_secs(10), || async { app.count() == 4 }).await);
    // Global QoS, transient non-exclusive queues, classic queue mirroring: none in use while
    // both sidecars consume.
    let used = rabbitmqctl(&["list_deprecated_features", "--used", "--quiet"]);
    let used: Vec<&str> = used
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("name"))
        .collect();
    assert!(used.is_empty(), "deprecated features in use: {used:?}");
    drop((one, two));
    b.cleanup().await;
}
