//! Spans leave the process: a minimal OTLP collector on 127.0.0.1 (HTTP/1 protobuf and gRPC over
//! h2c, decoded with the OTLP protobuf types) receives what `Telemetry` exports, configured only
//! through the standard variables, and flushed by `shutdown`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::headers::DeliveryInfo;
use crate::telemetry::setup::{LogFormat, SHUTDOWN_GRACE, Telemetry};
use crate::telemetry::trace::{HttpTarget, MessageTrace, ProcessTarget, Server};
use bytes::{BufMut as _, Bytes, BytesMut};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind};
use prost::Message as _;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";
const GRPC_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// One export as the collector saw it.
struct Export {
    path: String,
    grpc: bool,
    headers: HeaderMap,
    request: ExportTraceServiceRequest,
}

struct Collector {
    addr: SocketAddr,
    exports: mpsc::UnboundedReceiver<Export>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, exports) = mpsc::unbounded_channel();
        // Ends with the test's runtime.
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| answer(req, tx.clone()));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Collector { addr, exports }
    }

    /// Spans received so far. Called after `shutdown`, which returns only once the collector
    /// answered, so they are already queued; the short deadline only absorbs scheduling, and is
    /// well under the batch processor's 5 s delay, so a missing flush cannot pass unnoticed.
    async fn spans(&mut self) -> (Vec<Export>, Vec<Span>) {
        let first = tokio::time::timeout(Duration::from_secs(1), self.exports.recv())
            .await
            .expect("no export reached the collector")
            .expect("collector stopped");
        let mut exports = vec![first];
        while let Ok(more) = self.exports.try_recv() {
            exports.push(more);
        }
        let spans = exports
            .iter()
            .flat_map(|e| &e.request.resource_spans)
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| s.spans.clone())
            .collect();
        (exports, spans)
    }
}

async fn answer(
    req: Request<Incoming>,
    tx: mpsc::UnboundedSender<Export>,
) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
    let path = req.uri().path().to_owned();
    let headers = req.headers().clone();
    let grpc = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let body = req.into_body().collect().await.unwrap().to_bytes();
    // gRPC frames a message as: compressed flag (1 byte), length (4 bytes, big endian), message.
    let message = if grpc { body.slice(5..) } else { body };
    let request = ExportTraceServiceRequest::decode(message).expect("an OTLP trace request");
    let _ = tx.send(Export {
        path,
        grpc,
        headers,
        request,
    });
    let reply = ExportTraceServiceResponse::default().encode_to_vec();
    let response = if grpc {
        let mut frame = BytesMut::new();
        frame.put_u8(0);
        frame.put_u32(u32::try_from(reply.len()).unwrap());
        frame.put_slice(&reply);
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let frames = futures_util::stream::iter([
            Ok(Frame::data(frame.freeze())),
            Ok(Frame::trailers(trailers)),
        ]);
        Response::builder()
            .header("content-type", "application/grpc")
            .body(StreamBody::new(frames).boxed())
    } else {
        Response::builder()
            .header("content-type", "application/x-protobuf")
            .body(Full::new(Bytes::from(reply)).boxed())
    };
    Ok(response.unwrap())
}

fn env_of(pairs: Vec<(&'static str, String)>) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<&str, String> = pairs.into_iter().collect();
    move |k| map.get(k).cloned()
}

/// Processes one delivery with a known producer context, as the consumer loop would.
fn one_delivery() {
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(LongString::from(format!("00-{TRACE_ID}-{PARENT_ID}-01"))),
    );
    let props = BasicProperties::default()
        .with_message_id("m-1".into())
        .with_headers(headers);
    let delivery = DeliveryInfo {
        queue: "orders",
        exchange: "",
        routing_key: "orders",
        delivery_tag: 7,
        redelivered: false,
        attempt: 1,
        properties: &props,
        body_len: 3,
    };
    let server = Server {
        address: "127.0.0.1",
        port: 5672,
    };
    let trace = MessageTrace::start(&delivery, &ProcessTarget::new("orders", server));
    assert!(trace.exporting());
    let mut call = trace.dispatch_span(&HttpTarget::new(
        "POST",
        &"http://127.0.0.1:8080/in".parse().unwrap(),
    ));
    call.record_http_status(200);
    drop(call);
    trace.record_decision("ack", "");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn assert_delivery_exported(exports: &[Export], spans: &[Span], service: &str) {
    let process = spans
        .iter()
        .find(|s| s.name == "process orders")
        .unwrap_or_else(|| panic!("no process span in {spans:#?}"));
    assert_eq!(hex(&process.trace_id), TRACE_ID);
    assert_eq!(hex(&process.parent_span_id), PARENT_ID);
    assert_eq!(process.kind, SpanKind::Consumer as i32);
    let client = spans
        .iter()
        .find(|s| s.name == "POST")
        .expect("client span");
    assert_eq!(client.kind, SpanKind::Client as i32);
    assert_eq!(client.parent_span_id, process.span_id);
    assert_eq!(hex(&client.trace_id), TRACE_ID);

    let services: Vec<_> = exports
        .iter()
        .flat_map(|e| &e.request.resource_spans)
        .filter_map(|r| r.resource.as_ref())
        .flat_map(|r| &r.attributes)
        .filter(|kv| kv.key == "service.name")
        .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.as_str()),
            _ => None,
        })
        .collect();
    assert!(services.iter().all(|s| *s == service), "{services:?}");
    assert!(!services.is_empty());
}

#[tokio::test]
async fn http_protobuf_export_reaches_the_collector_on_shutdown() {
    let mut collector = Collector::start().await;
    let env = env_of(vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://{}/", collector.addr),
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".to_owned()),
        ("OTEL_SERVICE_NAME", "orders-sidecar".to_owned()),
        (
            "OTEL_EXPORTER_OTLP_HEADERS",
            "api-key=generic,x-tenant=a%20b".to_owned(),
        ),
        (
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
            "api-key=traces".to_owned(),
        ),
    ]);
    // The one test in this binary that installs the global subscriber, as main does.
    let telemetry = Telemetry::init_with_env(LogFormat::Json, &env).unwrap();
    assert!(telemetry.exporting());
    one_delivery();
    telemetry.shutdown().await;

    let (exports, spans) = collector.spans().await;
    assert!(exports.iter().all(|e| e.path == "/v1/traces" && !e.grpc));
    for e in &exports {
        assert_eq!(e.headers["content-type"], "application/x-protobuf");
        // The traces-specific variable wins per key; percent-encoded values are decoded.
        let keys: Vec<_> = e.headers.get_all("api-key").iter().collect();
        assert_eq!(keys, ["traces"]);
        assert_eq!(e.headers["x-tenant"], "a b");
    }
    assert_delivery_exported(&exports, &spans, "orders-sidecar");
}

#[tokio::test]
async fn grpc_export_reaches_the_collector_on_shutdown() {
    let mut collector = Collector::start().await;
    let env = env_of(vec![
        (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            format!("http://{}", collector.addr),
        ),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc".to_owned()),
    ]);
    let (telemetry, dispatch) = Telemetry::build(LogFormat::Text, &env).unwrap();
    assert!(telemetry.exporting());
    tracing::dispatcher::with_default(&dispatch, one_delivery);
    telemetry.shutdown().await;

    let (exports, spans) = collector.spans().await;
    assert!(exports.iter().all(|e| e.path == GRPC_PATH && e.grpc));
    assert_delivery_exported(&exports, &spans, "rabbit-sidecar");
}

#[tokio::test]
async fn shutdown_gives_up_on_a_collector_that_never_answers() {
    // Accepts connections and never answers: the worst case, a wedged collector.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let env = env_of(vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}")),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "60000".to_owned()),
    ]);
    let (telemetry, dispatch) = Telemetry::build(LogFormat::Text, &env).unwrap();
    tracing::dispatcher::with_default(&dispatch, one_delivery);
    let started = Instant::now();
    telemetry.shutdown().await;
    let took = started.elapsed();
    assert!(
        took < SHUTDOWN_GRACE + Duration::from_secs(2),
        "shutdown took {took:?}"
    );
}
