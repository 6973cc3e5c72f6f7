//! Hostile and odd messages against the real broker and binary: bodies of any bytes (including
//! 4 MiB of them), headers of every AMQP type, a 255-byte header name, garbage trace context, and
//! attempt counters of the wrong type. None may crash the sidecar or lose the message: the app gets
//! every body byte for byte, every message is settled, the queues end empty, and the sidecar stays
//! live and ready.

use std::collections::HashMap;
use std::time::Duration;

use crate::common::*;
use lapin::BasicProperties;
use lapin::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
};

fn props(id: &str, headers: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_message_id(id.into())
        .with_headers(headers)
}

fn table(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(ShortString::from(k), v);
    }
    t
}

/// Deterministic bytes that cover every value and are nowhere near valid UTF-8.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// What the app received, by message id (each id must arrive exactly once).
fn by_id(app: &App) -> HashMap<String, Received> {
    let mut out = HashMap::new();
    for r in app.received() {
        let id = r
            .header("x-amqp-message-id")
            .unwrap_or("<no id>")
            .to_string();
        assert!(
            out.insert(id.clone(), r).is_none(),
            "{id} reached the app twice"
        );
    }
    out
}

/// Waits until every one of `sent` was acked, then checks that each body arrived unchanged, that
/// nothing is left in the queue, its retry queue or its dead-letter queue, and that the sidecar
/// is alive and ready.
async fn all_delivered_intact(
    broker: &Broker,
    sidecar: &mut Sidecar,
    app: &App,
    queue: &str,
    sent: &[(String, Vec<u8>)],
) {
    let acks = series("rabbit_sidecar_acks_total", queue);
    let n = sent.len() as f64;
    assert!(
        eventually(Duration::from_secs(30), || async {
            sidecar.metric(&acks).await == n
        })
        .await,
        "all {n} acked; acks {}; logs:\n{}",
        sidecar.metric(&acks).await,
        sidecar.logs()
    );
    let got = by_id(app);
    assert_eq!(
        got.len(),
        sent.len(),
        "the app got each message once: {:?}",
        got.keys().collect::<Vec<_>>()
    );
    for (id, body) in sent {
        let r = got
            .get(id)
            .unwrap_or_else(|| panic!("{id} never reached the app"));
        assert!(
            r.body == *body,
            "{id}: body of {} bytes arrived as {} different bytes",
            body.len(),
            r.body.len()
        );
        // hyper leaves Content-Length out of an empty POST, which HTTP/1.1 reads as no body.
        let length = r.header("content-length").unwrap_or("0");
        assert_eq!(length, body.len().to_string(), "{id}: content-length");
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            broker.count(queue).await == Some((0, 1))
        })
        .await
    );
    for companion in [format!("{queue}.retry"), format!("{queue}.dead-letter")] {
        assert_eq!(
            broker.count(&companion).await.map(|c| c.0),
            Some(0),
            "{companion} is empty"
        );
    }
    // A message leaves in_flight a moment after its ack is counted.
    assert!(
        sidecar
            .wait_metric(
                &series("rabbit_sidecar_in_flight_messages", queue),
                0.0,
                Duration::from_secs(5)
            )
            .await,
        "nothing left in flight"
    );
    let m = sidecar.metrics().await;
    assert_eq!(
        metric_value(&m, &series("rabbit_sidecar_deliveries_total", queue)),
        Some(n),
        "no redelivery"
    );
    assert!(
        sidecar.running(),
        "the sidecar is still running; logs:\n{}",
        sidecar.logs()
    );
    assert!(
        matches!(sidecar.get("/healthz").await, Some((200, _))),
        "alive"
    );
    sidecar.wait_ready(Duration::from_secs(5)).await;
    let logs = sidecar.logs();
    assert!(!logs.contains("panicked"), "no panic in the logs:\n{logs}");
}

#[tokio::test]
async fn bodies_of_any_bytes_arrive_byte_for_byte() {
    let broker = Broker::connect().await;
    let queue = unique("bodies");
    broker.track(&queue);
    let app = App::start().await;
    let url = app.url();
    let mut sidecar = Sidecar::start(&args(&queue, &url, &[]));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let sent: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), Vec::new()),
        ("latin1".into(), b"caf\xe9 \xff\xfe".to_vec()),
        ("nul-bytes".into(), b"\0\0a\0b\0".to_vec()),
        ("overlong-utf8".into(), vec![0xc0, 0xaf, 0xe0, 0x80, 0xaf]),
        ("surrogate".into(), vec![0xed, 0xa0, 0x80, 0xed, 0xbf, 0xbf]),
        ("truncated-utf8".into(), "héllo".as_bytes()[..2].to_vec()),
        (
            "crlf-http-lookalike".into(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec(),
        ),
        ("noise-64k".into(), noise(64 * 1024, 7)),
        ("noise-4mib".into(), noise(4 * 1024 * 1024, 42)),
    ];
    for (id, body) in &sent {
        // A content type that lies about the charset must not make anyone decode the body.
        let p =
            props(id, FieldTable::default()).with_content_type("text/plain; charset=utf-8".into());
        broker.publish(&queue, body, p).await;
    }
    all_delivered_intact(&broker, &mut sidecar, &app, &queue, &sent).await;
    let got = by_id(&app);
    assert_eq!(
        got["latin1"].header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    broker.cleanup().await;
}

#[tokio::test]
async fn headers_of_every_amqp_type_are_mapped_or_left_out_never_fatal() {
    let broker = Broker::connect().await;
    let queue = unique("typed");
    broker.track(&queue);
    let app = App::start().await;
    let url = app.url();
    let mut sidecar = Sidecar::start(&args(&queue, &url, &[]));
    sidecar.wait_ready(Duration::from_secs(20)).await;

    let nested = table(vec![
        (
            "inner",
            AMQPValue::FieldTable(table(vec![("deep", AMQPValue::LongString("x".into()))])),
        ),
        (
            "list",
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::LongInt(1),
                AMQPValue::Void,
            ])),
        ),
    ]);
    let array = FieldArray::from(vec![
        AMQPValue::Boolean(false),
        AMQPValue::LongString("s".into()),
        AMQPValue::FieldTable(nested.clone()),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Double(0.5)])),
        AMQPValue::ByteArray(ByteArray::from(vec![1u8, 2, 3])),
    ]);
    // (A NaN double is not here: RabbitMQ cannot parse one and closes the connection.)
    let long = "L".repeat(4096);
    let typed = table(vec![
        ("bool", AMQPValue::Boolean(true)),
        ("i8", AMQPValue::ShortShortInt(-5)),
        ("u8", AMQPValue::ShortShortUInt(250)),
        ("i16", AMQPValue::ShortInt(-300)),
        ("u16", AMQPValue::ShortUInt(60_000)),
        ("i32", AMQPValue::LongInt(-70_000)),
        ("u32", AMQPValue::LongUInt(4_000_000_000)),
        ("i64", AMQPValue::LongLongInt(i64::MIN)),
        ("f32", AMQPValue::Float(1.5)),
        ("f64", AMQPValue::Double(-2.25)),
        (
            "decimal",
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 12_345,
            }),
        ),
        ("ts", AMQPValue::Timestamp(1_700_000_000)),
        ("long", AMQPValue::LongString(long.as_str().into())),
        (
            "too-long",
            AMQPValue::LongString("T".repeat(32 * 1024).into()),
        ),
        ("empty", AMQPValue::LongString("".into())),
        (
            "not-utf8",
            AMQPValue::LongString(LongString::from(vec![0xffu8, 0xfe, 0x00])),
        ),
        ("crlf", AMQPValue::LongString("a\r\nX-Injected: 1".into())),
        ("table", AMQPValue::FieldTable(nested)),
        ("empty-table", AMQPValue::FieldTable(FieldTable::default())),
        ("array", AMQPValue::FieldArray(array)),
        ("empty-array", AMQPValue::FieldArray(FieldArray::default())),
        (
            "bytes",
            AMQPValue::ByteArray(ByteArray::from((0..=255u8).collect::<Vec<_>>())),
        ),
        ("void", AMQPValue::Void),
    ]);
    let long_name = "n".repeat(255);
    let long_odd_name = format!("{}x", "é".repeat(127));
    assert_eq!(long_odd_name.len(), 255);
    let names = table(vec![
        (long_name.as_str(), AMQPValue::LongString("v".into())),
        (long_odd_name.as_str(), AMQPValue::LongString("w".into())),
        ("with space", AMQPValue::LongString("s".into())),
        ("", AMQPValue::LongString("nameless".into())),
    ]);
    let mut sent = Vec::new();
    for (id, headers) in [("typed", typed), ("names", names)] {
        let body = format!("body of {id}").into_bytes();
        broker.publish(&queue, &body, props(id, headers)).await;
        sent.push((id.to_string(), body));
    }
    all_delivered_intact(&broker, &mut sidecar, &app, &queue, &sent).await;

    let got = by_id(&app);
    let t = &got["typed"];
    for (name, want) in [
        ("bool", "true"),
        ("i8", "-5"),
        ("u8", "250"),
        ("i16", "-300"),
        ("u16", "60000"),
        ("i32", "-70000"),
        ("u32", "4000000000"),
        ("i64", "-9223372036854775808"),
        ("f32", "1.5"),
        ("f64", "-2.25"),
        ("ts", "1700000000"),
        ("long", long.as_str()),
        ("empty", ""),
    ] {
        assert_eq!(
            t.header(&format!("x-amqp-header-{name}")),
            Some(want),
            "header {name}: {:?}",
            t.headers
        );
    }
    for gone in [
        "too-long",
        "not-utf8",
        "crlf",
        "table",
        "empty-table",
        "array",
        "empty-array",
        "bytes",
        "void",
    ] {
        assert!(
            t.header(&format!("x-amqp-header-{gone}")).is_none(),
            "{gone} is left out: {:?}",
            t.headers
        );
    }
    assert!(
        t.header("x-injected").is_none(),
        "no header injection through CR LF"
    );
    let n = &got["names"];
    assert_eq!(
        n.header(&format!("x-amqp-header-{long_name}")),
        Some("v"),
        "a 255-byte name maps through"
    );
    // (The empty name only has to survive: it maps to a bare `x-amqp-header-`, a valid token.)
    assert!(
        !n.headers.values().any(|v| v == "w" || v == "s"),
        "names that are no HTTP token are left out: {:?}",
        n.headers
    );
    broker.cleanup().await;
}

/// A W3C `traceparent` the sidecar itself may write: version 00, 32 + 16 lowercase hex digits, not
/// all zero, two flag digits.
fn well_formed_traceparent(v: &str) -> bool {
    let parts: Vec<&str> = v.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && parts[1].bytes().any(|b| b != b'0')
        && hex(parts[2], 16)
        && parts[2].bytes().any(|b| b != b'0')
        && hex(parts[3], 2)
}

#[tokio::test]
async fn garbage_trace_context_is_ignored() {
    let broker = Broker::connect().await;
    let queue = unique("traceparent");
    broker.track(&queue);
    let app = App::start().await;
    let url = app.url();
    let mut sidecar = Sidecar::start(&args(&queue, &url, &[]));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let s = |v: &str| AMQPValue::LongString(v.into());
    let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let cases: Vec<(&str, FieldTable)> = vec![
        ("empty", table(vec![("traceparent", s(""))])),
        ("word", table(vec![("traceparent", s("garbage"))])),
        (
            "not-hex",
            table(vec![(
                "traceparent",
                s("00-zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-zzzzzzzzzzzzzzzz-01"),
            )]),
        ),
        (
            "all-zero",
            table(vec![(
                "traceparent",
                s("00-00000000000000000000000000000000-0000000000000000-01"),
            )]),
        ),
        (
            "version-ff",
            table(vec![(
                "traceparent",
                s("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            )]),
        ),
        (
            "future-version",
            table(vec![(
                "traceparent",
                s("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever"),
            )]),
        ),
        ("short", table(vec![("traceparent", s("00-4bf9-00f0-01"))])),
        (
            "uppercase",
            table(vec![(
                "traceparent",
                s("00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01"),
            )]),
        ),
        (
            "huge",
            table(vec![(
                "traceparent",
                s(&format!("00-{}", "a".repeat(60_000))),
            )]),
        ),
        (
            "integer",
            table(vec![("traceparent", AMQPValue::LongLongInt(42))]),
        ),
        (
            "table",
            table(vec![(
                "traceparent",
                AMQPValue::FieldTable(table(vec![("a", s(valid))])),
            )]),
        ),
        (
            "array",
            table(vec![(
                "traceparent",
                AMQPValue::FieldArray(FieldArray::from(vec![s(valid), s(valid)])),
            )]),
        ),
        (
            "bytes",
            table(vec![(
                "traceparent",
                AMQPValue::ByteArray(ByteArray::from(valid.as_bytes().to_vec())),
            )]),
        ),
        (
            "not-utf8",
            table(vec![(
                "traceparent",
                AMQPValue::LongString(LongString::from(vec![0xffu8; 55])),
            )]),
        ),
        ("void", table(vec![("traceparent", AMQPValue::Void)])),
        (
            "bad-tracestate",
            table(vec![
                ("traceparent", s(valid)),
                ("tracestate", s("=,,,==;;\u{1}é")),
            ]),
        ),
        (
            "mixed-case-names",
            table(vec![
                ("TraceParent", s(valid)),
                ("traceparent", s("nonsense")),
            ]),
        ),
    ];
    let mut sent = Vec::new();
    for (id, headers) in cases {
        let body = noise(100, id.len() as u64);
        broker.publish(&queue, &body, props(id, headers)).await;
        sent.push((id.to_string(), body));
    }
    all_delivered_intact(&broker, &mut sidecar, &app, &queue, &sent).await;
    for (id, r) in by_id(&app) {
        if let Some(tp) = r.header("traceparent") {
            assert!(
                well_formed_traceparent(tp),
                "{id}: the app got a malformed traceparent {tp:?}"
            );
            assert!(
                !tp.contains("zzzz") && !tp.starts_with("ff-"),
                "{id}: garbage passed through: {tp}"
            );
        }
        for (name, value) in &r.headers {
            assert!(
                !name.contains("traceparent") || name == "traceparent",
                "{id}: traceparent copied as {name}: {value}"
            );
        }
    }
    broker.cleanup().await;
}

#[tokio::test]
async fn attempt_counters_of_the_wrong_type_count_as_zero() {
    let broker = Broker::connect().await;
    let queue = unique("attempts");
    broker.track(&queue);
    let app = App::start().await;
    // One of them fails once, to see that retry counting recovers from the garbage it started with.
    let failed_once = std::sync::atomic::AtomicBool::new(false);
    app.answer(move |r| {
        if r.header("x-amqp-message-id") == Some("attempts-abc-then-500")
            && !failed_once.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            500
        } else {
            200
        }
    });
    let url = app.url();
    let mut sidecar = Sidecar::start(&args(&queue, &url, &["--max-deliveries", "3"]));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let s = |v: &str| AMQPValue::LongString(v.into());
    let cases: Vec<(&str, &str, AMQPValue)> = vec![
        ("attempts-abc", "x-sidecar-attempts", s("abc")),
        (
            "attempts-negative",
            "x-sidecar-attempts",
            AMQPValue::LongInt(-5),
        ),
        (
            "attempts-i64-min",
            "x-sidecar-attempts",
            AMQPValue::LongLongInt(i64::MIN),
        ),
        (
            "attempts-float",
            "x-sidecar-attempts",
            AMQPValue::Double(2.5),
        ),
        (
            "attempts-bool",
            "x-sidecar-attempts",
            AMQPValue::Boolean(true),
        ),
        (
            "attempts-table",
            "x-sidecar-attempts",
            AMQPValue::FieldTable(table(vec![("n", AMQPValue::LongInt(9))])),
        ),
        ("attempts-void", "x-sidecar-attempts", AMQPValue::Void),
        (
            "attempts-digits-overflow",
            "x-sidecar-attempts",
            s("99999999999999999999999"),
        ),
        ("count-abc", "x-delivery-count", s("abc")),
        (
            "count-negative",
            "x-delivery-count",
            AMQPValue::LongLongInt(-3),
        ),
        (
            "count-bytes",
            "x-delivery-count",
            AMQPValue::ByteArray(ByteArray::from(vec![9u8])),
        ),
        ("attempts-abc-then-500", "x-sidecar-attempts", s("abc")),
    ];
    let mut sent = Vec::new();
    for (id, name, value) in cases {
        let body = id.as_bytes().to_vec();
        broker
            .publish(&queue, &body, props(id, table(vec![(name, value)])))
            .await;
        sent.push((id.to_string(), body));
    }
    let acks = series("rabbit_sidecar_acks_total", &queue);
    let n = sent.len() as f64;
    assert!(
        eventually(Duration::from_secs(30), || async {
            sidecar.metric(&acks).await == n
        })
        .await,
        "all acked; logs:\n{}",
        sidecar.logs()
    );
    let received = app.received();
    let first_tries: Vec<_> = received
        .iter()
        .filter(|r| r.header("x-amqp-attempt") == Some("1"))
        .collect();
    assert_eq!(
        first_tries.len(),
        sent.len(),
        "every message's first delivery is attempt 1"
    );
    let retried: Vec<_> = received
        .iter()
        .filter(|r| r.header("x-amqp-message-id") == Some("attempts-abc-then-500"))
        .map(|r| r.header("x-amqp-attempt").unwrap_or("?").to_string())
        .collect();
    assert_eq!(
        retried,
        ["1", "2"],
        "the retried copy counts from the real attempt, not from the garbage"
    );
    assert_eq!(received.len(), sent.len() + 1);
    for (id, body) in &sent {
        assert!(
            received
                .iter()
                .any(|r| r.header("x-amqp-message-id") == Some(id) && r.body == *body),
            "{id} arrived intact"
        );
    }
    let m = sidecar.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            &format!(
                "rabbit_sidecar_retries_total{{{},reason=\"server_error\"}}",
                q(&queue)
            )
        ),
        Some(1.0)
    );
    for reason in ["rejected", "max_deliveries"] {
        assert_eq!(
            metric_value(
                &m,
                &format!(
                    "rabbit_sidecar_dead_letters_total{{{},reason=\"{reason}\"}}",
                    q(&queue)
                )
            ),
            Some(0.0)
        );
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            broker.count(&queue).await == Some((0, 1))
        })
        .await
    );
    assert_eq!(
        broker
            .count(&format!("{queue}.dead-letter"))
            .await
            .map(|c| c.0),
        Some(0)
    );
    assert!(sidecar.running(), "still running");
    sidecar.wait_ready(Duration::from_secs(5)).await;
    broker.cleanup().await;
}
