//! The core promises against the real broker: ack on 2xx, dead-letter on 4xx, bounded retries on
//! 5xx, pause while the app is down, reconnect after a closed connection, hand-over on kill -9,
//! single active consumer, drain on SIGTERM, failover to the second node. Each also checks that
//! `/metrics` tells what happened.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::common::*;

#[tokio::test]
async fn acks_on_2xx_and_maps_headers() {
    let broker = Broker::connect().await;
    let queue = unique("ack");
    broker.track(&queue);
    let app = App::start().await;
    let url = app.url();
    let sidecar = Sidecar::start(&args(&queue, &url, &[]));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let ids = broker.publish_n(&queue, 50, "m").await;
    assert!(
        eventually(Duration::from_secs(20), || async { app.count() >= 50 }).await,
        "app got {}",
        app.count()
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            broker.count(&queue).await == Some((0, 1))
        })
        .await
    );
    let got: HashSet<String> = app.ids().into_iter().collect();
    assert_eq!(got, ids.into_iter().collect::<HashSet<_>>());
    let r = &app.received()[0];
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(r.header("x-amqp-attempt"), Some("1"));
    assert_eq!(r.header("x-amqp-queue"), Some(queue.as_str()));
    assert!(r.header("x-amqp-message-id").unwrap().starts_with("m-"));
    // Host as the client would write it: the target's host and its non-default port.
    assert_eq!(r.header("host"), Some(app.addr.to_string().as_str()));
    assert!(
        sidecar
            .wait_metric(
                &series("rabbit_sidecar_acks_total", &queue),
                50.0,
                Duration::from_secs(5)
            )
            .await
    );
    let m = sidecar.metrics().await;
    assert_eq!(
        metric_value(&m, &series("rabbit_sidecar_deliveries_total", &queue)),
        Some(50.0)
    );
    assert_eq!(metric_value(&m, "rabbit_sidecar_connection_up"), Some(1.0));
    assert_eq!(
        metric_value(&m, &series("rabbit_sidecar_consumer_up", &queue)),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &m,
            &format!(
                "rabbit_sidecar_dead_letters_total{{{},reason=\"rejected\"}}",
                q(&queue)
            )
        ),
        Some(0.0)
    );
    broker.cleanup().await;
}

/// A backlog is what the broker sends in bursts of up to the prefetch: the consumer takes what is
/// already there in one go. Every message of the burst must reach the app and be acked, with none
/// left unacked on the channel.
#[tokio::test]
async fn a_backlog_many_times_the_prefetch_is_drained_whole() {
    let broker = Broker::connect().await;
    let queue = unique("backlog");
    broker.declare(&queue, false, false).await;
    let ids = broker.publish_n(&queue, 600, "b").await;
    let app = App::start().await;
    let url = app.url();
    let sidecar = Sidecar::start(&args(
        &queue,
        &url,
        &["--prefetch", "128", "--concurrency", "64"],
    ));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let acks = series("rabbit_sidecar_acks_total", &queue);
    assert!(
        sidecar
            .wait_metric(&acks, 600.0, Duration::from_secs(30))
            .await,
        "acked {} of 600",
        sidecar.metric(&acks).await
    );
    let got: HashSet<String> = app.ids().into_iter().collect();
    assert_eq!(got, ids.into_iter().collect::<HashSet<_>>());
    assert_eq!(app.count(), 600, "each message once");
    assert!(
        sidecar
            .wait_metric(
                &series("rabbit_sidecar_in_flight_messages", &queue),
                0.0,
                Duration::from_secs(5)
            )
            .await
    );
    assert_eq!(broker.count(&queue).await, Some((0, 1)));
    broker.cleanup().await;
}

#[tokio::test]
async fn a_400_is_dead_lettered_at_once_with_reasons() {
    let broker = Broker::connect().await;
    let queue = unique("reject");
    broker.track(&queue);
    let app = App::start().await;
    app.answer(|r| if r.id() == "poison" { 400 } else { 200 });
    let url = app.url();
    let sidecar = Sidecar::start(&args(&queue, &url, &[]));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    broker
        .publish(
            &queue,
            b"poison",
            lapin::BasicProperties::default().with_message_id("p1".into()),
        )
        .await;
    broker.publish(&queue, b"fine", Default::default()).await;
    let dlq = format!("{queue}.dead-letter");
    assert!(
        eventually(Duration::from_secs(15), || async {
            broker.count(&dlq).await.map(|c| c.0) == Some(1)
        })
        .await
    );
    let dead = broker.drain(&dlq).await;
    assert_eq!(dead.len(), 1);
    let (body, props) = &dead[0];
    assert_eq!(body, b"poison");
    assert_eq!(
        header_str(props, "x-sidecar-dead-letter-reason").as_deref(),
        Some("rejected")
    );
    assert_eq!(
        header_str(props, "x-sidecar-last-status").as_deref(),
        Some("400")
    );
    assert_eq!(
        header_str(props, "x-sidecar-attempts").as_deref(),
        Some("1")
    );
    assert_eq!(
        header_str(props, "x-sidecar-original-queue").as_deref(),
        Some(queue.as_str())
    );
    assert_eq!(props.message_id().as_ref().map(|s| s.as_str()), Some("p1"));
    assert_eq!(
        app.received().iter().filter(|r| r.id() == "poison").count(),
        1,
        "no retry of a 4xx"
    );
    assert!(
        sidecar
            .wait_metric(
                &format!(
                    "rabbit_sidecar_dead_letters_total{{{},reason=\"rejected\"}}",
                    q(&queue)
                ),
                1.0,
                Duration::from_secs(5)
            )
            .await
    );
    broker.cleanup().await;
}

async fn retries_then_dead_letters(quorum: bool) {
    let broker = Broker::connect().await;
    let queue = unique(if quorum { "retry-qq" } else { "retry-cq" });
    broker.declare(&queue, quorum, false).await;
    let app = App::start().await;
    app.answer(|r| if r.id() == "bad" { 500 } else { 200 });
    let url = app.url();
    let qtype = if quorum { "quorum" } else { "classic" };
    let mut a = args(
        &queue,
        &url,
        &["--max-deliveries", "3", "--retry-backoff", "300ms"],
    );
    let i = a.iter().position(|x| *x == "classic").unwrap();
    a[i] = qtype;
    let sidecar = Sidecar::start(&a);
    sidecar.wait_ready(Duration::from_secs(20)).await;
    broker.publish(&queue, b"bad", Default::default()).await;
    broker.publish_n(&queue, 5, "ok").await;
    let dlq = format!("{queue}.dead-letter");
    assert!(
        eventually(Duration::from_secs(30), || async {
            broker.count(&dlq).await.map(|c| c.0) == Some(1)
        })
        .await,
        "dead-lettered after max deliveries; logs:\n{}",
        sidecar.logs()
    );
    let tries: Vec<_> = app
        .received()
        .into_iter()
        .filter(|r| r.id() == "bad")
        .collect();
    assert_eq!(tries.len(), 3, "exactly --max-deliveries attempts");
    let attempts: Vec<_> = tries
        .iter()
        .map(|r| r.header("x-amqp-attempt").unwrap().to_string())
        .collect();
    assert_eq!(attempts, ["1", "2", "3"]);
    // Never faster than the backoff: 300ms then 600ms.
    assert!(tries[1].at - tries[0].at >= Duration::from_millis(300));
    assert!(tries[2].at - tries[1].at >= Duration::from_millis(600));
    // The other messages flowed meanwhile: all five reached the app before the last attempt.
    let others: Vec<_> = app
        .received()
        .into_iter()
        .filter(|r| r.id().starts_with("ok-"))
        .collect();
    assert_eq!(others.len(), 5, "every other message reached the app once");
    assert!(
        others.iter().all(|r| r.at < tries[2].at),
        "the other messages did not wait for the retried one"
    );
    let dead = broker.drain(&dlq).await;
    assert_eq!(
        header_str(&dead[0].1, "x-sidecar-dead-letter-reason").as_deref(),
        Some("max_deliveries")
    );
    assert_eq!(
        header_str(&dead[0].1, "x-sidecar-last-status").as_deref(),
        Some("500")
    );
    assert_eq!(broker.count(&queue).await.map(|c| c.0), Some(0));
    assert_eq!(
        broker.count(&format!("{queue}.retry")).await.map(|c| c.0),
        Some(0)
    );
    // The broker holds the dead letter before its confirm reaches the sidecar, which counts it
    // then: wait for the count, then hold the others exact.
    let dead_letters = format!(
        "rabbit_sidecar_dead_letters_total{{{},reason=\"max_deliveries\"}}",
        q(&queue)
    );
    assert!(
        sidecar
            .wait_metric(&dead_letters, 1.0, Duration::from_secs(10))
            .await,
        "one dead letter counted"
    );
    let m = sidecar.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            &format!(
                "rabbit_sidecar_retries_total{{{},reason=\"server_error\"}}",
                q(&queue)
            )
        ),
        Some(2.0)
    );
    assert_eq!(metric_value(&m, &dead_letters), Some(1.0));
    assert!(metric_value(&m, &series("rabbit_sidecar_redeliveries_total", &queue)).unwrap() >= 2.0);
    broker.cleanup().await;
}

#[tokio::test]
async fn a_500_is_retried_with_backoff_then_dead_lettered_classic() {
    retries_then_dead_letters(false).await;
}

#[tokio::test]
async fn a_500_is_retried_with_backoff_then_dead_lettered_quorum() {
    retries_then_dead_letters(true).await;
}

#[tokio::test]
async fn app_down_pauses_consuming_and_loses_nothing() {
    let broker = Broker::connect().await;
    let queue = unique("appdown");
    broker.track(&queue);
    let mut app = App::start().await;
    let url = app.url();
    let sidecar = Sidecar::start(&args(&queue, &url, &[]));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    app.down();
    let ids = broker.publish_n(&queue, 20, "d").await;
    assert!(
        eventually(Duration::from_secs(15), || async {
            broker.count(&queue).await.map(|c| c.1) == Some(0)
        })
        .await,
        "consumer cancelled while the app is down"
    );
    assert!(matches!(sidecar.get("/readyz").await, Some((503, _))));
    assert!(
        matches!(sidecar.get("/healthz").await, Some((200, _))),
        "an app outage never fails liveness"
    );
    assert_eq!(
        sidecar.metric("rabbit_sidecar_app_up").await,
        0.0,
        "the gate is down before the consumer is cancelled"
    );
    // The broker drops the consumer on basic.cancel; the sidecar counts the cancellation and
    // gives back what was in flight after cancel-ok and a drain of what the broker had sent.
    assert!(
        sidecar
            .wait_metric(
                &series("rabbit_sidecar_consumer_up", &queue),
                0.0,
                Duration::from_secs(10)
            )
            .await,
        "no consumer while the app is down"
    );
    let cancelled = format!(
        "rabbit_sidecar_consumer_cancellations_total{{{},reason=\"app_down\"}}",
        q(&queue)
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            sidecar.metric(&cancelled).await >= 1.0
        })
        .await,
        "the cancellation is counted"
    );
    assert!(
        broker
            .wait_ready_count(&queue, 20, Duration::from_secs(10))
            .await,
        "every message back in the queue: {:?}",
        broker.count(&queue).await
    );
    app.up().await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            app.ids().iter().collect::<HashSet<_>>().len() == 20
        })
        .await
    );
    let got: HashSet<String> = app.ids().into_iter().collect();
    assert_eq!(got, ids.into_iter().collect());
    // No attempt was spent on the outage: each message reaches the app as its first attempt
    // (given back untouched, not retried through the retry queue).
    for r in app.received() {
        assert_eq!(
            r.header("x-amqp-attempt"),
            Some("1"),
            "{} arrived as attempt {:?}",
            r.id(),
            r.header("x-amqp-attempt")
        );
    }
    assert_eq!(
        sidecar
            .metric(&format!(
                "rabbit_sidecar_retries_total{{{},reason=\"connection_reset\"}}",
                q(&queue)
            ))
            .await,
        0.0,
        "the outage was not counted as a retry"
    );
    assert_eq!(
        broker
            .count(&format!("{queue}.dead-letter"))
            .await
            .map(|c| c.0),
        Some(0),
        "nothing dead-lettered"
    );
    sidecar.wait_ready(Duration::from_secs(5)).await;
    broker.cleanup().await;
}

#[tokio::test]
async fn closed_connection_reconnects_and_loses_nothing() {
    let broker = Broker::connect().await;
    let queue = unique("closeconn");
    broker.track(&queue);
    let app = App::start().await;
    app.set_delay(Duration::from_millis(20));
    let url = app.url();
    let sidecar = Sidecar::spawn(&args(&queue, &url, &[]));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let ids = broker.publish_n(&queue, 100, "c").await;
    assert!(eventually(Duration::from_secs(10), || async { app.count() >= 10 }).await);
    let needle = format!("pid {}", sidecar.pid());
    assert!(
        eventually(Duration::from_secs(10), || async {
            close_connections_named(&needle) > 0
        })
        .await
    );
    assert!(
        eventually(Duration::from_secs(30), || async {
            app.ids().iter().collect::<HashSet<_>>().len() == 100
        })
        .await,
        "all messages processed after the reconnect; logs:\n{}",
        sidecar.logs()
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            broker.count(&queue).await.map(|c| c.0) == Some(0)
        })
        .await
    );
    let got: HashSet<String> = app.ids().into_iter().collect();
    assert_eq!(got, ids.into_iter().collect());
    assert!(
        eventually(Duration::from_secs(10), || async {
            sidecar.metric("rabbit_sidecar_reconnects_total").await >= 1.0
        })
        .await
    );
    let m = sidecar.metrics().await;
    assert!(
        metric_value(
            &m,
            "rabbit_sidecar_connection_losses_total{reason=\"closed_by_broker\"}"
        )
        .unwrap()
            >= 1.0,
        "{m}"
    );
    assert_eq!(metric_value(&m, "rabbit_sidecar_connection_up"), Some(1.0));
    broker.cleanup().await;
}

/// The connection closes while the app holds a message: the ack that follows the app's 2xx cannot
/// be sent. It is counted, and the broker's redelivery is processed and acked on the next
/// connection, so the message is handled twice and lost never.
#[tokio::test]
async fn an_ack_after_the_connection_closed_is_counted_and_the_message_comes_back() {
    let broker = Broker::connect().await;
    let queue = unique("settlefail");
    broker.track(&queue);
    let app = App::start().await;
    app.set_delay(Duration::from_secs(4));
    let url = app.url();
    let sidecar = Sidecar::spawn(&args(
        &queue,
        &url,
        &["--prefetch", "1", "--concurrency", "1"],
    ));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let settle_failures = series("rabbit_sidecar_settle_failures_total", &queue);
    assert_eq!(sidecar.metric(&settle_failures).await, 0.0);
    let ids = broker.publish_n(&queue, 1, "s").await;
    assert!(eventually(Duration::from_secs(10), || async { app.count() == 1 }).await);
    // The app holds it for 4 s; the connection goes now, and later answers come at once.
    app.set_delay(Duration::ZERO);
    let needle = format!("pid {}", sidecar.pid());
    assert!(
        eventually(Duration::from_secs(10), || async {
            close_connections_named(&needle) > 0
        })
        .await
    );
    assert!(
        sidecar
            .wait_metric(&settle_failures, 1.0, Duration::from_secs(20))
            .await,
        "settle failures {}; logs:\n{}",
        sidecar.metric(&settle_failures).await,
        sidecar.logs()
    );
    assert!(
        sidecar
            .wait_metric(
                &series("rabbit_sidecar_acks_total", &queue),
                1.0,
                Duration::from_secs(30)
            )
            .await,
        "the redelivery is acked; logs:\n{}",
        sidecar.logs()
    );
    let received = app.received();
    assert_eq!(received.len(), 2, "delivered, then redelivered");
    assert!(received.iter().all(|r| r.id() == ids[0]));
    assert_eq!(received[1].header("x-amqp-redelivered"), Some("true"));
    assert!(
        eventually(Duration::from_secs(10), || async {
            broker.count(&queue).await == Some((0, 1))
        })
        .await
    );
    assert!(sidecar.logs().contains("could not settle a message"));
    broker.cleanup().await;
}

#[tokio::test]
async fn kill_9_hands_unacked_messages_to_another_sidecar() {
    let broker = Broker::connect().await;
    let queue = unique("kill9");
    broker.track(&queue);
    let slow = App::start().await;
    slow.set_delay(Duration::from_secs(60));
    let slow_url = slow.url();
    let mut first = Sidecar::spawn(&args(
        &queue,
        &slow_url,
        &["--prefetch", "10", "--concurrency", "10"],
    ));
    first.wait_ready(Duration::from_secs(20)).await;
    let ids = broker.publish_n(&queue, 10, "k").await;
    assert!(
        first
            .wait_metric(
                &series("rabbit_sidecar_in_flight_messages", &queue),
                10.0,
                Duration::from_secs(10)
            )
            .await
    );
    let fast = App::start().await;
    let fast_url = fast.url();
    let second = Sidecar::spawn(&args(&queue, &fast_url, &[]));
    second.wait_ready(Duration::from_secs(20)).await;
    first.kill9().await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            fast.ids().iter().collect::<HashSet<_>>().len() == 10
        })
        .await
    );
    let got: HashSet<String> = fast.ids().into_iter().collect();
    assert_eq!(got, ids.into_iter().collect());
    assert!(
        fast.received()
            .iter()
            .all(|r| r.header("x-amqp-redelivered") == Some("true"))
    );
    assert!(
        second
            .wait_metric(
                &series("rabbit_sidecar_redeliveries_total", &queue),
                10.0,
                Duration::from_secs(5)
            )
            .await
    );
    broker.cleanup().await;
}

#[tokio::test]
async fn single_active_consumer_standby_takes_over_after_kill_9() {
    let broker = Broker::connect().await;
    let queue = unique("sac");
    broker.track(&queue);
    let app_a = App::start().await;
    app_a.set_delay(Duration::from_secs(60));
    let app_b = App::start().await;
    let (ua, ub) = (app_a.url(), app_b.url());
    let mut active = Sidecar::spawn(&args(&queue, &ua, &["--single-active-consumer"]));
    active.wait_ready(Duration::from_secs(20)).await;
    let standby = Sidecar::spawn(&args(&queue, &ub, &["--single-active-consumer"]));
    standby.wait_ready(Duration::from_secs(20)).await;
    let ids = broker.publish_n(&queue, 5, "s").await;
    assert!(eventually(Duration::from_secs(10), || async { app_a.count() >= 1 }).await);
    assert_eq!(app_b.count(), 0, "the standby receives nothing");
    assert!(
        eventually(Duration::from_secs(10), || async {
            standby
                .metric(&series("rabbit_sidecar_consumer_active", &queue))
                .await
                == 0.0
                && active
                    .metric(&series("rabbit_sidecar_consumer_active", &queue))
                    .await
                    == 1.0
        })
        .await
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            standby
                .get("/status")
                .await
                .is_some_and(|(_, s)| s.contains("\"standby\""))
                && standby
                    .metric(&series("rabbit_sidecar_consumer_active", &queue))
                    .await
                    == 0.0
        })
        .await,
        "the standby says so in /status"
    );
    assert!(
        standby
            .get("/readyz")
            .await
            .unwrap()
            .1
            .contains("standing by")
    );
    active.kill9().await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            app_b.ids().iter().collect::<HashSet<_>>().len() == 5
        })
        .await
    );
    let got: HashSet<String> = app_b.ids().into_iter().collect();
    assert_eq!(got, ids.into_iter().collect());
    assert!(
        standby
            .wait_metric(
                &series("rabbit_sidecar_consumer_active", &queue),
                1.0,
                Duration::from_secs(10)
            )
            .await
    );
    // The README's `/status` `standby` → `consuming`.
    assert!(
        eventually(Duration::from_secs(10), || async {
            standby.get("/status").await.is_some_and(|(_, body)| {
                serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|doc| {
                    doc["subscriptions"]
                        .as_array()
                        .is_some_and(|subs| subs.iter().any(|s| s["state"] == "consuming"))
                })
            })
        })
        .await,
        "the standby's /status says consuming: {:?}",
        standby.get("/status").await
    );
    broker.cleanup().await;
}

/// Four of twenty messages are in the app's hands when SIGTERM comes; the other sixteen were
/// prefetched and wait for a slot. The grace (10 s) would let a sidecar that keeps dispatching
/// them finish every one (4 rounds of 2 s), so what proves "unstarted messages are returned" is
/// that the app never sees them: exactly the four reach it and are acked, the sixteen are back
/// in the queue untouched.
#[tokio::test]
async fn sigterm_drains_in_flight_messages_and_exits_0() {
    let broker = Broker::connect().await;
    let queue = unique("sigterm");
    broker.track(&queue);
    let app = App::start().await;
    app.set_delay(Duration::from_secs(2));
    let url = app.url();
    let mut sidecar = Sidecar::start(&args(
        &queue,
        &url,
        &[
            "--prefetch",
            "20",
            "--concurrency",
            "4",
            "--shutdown-grace",
            "10s",
        ],
    ));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let ids = broker.publish_n(&queue, 20, "t").await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            app.count() == 4 && broker.count(&queue).await.map(|c| c.0) == Some(0)
        })
        .await,
        "four in the app's hands, all twenty delivered to the sidecar: app {}, ready {:?}",
        app.count(),
        broker.count(&queue).await
    );
    let cancellations = format!(
        "rabbit_sidecar_consumer_cancellations_total{{{},reason=\"shutdown\"}}",
        q(&queue)
    );
    assert_eq!(sidecar.metric(&cancellations).await, 0.0);
    sidecar.signal("TERM");
    // While the four finish: not ready, saying why, and the consumer was cancelled for it.
    assert!(
        eventually(Duration::from_secs(5), || async {
            matches!(sidecar.get("/readyz").await, Some((503, body)) if body.contains("draining"))
        })
        .await,
        "/readyz during the drain: {:?}",
        sidecar.get("/readyz").await
    );
    assert!(
        sidecar
            .wait_metric(&cancellations, 1.0, Duration::from_secs(5))
            .await,
        "{cancellations} moved: {}",
        sidecar.metric(&cancellations).await
    );
    let status = sidecar
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("exits within the grace");
    assert!(status.success(), "exit 0; logs:\n{}", sidecar.logs());
    let received: HashSet<String> = app.ids().into_iter().collect();
    assert_eq!(
        app.count(),
        4,
        "only the four in flight reached the app: {:?}",
        app.ids()
    );
    assert_eq!(
        app.accepted().len(),
        4,
        "the four in flight finished: {:?}",
        app.answered()
    );
    let (ready, consumers) = broker.count(&queue).await.unwrap();
    assert_eq!(consumers, 0);
    assert_eq!(
        ready, 16,
        "the four acked, the sixteen unstarted back in the queue"
    );
    let back: HashSet<String> = broker
        .drain(&queue)
        .await
        .iter()
        .map(|(body, _)| String::from_utf8_lossy(body).into_owned())
        .collect();
    let all: HashSet<String> = ids.into_iter().collect();
    assert_eq!(
        back,
        all.difference(&received).cloned().collect(),
        "what came back is exactly what the app never saw"
    );
    broker.cleanup().await;
}

#[tokio::test]
async fn sigterm_grace_deadline_returns_unfinished_messages() {
    let broker = Broker::connect().await;
    let queue = unique("grace");
    broker.track(&queue);
    let app = App::start().await;
    app.set_delay(Duration::from_secs(30));
    let url = app.url();
    let mut sidecar = Sidecar::start(&args(
        &queue,
        &url,
        &["--concurrency", "3", "--shutdown-grace", "1s"],
    ));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    broker.publish_n(&queue, 3, "g").await;
    assert!(
        sidecar
            .wait_metric(
                &series("rabbit_sidecar_in_flight_messages", &queue),
                3.0,
                Duration::from_secs(10)
            )
            .await
    );
    sidecar.signal("TERM");
    let status = sidecar
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("exits after the grace");
    assert!(status.success());
    assert!(
        eventually(Duration::from_secs(5), || async {
            broker.count(&queue).await == Some((3, 0))
        })
        .await
    );
    broker.cleanup().await;
}

#[tokio::test]
async fn a_down_first_node_fails_over_to_the_second() {
    let broker = Broker::connect().await;
    let queue = unique("nodes");
    broker.track(&queue);
    let app = App::start().await;
    let url = app.url();
    let dead = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f,{}",
        free_port(),
        amqp()
    );
    // A 10 s backoff: a sidecar that backed off after the first node instead of after a full pass
    // would not be ready for 10 s.
    let mut a = args(
        &queue,
        &url,
        &[
            "--reconnect-backoff",
            "10s",
            "--reconnect-backoff-max",
            "10s",
        ],
    );
    a[1] = &dead;
    let started = Instant::now();
    let sidecar = Sidecar::start(&a);
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the second node was tried at once: ready after {took:?}; logs:\n{}",
        sidecar.logs()
    );
    broker.publish_n(&queue, 3, "n").await;
    assert!(eventually(Duration::from_secs(10), || async { app.count() == 3 }).await);
    let status = sidecar.get("/status").await.unwrap().1;
    assert!(status.contains(amqp_addr()), "{status}");
    assert!(!status.contains("guest:guest"), "no credentials in /status");
    assert!(
        sidecar
            .metric("rabbit_sidecar_connect_failures_total")
            .await
            >= 1.0
    );
    assert!(
        !sidecar.metrics().await.contains("guest"),
        "no credentials in /metrics"
    );
    assert!(
        !sidecar.logs().contains("guest:guest"),
        "no credentials in logs"
    );
    broker.cleanup().await;
}

/// With `--management-url`, active/standby comes from the broker's own view of the consumers.
#[tokio::test]
async fn management_api_tells_active_from_standby() {
    let management = management_url();
    let reachable = eventually(Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(management_addr())
            .await
            .is_ok()
    })
    .await;
    assert!(
        reachable,
        "the management plugin must be enabled ({} enables it)",
        broker_script()
    );
    let broker = Broker::connect().await;
    let queue = unique("mgmt");
    broker.track(&queue);
    let app_a = App::start().await;
    app_a.set_delay(Duration::from_secs(60));
    let app_b = App::start().await;
    let (ua, ub) = (app_a.url(), app_b.url());
    let extra = [
        "--single-active-consumer",
        "--management-url",
        management,
        "--queue-poll-interval",
        "300ms",
    ];
    let mut active = Sidecar::spawn(&args(&queue, &ua, &extra));
    active.wait_ready(Duration::from_secs(20)).await;
    let standby = Sidecar::spawn(&args(&queue, &ub, &extra));
    standby.wait_ready(Duration::from_secs(20)).await;
    let series = series("rabbit_sidecar_consumer_active", &queue);
    // No traffic at all: only the management API can tell the two apart. The standby's gauge
    // reads 0 before its first poll too, so wait for its status to say so as well.
    assert!(
        eventually(Duration::from_secs(15), || async {
            active.metric(&series).await == 1.0
                && standby.metric(&series).await == 0.0
                && standby
                    .get("/status")
                    .await
                    .is_some_and(|(_, body)| body.contains("\"standby\""))
        })
        .await,
        "active {} standby {}; standby status: {:?}",
        active.metric(&series).await,
        standby.metric(&series).await,
        standby.get("/status").await.map(|(_, body)| body)
    );
    assert!(
        !standby.logs().contains("guest:guest"),
        "no credentials in logs"
    );
    active.kill9().await;
    assert!(
        standby
            .wait_metric(&series, 1.0, Duration::from_secs(15))
            .await,
        "the standby becomes active"
    );
    broker.cleanup().await;
}

/// A message that kills the sidecar each time it is handled (the app kill -9s the spawned
/// sidecar when it receives it) on a quorum queue: the broker counts each return in
/// `x-delivery-count`, so the delivery after the `--max-deliveries`th is dead-lettered on
/// arrival, without reaching the app, and everything else is accepted. Prefetch 1 keeps the
/// other messages out of the dying sidecar's hands, so only the poison one is counted.
#[tokio::test]
async fn a_message_that_kills_the_sidecar_is_dead_lettered_on_arrival_quorum() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    let broker = Broker::connect().await;
    let queue = unique("crashloop");
    broker.declare(&queue, true, false).await;
    let app = App::start().await;
    let pid = Arc::new(AtomicU32::new(0));
    let kills = Arc::new(AtomicU32::new(0));
    let (victim, counted) = (pid.clone(), kills.clone());
    app.answer(move |r| {
        if r.id() == "crash" {
            let pid = victim.load(Ordering::SeqCst);
            let killed = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if killed {
                counted.fetch_add(1, Ordering::SeqCst);
            }
        }
        200
    });
    let url = app.url();
    let a = args(
        &queue,
        &url,
        &[
            "--queue-type",
            "quorum",
            "--max-deliveries",
            "3",
            "--prefetch",
            "1",
            "--concurrency",
            "1",
        ],
    );
    let mut ids = broker.publish_n(&queue, 5, "before").await;
    broker
        .publish(
            &queue,
            b"crash",
            lapin::BasicProperties::default().with_message_id("crash".into()),
        )
        .await;
    ids.extend(broker.publish_n(&queue, 5, "after").await);
    let dlq = format!("{queue}.dead-letter");
    // Start a sidecar, and another each time one dies, until the poison message is
    // dead-lettered: three deaths, then the fourth sidecar dead-letters it. Bounded: a sidecar
    // that kept dispatching it would be killed every time, so give up after six.
    let mut sidecar = None;
    let mut spawned = 0;
    while spawned < 6 {
        let mut s = Sidecar::spawn(&a);
        pid.store(s.pid(), Ordering::SeqCst);
        spawned += 1;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut dead_lettered = false;
        while Instant::now() < deadline {
            if broker.count(&dlq).await.map(|c| c.0) == Some(1) {
                dead_lettered = true;
                break;
            }
            if !s.running() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if dead_lettered {
            sidecar = Some(s);
            break;
        }
        assert!(
            s.wait_exit(Duration::from_secs(5)).await.is_some(),
            "sidecar {spawned} neither died nor dead-lettered the message; logs:\n{}",
            s.logs()
        );
    }
    let sidecar = sidecar.unwrap_or_else(|| {
        panic!(
            "not dead-lettered after {spawned} sidecars, {} kills",
            kills.load(Ordering::SeqCst)
        )
    });
    assert_eq!(
        kills.load(Ordering::SeqCst),
        3,
        "killed once per allowed delivery"
    );
    assert_eq!(spawned, 4);
    let handed = app.ids().iter().filter(|id| *id == "crash").count();
    assert_eq!(handed, 3, "never handed to the app past --max-deliveries");
    let want: HashSet<String> = ids.into_iter().collect();
    assert!(
        eventually(Duration::from_secs(20), || async {
            let got: HashSet<String> = app.accepted().into_iter().collect();
            want.is_subset(&got)
        })
        .await,
        "everything else accepted: {:?}; logs:\n{}",
        app.accepted(),
        sidecar.logs()
    );
    let dead = broker.drain(&dlq).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, b"crash");
    assert_eq!(
        header_str(&dead[0].1, "x-sidecar-dead-letter-reason").as_deref(),
        Some("max_deliveries")
    );
    assert_eq!(
        sidecar
            .metric(&format!(
                "rabbit_sidecar_dead_letters_total{{{},reason=\"max_deliveries\"}}",
                q(&queue)
            ))
            .await,
        1.0
    );
    broker.cleanup().await;
}

/// How the dead-letter queue fails the sidecar's copy in [`unconfirmed_dead_letter`].
#[derive(Clone, Copy, PartialEq, Debug)]
enum DeadLetterPath {
    /// Deleted under the running sidecar: the mandatory copy comes back unroutable.
    Missing,
    /// Full (`x-max-length 1`, `x-overflow reject-publish`): the broker nacks the copy.
    Refused,
}

/// A poison message (answered 400) whose dead-letter copy the broker does not confirm: the
/// original is held one backoff step, then given back, and tried again: each round a
/// `dead_letter_failures_total`, never a loss, never a hot loop; the other messages flow. Once
/// the dead-letter queue accepts copies again, the message is dead-lettered.
async fn unconfirmed_dead_letter(path: DeadLetterPath) {
    use lapin::options::{QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions};
    use lapin::types::{AMQPValue, FieldTable};

    let broker = Broker::connect().await;
    let queue = unique("unconfirmed");
    broker.declare(&queue, false, false).await;
    let dlq = format!("{queue}.dead-letter");
    let declare_dlq = |full: bool| {
        let mut args = FieldTable::default();
        if full {
            args.insert("x-max-length".into(), AMQPValue::LongInt(1));
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
        }
        let (ch, dlq) = (broker.ch.clone(), dlq.clone());
        async move {
            ch.queue_declare(
                dlq.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .unwrap();
        }
    };
    if path == DeadLetterPath::Refused {
        declare_dlq(true).await;
        broker.publish(&dlq, b"filler", Default::default()).await;
    }
    let app = App::start().await;
    app.answer(|r| if r.id() == "poison" { 400 } else { 200 });
    let url = app.url();
    let sidecar = Sidecar::start(&args(
        &queue,
        &url,
        &["--retry-backoff", "500ms", "--retry-backoff-max", "500ms"],
    ));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    if path == DeadLetterPath::Missing {
        assert!(broker.count(&dlq).await.is_some(), "the sidecar made it");
        let ch = broker.conn.create_channel().await.unwrap();
        ch.queue_delete(dlq.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
    }
    broker.publish(&queue, b"poison", Default::default()).await;
    let ok = broker.publish_n(&queue, 3, "ok").await;
    let failures = format!("rabbit_sidecar_dead_letter_failures_total{{{}}}", q(&queue));
    assert!(
        eventually(Duration::from_secs(15), || async {
            sidecar.metric(&failures).await >= 3.0
        })
        .await,
        "{failures}: {}; logs:\n{}",
        sidecar.metric(&failures).await,
        sidecar.logs()
    );
    // Held one backoff step (500 ms) before each new try: not a hot loop.
    let tries: Vec<Instant> = app
        .received()
        .iter()
        .filter(|r| r.id() == "poison")
        .map(|r| r.at)
        .collect();
    assert!(tries.len() >= 3, "{} tries", tries.len());
    for pair in tries.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(450),
            "tries {:?} apart: the original was not held",
            pair[1] - pair[0]
        );
    }
    let rejected = format!(
        "rabbit_sidecar_dead_letters_total{{{},reason=\"rejected\"}}",
        q(&queue)
    );
    assert_eq!(
        sidecar.metric(&rejected).await,
        0.0,
        "no dead letter confirmed"
    );
    let accepted: HashSet<String> = app.accepted().into_iter().collect();
    assert!(
        ok.iter().all(|id| accepted.contains(id)),
        "the other messages flowed: {accepted:?}"
    );
    // The path heals: the poison message is dead-lettered, nothing is left behind.
    match path {
        DeadLetterPath::Missing => declare_dlq(false).await,
        DeadLetterPath::Refused => {
            broker
                .ch
                .queue_purge(dlq.as_str().into(), QueuePurgeOptions::default())
                .await
                .unwrap();
        }
    }
    assert!(
        sidecar
            .wait_metric(&rejected, 1.0, Duration::from_secs(15))
            .await,
        "dead-lettered once the queue takes copies; logs:\n{}",
        sidecar.logs()
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            broker.count(&queue).await.map(|c| c.0) == Some(0)
        })
        .await
    );
    let dead = broker.drain(&dlq).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, b"poison");
    broker.cleanup().await;
}

#[tokio::test]
async fn an_unconfirmed_dead_letter_is_held_then_requeued_dead_letter_queue_missing() {
    unconfirmed_dead_letter(DeadLetterPath::Missing).await;
}

#[tokio::test]
async fn an_unconfirmed_dead_letter_is_held_then_requeued_broker_refuses() {
    unconfirmed_dead_letter(DeadLetterPath::Refused).await;
}
