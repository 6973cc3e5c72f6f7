//! The circuit breaker in front of the app, against the real broker: a dependency outage behind a
//! reachable app (503 to everything) dead-letters nothing, loses nothing and spares the sick app;
//! a poison message among healthy ones is still dead-lettered after `--max-deliveries`; a 4xx
//! storm never opens the circuit; the app gate and the breaker work together; `Retry-After` sets
//! a message's retry delay (seconds and HTTP-date, capped); readiness, `/status` and metrics show
//! the circuit, and the retry and dead-letter queues' depth is polled.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::common::*;

/// An app whose answers the test switches between healthy (200) and sick (503), recording which
/// ids it accepted (how many times each).
struct Switchable {
    app: App,
    sick: Arc<AtomicBool>,
    accepted: Arc<Mutex<HashMap<String, u32>>>,
}

impl Switchable {
    async fn start() -> Switchable {
        let app = App::start().await;
        let sick = Arc::new(AtomicBool::new(false));
        let accepted: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let (s, a) = (sick.clone(), accepted.clone());
        app.answer(move |r| {
            if s.load(Ordering::SeqCst) {
                503
            } else {
                *a.lock().unwrap().entry(r.id()).or_default() += 1;
                200
            }
        });
        Switchable {
            app,
            sick,
            accepted,
        }
    }

    fn set_sick(&self, sick: bool) {
        self.sick.store(sick, Ordering::SeqCst);
    }

    fn accepted(&self) -> HashMap<String, u32> {
        self.accepted.lock().unwrap().clone()
    }
}

/// `metric{queue="…", <extra>}` as it appears in a scrape.
fn labelled(metric: &str, labels: &str) -> String {
    format!("{metric}{{{labels}}}")
}

async fn metric_or_zero(sidecar: &Sidecar, series: &str) -> f64 {
    metric_value(&sidecar.metrics().await, series).unwrap_or(0.0)
}

/// The `app` label of the breaker of `app`.
fn app_label(app: &App) -> String {
    format!("app=\"{}\"", app.addr)
}

async fn dependency_outage(quorum: bool) {
    let broker = Broker::connect().await;
    let queue = unique(if quorum { "cb-outage-q" } else { "cb-outage-c" });
    broker.track(&queue);
    let app = Switchable::start().await;
    let url = app.app.url();
    let queue_type = if quorum { "quorum" } else { "classic" };
    // Defaults for the breaker and the backoff (1 s, doubling), except a short cap of the open
    // time so recovery is seen soon, and three deliveries at most: the circuit opens within about
    // a second (20 answers, half of them failures of 10 messages), so a message fails at most
    // twice before it opens; one attempt spent on the outage afterwards would dead-letter it.
    // (With the 100 ms backoff of the other tests, messages fail several times before the
    // circuit opens: those attempts are spent, as the README says.)
    let sidecar = Sidecar::start(&args(
        &queue,
        &url,
        &[
            "--queue-type",
            queue_type,
            "--circuit-open-max",
            "4s",
            "--retry-backoff",
            "1s",
            "--max-deliveries",
            "3",
        ],
    ));
    sidecar.wait_ready(Duration::from_secs(20)).await;

    // A steady flow of 30 msg/s for 20 s: 3 s healthy, 12 s sick, 5 s healthy.
    const RATE: u64 = 30;
    const SECONDS: u64 = 20;
    let publisher = {
        let queue = queue.clone();
        tokio::spawn(async move {
            let broker = Broker::connect().await;
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
            let mut ids = Vec::new();
            for i in 0..RATE * SECONDS {
                tick.tick().await;
                let id = format!("m-{i}");
                broker
                    .publish(
                        &queue,
                        id.as_bytes(),
                        lapin::BasicProperties::default().with_message_id(id.as_str().into()),
                    )
                    .await;
                ids.push(id);
            }
            ids
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    app.set_sick(true);
    let sick_from = Instant::now();
    let open = labelled(
        "rabbit_sidecar_circuit_state",
        &format!("{},state=\"open\"", app_label(&app.app)),
    );
    assert!(
        sidecar
            .wait_metric(&open, 1.0, Duration::from_secs(10))
            .await,
        "the circuit opens during the outage"
    );
    tokio::time::sleep(Duration::from_secs(12).saturating_sub(sick_from.elapsed())).await;
    app.set_sick(false);
    let sick_until = Instant::now();
    let ids = tokio::time::timeout(Duration::from_secs(30), publisher)
        .await
        .expect("the publisher finishes")
        .unwrap();

    let want: HashSet<String> = ids.iter().cloned().collect();
    assert!(
        eventually(Duration::from_secs(60), || async {
            app.accepted().keys().cloned().collect::<HashSet<_>>() == want
        })
        .await,
        "every message accepted after the outage; missing {}; dead letters (id, attempts): {:?}",
        want.len() - app.accepted().len(),
        broker
            .drain(&format!("{queue}.dead-letter"))
            .await
            .iter()
            .map(|(body, props)| (
                String::from_utf8_lossy(body).into_owned(),
                header_str(props, "x-sidecar-attempts")
            ))
            .collect::<Vec<_>>()
    );
    let sick_requests = app
        .app
        .received()
        .iter()
        .filter(|r| r.at >= sick_from && r.at < sick_until)
        .count();
    let outage = (sick_until - sick_from).as_secs_f64();
    let per_second = sick_requests as f64 / outage;
    println!(
        "{queue_type}: {sick_requests} requests to the sick app in {outage:.1} s = {per_second:.1} req/s \
         (incoming {RATE} msg/s); {} requests in all for {} messages",
        app.app.count(),
        ids.len()
    );
    // Without the breaker it is the incoming rate plus every retry (over 100 req/s here); with
    // it, measured: 2 req/s (the calls before it opened, then one probe per open period).
    assert!(
        per_second < 5.0,
        "the sick app is spared: {per_second:.1} req/s during the outage"
    );
    let twice: Vec<_> = app.accepted().into_iter().filter(|(_, n)| *n > 1).collect();
    assert!(twice.is_empty(), "each message accepted once: {twice:?}");
    let dead_letter_queue = format!("{queue}.dead-letter");
    assert_eq!(
        broker.count(&dead_letter_queue).await.map(|c| c.0),
        Some(0),
        "nothing dead-lettered"
    );
    let closed = labelled(
        "rabbit_sidecar_circuit_state",
        &format!("{},state=\"closed\"", app_label(&app.app)),
    );
    assert!(
        sidecar
            .wait_metric(&closed, 1.0, Duration::from_secs(10))
            .await
    );
    let m = sidecar.metrics().await;
    for reason in ["max_deliveries", "rejected"] {
        assert_eq!(
            metric_value(
                &m,
                &labelled(
                    "rabbit_sidecar_dead_letters_total",
                    &format!("{},reason=\"{reason}\"", q(&queue))
                )
            ),
            Some(0.0)
        );
    }
    sidecar.wait_ready(Duration::from_secs(10)).await;
    broker.cleanup().await;
}

#[tokio::test]
async fn a_dependency_outage_dead_letters_nothing_and_spares_the_app_classic() {
    dependency_outage(false).await;
}

#[tokio::test]
async fn a_dependency_outage_dead_letters_nothing_and_spares_the_app_quorum() {
    dependency_outage(true).await;
}

#[tokio::test]
async fn a_poison_message_among_healthy_ones_is_still_dead_lettered() {
    let broker = Broker::connect().await;
    let queue = unique("cb-poison");
    broker.track(&queue);
    let app = App::start().await;
    app.answer(|r| {
        if r.id().starts_with("poison") {
            500
        } else {
            200
        }
    });
    let sidecar = Sidecar::start(&args(&queue, &app.url(), &["--max-deliveries", "4"]));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    broker.publish_n(&queue, 1, "poison").await;
    let healthy = broker.publish_n(&queue, 100, "ok").await;
    let dead_letter_queue = format!("{queue}.dead-letter");
    assert!(
        eventually(Duration::from_secs(20), || async {
            broker.count(&dead_letter_queue).await.map(|c| c.0) == Some(1)
        })
        .await,
        "the poison message is dead-lettered"
    );
    let letters = broker.drain(&dead_letter_queue).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].0, b"poison-0");
    assert_eq!(
        header_str(&letters[0].1, "x-sidecar-dead-letter-reason").as_deref(),
        Some("max_deliveries")
    );
    let poison_calls = app
        .received()
        .iter()
        .filter(|r| r.id() == "poison-0")
        .count();
    assert_eq!(poison_calls, 4, "exactly --max-deliveries attempts");
    assert!(
        app.received_all(&healthy, Duration::from_secs(20)).await,
        "every healthy message reached the app"
    );
    let transitions = labelled(
        "rabbit_sidecar_circuit_transitions_total",
        &format!("{},to=\"open\"", app_label(&app)),
    );
    assert_eq!(
        metric_or_zero(&sidecar, &transitions).await,
        0.0,
        "one failing message never opens the circuit"
    );
    broker.cleanup().await;
}

#[tokio::test]
async fn a_4xx_storm_never_opens_the_circuit() {
    let broker = Broker::connect().await;
    let queue = unique("cb-4xx");
    broker.track(&queue);
    let app = App::start().await;
    app.answer(|_| 422);
    let sidecar = Sidecar::start(&args(&queue, &app.url(), &["--circuit-min-calls", "5"]));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    broker.publish_n(&queue, 60, "bad").await;
    let rejected = labelled(
        "rabbit_sidecar_dead_letters_total",
        &format!("{},reason=\"rejected\"", q(&queue)),
    );
    assert!(
        sidecar
            .wait_metric(&rejected, 60.0, Duration::from_secs(20))
            .await,
        "every 4xx dead-lettered at once"
    );
    let transitions = labelled(
        "rabbit_sidecar_circuit_transitions_total",
        &format!("{},to=\"open\"", app_label(&app)),
    );
    assert_eq!(metric_or_zero(&sidecar, &transitions).await, 0.0);
    assert_eq!(app.count(), 60, "one call each");
    sidecar.wait_ready(Duration::from_secs(5)).await;
    broker.cleanup().await;
}

#[tokio::test]
async fn app_down_then_sick_then_well_loses_nothing_and_dead_letters_nothing() {
    let broker = Broker::connect().await;
    let queue = unique("cb-down-sick");
    broker.track(&queue);
    let mut app = Switchable::start().await;
    let url = app.app.url();
    let sidecar = Sidecar::start(&args(
        &queue,
        &url,
        &[
            "--queue-type",
            "quorum",
            "--circuit-min-calls",
            "5",
            "--circuit-open-max",
            "2s",
        ],
    ));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    app.app.down();
    let ids = broker.publish_n(&queue, 40, "dsw").await;
    assert!(
        sidecar
            .wait_metric("rabbit_sidecar_app_up", 0.0, Duration::from_secs(15))
            .await,
        "the gate closes while nothing listens"
    );
    // The app comes back, but sick: the gate opens and the breaker takes over.
    app.set_sick(true);
    app.app.up().await;
    assert!(
        eventually(Duration::from_secs(15), || async {
            matches!(sidecar.get("/readyz").await, Some((503, body)) if body.starts_with("circuit_open"))
        })
        .await,
        "readiness says circuit_open"
    );
    assert_eq!(metric_or_zero(&sidecar, "rabbit_sidecar_app_up").await, 1.0);
    tokio::time::sleep(Duration::from_secs(4)).await;
    app.set_sick(false);
    let want: HashSet<String> = ids.into_iter().collect();
    assert!(
        eventually(Duration::from_secs(40), || async {
            app.accepted().keys().cloned().collect::<HashSet<_>>() == want
        })
        .await,
        "every message accepted once the app is well"
    );
    assert_eq!(
        broker
            .count(&format!("{queue}.dead-letter"))
            .await
            .map(|c| c.0),
        Some(0),
        "nothing dead-lettered"
    );
    sidecar.wait_ready(Duration::from_secs(10)).await;
    broker.cleanup().await;
}

/// The app answers the first call of each message with `status` and `Retry-After: value(now)`,
/// then 200; returns the gap between the first and second call of one message.
async fn retry_after_gap(
    status: u16,
    value: impl Fn() -> String + Send + Sync + 'static,
    extra: &[&str],
) -> Duration {
    let broker = Broker::connect().await;
    let queue = unique("cb-retry-after");
    broker.track(&queue);
    let app = App::start().await;
    let seen: Arc<Mutex<HashSet<String>>> = Arc::default();
    let first = seen.clone();
    app.answer(move |r| {
        if first.lock().unwrap().insert(r.id()) {
            status
        } else {
            200
        }
    });
    let second = seen.clone();
    app.reply_headers(move |r| {
        // Asked before the status: the first call of an id is not in the set yet.
        if second.lock().unwrap().contains(&r.id()) {
            Vec::new()
        } else {
            vec![("retry-after".to_string(), value())]
        }
    });
    let sidecar = Sidecar::start(&args(&queue, &app.url(), extra));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    broker.publish_n(&queue, 1, "ra").await;
    assert!(
        eventually(Duration::from_secs(30), || async { app.count() >= 2 }).await,
        "the message is tried again"
    );
    let calls = app.received();
    broker.cleanup().await;
    calls[1].at - calls[0].at
}

#[tokio::test]
async fn retry_after_seconds_sets_the_delay() {
    let gap = retry_after_gap(429, || "2".into(), &[]).await;
    println!("Retry-After: 2 → retried after {gap:?} (backoff 100ms)");
    assert!(
        gap >= Duration::from_secs(2) && gap < Duration::from_secs(6),
        "{gap:?}"
    );
}

#[tokio::test]
async fn retry_after_http_date_sets_the_delay() {
    let gap = retry_after_gap(
        503,
        || httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(4)),
        &[],
    )
    .await;
    println!("Retry-After: <now + 4 s as an HTTP-date> → retried after {gap:?}");
    // The date has whole seconds: between 3 and 4 seconds from the answer.
    assert!(
        gap >= Duration::from_millis(2900) && gap < Duration::from_secs(8),
        "{gap:?}"
    );
}

#[tokio::test]
async fn retry_after_is_capped_and_garbage_ignored() {
    let gap = retry_after_gap(429, || "3600".into(), &["--retry-after-max", "1s"]).await;
    println!("Retry-After: 3600 with --retry-after-max 1s → retried after {gap:?}");
    assert!(
        gap >= Duration::from_secs(1) && gap < Duration::from_secs(4),
        "{gap:?}"
    );
    let gap = retry_after_gap(503, || "in a while".into(), &[]).await;
    println!("Retry-After: garbage → retried after {gap:?} (backoff 100ms)");
    assert!(gap < Duration::from_secs(2), "{gap:?}");
}

#[tokio::test]
async fn an_open_circuit_shows_in_readyz_status_and_metrics() {
    let broker = Broker::connect().await;
    let queue = unique("cb-visible");
    broker.track(&queue);
    let app = Switchable::start().await;
    // A 400 for the one "bad" message: a dead letter for the depth gauge.
    let accepted = app.accepted.clone();
    let sick = app.sick.clone();
    app.app.answer(move |r| {
        if r.id().starts_with("bad") {
            400
        } else if sick.load(Ordering::SeqCst) {
            503
        } else {
            *accepted.lock().unwrap().entry(r.id()).or_default() += 1;
            200
        }
    });
    let sidecar = Sidecar::start(&args(
        &queue,
        &app.app.url(),
        // The failures that open the circuit wait out a 5 s backoff in the retry queue, where
        // its depth shows them; the circuit stays open as long.
        &[
            "--circuit-min-calls",
            "5",
            "--circuit-open",
            "5s",
            "--retry-backoff",
            "5s",
        ],
    ));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    broker.publish_n(&queue, 1, "bad").await;
    let dead_letter_depth = series("rabbit_sidecar_dead_letter_queue_messages", &queue);
    assert!(
        sidecar
            .wait_metric(&dead_letter_depth, 1.0, Duration::from_secs(10))
            .await,
        "the dead-letter queue's depth is polled"
    );

    app.set_sick(true);
    let ids = broker.publish_n(&queue, 30, "v").await;
    assert!(
        eventually(Duration::from_secs(15), || async {
            matches!(sidecar.get("/readyz").await, Some((503, body)) if body.starts_with("circuit_open"))
        })
        .await,
        "readiness fails with circuit_open"
    );
    assert!(
        matches!(sidecar.get("/healthz").await, Some((200, _))),
        "liveness holds"
    );
    // The consumer loop sees the open circuit a moment after the breaker opens (another task):
    // /status says paused as soon as it stops taking deliveries, before its cancel completes.
    let (status, _) = sidecar
        .status_when(Duration::from_secs(2), |s| {
            s["subscriptions"][0]["state"] == "paused_circuit_open"
        })
        .await;
    assert_eq!(
        status["subscriptions"][0]["state"], "paused_circuit_open",
        "{status}"
    );
    let circuit = &status["circuit_breakers"][0];
    assert_eq!(circuit["app"], app.app.addr.to_string(), "{status}");
    assert_eq!(circuit["state"], "open", "{status}");
    assert!(
        circuit["since"].is_string() && circuit["next_probe"].is_string(),
        "{status}"
    );

    let label = app_label(&app.app);
    let opened = labelled(
        "rabbit_sidecar_circuit_transitions_total",
        &format!("{label},to=\"open\""),
    );
    // Health learns of the open circuit a moment before its metrics do.
    assert!(
        sidecar
            .wait_metric(&opened, 1.0, Duration::from_secs(5))
            .await
    );
    let m = sidecar.metrics().await;
    let state = |s: &str| {
        metric_value(
            &m,
            &labelled(
                "rabbit_sidecar_circuit_state",
                &format!("{label},state=\"{s}\""),
            ),
        )
    };
    assert_eq!(
        (state("closed"), state("open"), state("half_open")),
        (Some(0.0), Some(1.0), Some(0.0))
    );
    assert_eq!(metric_value(&m, &opened), Some(1.0));
    // Counted once the cancel completes, which a busy broker can take a while to confirm.
    let cancelled = labelled(
        "rabbit_sidecar_consumer_cancellations_total",
        &format!("{},reason=\"circuit_open\"", q(&queue)),
    );
    assert!(
        sidecar
            .wait_metric(&cancelled, 1.0, Duration::from_secs(10))
            .await,
        "one cancellation for the open circuit"
    );
    // Failed and parked messages wait in the retry queue (5 s).
    let retry_depth = series("rabbit_sidecar_retry_queue_messages", &queue);
    assert!(
        eventually(Duration::from_secs(5), || async {
            metric_or_zero(&sidecar, &retry_depth).await > 0.0
        })
        .await,
        "the retry queue's depth is polled"
    );

    app.set_sick(false);
    let closed = labelled(
        "rabbit_sidecar_circuit_state",
        &format!("{label},state=\"closed\""),
    );
    assert!(
        sidecar
            .wait_metric(&closed, 1.0, Duration::from_secs(20))
            .await
    );
    sidecar.wait_ready(Duration::from_secs(10)).await;
    let want: HashSet<String> = ids.into_iter().collect();
    assert!(
        eventually(Duration::from_secs(20), || async {
            app.accepted().keys().cloned().collect::<HashSet<_>>() == want
        })
        .await
    );
    let m = sidecar.metrics().await;
    let open_seconds = metric_value(
        &m,
        &labelled("rabbit_sidecar_circuit_open_seconds_total", &label),
    )
    .unwrap();
    assert!(open_seconds >= 4.0, "open for about 5 s: {open_seconds}");
    for to in ["half_open", "closed"] {
        let t = labelled(
            "rabbit_sidecar_circuit_transitions_total",
            &format!("{label},to=\"{to}\""),
        );
        assert!(metric_value(&m, &t).unwrap() >= 1.0, "{to}");
    }
    let (_, status) = sidecar.get("/status").await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["circuit_breakers"][0]["state"], "closed");
    assert!(status["circuit_breakers"][0]["next_probe"].is_null());
    broker.cleanup().await;
}
