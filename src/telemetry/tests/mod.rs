//! Telemetry's own tests: OTLP encoding against the official conversion, the span batcher, the
//! spans a delivery makes, export to a collector on 127.0.0.1, the `OTEL_*` settings and the log
//! level. None needs a broker.

use hyper::HeaderMap;
use lapin::types::FieldTable;

use crate::telemetry::trace::{DeliveryMeta, HttpTarget, MessageTrace};

mod config;
mod log_level;
mod otlp_encode;
mod otlp_export;
mod span_batch;
mod trace_spans;

/// A delivery of `orders` (through `shop`, key `order.created`) carrying `headers`.
fn meta(headers: Option<&FieldTable>) -> DeliveryMeta<'_> {
    DeliveryMeta {
        queue: "orders",
        exchange: "shop",
        routing_key: "order.created",
        delivery_tag: 42,
        message_id: Some("msg-1"),
        correlation_id: Some("corr-9"),
        body_size: 123,
        server_address: "rabbit-1",
        server_port: 5672,
        headers,
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
