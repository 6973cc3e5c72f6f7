//! The per-delivery tracing contract, checked against the SDK's in-memory exporter: span names,
//! kinds, parents and attributes as a trace backend would see them, what the app and re-published
//! copies receive, and that no header value, however malformed, can panic or hijack a trace.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{meta, sent_to_app, target, with_props};
use crate::telemetry::setup::{LogFormat, Telemetry, otel_layer};
use crate::telemetry::trace::{HttpTarget, MessageTrace, extract_context, parse_traceparent};
use hyper::HeaderMap;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, ByteArray, FieldArray, FieldTable, LongString, ShortString};
use opentelemetry::trace::{SpanId, SpanKind, Status, TraceId, TracerProvider as _};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing_subscriber::layer::SubscriberExt as _;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Runs `f` under a subscriber with only the production OpenTelemetry layer and returns the spans
/// that finished.
fn with_exporter<R>(f: impl FnOnce() -> R) -> (R, Vec<SpanData>) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry().with(otel_layer(provider.tracer("test")));
    let out = tracing::subscriber::with_default(subscriber, f);
    provider.force_flush().expect("flush");
    (out, exporter.get_finished_spans().expect("spans"))
}

fn headers(pairs: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in pairs {
        table.insert(ShortString::from(k), v);
    }
    table
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn attr(span: &SpanData, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.clone())
}

fn str_attr(span: &SpanData, key: &str) -> String {
    match attr(span, key) {
        Some(Value::String(s)) => s.as_str().to_owned(),
        other => panic!("{key}: expected a string, got {other:?}"),
    }
}

fn int_attr(span: &SpanData, key: &str) -> i64 {
    match attr(span, key) {
        Some(Value::I64(i)) => i,
        other => panic!("{key}: expected an integer, got {other:?}"),
    }
}

fn find<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    spans
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no span {name:?} in {spans:#?}"))
}

fn header(map: &HeaderMap, key: &str) -> Option<String> {
    map.get(key).map(|v| v.to_str().unwrap().to_owned())
}

#[test]
fn process_span_continues_the_producer_trace_with_messaging_attributes() {
    let table = headers(vec![
        ("traceparent", long(TRACEPARENT)),
        ("tracestate", long("vendor=abc")),
    ]);
    let (trace_id, spans) = with_exporter(|| {
        let trace = MessageTrace::start(&meta(Some(&table)), &target());
        assert!(trace.exporting());
        trace.record_decision("dead_letter", "HTTP 422: no such product");
        trace.record_error("http_422");
        trace.trace_id().map(str::to_owned)
    });

    assert_eq!(trace_id.as_deref(), Some(TRACE_ID));
    assert_eq!(spans.len(), 1);
    let span = &spans[0];
    assert_eq!(span.name, "process orders");
    assert_eq!(span.span_kind, SpanKind::Consumer);
    assert_eq!(
        span.span_context.trace_id(),
        TraceId::from_hex(TRACE_ID).unwrap()
    );
    assert_eq!(span.parent_span_id, SpanId::from_hex(PARENT_ID).unwrap());
    assert!(span.parent_span_is_remote);
    assert!(span.span_context.is_sampled());

    assert_eq!(str_attr(span, "messaging.system"), "rabbitmq");
    assert_eq!(str_attr(span, "messaging.operation.type"), "process");
    assert_eq!(str_attr(span, "messaging.operation.name"), "process");
    assert_eq!(str_attr(span, "messaging.destination.name"), "orders");
    assert_eq!(
        str_attr(span, "messaging.rabbitmq.destination.routing_key"),
        "order.created"
    );
    assert_eq!(
        int_attr(span, "messaging.rabbitmq.message.delivery_tag"),
        42
    );
    assert_eq!(str_attr(span, "messaging.message.id"), "msg-1");
    assert_eq!(
        str_attr(span, "messaging.message.conversation_id"),
        "corr-9"
    );
    assert_eq!(int_attr(span, "messaging.message.body.size"), 123);
    assert_eq!(str_attr(span, "server.address"), "rabbit-1");
    assert_eq!(int_attr(span, "server.port"), 5672);
    assert_eq!(str_attr(span, "rabbit_sidecar.decision"), "dead_letter");
    assert_eq!(str_attr(span, "error.type"), "http_422");
    assert_eq!(span.status, Status::error("http_422"));
    let event = span
        .events
        .iter()
        .find(|e| e.name == "decision")
        .expect("decision event");
    assert_eq!(
        event.attributes,
        vec![
            KeyValue::new("rabbit_sidecar.decision", "dead_letter"),
            KeyValue::new("rabbit_sidecar.detail", "HTTP 422: no such product"),
        ]
    );
    // The tracestate travels with the parent into the span's own context.
    assert_eq!(span.span_context.trace_state().header(), "vendor=abc");
}

#[test]
fn successful_delivery_has_no_error_and_optional_ids_are_absent() {
    let (trace_id, spans) = with_exporter(|| {
        let trace = MessageTrace::start(&with_props(BasicProperties::default(), None), &target());
        trace.record_decision("ack", "");
        trace.trace_id().map(str::to_owned)
    });
    let span = find(&spans, "process orders");
    assert_eq!(
        span.parent_span_id,
        SpanId::INVALID,
        "no headers: a new root"
    );
    assert_eq!(span.status, Status::Unset);
    assert!(attr(span, "error.type").is_none());
    assert!(attr(span, "messaging.message.id").is_none());
    assert!(attr(span, "messaging.message.conversation_id").is_none());
    assert_eq!(str_attr(span, "rabbit_sidecar.decision"), "ack");
    let event = span.events.iter().find(|e| e.name == "decision").unwrap();
    assert_eq!(
        event.attributes,
        vec![KeyValue::new("rabbit_sidecar.decision", "ack")],
        "no empty detail"
    );
    // A fresh root still has a trace id for the logs.
    assert_eq!(trace_id, Some(span.span_context.trace_id().to_string()));
}

#[test]
fn client_span_is_a_child_and_the_app_gets_its_traceparent() {
    let table = headers(vec![
        ("traceparent", long(TRACEPARENT)),
        ("tracestate", long("vendor=abc")),
    ]);
    let (sent, spans) = with_exporter(|| {
        let trace = MessageTrace::start(&meta(Some(&table)), &target());
        let uri: hyper::Uri = "http://user:secret@127.0.0.1:8080/messages?x=1"
            .parse()
            .unwrap();
        let mut call = trace.dispatch_span(&HttpTarget::new("POST", &uri));
        let mut sent = HeaderMap::new();
        // A stale value from elsewhere must not reach the app.
        sent.insert("tracestate", "stale=1".parse().unwrap());
        trace.inject_http(&call, &mut sent);
        call.record_http_status(503);
        sent
    });

    let process = find(&spans, "process orders");
    let client = find(&spans, "POST");
    assert_eq!(client.span_kind, SpanKind::Client);
    assert_eq!(
        client.span_context.trace_id(),
        process.span_context.trace_id()
    );
    assert_eq!(client.parent_span_id, process.span_context.span_id());
    assert!(!client.parent_span_is_remote);
    assert_eq!(str_attr(client, "http.request.method"), "POST");
    assert_eq!(str_attr(client, "server.address"), "127.0.0.1");
    assert_eq!(int_attr(client, "server.port"), 8080);
    assert_eq!(
        str_attr(client, "url.full"),
        "http://127.0.0.1:8080/messages?x=1",
        "userinfo never reaches a span"
    );
    assert_eq!(int_attr(client, "http.response.status_code"), 503);
    assert_eq!(str_attr(client, "error.type"), "503");
    assert_eq!(client.status, Status::error("503"));

    assert_eq!(
        header(&sent, "traceparent").as_deref(),
        Some(format!("00-{TRACE_ID}-{}-01", client.span_context.span_id()).as_str())
    );
    assert_eq!(header(&sent, "tracestate").as_deref(), Some("vendor=abc"));
}

#[test]
fn client_errors_without_a_response_are_recorded() {
    let (_, spans) = with_exporter(|| {
        let trace = MessageTrace::start(&meta(None), &target());
        let mut call = trace.dispatch_span(&HttpTarget::new(
            "POST",
            &"http://localhost/x".parse().unwrap(),
        ));
        call.record_error("timeout");
        trace
            .dispatch_span(&HttpTarget::new("POST", &"https://app/y".parse().unwrap()))
            .record_http_status(200);
    });
    let clients: Vec<_> = spans.iter().filter(|s| s.name == "POST").collect();
    assert_eq!(clients.len(), 2);
    let failed = clients
        .iter()
        .find(|s| attr(s, "http.response.status_code").is_none())
        .unwrap();
    assert_eq!(str_attr(failed, "error.type"), "timeout");
    assert_eq!(failed.status, Status::error("timeout"));
    assert_eq!(int_attr(failed, "server.port"), 80, "default port of http");
    let ok = clients
        .iter()
        .find(|s| attr(s, "http.response.status_code").is_some())
        .unwrap();
    assert_eq!(ok.status, Status::Unset);
    assert!(attr(ok, "error.type").is_none());
    assert_eq!(int_attr(ok, "server.port"), 443, "default port of https");
}

#[test]
fn republished_copies_carry_the_process_span_onward() {
    let table = headers(vec![
        (
            "Traceparent",
            AMQPValue::ShortString(ShortString::from(TRACEPARENT)),
        ),
        ("tracestate", long("vendor=abc")),
        ("x-attempt", AMQPValue::LongInt(2)),
    ]);
    let (copy, spans) = with_exporter(|| {
        let trace = MessageTrace::start(&meta(Some(&table)), &target());
        let mut copy = table.clone();
        trace.inject_amqp(&mut copy);
        copy
    });
    let process = find(&spans, "process orders");
    assert_eq!(
        process.parent_span_id,
        SpanId::from_hex(PARENT_ID).unwrap(),
        "a differently cased key is still found"
    );
    let inner = copy.inner();
    assert!(!inner.contains_key("Traceparent"), "old key replaced");
    assert_eq!(inner.get("x-attempt"), Some(&AMQPValue::LongInt(2)));
    assert_eq!(
        inner.get("traceparent"),
        Some(&long(&format!(
            "00-{TRACE_ID}-{}-01",
            process.span_context.span_id()
        )))
    );
    assert_eq!(inner.get("tracestate"), Some(&long("vendor=abc")));
    // What we write, the next consumer reads back.
    let next = extract_context(Some(&copy));
    use opentelemetry::trace::TraceContextExt as _;
    assert_eq!(
        next.span().span_context().span_id(),
        process.span_context.span_id()
    );
}

#[test]
fn string_like_amqp_types_are_all_understood() {
    for value in [
        long(TRACEPARENT),
        AMQPValue::ShortString(ShortString::from(TRACEPARENT)),
        AMQPValue::ByteArray(ByteArray::from(TRACEPARENT.as_bytes().to_vec())),
        // Surrounding whitespace is a common producer slip and harmless.
        long(&format!(" {TRACEPARENT}\n")),
    ] {
        let table = headers(vec![("traceparent", value.clone())]);
        let (_, spans) =
            with_exporter(|| drop(MessageTrace::start(&meta(Some(&table)), &target())));
        let span = find(&spans, "process orders");
        assert_eq!(
            span.span_context.trace_id(),
            TraceId::from_hex(TRACE_ID).unwrap(),
            "{value:?}"
        );
        assert_eq!(span.parent_span_id, SpanId::from_hex(PARENT_ID).unwrap());
    }
}

fn garbage() -> Vec<AMQPValue> {
    let zero_trace = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
    let zero_span = "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01";
    let mut nested = FieldTable::default();
    nested.insert("traceparent".into(), long(TRACEPARENT));
    vec![
        long(""),
        long("garbage"),
        long("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01"), // short trace id
        long("00-4bf92f3577b34da6a3ce929d0e0e47366-00f067aa0ba902b7-01"), // long trace id
        long("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01"), // short span id
        long("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1"), // short flags
        long("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"), // upper case
        long("00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01"), // non-hex
        long("00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"), // sign
        long("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"), // forbidden version
        long("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"),
        long("0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        long("00-ééééééééééééééé-00f067aa0ba902b7-01"),
        long(zero_trace),
        long(zero_span),
        AMQPValue::ByteArray(ByteArray::from(vec![0xff, 0xfe, 0x00, 0x2d])),
        AMQPValue::FieldTable(nested),
        AMQPValue::FieldArray(FieldArray::from(vec![long(TRACEPARENT)])),
        AMQPValue::LongInt(42),
        AMQPValue::LongLongInt(-1),
        AMQPValue::Boolean(true),
        AMQPValue::Double(1.5),
        AMQPValue::Timestamp(0),
        AMQPValue::Void,
    ]
}

#[test]
fn garbage_traceparents_start_a_fresh_root_without_panicking() {
    let bad_id = TraceId::from_hex(TRACE_ID).unwrap();
    for value in garbage() {
        let table = headers(vec![
            ("traceparent", value.clone()),
            ("tracestate", AMQPValue::LongLongInt(7)),
        ]);
        let ((trace_id, sent), spans) = with_exporter(|| {
            let trace = MessageTrace::start(&meta(Some(&table)), &target());
            (trace.trace_id().map(str::to_owned), sent_to_app(&trace))
        });
        let span = find(&spans, "process orders");
        assert_eq!(span.parent_span_id, SpanId::INVALID, "{value:?}");
        assert_ne!(span.span_context.trace_id(), bad_id, "{value:?}");
        assert_eq!(
            trace_id,
            Some(span.span_context.trace_id().to_string()),
            "{value:?}"
        );
        // The app continues our fresh trace, not the garbage one.
        let client = find(&spans, "POST");
        assert_eq!(
            header(&sent, "traceparent"),
            Some(format!(
                "00-{}-{}-01",
                span.span_context.trace_id(),
                client.span_context.span_id()
            )),
            "{value:?}"
        );
        assert_eq!(header(&sent, "tracestate"), None);
    }
}

#[test]
fn garbage_without_an_exporter_propagates_nothing() {
    for value in garbage() {
        let table = headers(vec![("traceparent", value.clone())]);
        let trace = MessageTrace::start(&meta(Some(&table)), &target());
        assert!(!trace.exporting());
        assert_eq!(trace.trace_id(), None, "{value:?}");
        let call = trace.dispatch_span(&HttpTarget::new(
            "POST",
            &"http://127.0.0.1:1/".parse().unwrap(),
        ));
        let mut sent = HeaderMap::new();
        sent.insert("traceparent", "00-stale".parse().unwrap());
        trace.inject_http(&call, &mut sent);
        assert!(sent.is_empty(), "{value:?}: {sent:?}");
        let mut copy = table.clone();
        trace.inject_amqp(&mut copy);
        assert!(copy.inner().is_empty(), "{value:?}: garbage is dropped");
    }
}

#[test]
fn without_an_exporter_the_producer_context_goes_to_the_app_unchanged() {
    let table = headers(vec![
        ("traceparent", long(TRACEPARENT)),
        ("tracestate", long("vendor=abc,other=1")),
    ]);
    // No subscriber at all, as when RUST_LOG filters everything and no endpoint is set.
    let trace = MessageTrace::start(&meta(Some(&table)), &target());
    assert!(!trace.exporting());
    assert_eq!(trace.trace_id(), Some(TRACE_ID));
    let sent = sent_to_app(&trace);
    assert_eq!(header(&sent, "traceparent").as_deref(), Some(TRACEPARENT));
    assert_eq!(
        header(&sent, "tracestate").as_deref(),
        Some("vendor=abc,other=1")
    );
    let mut copy = FieldTable::default();
    trace.inject_amqp(&mut copy);
    assert_eq!(copy.inner().get("traceparent"), Some(&long(TRACEPARENT)));
}

#[test]
fn unsampled_parent_stays_unsampled() {
    let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    let table = headers(vec![("traceparent", long(unsampled))]);
    let (sent, spans) =
        with_exporter(|| sent_to_app(&MessageTrace::start(&meta(Some(&table)), &target())));
    assert!(
        spans.is_empty(),
        "parent-based sampling drops it: {spans:?}"
    );
    let sent = header(&sent, "traceparent").expect("still propagated");
    assert!(sent.starts_with(&format!("00-{TRACE_ID}-")), "{sent}");
    assert!(sent.ends_with("-00"), "{sent}");
}

#[test]
fn parse_traceparent_is_strict() {
    let (trace, span, flags) = parse_traceparent(TRACEPARENT).unwrap();
    assert_eq!(trace.to_string(), TRACE_ID);
    assert_eq!(span.to_string(), PARENT_ID);
    assert!(flags.is_sampled());
    // A future version may append fields; version 00 may not.
    assert!(parse_traceparent(&format!("01{}-more", &TRACEPARENT[2..])).is_some());
    assert!(parse_traceparent(&format!("{TRACEPARENT}-more")).is_none());
    for bad in ["", "-", "---", "00-00-00-00", "00--00f067aa0ba902b7-01"] {
        assert!(parse_traceparent(bad).is_none(), "{bad:?}");
    }
}

/// Collects what the fmt layer writes, to check what an operator reads.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

fn log_inside_a_delivery(format: LogFormat) -> String {
    let captured = Captured::default();
    let writer = captured.clone();
    let env: HashMap<&str, &str> = HashMap::from([("RUST_LOG", "info")]);
    let (telemetry, dispatch) = Telemetry::build_with_writer(
        format,
        &|k: &str| env.get(k).map(|v| v.to_string()),
        move || writer.clone(),
    )
    .unwrap();
    assert!(!telemetry.exporting());
    let table = headers(vec![("traceparent", long(TRACEPARENT))]);
    tracing::dispatcher::with_default(&dispatch, || {
        let trace = MessageTrace::start(&meta(Some(&table)), &target());
        // As the consumer does: what it logs about the delivery, it logs in the delivery's span.
        trace.in_scope(|| tracing::info!("calling the app"));
    });
    captured.text()
}

#[test]
fn text_log_lines_inside_a_delivery_carry_the_trace_id() {
    let text = log_inside_a_delivery(LogFormat::Text);
    let line = text
        .lines()
        .find(|l| l.contains("calling the app"))
        .unwrap_or_else(|| panic!("no log line in {text:?}"));
    assert!(line.contains(&format!("trace_id={TRACE_ID}")), "{line}");
}

#[test]
fn json_log_lines_inside_a_delivery_carry_the_trace_id() {
    let text = log_inside_a_delivery(LogFormat::Json);
    let line = text
        .lines()
        .find(|l| l.contains("calling the app"))
        .unwrap_or_else(|| panic!("no log line in {text:?}"));
    let json: serde_json::Value = serde_json::from_str(line).unwrap();
    let spans = json["spans"].as_array().expect("span list");
    assert_eq!(spans[0]["trace_id"], TRACE_ID, "{line}");
    assert_eq!(spans[0]["messaging.destination.name"], "orders", "{line}");
}

/// Counts the `tracing` spans made, by name.
#[derive(Clone, Default)]
struct SpanCounter(Arc<Mutex<HashMap<&'static str, usize>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for SpanCounter {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _: &tracing::span::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        *self
            .0
            .lock()
            .unwrap()
            .entry(attrs.metadata().name())
            .or_default() += 1;
    }
}

#[test]
fn the_log_span_is_made_only_when_something_is_logged_in_it() {
    let counter = SpanCounter::default();
    let subscriber = tracing_subscriber::registry().with(counter.clone());
    let made = || {
        counter
            .0
            .lock()
            .unwrap()
            .get("process")
            .copied()
            .unwrap_or(0)
    };
    let table = headers(vec![("traceparent", long(TRACEPARENT))]);
    tracing::subscriber::with_default(subscriber, || {
        // A delivery handled without a log line: no span for the log layer to format.
        let quiet = MessageTrace::start(&meta(Some(&table)), &target());
        let call = quiet.dispatch_span(&HttpTarget::new(
            "POST",
            &"http://127.0.0.1:1/".parse().unwrap(),
        ));
        quiet.inject_http(&call, &mut HeaderMap::new());
        quiet.record_decision("ack", "");
        drop(quiet);
        assert_eq!(made(), 0);
        // One that logs twice: one span, made once, carrying the trace id.
        let noisy = MessageTrace::start(&meta(Some(&table)), &target());
        noisy.in_scope(|| tracing::warn!("first"));
        noisy.in_scope(|| tracing::warn!("second"));
        assert_eq!(made(), 1);
        assert_eq!(noisy.trace_id(), Some(TRACE_ID));
    });
}

#[test]
fn through_the_default_exchange_the_routing_key_is_the_queue_and_no_exchange_is_named() {
    // The span shares the queue's name for the routing key then, rather than copying it.
    let mut delivery = meta(None);
    delivery.exchange = "";
    delivery.routing_key = "orders";
    let (_, spans) = with_exporter(|| drop(MessageTrace::start(&delivery, &target())));
    let span = find(&spans, "process orders");
    assert_eq!(
        str_attr(span, "messaging.rabbitmq.destination.routing_key"),
        "orders"
    );
    assert_eq!(str_attr(span, "messaging.destination.name"), "orders");
    assert_eq!(attr(span, "rabbit_sidecar.exchange"), None);
}

#[test]
fn stale_trace_headers_are_replaced_not_added_to() {
    let stale = |with_state: bool| {
        let mut sent = HeaderMap::new();
        sent.append("traceparent", "00-stale-one".parse().unwrap());
        sent.append("traceparent", "00-stale-two".parse().unwrap());
        if with_state {
            sent.insert("tracestate", "stale=1".parse().unwrap());
        }
        sent
    };
    let values = |sent: &HeaderMap, key: &str| -> Vec<String> {
        sent.get_all(key)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    };
    let http = HttpTarget::new("POST", &"http://127.0.0.1:1/".parse().unwrap());

    // The producer's context with a tracestate, no exporter: both replaced by the producer's.
    let table = headers(vec![
        ("traceparent", long(TRACEPARENT)),
        ("tracestate", long("vendor=abc")),
    ]);
    let trace = MessageTrace::start(&meta(Some(&table)), &target());
    let mut sent = stale(true);
    trace.inject_http(&trace.dispatch_span(&http), &mut sent);
    assert_eq!(values(&sent, "traceparent"), [TRACEPARENT]);
    assert_eq!(values(&sent, "tracestate"), ["vendor=abc"]);

    // A context without a tracestate: the stale one goes.
    let table = headers(vec![("traceparent", long(TRACEPARENT))]);
    let trace = MessageTrace::start(&meta(Some(&table)), &target());
    let mut sent = stale(true);
    trace.inject_http(&trace.dispatch_span(&http), &mut sent);
    assert_eq!(values(&sent, "traceparent"), [TRACEPARENT]);
    assert!(values(&sent, "tracestate").is_empty(), "{sent:?}");

    // Exporting: the client span's context, one value, in the W3C layout.
    let (sent, _) = with_exporter(|| {
        let trace = MessageTrace::start(&meta(Some(&table)), &target());
        let mut sent = stale(false);
        trace.inject_http(&trace.dispatch_span(&http), &mut sent);
        sent
    });
    let parents = values(&sent, "traceparent");
    assert_eq!(parents.len(), 1, "{parents:?}");
    let (trace_id, span_id, flags) = parse_traceparent(&parents[0]).expect("a valid traceparent");
    assert_eq!(trace_id.to_string(), TRACE_ID);
    assert_ne!(span_id, SpanId::INVALID);
    assert!(flags.is_sampled());
    assert_eq!(parents[0].len(), 55);
    assert!(
        parents[0]
            .bytes()
            .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "lowercase hex: {}",
        parents[0]
    );
}
