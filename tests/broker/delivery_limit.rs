//! Quorum queues and their delivery limit: RabbitMQ 4 gives every quorum queue a limit of 20
//! returns, after which a message is dead-lettered, or without a dead-letter exchange dropped.
//! Nothing the sidecar declares may drop a message, on either broker; a queue it did not declare
//! is checked and warned about.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, BasicNackOptions};
use lapin::types::AMQPValue;

use crate::common::*;

/// The limit `--declare` gives a quorum queue (RabbitMQ 4's default).
const LIMIT: u32 = 20;

/// Gets `queue`'s head message and gives it back with `basic.nack(requeue)`, `times` times at
/// most; returns how many returns were made (fewer when the queue ran empty).
async fn nack_returns(b: &Broker, queue: &str, times: u32) -> u32 {
    let mut returned = 0;
    for _ in 0..times {
        let got =
            b.ch.basic_get(queue.into(), BasicGetOptions::default())
                .await
                .unwrap();
        let Some(got) = got else {
            // A return is put back a moment after the nack: look again before calling it empty.
            let back = eventually(Duration::from_secs(2), || async {
                b.count(queue).await.is_some_and(|(ready, _)| ready > 0)
            })
            .await;
            if back {
                continue;
            }
            break;
        };
        got.delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await
            .unwrap();
        returned += 1;
    }
    returned
}

/// The reason of the latest `x-death` entry of a dead letter.
fn death_reason(props: &BasicProperties) -> Option<String> {
    let headers = props.headers().as_ref()?;
    let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    match first.inner().get("reason")? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

/// Lets the sidecar declare `queue` (quorum) and its companions, then stops it.
async fn declared_by_the_sidecar(b: &Broker, queue: &str) {
    b.track(queue);
    let app = App::start().await;
    let url = app.url();
    let sidecar = Sidecar::start(&args(queue, &url, &["--queue-type", "quorum"]));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    drop(sidecar);
    assert!(
        eventually(Duration::from_secs(10), || async {
            b.count(queue).await == Some((0, 0))
        })
        .await,
        "the sidecar's consumer is gone"
    );
}

#[tokio::test]
async fn a_message_returned_past_the_delivery_limit_lands_in_the_dead_letter_queue() {
    let b = Broker::connect().await;
    let queue = unique("limit-dlx");
    let dlq = format!("{queue}.dead-letter");
    declared_by_the_sidecar(&b, &queue).await;
    b.publish_id(&queue, "returned-often").await;

    // The reproduction: returned 21 times. The limit keeps it through 20 returns; the
    // 21st takes it out of the queue, into the dead-letter queue rather than nowhere.
    let returned = nack_returns(&b, &queue, LIMIT + 5).await;
    assert_eq!(returned, LIMIT + 1, "the limit allows {LIMIT} returns");
    assert!(
        b.wait_ready_count(&dlq, 1, Duration::from_secs(10)).await,
        "the message is in {dlq}"
    );
    assert_eq!(b.count(&queue).await, Some((0, 0)));
    let letters = b.drain(&dlq).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].0, b"returned-often");
    assert_eq!(
        death_reason(&letters[0].1).as_deref(),
        Some("delivery_limit"),
        "the broker says why"
    );
    b.cleanup().await;
}

#[tokio::test]
async fn the_sidecar_dead_letters_a_message_at_the_delivery_limit_on_arrival() {
    let b = Broker::connect().await;
    let queue = unique("limit-arrival");
    let dlq = format!("{queue}.dead-letter");
    declared_by_the_sidecar(&b, &queue).await;
    b.publish_id(&queue, "at-limit").await;
    // Returned as often as the limit allows: the next return (a crash, a lost connection) would
    // remove it.
    assert_eq!(nack_returns(&b, &queue, LIMIT).await, LIMIT);
    b.publish_n(&queue, 3, "fresh").await;

    let app = App::start().await;
    let url = app.url();
    // --max-deliveries above the limit: only the limit can stop the message.
    let sidecar = Sidecar::start(&args(
        &queue,
        &url,
        &["--queue-type", "quorum", "--max-deliveries", "30"],
    ));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let dead = series("rabbit_sidecar_dead_letters_total", &queue)
        .replace('}', ",reason=\"delivery_limit\"}");
    assert!(
        sidecar
            .wait_metric(&dead, 1.0, Duration::from_secs(15))
            .await,
        "{}",
        sidecar.metrics().await
    );
    assert!(
        eventually(Duration::from_secs(10), || async { app.count() == 3 }).await,
        "the other messages reach the app: {:?}",
        app.ids()
    );
    assert!(
        !app.ids().iter().any(|id| id == "at-limit"),
        "the message at the limit is not offered to the app"
    );
    drop(sidecar);
    assert!(b.wait_ready_count(&dlq, 1, Duration::from_secs(10)).await);
    let letters = b.drain(&dlq).await;
    assert_eq!(letters[0].0, b"at-limit");
    assert_eq!(
        header_str(&letters[0].1, "x-sidecar-dead-letter-reason").as_deref(),
        Some("delivery_limit")
    );
    b.cleanup().await;
}

#[tokio::test]
async fn a_queue_an_earlier_version_declared_is_kept_with_a_warning() {
    let b = Broker::connect().await;
    let queue = unique("limit-earlier");
    // What earlier versions of the sidecar declared: type only, no dead-letter exchange.
    b.declare(&queue, true, false).await;
    let app = App::start().await;
    let url = app.url();
    let sidecar = Sidecar::start(&args(&queue, &url, &["--queue-type", "quorum"]));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    b.publish_n(&queue, 2, "kept").await;
    assert!(eventually(Duration::from_secs(10), || async { app.count() == 2 }).await);
    let logs = sidecar.logs();
    assert!(
        logs.contains("declared by an earlier release") && logs.contains("set_policy"),
        "{logs}"
    );
    drop(sidecar);
    b.cleanup().await;
}

/// Runs `rabbit-sidecar check ARGS` and returns (exit code, stdout).
async fn check(args: &[&str]) -> (i32, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_rabbit-sidecar"));
    cmd.arg("check")
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("check exits within 30s")
        .expect("the binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn a_queue_it_did_not_declare_is_warned_about_at_start_and_by_check() {
    let b = Broker::connect().await;
    let queue = unique("limit-foreign");
    // A quorum queue with a limit (explicit here, so 3.10 has one too) and no dead-letter
    // exchange, declared by someone else.
    b.declare_with(
        &queue,
        &[
            ("x-queue-type", AMQPValue::LongString("quorum".into())),
            ("x-delivery-limit", AMQPValue::LongInt(10)),
        ],
    )
    .await;
    let app = App::start().await;
    let url = app.url();
    let flags = [
        "--amqp-url",
        amqp(),
        "--queue",
        &queue,
        "--target-url",
        &url,
        "--management-url",
        management_url(),
        "--max-deliveries",
        "12",
    ];

    let (code, out) = check(&flags).await;
    assert_eq!(code, 0, "warnings do not fail the check: {out}");
    let warnings: Vec<&str> = out.lines().filter(|l| l.contains("WARNING")).collect();
    assert_eq!(warnings.len(), 2, "{out}");
    assert!(warnings[0].contains("no dead-letter exchange") && warnings[0].contains(&queue));
    assert!(
        warnings[0].contains("set_policy"),
        "says how to fix it: {out}"
    );
    assert!(warnings[1].contains("--max-deliveries 12"), "{out}");

    let sidecar = Sidecar::start(&flags);
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let logs = sidecar.logs();
    assert!(logs.contains("no dead-letter exchange"), "{logs}");
    assert!(logs.contains("--max-deliveries 12"), "{logs}");
    drop(sidecar);

    // Fixed the way the warning says (a policy): the check is quiet.
    let policy = format!("{queue}-dead-letter");
    let definition = format!(
        "{{\"dead-letter-exchange\":\"\",\"dead-letter-routing-key\":\"{queue}.dead-letter\"}}"
    );
    rabbitmqctl(&[
        "set_policy",
        "--apply-to",
        "queues",
        &policy,
        &format!("^{queue}$"),
        &definition,
    ]);
    let quiet = eventually(Duration::from_secs(10), || async {
        let (_, out) = check(&flags[..flags.len() - 2]).await;
        !out.contains("WARNING") && out.contains("delivery limit 10, ok")
    })
    .await;
    rabbitmqctl(&["clear_policy", &policy]);
    assert!(quiet, "{}", check(&flags).await.1);
    b.cleanup().await;
}

/// The app is never told of more attempts than it has seen the message: an attempt is spent
/// only when the app had the message (and not even then when the app went away while holding
/// it), never by a return it did not see.
fn attempts_follow_receipts(app: &App, ids: &[String]) {
    let received = app.received();
    for id in ids {
        let attempts: Vec<u32> = received
            .iter()
            .filter(|r| &r.id() == id)
            .map(|r| r.header("x-amqp-attempt").map_or(1, |a| a.parse().unwrap()))
            .collect();
        assert!(!attempts.is_empty(), "{id} reached the app");
        for (seen, attempt) in attempts.iter().enumerate() {
            assert!(
                *attempt <= seen as u32 + 1,
                "{id}: attempts as the app saw them: {attempts:?}"
            );
        }
    }
}

#[tokio::test]
async fn returns_while_the_app_is_down_spend_no_attempt_on_a_quorum_queue() {
    let b = Broker::connect().await;
    let queue = unique("limit-app-down");
    b.track(&queue);
    let mut app = App::start().await;
    app.set_delay(Duration::from_millis(300));
    let url = app.url();
    // One slot, so most messages wait in the prefetch buffer when the app goes away: those are
    // given back without the app having seen them.
    let sidecar = Sidecar::start(&args(
        &queue,
        &url,
        &[
            "--queue-type",
            "quorum",
            "--concurrency",
            "1",
            "--prefetch",
            "20",
        ],
    ));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let ids = b.publish_n(&queue, 12, "down").await;
    let returned = format!(
        "rabbit_sidecar_nacks_total{{{},requeue=\"true\"}}",
        q(&queue)
    );
    for cycle in 0..2 {
        let seen = app.count();
        assert!(
            eventually(Duration::from_secs(10), || async { app.count() > seen }).await,
            "cycle {cycle}: the app gets work"
        );
        let before = sidecar.metric(&returned).await;
        app.down();
        assert!(
            eventually(Duration::from_secs(10), || async {
                sidecar.metric(&returned).await > before
            })
            .await,
            "cycle {cycle}: unstarted messages are given back"
        );
        app.up().await;
    }
    assert!(
        app.received_all(&ids, Duration::from_secs(30)).await,
        "every message reaches the app: {:?}",
        app.ids()
    );
    attempts_follow_receipts(&app, &ids);
    assert_eq!(
        sidecar
            .metric(
                &series("rabbit_sidecar_dead_letters_total", &queue)
                    .replace('}', ",reason=\"max_deliveries\"}")
            )
            .await,
        0.0
    );
    drop(sidecar);
    b.cleanup().await;
}

#[tokio::test]
async fn messages_returned_at_shutdown_spend_no_attempt_on_a_quorum_queue() {
    let b = Broker::connect().await;
    let queue = unique("limit-shutdown");
    b.track(&queue);
    let app = App::start().await;
    app.set_delay(Duration::from_millis(300));
    let url = app.url();
    let flags = [
        "--queue-type",
        "quorum",
        "--concurrency",
        "1",
        "--max-deliveries",
        "1",
    ];
    let ids = {
        let mut sidecar = Sidecar::start(&args(&queue, &url, &flags));
        sidecar.wait_ready(Duration::from_secs(20)).await;
        let ids = b.publish_n(&queue, 8, "term").await;
        assert!(eventually(Duration::from_secs(10), || async { app.count() >= 1 }).await);
        sidecar.signal("TERM");
        assert!(sidecar.wait_exit(Duration::from_secs(20)).await.is_some());
        ids
    };
    assert!(
        app.count() < ids.len(),
        "some messages were given back unstarted"
    );
    // With one attempt allowed, a return that spent one would be dead-lettered on arrival.
    let sidecar = Sidecar::start(&args(&queue, &url, &flags));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    assert!(
        app.received_all(&ids, Duration::from_secs(20)).await,
        "every message reaches the app: {:?}",
        app.ids()
    );
    attempts_follow_receipts(&app, &ids);
    assert_eq!(b.count(&format!("{queue}.dead-letter")).await, Some((0, 0)));
    drop(sidecar);
    b.cleanup().await;
}
