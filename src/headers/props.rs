//! Property tests over the AMQP → HTTP header mapping and the attempt counting: arbitrary field
//! tables (nested values, odd names, raw bytes) never panic, and what reaches the app is always a
//! valid header carrying a scalar value.
//!
//! Trace context extraction (`telemetry::trace::extract_context`) is not covered here: it has its
//! own unit tests in `src/telemetry/tests/trace_spans.rs`.

use std::collections::BTreeMap;

use crate::headers::{self, DeliveryInfo, scalar_text};
use hyper::header::HeaderMap;
use lapin::BasicProperties;
use lapin::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
};
use proptest::prelude::*;

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9_-]{1,20}",
        any::<String>().prop_map(|s| s.chars().take(40).collect()),
        Just("x-sidecar-attempts".to_string()),
        Just("x-delivery-count".to_string()),
        Just("traceparent".to_string()),
        Just("TraceState".to_string()),
    ]
}

fn text() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[ -~]{0,40}".prop_map(String::into_bytes),
        any::<String>().prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..40),
        (0usize..3).prop_map(|k| vec![b'x'; 8 * 1024 - 1 + k]),
    ]
}

fn scalar() -> impl Strategy<Value = AMQPValue> {
    prop_oneof![
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i8>().prop_map(AMQPValue::ShortShortInt),
        any::<u8>().prop_map(AMQPValue::ShortShortUInt),
        any::<i16>().prop_map(AMQPValue::ShortInt),
        any::<u16>().prop_map(AMQPValue::ShortUInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<u32>().prop_map(AMQPValue::LongUInt),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        any::<f32>().prop_map(AMQPValue::Float),
        any::<f64>().prop_map(AMQPValue::Double),
        any::<u64>().prop_map(AMQPValue::Timestamp),
        (any::<u8>(), any::<u32>())
            .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
        "[ -~]{0,40}".prop_map(|s| AMQPValue::ShortString(ShortString::from(s))),
        text().prop_map(|b| AMQPValue::LongString(LongString::from(b))),
        prop::collection::vec(any::<u8>(), 0..20)
            .prop_map(|b| AMQPValue::ByteArray(ByteArray::from(b))),
        Just(AMQPValue::Void),
    ]
}

fn value() -> impl Strategy<Value = AMQPValue> {
    scalar().prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6)
                .prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v))),
            prop::collection::vec((name(), inner), 0..6)
                .prop_map(|kv| AMQPValue::FieldTable(table(kv))),
        ]
    })
}

fn table(kv: Vec<(String, AMQPValue)>) -> FieldTable {
    let mut map = BTreeMap::new();
    for (k, v) in kv {
        map.insert(ShortString::from(k), v);
    }
    FieldTable::from(map)
}

fn field_table() -> impl Strategy<Value = FieldTable> {
    prop::collection::vec((name(), value()), 0..12).prop_map(table)
}

const FIXED: &[&str] = &[
    "content-length",
    "content-type",
    "content-encoding",
    "x-amqp-message-id",
    "x-amqp-correlation-id",
    "x-amqp-reply-to",
    "x-amqp-type",
    "x-amqp-app-id",
    "x-amqp-user-id",
    "x-amqp-timestamp",
    "x-amqp-priority",
    "x-amqp-exchange",
    "x-amqp-routing-key",
    "x-amqp-queue",
    "x-amqp-redelivered",
    "x-amqp-attempt",
];

fn is_scalar(v: &AMQPValue) -> bool {
    !matches!(
        v,
        AMQPValue::FieldTable(_)
            | AMQPValue::FieldArray(_)
            | AMQPValue::ByteArray(_)
            | AMQPValue::Void
    )
}

fn check_headers(h: &HeaderMap, t: &FieldTable) {
    for (name, value) in h.iter() {
        let bytes = value.as_bytes();
        assert!(bytes.len() <= 8 * 1024, "{name}: {} bytes", bytes.len());
        assert!(
            bytes
                .iter()
                .all(|b| *b == b'\t' || (0x20..0x7f).contains(b)),
            "{name}: {value:?} is not visible ASCII"
        );
        let name = name.as_str();
        if FIXED.contains(&name) {
            continue;
        }
        let user = name
            .strip_prefix("x-amqp-header-")
            .unwrap_or_else(|| panic!("unexpected header {name}"));
        assert!(
            !user.eq_ignore_ascii_case("traceparent") && !user.eq_ignore_ascii_case("tracestate"),
            "trace context copied from the message: {name}"
        );
        let text = value.to_str().unwrap();
        let source = t.inner().iter().find(|(k, v)| {
            k.as_str().eq_ignore_ascii_case(user) && scalar_text(v).as_deref() == Some(text)
        });
        let (_, v) = source.unwrap_or_else(|| panic!("{name}: {text:?} has no source in {t:?}"));
        assert!(is_scalar(v), "{name} from a non-scalar {v:?}");
    }
    // The other direction: a clean scalar under a token name is never dropped.
    for (k, v) in t.inner() {
        let k = k.as_str();
        if k.eq_ignore_ascii_case("traceparent") || k.eq_ignore_ascii_case("tracestate") {
            continue;
        }
        let Some(text) = scalar_text(v) else { continue };
        let clean = text.len() <= 8 * 1024 && text.bytes().all(|b| (0x20..0x7f).contains(&b));
        let token = !k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if clean && token {
            let header = format!("x-amqp-header-{}", k.to_ascii_lowercase());
            let trimmed = text.trim_matches(|c| c == ' ' || c == '\t');
            assert!(
                h.get_all(&header)
                    .iter()
                    .any(|hv| hv.to_str().unwrap().trim() == trimmed),
                "{k} = {text:?} was dropped"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn to_http_never_panics_and_emits_only_valid_scalar_headers(
        t in field_table(),
        content_type in prop::option::of(prop_oneof!["[ -~]{0,60}", any::<String>().prop_map(|s| s.chars().take(60).collect::<String>())]),
        message_id in prop::option::of("[ -~]{0,40}"),
        redelivered in any::<bool>(),
        attempt in any::<u32>(),
        queue in "[ -~]{0,40}",
    ) {
        let mut props = BasicProperties::default().with_headers(t.clone());
        if let Some(ct) = content_type {
            props = props.with_content_type(ct.into());
        }
        if let Some(id) = message_id {
            props = props.with_message_id(id.into());
        }
        let h = headers::to_http(&DeliveryInfo {
            queue: &queue,
            exchange: "",
            routing_key: &queue,
            delivery_tag: 1,
            redelivered,
            attempt,
            properties: &props,
            body_len: 3,
        });
        prop_assert!(h.contains_key("content-type"));
        prop_assert_eq!(h["content-length"].to_str().unwrap(), "3");
        prop_assert_eq!(h["x-amqp-attempt"].to_str().unwrap(), attempt.to_string());
        check_headers(&h, &t);
    }

    #[test]
    fn prior_attempts_never_panics_and_adds_the_two_counts(
        t in field_table(),
        attempts in prop::option::of(0u32..1_000_000),
        delivery_count in prop::option::of(any::<i64>()),
    ) {
        let _ = headers::prior_attempts(Some(&t));
        let mut map = t.inner().clone();
        map.remove(headers::ATTEMPTS);
        map.remove(headers::DELIVERY_COUNT);
        let mut t = FieldTable::from(map);
        if let Some(a) = attempts {
            t.insert(headers::ATTEMPTS.into(), AMQPValue::LongInt(a as i32));
        }
        if let Some(d) = delivery_count {
            t.insert(headers::DELIVERY_COUNT.into(), AMQPValue::LongLongInt(d));
        }
        let got = headers::prior_attempts(Some(&t));
        {
            let expect = u64::from(attempts.unwrap_or(0)) + u64::try_from(delivery_count.unwrap_or(0)).unwrap_or(0);
            prop_assert_eq!(u64::from(got), expect.min(u64::from(u32::MAX)));
        }
    }
}
