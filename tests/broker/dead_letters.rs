//! `rabbit-sidecar dead-letters`: the binary against the real broker. Dead letters come from the
//! real sidecar (an app answering 400 or 503), from the broker itself (a rejected and an expired
//! message on a queue whose dead-letter exchange leads to the dead-letter queue), or are published
//! with the sidecar's headers where a test needs exact control.
//!
//! What is proven: `list` counts by reason with examples and removes nothing, and never lets a
//! dead letter vanish by browsing a quorum queue with a delivery limit; `replay` moves by reason
//! and limit, in order, with the history reset and everything else kept, removes a dead letter
//! only after its copy was confirmed, and loses nothing when killed with -9; a dry run moves
//! nothing; `purge` wants `--yes`; the consumer's configuration applies and no password is printed.

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::*;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::Value;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("JSON ({e}): {self:?}"))
    }
}

fn command(args: &[&str], env: &[(&str, &str)]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_rabbit-sidecar"));
    for (name, _) in std::env::vars() {
        if name.starts_with("RABBIT_SIDECAR_") {
            cmd.env_remove(name);
        }
    }
    // The broker under test, unless a test names another (a flag, or this variable in `env`).
    cmd.env("RABBIT_SIDECAR_AMQP_URL", amqp());
    cmd.arg("dead-letters")
        .args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// `rabbit-sidecar dead-letters ARGS` with `env` (no inherited `RABBIT_SIDECAR_*` but the broker
/// under test's URL); it must exit within 60 seconds.
async fn dl(args: &[&str], env: &[(&str, &str)]) -> Run {
    let out = tokio::time::timeout(Duration::from_secs(60), command(args, env).output())
        .await
        .unwrap_or_else(|_| panic!("dead-letters {args:?} did not exit within 60s"))
        .expect("the binary runs");
    Run {
        code: out.status.code().expect("exited, not killed by a signal"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn ok(args: &[&str]) -> Run {
    let r = dl(args, &[]).await;
    assert_eq!(r.code, 0, "dead-letters {args:?}: {r:?}");
    r
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A dead letter as the sidecar writes it, with every property set.
fn sidecar_dead_letter(id: &str, reason: &str, origin: &str) -> BasicProperties {
    let mut h = FieldTable::default();
    h.insert("x-sidecar-dead-letter-reason".into(), text(reason));
    h.insert("x-sidecar-attempts".into(), AMQPValue::LongLongInt(3));
    h.insert("x-sidecar-last-status".into(), AMQPValue::LongInt(400));
    h.insert("x-sidecar-last-error".into(), text("HTTP 400: answer"));
    h.insert("x-sidecar-original-exchange".into(), text("shop"));
    h.insert(
        "x-sidecar-original-routing-key".into(),
        text("order.created"),
    );
    h.insert("x-sidecar-original-queue".into(), text(origin));
    h.insert("x-delivery-count".into(), AMQPValue::LongInt(2));
    let mut death = FieldTable::default();
    death.insert("reason".into(), text("expired"));
    death.insert("queue".into(), text(&format!("{origin}.retry")));
    death.insert("count".into(), AMQPValue::LongLongInt(2));
    death.insert("time".into(), AMQPValue::Timestamp(now()));
    h.insert(
        "x-death".into(),
        AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
    );
    h.insert("x-first-death-reason".into(), text("expired"));
    h.insert("traceparent".into(), text(TRACEPARENT));
    h.insert("tracestate".into(), text("vendor=1"));
    h.insert("tenant".into(), text("acme"));
    BasicProperties::default()
        .with_message_id(id.into())
        .with_correlation_id(format!("corr-{id}").as_str().into())
        .with_content_type("application/json".into())
        .with_app_id("shop".into())
        .with_timestamp(now())
        .with_priority(4)
        .with_headers(h)
}

async fn declare_with(b: &Broker, queue: &str, args: &[(&str, AMQPValue)]) {
    let mut t = FieldTable::default();
    for (k, v) in args {
        t.insert((*k).into(), v.clone());
    }
    b.ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        t,
    )
    .await
    .unwrap();
}

fn quorum() -> (&'static str, AMQPValue) {
    ("x-queue-type", text("quorum"))
}

async fn ready(b: &Broker, queue: &str) -> u32 {
    b.count(queue).await.map(|(r, _)| r).unwrap_or(u32::MAX)
}

/// Polls until each queue has the ready count it is paired with (messages a closed channel
/// gives back reach a quorum queue a moment later), at most 10 s; asserts it got there.
async fn assert_ready(b: &Broker, want: &[(&str, u32)], what: &str) {
    let seen = std::sync::Mutex::new(Vec::new());
    let ok = eventually(Duration::from_secs(10), || async {
        let mut now = Vec::new();
        for (queue, _) in want {
            now.push(ready(b, queue).await);
        }
        let done = want.iter().map(|(_, n)| *n).eq(now.iter().copied());
        *seen.lock().unwrap() = now;
        done
    })
    .await;
    let seen = seen.into_inner().unwrap();
    assert!(ok, "{what}: ready counts {seen:?}, want {want:?}");
}

fn ids(messages: &[(Vec<u8>, BasicProperties)]) -> Vec<String> {
    messages
        .iter()
        .map(|(_, p)| p.message_id().as_ref().unwrap().to_string())
        .collect()
}

/// The count of `reason` from `source` in a list report.
fn reason_count(report: &Value, reason: &str, source: &str) -> u64 {
    report["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["reason"] == reason && g["source"] == source)
        .map(|g| g["count"].as_u64().unwrap())
        .unwrap_or(0)
}

#[tokio::test]
async fn list_counts_sidecar_and_broker_dead_letters_by_reason_with_examples() {
    let b = Broker::connect().await;
    let queue = unique("dl-list");
    let dlq = format!("{queue}.dead-letter");
    b.track(&queue);
    // The consumed queue dead-letters to the sidecar's dead-letter queue too, so that the broker's
    // own dead letters (a reject, an expiry) land beside the sidecar's.
    declare_with(
        &b,
        &queue,
        &[
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text(&dlq)),
        ],
    )
    .await;
    declare_with(&b, &dlq, &[]).await;
    b.publish(
        &queue,
        b"expiring",
        BasicProperties::default()
            .with_message_id("expiring".into())
            .with_expiration("1".into()),
    )
    .await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            ready(&b, &dlq).await == 1
        })
        .await
    );
    b.publish(
        &queue,
        b"refused",
        BasicProperties::default().with_message_id("refused".into()),
    )
    .await;
    let got =
        b.ch.basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
            .unwrap();
    got.delivery
        .acker
        .reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            ready(&b, &dlq).await == 2
        })
        .await
    );

    let app = App::start().await;
    app.answer(|r| match r.id() {
        id if id.starts_with("bad") => 400,
        id if id.starts_with("sick") => 503,
        _ => 200,
    });
    let url = app.url();
    let mut sidecar = Sidecar::spawn(&[
        "--amqp-url",
        amqp(),
        "--queue",
        &queue,
        "--target-url",
        &url,
        "--retry-backoff",
        "100ms",
        "--max-deliveries",
        "2",
    ]);
    for id in [
        "bad-1", "good-1", "sick-1", "bad-2", "sick-2", "bad-3", "good-2",
    ] {
        b.publish(
            &queue,
            id.as_bytes(),
            BasicProperties::default()
                .with_message_id(id.into())
                .with_timestamp(now()),
        )
        .await;
    }
    assert!(
        eventually(Duration::from_secs(30), || async {
            ready(&b, &dlq).await == 7
        })
        .await,
        "five dead letters from the sidecar; logs:\n{}",
        sidecar.logs()
    );
    sidecar.kill9().await;

    let report = ok(&["list", "--queue", &queue, "--json"]).await.json();
    assert_eq!(report["queue"], queue.as_str());
    assert_eq!(report["dead_letter_queue"], dlq.as_str());
    assert_eq!(report["messages"], 7);
    assert_eq!(report["scanned"], 7);
    assert_eq!(reason_count(&report, "rejected", "sidecar"), 3);
    assert_eq!(reason_count(&report, "max_deliveries", "sidecar"), 2);
    assert_eq!(reason_count(&report, "rejected", "broker"), 1);
    assert_eq!(reason_count(&report, "expired", "broker"), 1);
    let group = |reason: &str, source: &str| {
        report["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["reason"] == reason && g["source"] == source)
            .unwrap()
            .clone()
    };
    let rejected = group("rejected", "sidecar");
    let examples = rejected["examples"].as_array().unwrap();
    assert_eq!(examples.len(), 3);
    let mut example_ids: Vec<&str> = examples
        .iter()
        .map(|e| e["message_id"].as_str().unwrap())
        .collect();
    example_ids.sort();
    assert_eq!(example_ids, ["bad-1", "bad-2", "bad-3"]);
    assert_eq!(examples[0]["last_status"], 400);
    assert_eq!(examples[0]["attempts"], 1);
    assert_eq!(examples[0]["origin_queue"], queue.as_str());
    assert!(
        examples[0]["last_error"]
            .as_str()
            .unwrap()
            .contains("answer"),
        "the app's answer: {report:#}"
    );
    assert!(rejected["oldest"].is_string() && rejected["newest"].is_string());
    let sick = group("max_deliveries", "sidecar");
    assert_eq!(sick["examples"][0]["last_status"], 503);
    assert_eq!(sick["examples"][0]["attempts"], 2);
    let expired = group("expired", "broker");
    assert_eq!(expired["examples"][0]["message_id"], "expiring");
    assert_eq!(expired["examples"][0]["origin_queue"], queue.as_str());
    assert!(
        expired["examples"][0]["time"].is_string(),
        "the x-death time"
    );
    assert_eq!(report["origins"][0]["queue"], queue.as_str());
    assert_eq!(report["origins"][0]["count"], 7);
    assert!(report["oldest"].is_string() && report["newest"].is_string());
    assert_eq!(report["delivery_limit"]["source"], "assumed");

    // The human report says the same, and the list removed nothing.
    let human = ok(&["list", "--queue", &queue]).await.stdout;
    for needle in [
        "7 message(s)",
        "rejected",
        "max_deliveries",
        "expired",
        "id=bad-1",
        "status=400",
    ] {
        assert!(human.contains(needle), "{needle:?} in\n{human}");
    }
    assert_ready(&b, &[(&dlq, 7)], "dlq").await;
    // With the management API, the queue's type and limit are known.
    let report = ok(&[
        "list",
        "--queue",
        &queue,
        "--json",
        "--management-url",
        management_url(),
    ])
    .await
    .json();
    assert_eq!(report["queue_type"], "classic");
    assert_eq!(report["delivery_limit"]["limit"], Value::Null);
    assert_eq!(report["delivery_limit"]["source"], "management");
    assert_ready(&b, &[(&dlq, 7)], "dlq").await;
    b.cleanup().await;
}

/// Publishes ten dead letters alternating `rejected` / `max_deliveries` (ids d0..d9), one with no
/// recorded origin and one from another queue, into a fresh dead-letter queue of the given type.
async fn mixed_dead_letters(b: &Broker, queue: &str, quorum_dlq: bool) -> String {
    let dlq = format!("{queue}.dead-letter");
    b.track(queue);
    declare_with(b, queue, &[]).await;
    let args = if quorum_dlq { vec![quorum()] } else { vec![] };
    declare_with(b, &dlq, &args).await;
    for i in 0..10 {
        let reason = if i % 2 == 0 {
            "rejected"
        } else {
            "max_deliveries"
        };
        let id = format!("d{i}");
        b.publish(&dlq, id.as_bytes(), sidecar_dead_letter(&id, reason, queue))
            .await;
    }
    b.publish(
        &dlq,
        b"u",
        BasicProperties::default().with_message_id("u".into()),
    )
    .await;
    b.publish(
        &dlq,
        b"o",
        sidecar_dead_letter("o", "rejected", "another-queue"),
    )
    .await;
    dlq
}

async fn replay_by_reason_and_limit_in_order(quorum_dlq: bool) {
    let b = Broker::connect().await;
    let queue = unique(if quorum_dlq {
        "dl-replay-q"
    } else {
        "dl-replay-c"
    });
    let dlq = mixed_dead_letters(&b, &queue, quorum_dlq).await;

    let dry = ok(&[
        "replay",
        "--queue",
        &queue,
        "--reason",
        "max_deliveries",
        "--dry-run",
        "--json",
    ])
    .await
    .json();
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["moved"], 5);
    assert_eq!(dry["left"]["other_reason"], 5);
    assert_eq!(dry["left"]["no_origin"], 1);
    assert_eq!(dry["left"]["other_origin"], 1);
    assert_ready(&b, &[(&dlq, 12), (&queue, 0)], "a dry run moves nothing").await;

    let started = Instant::now();
    let first = ok(&[
        "replay", "--queue", &queue, "--reason", "rejected", "--limit", "3", "--rate", "4/s",
    ])
    .await;
    // Three copies at 4/s: two gaps of 250 ms at least.
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    assert!(
        first.stdout.contains("replayed 3 dead letter(s)"),
        "{first:?}"
    );
    assert!(first.stdout.contains("rejected"), "{first:?}");
    assert_ready(&b, &[(&dlq, 9), (&queue, 3)], "three replayed").await;

    let all = ok(&["replay", "--queue", &queue, "--rate", "200/s", "--json"])
        .await
        .json();
    assert_eq!(all["moved"], 7);
    assert_eq!(all["destinations"][0]["queue"], queue.as_str());
    assert_eq!(all["destinations"][0]["exchange"], "");
    assert_eq!(all["left"]["no_origin"], 1);
    assert_eq!(all["left"]["other_origin"], 1);

    // Every copy arrived. A classic queue keeps the dead-letter queue's order: the filtered-out
    // ones went back to their places. A quorum queue puts a returned message behind those
    // returned before (the dry run returned them all once), so only the set is the same there.
    let moved = b.drain(&queue).await;
    let in_order = ["d0", "d2", "d4", "d1", "d3", "d5", "d6", "d7", "d8", "d9"];
    if quorum_dlq {
        let mut got = ids(&moved);
        got.sort();
        let mut want = in_order.to_vec();
        want.sort();
        assert_eq!(got, want);
        assert_eq!(ids(&moved)[..3], ["d0", "d2", "d4"]);
    } else {
        assert_eq!(ids(&moved), in_order);
    }
    assert_eq!(ids(&b.drain(&dlq).await), ["u", "o"], "the others stay");

    // The history is reset; properties, the producer's headers and the trace context are kept.
    let (body, p) = &moved[0];
    assert_eq!(body, b"d0");
    let original = sidecar_dead_letter("d0", "rejected", &queue);
    assert_eq!(p.correlation_id(), original.correlation_id());
    assert_eq!(p.content_type(), original.content_type());
    assert_eq!(p.app_id(), original.app_id());
    assert_eq!(*p.priority(), Some(4));
    assert!(p.timestamp().is_some());
    assert_eq!(*p.delivery_mode(), Some(2));
    for gone in [
        "x-sidecar-dead-letter-reason",
        "x-sidecar-attempts",
        "x-sidecar-last-status",
        "x-sidecar-last-error",
        "x-death",
        "x-first-death-reason",
    ] {
        assert_eq!(header_str(p, gone), None, "{gone} removed");
    }
    assert!(
        p.headers()
            .as_ref()
            .unwrap()
            .inner()
            .get("x-death")
            .is_none(),
        "x-death removed"
    );
    assert_eq!(header_str(p, "traceparent").as_deref(), Some(TRACEPARENT));
    assert_eq!(header_str(p, "tracestate").as_deref(), Some("vendor=1"));
    assert_eq!(header_str(p, "tenant").as_deref(), Some("acme"));
    assert_eq!(
        header_str(p, "x-sidecar-original-routing-key").as_deref(),
        Some("order.created")
    );
    // The consumed queue is classic: a delivery count on the copy could only be one we carried.
    assert_eq!(header_str(p, "x-delivery-count"), None);
    b.cleanup().await;
}

#[tokio::test]
async fn replay_moves_by_reason_and_limit_in_order_with_the_history_reset_classic() {
    replay_by_reason_and_limit_in_order(false).await;
}

#[tokio::test]
async fn replay_moves_by_reason_and_limit_in_order_with_the_history_reset_quorum() {
    replay_by_reason_and_limit_in_order(true).await;
}

/// The runbook: the app's dependency was down, every message was dead-lettered after its
/// attempts; the app recovered; list, replay, verify. The replayed messages reach the app as
/// first attempts, with their ids and their producer's trace.
#[tokio::test]
async fn after_an_outage_the_dead_letters_are_replayed_to_the_recovered_app() {
    let b = Broker::connect().await;
    let queue = unique("dl-outage");
    let dlq = format!("{queue}.dead-letter");
    b.track(&queue);
    let app = App::start().await;
    app.answer(|_| 503);
    let url = app.url();
    let sidecar = Sidecar::start(&args(
        &queue,
        &url,
        // Without the circuit breaker (on by default, it would park these messages unspent
        // instead): the outage dead-letters every message, as it did before the breaker and
        // still does where it is turned off or the failures are not the kind it counts.
        &[
            "--queue-type",
            "quorum",
            "--max-deliveries",
            "2",
            "--circuit-breaker=false",
        ],
    ));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let n = 20;
    for i in 0..n {
        let id = format!("o-{i}");
        let mut h = FieldTable::default();
        h.insert("traceparent".into(), text(TRACEPARENT));
        b.publish(
            &queue,
            id.as_bytes(),
            BasicProperties::default()
                .with_message_id(id.as_str().into())
                .with_headers(h),
        )
        .await;
    }
    assert!(
        eventually(Duration::from_secs(60), || async {
            ready(&b, &dlq).await == n
        })
        .await,
        "every message dead-lettered; logs:\n{}",
        sidecar.logs()
    );

    app.answer(|_| 200);
    let report = ok(&[
        "list",
        "--queue",
        &queue,
        "--json",
        "--management-url",
        management_url(),
    ])
    .await
    .json();
    assert_eq!(
        reason_count(&report, "max_deliveries", "sidecar"),
        u64::from(n)
    );
    assert_eq!(report["reasons"][0]["examples"][0]["last_status"], 503);
    assert_eq!(report["queue_type"], "quorum");
    let replay_started = Instant::now();
    let out = ok(&["replay", "--queue", &queue, "--rate", "100/s"]).await;
    assert!(
        out.stdout.contains(&format!("replayed {n} dead letter(s)")),
        "{out:?}"
    );
    assert!(
        eventually(Duration::from_secs(30), || async {
            app.received()
                .iter()
                .filter(|r| r.at >= replay_started)
                .count()
                >= n as usize
        })
        .await,
        "the app gets the replayed messages; logs:\n{}",
        sidecar.logs()
    );
    let replayed: Vec<Received> = app
        .received()
        .into_iter()
        .filter(|r| r.at >= replay_started)
        .collect();
    let got: HashSet<String> = replayed.iter().map(Received::id).collect();
    assert_eq!(got.len(), n as usize, "every id once");
    for r in &replayed {
        assert_eq!(
            r.header("x-amqp-attempt"),
            Some("1"),
            "a first attempt again"
        );
        assert_eq!(r.header("x-amqp-message-id"), Some(r.id().as_str()));
        assert_eq!(r.header("x-amqp-header-x-sidecar-attempts"), None);
        assert_eq!(r.header("x-amqp-header-x-sidecar-dead-letter-reason"), None);
        let trace = r.header("traceparent").unwrap_or_default();
        assert!(
            trace.contains("4bf92f3577b34da6a3ce929d0e0e4736"),
            "the producer's trace goes on: {trace}"
        );
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            ready(&b, &dlq).await == 0 && ready(&b, &queue).await == 0
        })
        .await
    );
    b.cleanup().await;
}

/// Browsing a quorum queue returns each message once per list; RabbitMQ drops a message returned
/// more often than the queue's delivery limit when there is no dead-letter exchange. `list`
/// refreshes the messages near the limit instead, so listing as often as one likes loses nothing.
async fn listing_often_loses_nothing(limit: i64, lists: usize, management: bool) {
    let b = Broker::connect().await;
    let queue = unique("dl-limit");
    let dlq = format!("{queue}.dead-letter");
    b.track(&queue);
    declare_with(&b, &queue, &[]).await;
    declare_with(
        &b,
        &dlq,
        &[
            quorum(),
            ("x-delivery-limit", AMQPValue::LongLongInt(limit)),
        ],
    )
    .await;
    let all: Vec<String> = (0..4).map(|i| format!("n{i}")).collect();
    for id in &all {
        b.publish(
            &dlq,
            id.as_bytes(),
            sidecar_dead_letter(id, "rejected", &queue),
        )
        .await;
    }
    let mut args = vec!["list", "--queue", &queue, "--json"];
    if management {
        args.extend(["--management-url", management_url()]);
    }
    let mut refreshed = 0;
    for round in 0..lists {
        let report = ok(&args).await.json();
        assert_eq!(report["scanned"], 4, "round {round}: {report:#}");
        if management {
            assert_eq!(report["delivery_limit"]["limit"], limit, "{report:#}");
        }
        refreshed += report["refreshed"].as_u64().unwrap();
    }
    assert!(
        refreshed > 0,
        "messages came near the limit and were refreshed"
    );
    let left = b.drain(&dlq).await;
    let mut got = ids(&left);
    got.sort();
    assert_eq!(got, all, "nothing vanished, nothing doubled");
    b.cleanup().await;
}

#[tokio::test]
async fn listing_a_quorum_dead_letter_queue_often_loses_nothing_with_its_known_limit() {
    listing_often_loses_nothing(3, 8, true).await;
}

#[tokio::test]
async fn listing_a_quorum_dead_letter_queue_often_loses_nothing_with_the_assumed_limit() {
    // RabbitMQ 4's default of 20, declared here on 3.10, and no --management-url.
    listing_often_loses_nothing(20, 24, false).await;
}

#[tokio::test]
async fn purge_refuses_without_yes_and_removes_everything_with_it() {
    let b = Broker::connect().await;
    let queue = unique("dl-purge");
    let dlq = mixed_dead_letters(&b, &queue, false).await;
    let r = dl(&["purge", "--queue", &queue], &[]).await;
    assert_eq!(r.code, 64, "{r:?}");
    assert!(r.stderr.contains("--yes"), "{r:?}");
    assert_ready(&b, &[(&dlq, 12)], "nothing removed").await;
    let r = ok(&["purge", "--queue", &queue, "--yes", "--json"])
        .await
        .json();
    assert_eq!(r["purged"], 12);
    assert_eq!(r["dead_letter_queue"], dlq.as_str());
    assert_ready(&b, &[(&dlq, 0)], "dlq").await;
    b.cleanup().await;
}

/// kill -9 in the middle of a slow replay (with a filter, so the replay also holds messages it
/// passed over), twice: every id is afterwards in the queue or still in the dead-letter queue.
/// At 10/s the replay spends nearly all its time waiting for the next slot with the next message
/// in hand, which is where a replay that removed a dead letter before its copy was confirmed
/// would lose it.
#[tokio::test]
async fn kill_9_in_the_middle_of_a_replay_loses_nothing() {
    let b = Broker::connect().await;
    let queue = unique("dl-kill");
    let dlq = format!("{queue}.dead-letter");
    b.track(&queue);
    declare_with(&b, &queue, &[]).await;
    declare_with(&b, &dlq, &[]).await;
    let n = 300;
    let all: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
    for (i, id) in all.iter().enumerate() {
        let reason = if i % 4 == 3 {
            "max_deliveries"
        } else {
            "rejected"
        };
        b.publish(&dlq, id.as_bytes(), sidecar_dead_letter(id, reason, &queue))
            .await;
    }
    for round in 1..=2u32 {
        let mut child = command(
            &[
                "replay", "--queue", &queue, "--reason", "rejected", "--rate", "10/s",
            ],
            &[],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
        let moving = eventually(Duration::from_secs(30), || async {
            ready(&b, &queue).await >= 10 * round
        })
        .await;
        assert!(moving, "round {round}: the replay moves messages");
        let pid = child.id().unwrap();
        let killed = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status.code(), None, "killed by the signal");
        // The broker gives back what the dead process held once it sees the connection gone; a
        // loss keeps the total below n until the deadline, and the check below names the ids.
        eventually(Duration::from_secs(15), || async {
            ready(&b, &dlq).await as usize + ready(&b, &queue).await as usize >= n
        })
        .await;
    }
    let in_queue = ids(&b.drain(&queue).await);
    let in_dlq = ids(&b.drain(&dlq).await);
    let seen: HashSet<&String> = in_queue.iter().chain(in_dlq.iter()).collect();
    let lost: Vec<&String> = all.iter().filter(|id| !seen.contains(id)).collect();
    assert!(lost.is_empty(), "lost {lost:?}");
    assert!(
        in_queue.len() < 225,
        "killed in the middle: {} of 225 moved",
        in_queue.len()
    );
    let duplicates = in_queue.len() + in_dlq.len() - n;
    println!(
        "moved {} before two kill -9, {} left, {duplicates} duplicate(s)",
        in_queue.len(),
        in_dlq.len()
    );
    b.cleanup().await;
}

#[tokio::test]
async fn a_copy_the_broker_refuses_leaves_its_dead_letter_in_place() {
    let b = Broker::connect().await;
    let queue = unique("dl-refused");
    let dlq = format!("{queue}.dead-letter");
    b.track(&queue);
    // A queue that refuses every publish: the copy is nacked.
    declare_with(
        &b,
        &queue,
        &[
            ("x-max-length", AMQPValue::LongLongInt(0)),
            ("x-overflow", text("reject-publish")),
        ],
    )
    .await;
    declare_with(&b, &dlq, &[]).await;
    for id in ["r0", "r1", "r2"] {
        b.publish(
            &dlq,
            id.as_bytes(),
            sidecar_dead_letter(id, "rejected", &queue),
        )
        .await;
    }
    let r = dl(&["replay", "--queue", &queue], &[]).await;
    assert_eq!(r.code, 69, "{r:?}");
    assert!(r.stderr.contains("refused"), "{r:?}");
    assert!(r.stdout.contains("0 dead letter(s)"), "{r:?}");
    assert_eq!(
        ids(&b.drain(&dlq).await),
        ["r0", "r1", "r2"],
        "in place, in order"
    );

    // A destination that does not exist: nothing is read at all.
    let missing = unique("dl-missing");
    let missing_dlq = format!("{missing}.dead-letter");
    b.track(&missing);
    declare_with(&b, &missing_dlq, &[]).await;
    b.publish(
        &missing_dlq,
        b"m",
        sidecar_dead_letter("m", "rejected", &missing),
    )
    .await;
    let r = dl(&["replay", "--queue", &missing], &[]).await;
    assert_eq!(r.code, 69, "{r:?}");
    assert!(r.stderr.contains("does not exist"), "{r:?}");
    assert_ready(&b, &[(&missing_dlq, 1)], "missing_dlq").await;
    b.cleanup().await;
}

#[tokio::test]
async fn sigint_stops_a_replay_between_messages_and_reports() {
    let b = Broker::connect().await;
    let queue = unique("dl-sigint");
    let dlq = mixed_dead_letters(&b, &queue, false).await;
    let child = command(&["replay", "--queue", &queue, "--rate", "2/s"], &[])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || async {
            ready(&b, &queue).await >= 2
        })
        .await
    );
    let pid = child.id().unwrap();
    std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("the replay stops promptly")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(130), "{stdout}");
    assert!(stdout.contains("stopped after replaying"), "{stdout}");
    let moved = ready(&b, &queue).await;
    assert!(moved < 10, "stopped early: {moved}");
    assert_eq!(
        moved + ready(&b, &dlq).await,
        12,
        "a clean stop makes no duplicate and loses nothing"
    );
    b.cleanup().await;
}

#[tokio::test]
async fn the_consumers_configuration_applies_and_no_password_is_printed() {
    let b = Broker::connect().await;
    let queue = unique("dl-config");
    b.track(&queue);
    declare_with(&b, &queue, &[]).await;
    let custom_dlq = format!("{queue}.custom-dlq");
    b.track(&custom_dlq);
    declare_with(&b, &custom_dlq, &[]).await;
    b.publish(
        &custom_dlq,
        b"c",
        sidecar_dead_letter("c", "rejected", &queue),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sidecar.toml");
    std::fs::write(
        &file,
        format!(
            "[[subscription]]\nqueue = \"other\"\n[[subscription]]\nqueue = \"{queue}\"\ndead-letter-queue = \"{custom_dlq}\"\n"
        ),
    )
    .unwrap();
    let file = file.to_str().unwrap();
    // The first node is down: the next is tried, as by the consumer.
    let nodes = format!("amqp://guest:guest@127.0.0.1:1/%2f,{}", amqp());
    let env = [
        ("RABBIT_SIDECAR_CONFIG", file),
        ("RABBIT_SIDECAR_AMQP_URL", nodes.as_str()),
    ];
    let r = dl(&["list", "--queue", &queue, "--json"], &env).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["dead_letter_queue"], custom_dlq.as_str());
    assert_eq!(r.json()["messages"], 1);
    let r = dl(&["list", "--json"], &env).await;
    assert_eq!(r.code, 64, "two subscriptions: --queue picks one: {r:?}");
    assert!(r.stderr.contains("--queue"), "{r:?}");

    let secret = "s3cr3t-pa55";
    let bad = format!("amqp://guest:{secret}@{}/%2f", amqp_addr());
    let r = dl(&["list", "--queue", &queue, "--amqp-url", &bad], &[]).await;
    assert_eq!(r.code, 69, "{r:?}");
    assert!(
        !r.stdout.contains(secret) && !r.stderr.contains(secret),
        "{r:?}"
    );
    let r = dl(
        &[
            "replay",
            "--queue",
            &queue,
            "--management-url",
            &format!("http://guest:{secret}@{}", management_addr()),
            "--dry-run",
        ],
        &[("RABBIT_SIDECAR_DEAD_LETTER_QUEUE", &custom_dlq)],
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("would replay 1"), "{r:?}");
    assert!(
        !r.stdout.contains(secret) && !r.stderr.contains(secret),
        "{r:?}"
    );

    for (args, needle) in [
        (&["list"][..], "--queue"),
        (
            &["replay", "--queue", "q", "--reason", "reject"],
            "--reason",
        ),
        (&["replay", "--queue", "q", "--rate", "fast"], "--rate"),
        (
            &["list", "--queue", "q", "--heartbeat", "soon"],
            "--heartbeat",
        ),
        (&[], "Usage"),
    ] {
        let r = dl(args, &[]).await;
        assert_eq!(r.code, 64, "{args:?}: {r:?}");
        assert!(r.stderr.contains(needle), "{args:?} names {needle}: {r:?}");
    }
    let r = dl(
        &[
            "list",
            "--queue",
            "q",
            "--amqp-url",
            "amqp://guest:guest@127.0.0.1:1/%2f",
        ],
        &[],
    )
    .await;
    assert_eq!(r.code, 69, "{r:?}");
    let r = dl(&["list", "--queue", &unique("dl-nothing")], &[]).await;
    assert_eq!(r.code, 69, "{r:?}");
    assert!(r.stderr.contains("does not exist"), "{r:?}");
    b.cleanup().await;
}
