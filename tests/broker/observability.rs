//! The observability contract against the real broker and the real binary: the scrape passes
//! `promtool check metrics`, every family and every known label value exists from the first
//! scrape, probes answer fast while the consumer side is saturated, handler timeouts and the
//! delivery-ack timeout warning show in the metrics, `/status` has its documented shape and never
//! leaks a password, and the admin server shrugs off bad requests.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::*;
use rabbit_sidecar::telemetry::metrics::{
    CancelReason, DeadLetterReason, HandlerOutcome, LossReason, RetryReason,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every `rabbit_sidecar_*` family name written as a string literal in `src/telemetry/metrics.rs`: the
/// contract as the source states it, independent of what the binary happens to register.
fn families_in_source() -> BTreeSet<String> {
    let src = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/telemetry/metrics.rs"
    ))
    .unwrap();
    let mut out = BTreeSet::new();
    for piece in src.split('"').skip(1).step_by(2) {
        if piece.starts_with("rabbit_sidecar_")
            && piece
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit())
        {
            out.insert(piece.to_string());
        }
    }
    out
}

/// `# HELP name text` lines of a scrape, by family.
fn help_lines(scrape: &str) -> BTreeMap<String, String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, h)| (n.to_string(), h.to_string()))
        .collect()
}

/// Pipes `text` to `promtool check metrics`; returns (success, stdout + stderr).
async fn promtool_check(text: &str) -> (bool, String) {
    let child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => panic!(
            "promtool is not installed ({e}); it ships in the Debian package `prometheus` (apt-get install prometheus)"
        ),
    };
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("promtool answers within 30s")
        .unwrap();
    let mut report = String::from_utf8_lossy(&out.stdout).into_owned();
    report.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), report)
}

#[tokio::test]
async fn promtool_accepts_a_live_scrape_after_acks_retries_and_dead_letters() {
    let broker = Broker::connect().await;
    let queue = unique("promtool");
    broker.track(&queue);
    let app = App::start().await;
    app.answer(|r| match r.id().as_str() {
        "flaky" => 503,
        "poison" => 422,
        _ => 200,
    });
    let url = app.url();
    let sidecar = Sidecar::start(&args(&queue, &url, &["--max-deliveries", "2"]));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    broker.publish_n(&queue, 5, "ok").await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    broker
        .publish(
            &queue,
            b"flaky",
            lapin::BasicProperties::default().with_timestamp(now),
        )
        .await;
    broker.publish(&queue, b"poison", Default::default()).await;
    let series = [
        series("rabbit_sidecar_acks_total", &queue),
        format!(
            "rabbit_sidecar_nacks_total{{{},requeue=\"true\"}}",
            q(&queue)
        ),
        format!(
            "rabbit_sidecar_retries_total{{{},reason=\"server_error\"}}",
            q(&queue)
        ),
        format!(
            "rabbit_sidecar_dead_letters_total{{{},reason=\"rejected\"}}",
            q(&queue)
        ),
        format!(
            "rabbit_sidecar_dead_letters_total{{{},reason=\"max_deliveries\"}}",
            q(&queue)
        ),
    ];
    // acks_total counts messages the app accepted; retried and dead-lettered originals are acked
    // too, but counted by their own families.
    let want = [5.0, 0.0, 1.0, 1.0, 1.0];
    assert!(
        eventually(Duration::from_secs(20), || async {
            let m = sidecar.metrics().await;
            series
                .iter()
                .zip(want)
                .all(|(s, w)| metric_value(&m, s) == Some(w))
        })
        .await,
        "traffic settled as expected; metrics:\n{}",
        sidecar.metrics().await
    );
    let scrape = sidecar.metrics().await;
    let (ok, report) = promtool_check(&scrape).await;
    assert!(ok, "promtool check metrics failed:\n{report}");
    assert!(
        report.trim().is_empty(),
        "promtool check metrics complains:\n{report}"
    );
    broker.cleanup().await;
}

#[tokio::test]
async fn every_family_and_known_label_value_exists_at_zero_on_the_first_scrape() {
    let broker = Broker::connect().await;
    let queue = unique("zero");
    broker.track(&queue);
    let app = App::start().await;
    let url = app.url();
    let sidecar = Sidecar::start(&args(&queue, &url, &[]));
    // The very first scrape that answers: possibly before the broker connection is up.
    let first = std::sync::Mutex::new(None);
    assert!(
        eventually(Duration::from_secs(20), || async {
            let answer = sidecar.get("/metrics").await;
            let got = answer.is_some();
            *first.lock().unwrap() = answer;
            got
        })
        .await,
        "no /metrics answer (process {}); logs:\n{}",
        sidecar.process_state(),
        sidecar.logs()
    );
    let (status, scrape) = first.into_inner().unwrap().unwrap();
    assert_eq!(status, 200);

    let help = help_lines(&scrape);
    let source = families_in_source();
    assert!(
        source.len() >= 25,
        "found the families in src/telemetry/metrics.rs: {source:?}"
    );
    for family in &source {
        let text = help
            .get(family)
            .unwrap_or_else(|| panic!("{family} missing from the first scrape:\n{scrape}"));
        assert!(
            text.trim().len() > 10,
            "{family} has a real HELP text: {text:?}"
        );
    }
    let library: BTreeSet<String> = rabbit_sidecar::telemetry::metrics::Metrics::new(&[&queue])
        .family_names()
        .into_iter()
        .collect();
    for family in &library {
        assert!(
            help.contains_key(family),
            "{family} (registered by the library) missing from the scrape"
        );
    }
    let exported: BTreeSet<&String> = help
        .keys()
        .filter(|f| f.starts_with("rabbit_sidecar_"))
        .collect();
    let undocumented: Vec<_> = exported
        .iter()
        .filter(|f| !source.contains(f.as_str()))
        .collect();
    assert!(
        undocumented.is_empty(),
        "families exported but not named in src/telemetry/metrics.rs: {undocumented:?}"
    );

    let ql = q(&queue);
    let mut zero: Vec<String> = [
        "deliveries_total",
        "redeliveries_total",
        "acks_total",
        "dead_letter_failures_total",
        "ack_timeout_warnings_total",
        "in_flight_messages",
        "last_delivery_timestamp_seconds",
        "last_ack_timestamp_seconds",
        "oldest_unacked_age_seconds",
        "delivery_attempts_count",
        "delivery_attempts_sum",
        "message_age_seconds_count",
        "message_age_seconds_sum",
    ]
    .iter()
    .map(|n| format!("rabbit_sidecar_{n}{{{ql}}}"))
    .collect();
    for requeue in ["true", "false"] {
        zero.push(format!(
            "rabbit_sidecar_nacks_total{{{ql},requeue=\"{requeue}\"}}"
        ));
    }
    for r in RetryReason::ALL {
        zero.push(format!(
            "rabbit_sidecar_retries_total{{{ql},reason=\"{}\"}}",
            r.as_str()
        ));
    }
    for r in DeadLetterReason::ALL {
        zero.push(format!(
            "rabbit_sidecar_dead_letters_total{{{ql},reason=\"{}\"}}",
            r.as_str()
        ));
    }
    for r in CancelReason::ALL {
        zero.push(format!(
            "rabbit_sidecar_consumer_cancellations_total{{{ql},reason=\"{}\"}}",
            r.as_str()
        ));
    }
    for r in LossReason::ALL {
        zero.push(format!(
            "rabbit_sidecar_connection_losses_total{{reason=\"{}\"}}",
            r.as_str()
        ));
    }
    for o in HandlerOutcome::ALL.map(HandlerOutcome::as_str) {
        zero.push(format!(
            "rabbit_sidecar_handler_duration_seconds_count{{outcome=\"{o}\",{ql}}}"
        ));
        zero.push(format!(
            "rabbit_sidecar_handler_duration_seconds_sum{{outcome=\"{o}\",{ql}}}"
        ));
        zero.push(format!(
            "rabbit_sidecar_handler_duration_seconds_bucket{{outcome=\"{o}\",{ql},le=\"+Inf\"}}"
        ));
    }
    zero.push("rabbit_sidecar_reconnects_total".into());
    for series in &zero {
        assert_eq!(
            metric_value(&scrape, series),
            Some(0.0),
            "{series} exists at 0 on the first scrape:\n{scrape}"
        );
    }
    // Gauges whose value depends on how far start-up got, but whose series must exist.
    for series in [
        format!("rabbit_sidecar_consumer_up{{{ql}}}"),
        format!("rabbit_sidecar_consumer_active{{{ql}}}"),
        format!("rabbit_sidecar_queue_messages_ready{{{ql}}}"),
        format!("rabbit_sidecar_queue_consumers{{{ql}}}"),
        "rabbit_sidecar_connection_up".into(),
        "rabbit_sidecar_connection_blocked".into(),
        "rabbit_sidecar_app_up".into(),
        "rabbit_sidecar_ready".into(),
        "rabbit_sidecar_connect_failures_total".into(),
        "rabbit_sidecar_consumer_timeout_seconds".into(),
        format!(
            "rabbit_sidecar_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        ),
    ] {
        assert!(
            metric_value(&scrape, &series).is_some(),
            "{series} exists on the first scrape:\n{scrape}"
        );
    }
    assert_eq!(
        metric_value(
            &scrape,
            &format!(
                "rabbit_sidecar_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        Some(1.0)
    );
    // Label values of the retry and dead-letter queues never become series of their own.
    assert!(
        !scrape.contains(&format!("{queue}.retry"))
            && !scrape.contains(&format!("{queue}.dead-letter"))
    );
    sidecar.wait_ready(Duration::from_secs(20)).await;
    assert_eq!(
        sidecar
            .metric("rabbit_sidecar_consumer_timeout_seconds")
            .await,
        1800.0,
        "the 30m default"
    );
    broker.cleanup().await;
}

#[tokio::test]
async fn probes_answer_in_milliseconds_while_every_slot_is_taken() {
    let broker = Broker::connect().await;
    let queue = unique("saturated");
    broker.track(&queue);
    let app = App::start().await;
    app.set_delay(Duration::from_secs(60));
    let url = app.url();
    let sidecar = Sidecar::start(&args(
        &queue,
        &url,
        &[
            "--concurrency",
            "4",
            "--prefetch",
            "8",
            "--handler-timeout",
            "90s",
        ],
    ));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    broker.publish_n(&queue, 20, "s").await;
    assert!(
        sidecar
            .wait_metric(
                &series("rabbit_sidecar_in_flight_messages", &queue),
                8.0,
                Duration::from_secs(15)
            )
            .await,
        "prefetch filled; metrics:\n{}",
        sidecar.metrics().await
    );
    assert!(
        eventually(Duration::from_secs(10), || async { app.count() == 4 }).await,
        "four handler calls hang in the app"
    );
    let limit = Duration::from_millis(200);
    let mut slowest = Duration::ZERO;
    for i in 0..50 {
        for path in ["/healthz", "/readyz"] {
            let started = Instant::now();
            let answer = sidecar.get(path).await;
            let took = started.elapsed();
            slowest = slowest.max(took);
            let (status, body) = answer.unwrap_or_else(|| panic!("{path} #{i} did not answer"));
            assert!(took < limit, "{path} #{i} took {took:?}");
            assert_eq!(status, 200, "{path} #{i}: {body}");
        }
    }
    assert_eq!(
        app.count(),
        4,
        "nothing else was dispatched meanwhile (slowest probe {slowest:?})"
    );
    assert_eq!(
        sidecar
            .metric(&format!(
                "rabbit_sidecar_in_flight_messages{{{}}}",
                q(&queue)
            ))
            .await,
        8.0
    );
    broker.cleanup().await;
}

#[tokio::test]
async fn handler_timeouts_are_retried_then_dead_lettered_and_liveness_holds() {
    let broker = Broker::connect().await;
    let queue = unique("htimeout");
    broker.track(&queue);
    let app = App::start().await;
    app.set_delay(Duration::from_secs(60));
    let url = app.url();
    let sidecar = Sidecar::start(&args(
        &queue,
        &url,
        &["--handler-timeout", "300ms", "--max-deliveries", "2"],
    ));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    broker
        .publish(
            &queue,
            b"hangs",
            lapin::BasicProperties::default().with_message_id("h1".into()),
        )
        .await;
    let dlq = format!("{queue}.dead-letter");
    let dl = format!(
        "rabbit_sidecar_dead_letters_total{{{},reason=\"max_deliveries\"}}",
        q(&queue)
    );
    let liveness_failures = std::sync::Mutex::new(Vec::new());
    let probes = std::sync::atomic::AtomicU32::new(0);
    let done = eventually(Duration::from_secs(20), || async {
        probes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match sidecar.get("/healthz").await {
            Some((200, _)) => {}
            other => liveness_failures.lock().unwrap().push(other),
        }
        sidecar.metric(&dl).await == 1.0
    })
    .await;
    assert!(
        done,
        "dead-lettered after two timeouts; logs:\n{}",
        sidecar.logs()
    );
    let liveness_failures = liveness_failures.into_inner().unwrap();
    assert!(
        liveness_failures.is_empty(),
        "/healthz failed during timeouts: {liveness_failures:?}"
    );
    assert!(
        probes.into_inner() >= 2,
        "liveness was probed while the handler hung"
    );
    let m = sidecar.metrics().await;
    let ql = q(&queue);
    assert_eq!(
        metric_value(
            &m,
            &format!("rabbit_sidecar_retries_total{{{ql},reason=\"timeout\"}}")
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &m,
            &format!("rabbit_sidecar_retries_total{{{ql},reason=\"server_error\"}}")
        ),
        Some(0.0)
    );
    let timeouts = metric_value(
        &m,
        &format!("rabbit_sidecar_handler_duration_seconds_count{{outcome=\"timeout\",{ql}}}"),
    )
    .unwrap();
    assert_eq!(timeouts, 1.0, "the first attempt is counted as a timeout");
    let timeout_sum = metric_value(
        &m,
        &format!("rabbit_sidecar_handler_duration_seconds_sum{{outcome=\"timeout\",{ql}}}"),
    )
    .unwrap();
    assert!(
        (0.29..5.0).contains(&timeout_sum),
        "the timed-out call lasted about the 300ms deadline: {timeout_sum}"
    );
    assert_eq!(
        metric_value(
            &m,
            &format!(
                "rabbit_sidecar_handler_duration_seconds_count{{outcome=\"dead_letter\",{ql}}}"
            )
        ),
        Some(1.0),
        "the second (last) attempt ends as a dead letter"
    );
    assert_eq!(
        metric_value(
            &m,
            &format!("rabbit_sidecar_handler_duration_seconds_count{{outcome=\"ack\",{ql}}}")
        ),
        Some(0.0)
    );
    assert_eq!(
        app.count(),
        2,
        "exactly --max-deliveries calls reached the app"
    );
    let dead = broker.drain(&dlq).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, b"hangs");
    assert_eq!(
        header_str(&dead[0].1, "x-sidecar-dead-letter-reason").as_deref(),
        Some("max_deliveries")
    );
    assert_eq!(
        header_str(&dead[0].1, "x-sidecar-attempts").as_deref(),
        Some("2")
    );
    let last_error = header_str(&dead[0].1, "x-sidecar-last-error").unwrap_or_default();
    assert!(
        last_error.contains("300ms"),
        "the dead letter says the app did not answer in time: {last_error:?}"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            broker.count(&queue).await.map(|c| c.0) == Some(0)
        })
        .await
    );
    assert!(matches!(sidecar.get("/healthz").await, Some((200, _))));
    sidecar.wait_ready(Duration::from_secs(5)).await;
    broker.cleanup().await;
}

#[tokio::test]
async fn a_message_near_the_delivery_ack_timeout_is_warned_about_once() {
    let broker = Broker::connect().await;
    let queue = unique("acktimeout");
    broker.track(&queue);
    let app = App::start().await;
    app.set_delay(Duration::from_secs(60));
    let url = app.url();
    let sidecar = Sidecar::start(&args(
        &queue,
        &url,
        &[
            "--broker-consumer-timeout",
            "2s",
            "--handler-timeout",
            "30s",
        ],
    ));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    assert_eq!(
        sidecar
            .metric("rabbit_sidecar_consumer_timeout_seconds")
            .await,
        2.0
    );
    let warnings = series("rabbit_sidecar_ack_timeout_warnings_total", &queue);
    assert_eq!(sidecar.metric(&warnings).await, 0.0);
    broker.publish(&queue, b"slow", Default::default()).await;
    assert!(
        sidecar
            .wait_metric(&warnings, 1.0, Duration::from_secs(10))
            .await,
        "warned at 80% of 2s; logs:\n{}",
        sidecar.logs()
    );
    let age = series("rabbit_sidecar_oldest_unacked_age_seconds", &queue);
    assert!(
        eventually(Duration::from_secs(5), || async {
            sidecar.metric(&age).await > 1.5
        })
        .await
    );
    // Well past the threshold, still one warning for the one message.
    assert!(
        eventually(Duration::from_secs(10), || async {
            sidecar.metric(&age).await > 3.5
        })
        .await
    );
    assert_eq!(
        sidecar.metric(&warnings).await,
        1.0,
        "one warning per message, not one per tick"
    );
    assert!(
        sidecar.logs().contains("delivery-acknowledgement timeout"),
        "the warning is logged too"
    );
    assert!(matches!(sidecar.get("/healthz").await, Some((200, _))));
    broker.cleanup().await;
}

/// Deletes a broker user when dropped, so a failing test leaves no account behind.
struct TempUser(String);

impl Drop for TempUser {
    fn drop(&mut self) {
        let _ = rabbitmqctl_command()
            .args(["delete_user", &self.0])
            .output();
    }
}

#[tokio::test]
async fn status_has_its_documented_shape_and_no_secret_leaks_anywhere() {
    let broker = Broker::connect().await;
    let queue = unique("status");
    broker.track(&queue);
    let user = unique("user");
    let password = format!("Pw-{}-zq9Xv7", std::process::id());
    rabbitmqctl(&["add_user", &user, &password]);
    let _guard = TempUser(user.clone());
    rabbitmqctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);
    let app = App::start().await;
    let url = app.url();
    // The first node is dead, so the connection failure path (and its error text) is exercised too.
    let nodes = format!(
        "amqp://{user}:{password}@127.0.0.1:{}/%2f,amqp://{user}:{password}@{}/%2f",
        free_port(),
        amqp_addr()
    );
    let mut a = args(&queue, &url, &[]);
    a[1] = &nodes;
    let sidecar = Sidecar::spawn(&a);
    sidecar.wait_ready(Duration::from_secs(30)).await;

    let doc: serde_json::Value =
        serde_json::from_str(&sidecar.get("/status").await.unwrap().1).unwrap();
    let sub = &doc["subscriptions"][0];
    assert_eq!(sub["queue"], queue.as_str());
    assert!(
        sub["last_delivery"].is_null() && sub["last_ack"].is_null(),
        "never before any delivery: {doc}"
    );
    assert_eq!(sub["in_flight"], 0);

    broker.publish_n(&queue, 3, "st").await;
    assert!(
        sidecar
            .wait_metric(
                &series("rabbit_sidecar_acks_total", &queue),
                3.0,
                Duration::from_secs(10)
            )
            .await
    );
    // The ack is counted a moment before /status drops the message from in_flight.
    let (doc, body) = sidecar
        .status_when(Duration::from_secs(10), |d| {
            let sub = &d["subscriptions"][0];
            sub["in_flight"] == 0 && sub["last_ack"].is_string()
        })
        .await;
    assert_eq!(doc["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(doc["live"], true);
    assert_eq!(doc["ready"], true);
    assert_eq!(doc["broker"]["connected"], true);
    assert_eq!(
        doc["broker"]["node"],
        amqp_addr(),
        "host:port of the node in use: {body}"
    );
    assert_eq!(doc["subscriptions"].as_array().map(Vec::len), Some(1));
    let sub = &doc["subscriptions"][0];
    assert_eq!(sub["queue"], queue.as_str());
    assert_eq!(sub["state"], "consuming");
    let tag = sub["consumer_tag"]
        .as_str()
        .unwrap_or_else(|| panic!("a consumer tag while consuming: {body}"));
    assert!(
        tag.starts_with("rabbit-sidecar.") && tag.contains(&sidecar.pid().to_string()),
        "{tag}"
    );
    assert_eq!(sub["in_flight"], 0);
    let now = SystemTime::now();
    for field in ["last_delivery", "last_ack"] {
        let text = sub[field]
            .as_str()
            .unwrap_or_else(|| panic!("{field} set after traffic: {body}"));
        let at = humantime::parse_rfc3339(text)
            .unwrap_or_else(|e| panic!("{field} is RFC 3339 ({e}): {text}"));
        let ago = now.duration_since(at).unwrap_or_default();
        assert!(ago < Duration::from_secs(60), "{field} is recent: {text}");
    }

    let metrics = sidecar.metrics().await;
    assert!(
        sidecar
            .metric("rabbit_sidecar_connect_failures_total")
            .await
            >= 1.0,
        "the dead node was tried"
    );
    for (what, text) in [
        ("/status", body.as_str()),
        ("/metrics", metrics.as_str()),
        ("logs", sidecar.logs().as_str()),
    ] {
        assert!(
            !text.contains(&password),
            "the AMQP password appears in {what}:\n{text}"
        );
    }
    assert!(
        sidecar.logs().contains(amqp_addr()),
        "logs name the node by host:port"
    );
    drop(sidecar);
    broker.cleanup().await;
}

/// Writes `request` on a fresh connection to `addr` and reads until the server closes it (or 5s
/// pass). Returns what was read and whether the connection was closed by the server.
async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> (Vec<u8>, bool) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server may stop reading (and reset) before an oversized request is fully written.
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(request)).await;
    let _ = stream.flush().await;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (got, false),
        }
    }
}

fn status_code(response: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(response);
    let line = text.lines().next()?;
    line.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// The `rabbit_sidecar_*` sample lines of a scrape (no comments, no process metrics).
fn sidecar_samples(scrape: &str) -> Vec<String> {
    scrape
        .lines()
        .filter(|l| l.starts_with("rabbit_sidecar_"))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn the_admin_server_refuses_bad_requests_and_keeps_serving() {
    let broker = Broker::connect().await;
    let queue = unique("admin");
    broker.track(&queue);
    let app = App::start().await;
    let url = app.url();
    let sidecar = Sidecar::start(&args(&queue, &url, &[]));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    // Let the queue poll report this consumer before taking the baseline.
    assert!(
        sidecar
            .wait_metric(
                &series("rabbit_sidecar_queue_consumers", &queue),
                1.0,
                Duration::from_secs(10)
            )
            .await
    );
    let before = sidecar_samples(&sidecar.metrics().await);
    let admin = sidecar.admin;

    let (resp, _) = raw_exchange(
        admin,
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .await;
    assert_eq!(
        status_code(&resp),
        Some(405),
        "{}",
        String::from_utf8_lossy(&resp)
    );
    let (resp, _) = raw_exchange(
        admin,
        b"DELETE /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        status_code(&resp),
        Some(405),
        "{}",
        String::from_utf8_lossy(&resp)
    );
    let (resp, _) = raw_exchange(
        admin,
        b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        status_code(&resp),
        Some(404),
        "{}",
        String::from_utf8_lossy(&resp)
    );
    let (resp, _) = raw_exchange(
        admin,
        b"GET /metrics/../healthz?x=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        status_code(&resp),
        Some(404),
        "paths are matched exactly: {}",
        String::from_utf8_lossy(&resp)
    );

    let mut huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 64 * 1024));
    huge.extend_from_slice(b"\r\n\r\n");
    let (resp, closed) = raw_exchange(admin, &huge).await;
    match status_code(&resp) {
        Some(code) => assert!(
            (400..500).contains(&code),
            "a 64 KiB header is refused: {code}"
        ),
        None => assert!(
            closed && resp.is_empty(),
            "no answer means a closed connection: {:?}",
            String::from_utf8_lossy(&resp)
        ),
    }
    assert!(closed, "the connection with a 64 KiB header is closed");

    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (resp, closed) = raw_exchange(admin, &garbage).await;
    assert!(closed, "garbage gets the connection closed");
    if let Some(code) = status_code(&resp) {
        assert!(
            (400..500).contains(&code),
            "garbage is at most answered with a 4xx: {code}"
        );
    }
    let (resp, closed) = raw_exchange(admin, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03").await;
    assert!(
        closed,
        "a TLS ClientHello gets the connection closed: {:?}",
        String::from_utf8_lossy(&resp)
    );

    assert!(
        matches!(sidecar.get("/healthz").await, Some((200, _))),
        "still alive"
    );
    sidecar.wait_ready(Duration::from_secs(5)).await;
    let after = sidecar_samples(&sidecar.metrics().await);
    assert_eq!(before, after, "bad admin requests change no sidecar metric");
    broker.cleanup().await;
}

#[tokio::test]
async fn message_age_is_observed_only_for_messages_with_a_timestamp() {
    let broker = Broker::connect().await;
    let queue = unique("age");
    broker.track(&queue);
    let app = App::start().await;
    let url = app.url();
    let sidecar = Sidecar::start(&args(&queue, &url, &[]));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let ql = q(&queue);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    broker
        .publish(
            &queue,
            b"old",
            lapin::BasicProperties::default().with_timestamp(now - 30),
        )
        .await;
    broker.publish(&queue, b"untimed", Default::default()).await;
    // The attempt is observed just after the ack is counted, in the same event.
    assert!(
        sidecar
            .wait_metric(
                &format!("rabbit_sidecar_delivery_attempts_count{{{ql}}}"),
                2.0,
                Duration::from_secs(10)
            )
            .await
    );
    let m = sidecar.metrics().await;
    assert_eq!(
        metric_value(&m, &format!("rabbit_sidecar_acks_total{{{ql}}}")),
        Some(2.0)
    );
    assert_eq!(
        metric_value(&m, &format!("rabbit_sidecar_deliveries_total{{{ql}}}")),
        Some(2.0)
    );
    assert_eq!(
        metric_value(
            &m,
            &format!("rabbit_sidecar_message_age_seconds_count{{{ql}}}")
        ),
        Some(1.0),
        "only the timed message"
    );
    let sum = metric_value(
        &m,
        &format!("rabbit_sidecar_message_age_seconds_sum{{{ql}}}"),
    )
    .unwrap();
    assert!((29.0..60.0).contains(&sum), "about 30s old: {sum}");
    assert_eq!(
        metric_value(
            &m,
            &format!("rabbit_sidecar_message_age_seconds_bucket{{{ql},le=\"15\"}}")
        ),
        Some(0.0)
    );
    assert_eq!(
        metric_value(
            &m,
            &format!("rabbit_sidecar_message_age_seconds_bucket{{{ql},le=\"60\"}}")
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &m,
            &format!("rabbit_sidecar_delivery_attempts_count{{{ql}}}")
        ),
        Some(2.0)
    );
    assert_eq!(
        metric_value(
            &m,
            &format!("rabbit_sidecar_delivery_attempts_bucket{{{ql},le=\"1\"}}")
        ),
        Some(2.0)
    );
    broker.cleanup().await;
}
