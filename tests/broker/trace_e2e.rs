//! The trace promise end to end: a message published with a known `traceparent` goes through the
//! real broker and the real sidecar binary; the exported `process` span continues that trace, the
//! app receives a `traceparent` of the same trace naming the sidecar's CLIENT span, and a
//! dead-lettered copy carries the context on.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;
use std::sync::{Arc, Mutex};

use crate::common::*;

const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const PARENT_ID: &str = "b7ad6b7169203331";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A minimal OTLP/HTTP protobuf collector on 127.0.0.1.
async fn collector() -> (String, Arc<Mutex<Vec<Span>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
    let store = spans.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let store = store.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let store = store.clone();
                    async move {
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        if let Ok(export) = ExportTraceServiceRequest::decode(body) {
                            let mut s = store.lock().unwrap();
                            for rs in export.resource_spans {
                                for ss in rs.scope_spans {
                                    s.extend(ss.spans);
                                }
                            }
                        }
                        let reply = ExportTraceServiceResponse::default().encode_to_vec();
                        Ok::<_, std::convert::Infallible>(
                            Response::builder()
                                .header("content-type", "application/x-protobuf")
                                .body(Full::new(Bytes::from(reply)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (format!("http://{addr}"), spans)
}

fn attr<'a>(
    span: &'a Span,
    key: &str,
) -> Option<&'a opentelemetry_proto::tonic::common::v1::any_value::Value> {
    span.attributes
        .iter()
        .find(|a| a.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()
}

#[tokio::test]
async fn the_process_span_continues_the_producers_trace_and_the_app_gets_a_child_context() {
    let broker = Broker::connect().await;
    let queue = unique("trace");
    broker.track(&queue);
    let (endpoint, spans) = collector().await;
    let app = App::start().await;
    app.answer(|r| if r.id() == "poison" { 400 } else { 200 });
    let url = app.url();
    let mut sidecar = Sidecar::start_env(
        &[
            "--amqp-url",
            amqp(),
            "--queue",
            &queue,
            "--target-url",
            &url,
            "--declare",
            "--queue-type",
            "classic",
        ],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_SERVICE_NAME", "sidecar-under-test"),
        ],
    );
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(format!("00-{TRACE_ID}-{PARENT_ID}-01").into()),
    );
    for body in ["hello", "poison"] {
        broker
            .publish(
                &queue,
                body.as_bytes(),
                BasicProperties::default()
                    .with_headers(headers.clone())
                    .with_message_id(format!("id-{body}").into()),
            )
            .await;
    }
    assert!(eventually(Duration::from_secs(15), || async { app.count() == 2 }).await);
    let dlq = format!("{queue}.dead-letter");
    assert!(
        eventually(Duration::from_secs(15), || async {
            broker.count(&dlq).await.map(|c| c.0) == Some(1)
        })
        .await
    );

    // The app saw a child context of the producer's trace, not the producer's own span.
    let hello = app
        .received()
        .into_iter()
        .find(|r| r.id() == "hello")
        .unwrap();
    let tp = hello
        .header("traceparent")
        .expect("the app receives traceparent")
        .to_string();
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts[1], TRACE_ID, "{tp}");
    assert_ne!(
        parts[2], PARENT_ID,
        "the app's parent is the sidecar's CLIENT span"
    );

    // The dead letter carries the context on.
    let dead = broker.drain(&dlq).await;
    let dl_tp = header_str(&dead[0].1, "traceparent").expect("the dead letter carries traceparent");
    assert!(dl_tp.contains(TRACE_ID), "{dl_tp}");

    // The warning about the dead letter names the message and its trace. The copy reaches the
    // dead-letter queue before the broker's confirm reaches the sidecar, which then logs.
    eventually(Duration::from_secs(10), || async {
        sidecar.logs().contains("message dead-lettered")
    })
    .await;
    let logs = sidecar.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("message dead-lettered"))
        .unwrap_or_else(|| panic!("no dead-letter warning in:\n{logs}"));
    assert!(line.contains(&format!("trace_id={TRACE_ID}")), "{line}");
    assert!(line.contains("id-poison"), "{line}");

    // SIGTERM flushes the exporter.
    sidecar.signal("TERM");
    assert!(
        sidecar
            .wait_exit(Duration::from_secs(20))
            .await
            .unwrap()
            .success()
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            spans
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.name == format!("process {queue}"))
                .count()
                == 2
        })
        .await,
        "two process spans exported; logs:\n{}",
        sidecar.logs()
    );
    let spans = spans.lock().unwrap().clone();
    let process: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == format!("process {queue}"))
        .collect();
    for p in &process {
        assert_eq!(hex(&p.trace_id), TRACE_ID);
        assert_eq!(hex(&p.parent_span_id), PARENT_ID);
        assert_eq!(p.kind, SpanKind::Consumer as i32);
        assert!(
            matches!(attr(p, "messaging.system"), Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) if s == "rabbitmq")
        );
    }
    let client = spans
        .iter()
        .find(|s| s.kind == SpanKind::Client as i32 && hex(&s.span_id) == parts[2])
        .expect("the CLIENT span named in the app's traceparent was exported");
    assert_eq!(hex(&client.trace_id), TRACE_ID);
    assert!(
        process.iter().any(|p| p.span_id == client.parent_span_id),
        "the CLIENT span is a child of a process span"
    );
    let rejected = process
        .iter()
        .find(|p| matches!(attr(p, "messaging.message.id"), Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) if s == "id-poison"))
        .expect("the poison message's span");
    assert!(
        attr(rejected, "error.type").is_some(),
        "error.type recorded on failure"
    );
    broker.cleanup().await;
}
