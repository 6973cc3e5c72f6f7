//! Coalesced acks (`--ack-batch-max`, `--ack-batch-wait`) against the real broker: every message
//! still ends where the app's answer says, exactly once, with acks sharing frames; a crash or a
//! lost connection inside the window redelivers (duplicates, never a loss); SIGTERM sends what is
//! pending; `--ack-batch-max 1` acks message by message as before. Each checks
//! `rabbit_sidecar_ack_batch_size` beside the counters.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::common::*;

const BATCH_SIZE: &str = "rabbit_sidecar_ack_batch_size";

/// (frames, tags) of the `ack_batch_size` histogram of `queue`.
async fn frames(sidecar: &Sidecar, queue: &str) -> (f64, f64) {
    let m = sidecar.metrics().await;
    (
        metric_value(&m, &series(&format!("{BATCH_SIZE}_count"), queue)).unwrap_or(f64::NAN),
        metric_value(&m, &series(&format!("{BATCH_SIZE}_sum"), queue)).unwrap_or(f64::NAN),
    )
}

/// What the app answers for message `id` at `attempt`: the id's last digit picks the story.
fn answer(id: &str, attempt: u32) -> u16 {
    match id.chars().last() {
        // Poison: dead-lettered at once.
        Some('7') => 400,
        // Always failing: retried, then dead-lettered after --max-deliveries (3).
        Some('3') => 500,
        // Failing once: retried, then accepted.
        Some('5') if attempt == 1 => 503,
        _ => 200,
    }
}

/// How many times the app sees `id` when nothing is lost or duplicated.
fn expected_attempts(id: &str) -> usize {
    match id.chars().last() {
        Some('7') => 1,
        Some('3') => 3,
        Some('5') => 2,
        _ => 1,
    }
}

async fn mixed_answers_end_where_their_answers_say(quorum: bool) {
    let broker = Broker::connect().await;
    let queue = unique(if quorum {
        "acks-mixed-qq"
    } else {
        "acks-mixed-cq"
    });
    broker.declare(&queue, quorum, false).await;
    let app = App::start().await;
    app.answer(|r| {
        let attempt = r
            .header("x-amqp-attempt")
            .and_then(|a| a.parse().ok())
            .unwrap_or(1);
        answer(&r.id(), attempt)
    });
    let url = app.url();
    let qtype = if quorum { "quorum" } else { "classic" };
    let mut a = args(
        &queue,
        &url,
        &[
            "--max-deliveries",
            "3",
            "--prefetch",
            "64",
            "--concurrency",
            "16",
            "--ack-batch-max",
            "32",
            "--ack-batch-wait",
            "50ms",
            // A fifth of the ids always fail: with the breaker on, that many failing messages
            // look like a sick app and open the circuit (tests/broker/circuit_breaker.rs); here
            // every answer must reach the settlement.
            "--circuit-breaker=false",
        ],
    );
    let i = a.iter().position(|x| *x == "classic").unwrap();
    a[i] = qtype;
    let sidecar = Sidecar::start(&a);
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let n = 300;
    let ids = broker.publish_n(&queue, n, "m").await;
    let poison: HashSet<&String> = ids
        .iter()
        .filter(|id| id.ends_with('7') || id.ends_with('3'))
        .collect();
    let dlq = format!("{queue}.dead-letter");
    let expected_total: usize = ids.iter().map(|id| expected_attempts(id)).sum();
    let settled = eventually(Duration::from_secs(60), || async {
        app.count() >= expected_total
            && broker.count(&dlq).await.map(|c| c.0 as usize) == Some(poison.len())
            && broker.count(&queue).await.map(|c| c.0) == Some(0)
            && sidecar
                .metric(&series("rabbit_sidecar_in_flight_messages", &queue))
                .await
                == 0.0
    })
    .await;
    assert!(
        settled,
        "app saw {} of {expected_total}; logs:\n{}",
        app.count(),
        sidecar.logs()
    );
    // Every message was seen exactly as often as its answers called for: none lost, none
    // delivered again by a channel error or a misplaced multiple ack.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for id in app.ids() {
        *seen.entry(id).or_default() += 1;
    }
    for id in &ids {
        assert_eq!(
            seen.get(id).copied().unwrap_or(0),
            expected_attempts(id),
            "{id}; logs:\n{}",
            sidecar.logs()
        );
    }
    let dead: HashSet<String> = broker
        .drain(&dlq)
        .await
        .into_iter()
        .map(|(body, _)| String::from_utf8(body).unwrap())
        .collect();
    assert_eq!(dead, poison.iter().map(|s| s.to_string()).collect());

    let accepted = ids.iter().filter(|id| !poison.contains(id)).count() as f64;
    let retried_once = ids.iter().filter(|id| id.ends_with('5')).count() as f64;
    let always_failing = ids.iter().filter(|id| id.ends_with('3')).count() as f64;
    let m = sidecar.metrics().await;
    let value = |s: &str| metric_value(&m, s).unwrap_or(f64::NAN);
    let acks = value(&series("rabbit_sidecar_acks_total", &queue));
    assert_eq!(acks, accepted, "acks_total counts messages, not frames");
    let retries: f64 = ["server_error", "timeout", "throttled", "connection_reset"]
        .iter()
        .map(|r| {
            value(&format!(
                "rabbit_sidecar_retries_total{{{},reason=\"{r}\"}}",
                q(&queue)
            ))
        })
        .sum();
    assert_eq!(retries, retried_once + 2.0 * always_failing);
    let dead_letters: f64 = ["rejected", "max_deliveries"]
        .iter()
        .map(|r| {
            value(&format!(
                "rabbit_sidecar_dead_letters_total{{{},reason=\"{r}\"}}",
                q(&queue)
            ))
        })
        .sum();
    assert_eq!(dead_letters, poison.len() as f64);
    assert_eq!(
        value(&series("rabbit_sidecar_settle_failures_total", &queue)),
        0.0
    );
    // Every original left by an ack frame: the accepted ones, and those replaced by a retry or
    // a dead letter. Fewer frames than messages.
    let (frames, tags) = frames(&sidecar, &queue).await;
    assert_eq!(tags, acks + retries + dead_letters, "{m}");
    assert!(
        frames < tags,
        "acks were coalesced: {frames} frames for {tags} messages"
    );
    broker.cleanup().await;
}

/// Mixed answers (2xx, 400, 5xx once, 5xx always) with out-of-order completion and coalescing on:
/// every message is seen as often as its answers call for, ends acked or dead-lettered, and the
/// counters add up; fewer ack frames than messages.
/// A window long enough that the acks are still pending when the test acts: up to 50 tags or
/// 10 s.
const LONG_WINDOW: &[&str] = &[
    "--prefetch",
    "100",
    "--ack-batch-max",
    "50",
    "--ack-batch-wait",
    "10s",
];

#[tokio::test]
async fn mixed_answers_with_coalescing_end_where_their_answers_say_classic() {
    mixed_answers_end_where_their_answers_say(false).await;
}

#[tokio::test]
async fn mixed_answers_with_coalescing_end_where_their_answers_say_quorum() {
    mixed_answers_end_where_their_answers_say(true).await;
}

/// kill -9 while accepted messages wait in a long window (10 s, a batch larger than the load):
/// none was acked, so the broker hands every one to the next consumer.
#[tokio::test]
async fn kill_9_inside_a_long_ack_window_redelivers_the_unacked_messages() {
    let broker = Broker::connect().await;
    let queue = unique("acks-kill9");
    broker.track(&queue);
    let app = App::start().await;
    let url = app.url();
    let mut sidecar = Sidecar::spawn(&args(
        &queue,
        &url,
        &[
            "--prefetch",
            "100",
            "--concurrency",
            "10",
            "--ack-batch-max",
            "50",
            "--ack-batch-wait",
            "10s",
        ],
    ));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let ids = broker.publish_n(&queue, 20, "k").await;
    assert!(
        eventually(Duration::from_secs(5), || async { app.count() == 20 }).await,
        "the app answered all; logs:\n{}",
        sidecar.logs()
    );
    let m = sidecar.metrics().await;
    assert_eq!(
        metric_value(&m, &series("rabbit_sidecar_acks_total", &queue)),
        Some(0.0),
        "the acks wait in the window"
    );
    assert_eq!(
        metric_value(&m, &series("rabbit_sidecar_in_flight_messages", &queue)),
        Some(20.0),
        "held unacked until their ack is sent"
    );
    sidecar.kill9().await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            broker.count(&queue).await == Some((20, 0))
        })
        .await,
        "every message is back in the queue: {:?}",
        broker.count(&queue).await
    );
    let back = consume_ids(&broker.conn, &queue, 20, Duration::from_secs(10)).await;
    assert_eq!(
        back.into_iter().collect::<HashSet<_>>(),
        ids.into_iter().collect()
    );
    broker.cleanup().await;
}

/// SIGTERM while acks wait in a long window: the drain sends them at once (well before the
/// window ends), the queue is empty and nothing is delivered again.
#[tokio::test]
async fn sigterm_sends_the_pending_acks_and_nothing_comes_back() {
    let broker = Broker::connect().await;
    let queue = unique("acks-sigterm");
    broker.track(&queue);
    let app = App::start().await;
    let url = app.url();
    let mut sidecar = Sidecar::start(&args(&queue, &url, LONG_WINDOW));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    broker.publish_n(&queue, 20, "t").await;
    assert!(eventually(Duration::from_secs(5), || async { app.count() == 20 }).await);
    let acks = series("rabbit_sidecar_acks_total", &queue);
    assert_eq!(
        sidecar.metric(&acks).await,
        0.0,
        "the acks wait in the window"
    );
    let term = std::time::Instant::now();
    sidecar.signal("TERM");
    let status = sidecar
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits");
    assert!(status.success(), "exit 0; logs:\n{}", sidecar.logs());
    assert!(
        term.elapsed() < Duration::from_secs(5),
        "the drain did not wait out the 10 s window"
    );
    // The admin server is gone with the process: the log tells what was acked.
    let logs = sidecar.logs();
    assert_eq!(
        logs.lines().filter(|l| l.contains(": acked ")).count(),
        20,
        "every pending ack was sent on SIGTERM; logs:\n{logs}"
    );
    assert!(!logs.contains("could not settle"), "{logs}");
    assert_eq!(broker.count(&queue).await, Some((0, 0)), "nothing left");
    assert_eq!(app.count(), 20, "nothing redelivered");
    broker.cleanup().await;
}

/// `--ack-batch-max 1`: one frame per message, as before coalescing existed.
#[tokio::test]
async fn off_mode_acks_each_message_with_a_frame_of_its_own() {
    let broker = Broker::connect().await;
    let queue = unique("acks-off");
    broker.track(&queue);
    let app = App::start().await;
    let url = app.url();
    let sidecar = Sidecar::start(&args(&queue, &url, &["--ack-batch-max", "1"]));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let ids = broker.publish_n(&queue, 100, "o").await;
    let acks = series("rabbit_sidecar_acks_total", &queue);
    assert!(
        sidecar
            .wait_metric(&acks, 100.0, Duration::from_secs(20))
            .await,
        "logs:\n{}",
        sidecar.logs()
    );
    assert_eq!(frames(&sidecar, &queue).await, (100.0, 100.0));
    assert_eq!(
        app.ids().into_iter().collect::<HashSet<_>>(),
        ids.into_iter().collect()
    );
    assert_eq!(app.count(), 100);
    assert!(
        eventually(Duration::from_secs(5), || async {
            broker.count(&queue).await.map(|c| c.0) == Some(0)
        })
        .await
    );
    broker.cleanup().await;
}

/// The broker closes the connection while accepted messages wait in the window: their acks are
/// moot (the broker requeued the messages), counted as settle failures and never as acks; the
/// redeliveries are processed on the next connection, and nothing is lost.
#[tokio::test]
async fn a_closed_connection_with_acks_pending_loses_nothing() {
    let broker = Broker::connect().await;
    let queue = unique("acks-closed");
    broker.track(&queue);
    let app = App::start().await;
    let url = app.url();
    let sidecar = Sidecar::spawn(&args(&queue, &url, LONG_WINDOW));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let ids = broker.publish_n(&queue, 20, "c").await;
    assert!(eventually(Duration::from_secs(5), || async { app.count() == 20 }).await);
    let acks = series("rabbit_sidecar_acks_total", &queue);
    assert_eq!(
        sidecar.metric(&acks).await,
        0.0,
        "the acks wait in the window"
    );
    // Closed well inside the 10 s window (rabbitmqctl takes a few seconds at most), so no ack is
    // on its way when the connection goes.
    let needle = format!("pid {}", sidecar.pid());
    assert!(
        eventually(Duration::from_secs(10), || async {
            close_connections_named(&needle) > 0
        })
        .await
    );
    let settle_failures = series("rabbit_sidecar_settle_failures_total", &queue);
    assert!(
        sidecar
            .wait_metric(&settle_failures, 20.0, Duration::from_secs(5))
            .await,
        "every pending ack failed: {}; logs:\n{}",
        sidecar.metric(&settle_failures).await,
        sidecar.logs()
    );
    assert!(
        sidecar
            .wait_metric(&acks, 20.0, Duration::from_secs(30))
            .await,
        "the redeliveries are acked on the next connection; logs:\n{}",
        sidecar.logs()
    );
    let mut seen: HashMap<String, usize> = HashMap::new();
    for id in app.ids() {
        *seen.entry(id).or_default() += 1;
    }
    assert_eq!(
        seen.keys().cloned().collect::<HashSet<_>>(),
        ids.into_iter().collect()
    );
    assert!(
        seen.values().all(|&n| n == 2),
        "each delivered, then redelivered: {seen:?}"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            broker.count(&queue).await.map(|c| c.0) == Some(0)
        })
        .await
    );
    assert_eq!(sidecar.metric(&acks).await, 20.0, "only what was acked");
    assert_eq!(frames(&sidecar, &queue).await.1, 20.0);
    broker.cleanup().await;
}
