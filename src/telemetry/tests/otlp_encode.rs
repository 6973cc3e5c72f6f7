//! The direct OTLP encoder writes exactly what the official conversion (opentelemetry-proto)
//! produces, for every kind of span content the SDK can hold.

use crate::telemetry::otlp::encode_request;
use opentelemetry::trace::{
    Link, Span as _, SpanBuilder, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _,
    TraceFlags, TraceId, TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Array, Context, InstrumentationScope, KeyValue, StringValue, Value};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use prost::Message as _;

fn resource() -> Resource {
    Resource::builder_empty()
        .with_service_name("orders-sidecar")
        .with_attribute(KeyValue::new("deployment.environment", "test"))
        .with_attribute(KeyValue::new("replica", 3))
        .with_schema_url([], "https://opentelemetry.io/schemas/1.26.0")
        .build()
}

/// Finished spans covering every field: remote and local parents, roots, each kind, events with
/// and without attributes, links, every status, every attribute value type, two scopes, a trace
/// state, an unsampled-but-recorded flag, long strings that need multi-byte lengths.
fn spans() -> Vec<SpanData> {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let tracer = provider.tracer("rabbit-sidecar");
    let scoped = provider.tracer_with_scope(
        InstrumentationScope::builder("other")
            .with_version("1.2.3")
            .with_schema_url("https://example.com/schema")
            .with_attributes([KeyValue::new("scope.attr", true)])
            .build(),
    );

    let remote = SpanContext::new(
        TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
        SpanId::from_hex("00f067aa0ba902b7").unwrap(),
        TraceFlags::SAMPLED,
        true,
        "vendor=abc,other=1".parse::<TraceState>().unwrap(),
    );
    let parent_cx = Context::new().with_remote_span_context(remote.clone());

    let mut process = tracer.build_with_context(
        SpanBuilder::from_name("process orders")
            .with_kind(SpanKind::Consumer)
            .with_attributes([
                KeyValue::new("messaging.system", "rabbitmq"),
                KeyValue::new("messaging.rabbitmq.message.delivery_tag", 42),
                KeyValue::new("negative", -7),
                KeyValue::new("zero", 0),
                KeyValue::new("empty", ""),
                KeyValue::new("ratio", 0.25),
                KeyValue::new("flag", false),
                KeyValue::new("long", "x".repeat(300)),
                KeyValue::new("", "no key"),
                KeyValue::new("k".repeat(200), 1),
                KeyValue::new("bools", Value::Array(Array::Bool(vec![true, false]))),
                KeyValue::new("ints", Value::Array(Array::I64(vec![1, -2, 300]))),
                KeyValue::new("floats", Value::Array(Array::F64(vec![1.5]))),
                KeyValue::new(
                    "strings",
                    Value::Array(Array::String(vec![
                        StringValue::from("a"),
                        StringValue::from(""),
                    ])),
                ),
            ])
            .with_links(vec![Link::new(
                remote.clone(),
                vec![KeyValue::new("link.attr", "x")],
                0,
            )]),
        &parent_cx,
    );
    process.add_event(
        "decision",
        vec![KeyValue::new("rabbit_sidecar.decision", "retry")],
    );
    process.add_event("bare", vec![]);
    process.set_status(Status::error("http_503"));
    let local_cx = Context::new().with_remote_span_context(process.span_context().clone());
    let mut client = tracer.build_with_context(
        SpanBuilder::from_name("POST").with_kind(SpanKind::Client),
        &local_cx,
    );
    client.set_status(Status::Ok);
    client.end();
    process.end();

    let mut root = tracer.start("root");
    root.set_attribute(KeyValue::new("k", "v"));
    root.end();
    for kind in [SpanKind::Internal, SpanKind::Server, SpanKind::Producer] {
        scoped
            .span_builder("scoped")
            .with_kind(kind)
            .start(&scoped)
            .end();
    }
    // Back to the first scope: a second run of it must not be merged into the first.
    tracer.start("late").end();
    provider.force_flush().unwrap();
    exporter.get_finished_spans().unwrap()
}

fn official(resource: &Resource, spans: Vec<SpanData>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: group_spans_by_resource_and_scope(
            spans,
            &ResourceAttributesWithSchema::from(resource),
        ),
    }
}

fn ours(resource: &Resource, spans: &[SpanData]) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest::decode(encode_request(resource, spans).as_slice())
        .expect("valid protobuf")
}

#[test]
fn every_span_field_is_encoded_as_the_official_conversion_does() {
    let resource = resource();
    let spans = spans();
    assert_eq!(spans.len(), 7);
    let ours = ours(&resource, &spans);

    // The official conversion groups all spans of a scope together; ours keeps the batch order
    // and starts a new scope entry when the scope changes. Compare span by span, then scopes.
    assert_eq!(
        by_span_id(&ours),
        by_span_id(&official(&resource, spans.clone()))
    );

    let official = official(&resource, spans);
    assert_eq!(ours.resource_spans.len(), 1);
    assert_eq!(
        ours.resource_spans[0].resource,
        official.resource_spans[0].resource
    );
    assert_eq!(
        ours.resource_spans[0].schema_url,
        official.resource_spans[0].schema_url
    );
    let scopes: Vec<_> = ours.resource_spans[0]
        .scope_spans
        .iter()
        .map(|ss| (ss.scope.as_ref().unwrap().name.clone(), ss.spans.len()))
        .collect();
    assert_eq!(
        scopes,
        [
            ("rabbit-sidecar".to_owned(), 3),
            ("other".to_owned(), 3),
            ("rabbit-sidecar".to_owned(), 1)
        ]
    );
}

type ScopedSpan = (
    Option<opentelemetry_proto::tonic::common::v1::InstrumentationScope>,
    String,
    opentelemetry_proto::tonic::trace::v1::Span,
);

/// Every span of a request with its scope and schema, in the order of their span ids.
fn by_span_id(r: &ExportTraceServiceRequest) -> Vec<ScopedSpan> {
    let mut spans: Vec<ScopedSpan> = r
        .resource_spans
        .iter()
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| {
            ss.spans
                .iter()
                .map(move |s| (ss.scope.clone(), ss.schema_url.clone(), s.clone()))
        })
        .collect();
    spans.sort_by_key(|e| e.2.span_id.clone());
    spans
}

/// Attributes shared by many spans are written once and copied: what is copied must be exactly
/// the attribute, whatever else shares its key, its value or its text.
#[test]
fn attributes_shared_by_many_spans_are_encoded_as_the_official_conversion_does() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let tracer = provider.tracer("rabbit-sidecar");
    let queue: std::sync::Arc<str> = "orders".into();
    let node: std::sync::Arc<str> = "rabbit-1".into();
    for i in 0..40 {
        let shared = |key: &'static str, text: &std::sync::Arc<str>| {
            KeyValue::new(key, Value::String(StringValue::from(text.clone())))
        };
        let mut span = tracer.build(SpanBuilder::from_name("process orders").with_attributes([
            shared("messaging.destination.name", &queue),
            // The same text under another key, and another text under the same key.
            shared("messaging.rabbitmq.destination.routing_key", &queue),
            shared("server.address", if i % 2 == 0 { &node } else { &queue }),
            KeyValue::new("messaging.system", "rabbitmq"),
            // Owned and new for every span, some equal in text.
            KeyValue::new("messaging.message.id", format!("m-{}", i % 3)),
            KeyValue::new("messaging.rabbitmq.message.delivery_tag", i),
            KeyValue::new("empty", ""),
            KeyValue::new("long", "x".repeat(200)),
        ]));
        // The same attribute in an event: another field around the same encoding.
        span.add_event(
            "decision",
            vec![KeyValue::new("messaging.system", "rabbitmq")],
        );
        span.end();
    }
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    assert_eq!(spans.len(), 40);
    let resource = resource();
    assert_eq!(
        by_span_id(&ours(&resource, &spans)),
        by_span_id(&official(&resource, spans))
    );
}

#[test]
fn an_empty_batch_is_a_valid_request() {
    let request = ours(&resource(), &[]);
    assert_eq!(request.resource_spans.len(), 1);
    assert!(request.resource_spans[0].scope_spans.is_empty());
}
