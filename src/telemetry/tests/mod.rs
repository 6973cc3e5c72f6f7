//! Telemetry's own tests: OTLP encoding against the official conversion, the span batcher, the
//! spans a delivery makes, export to a collector on 127.0.0.1, the `OTEL_*` settings and the log
//! level. None needs a broker.

use hyper::HeaderMap;
use lapin::types::FieldTable;

use lapin::BasicProperties;

use crate::headers::DeliveryInfo;
use crate::telemetry::trace::{HttpTarget, MessageTrace, ProcessTarget, Server};

mod config;
mod log_level;
mod otlp_encode;
mod otlp_export;
mod span_batch;
mod trace_spans;

/// The node the test deliveries come from.
const SERVER: Server<'static> = Server {
    address: "rabbit-1",
    port: 5672,
};

/// What the consumer of `orders` on [`SERVER`] gives every delivery's span.
fn target() -> ProcessTarget {
    ProcessTarget::new("orders", SERVER)
}

/// A delivery of `orders` (through `shop`, key `order.created`, tag 42, message id `msg-1`,
/// correlation id `corr-9`) carrying `headers`. Its properties are leaked: a test's few bytes,
/// for a description that borrows them as the consumer's does.
fn meta(headers: Option<&FieldTable>) -> DeliveryInfo<'static> {
    with_props(
        BasicProperties::default()
            .with_message_id("msg-1".into())
            .with_correlation_id("corr-9".into()),
        headers,
    )
}

/// [`meta`] with `props` (and `headers`, if any) as the message's properties.
fn with_props(props: BasicProperties, headers: Option<&FieldTable>) -> DeliveryInfo<'static> {
    let props = match headers {
        Some(h) => props.with_headers(h.clone()),
        None => props,
    };
    DeliveryInfo {
        queue: "orders",
        exchange: "shop",
        routing_key: "order.created",
        delivery_tag: 42,
        redelivered: false,
        attempt: 1,
        properties: Box::leak(Box::new(props)),
        body_len: 123,
    }
}

/// The trace headers the app receives with a delivery traced by `trace` (its client span's
/// context, injected into the POST).
fn sent_to_app(trace: &MessageTrace<'_>) -> HeaderMap {
    let call = trace.dispatch_span(&HttpTarget::new(
        "POST",
        &"http://127.0.0.1:1/".parse().unwrap(),
    ));
    let mut sent = HeaderMap::new();
    trace.inject_http(&call, &mut sent);
    sent
}
