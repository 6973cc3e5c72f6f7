//! Per-delivery tracing: continue the producer's trace, name the HTTP call to the app, pass the
//! context on.
//!
//! The consumer loop drives one [`MessageTrace`] per delivery, in this order:
//!
//! ```text
//! let trace = MessageTrace::start(&DeliveryMeta { .. });      // CONSUMER span "process {queue}"
//! async { .. }.instrument(trace.span().clone())               // logs inside carry trace_id
//!   let call = trace.dispatch_span("POST", &uri);             // CLIENT span "POST", child of it
//!   trace.inject_http(&call, request.headers_mut());          // app sees traceparent/tracestate
//!   record_http_status(&call, 503)  or  record_client_error(&call, "timeout");
//!   trace.record_decision("retry");                           // attribute + span event
//!   trace.record_error("http_503");                           // error.type + status error
//!   trace.inject_amqp(&mut copy_headers);                     // retried / dead-lettered copy
//! ```
//!
//! The process span is a CONSUMER span named `process {queue}` with the OpenTelemetry messaging
//! conventions for RabbitMQ (`messaging.system`, `messaging.operation.{type,name}`,
//! `messaging.destination.name`, `messaging.rabbitmq.destination.routing_key`,
//! `messaging.rabbitmq.message.delivery_tag`, `messaging.message.id`,
//! `messaging.message.conversation_id`, `messaging.message.body.size`, `server.address`,
//! `server.port`, and `error.type` on failure). The fate of the message is
//! `rabbit_sidecar.decision`: our own namespace, because semconv defines no such attribute and an
//! unowned `messaging.rabbitmq.*` name could collide with a future one.
//!
//! Only what a person reading logs needs (queue, delivery tag, message id, trace id, decision,
//! error type) is a `tracing` field; the other attributes go straight to OpenTelemetry, so text
//! log lines stay short and cost nothing when no exporter is installed.
//!
//! Its parent is the W3C `traceparent`/`tracestate` found in the AMQP headers. Producers write
//! those as long strings, short strings or byte arrays; anything else, or a value that is not a
//! strict W3C traceparent (the SDK's own parser accepts wrong lengths), starts a new root instead.
//!
//! Without an OpenTelemetry layer (no exporter configured) nothing is recorded anywhere but the
//! logs, and the incoming context is handed to the app and to re-published copies unchanged, so
//! the producer's trace still continues through the app.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use opentelemetry::trace::{
    SpanContext, SpanId, Status, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Context, KeyValue};
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";
const DECISION_KEY: &str = "rabbit_sidecar.decision";

/// Set once an OpenTelemetry layer has been built in this process (see
/// [`crate::telemetry::otel_layer`]). Until then nothing can take the OpenTelemetry attributes
/// of a process span, so [`MessageTrace::start`] opens a lean span with only what a log line
/// shows: formatting the others for the log layer was a measurable share of the per-message
/// cost. Once set it stays set; a span that finds no layer still reports `exporting == false`.
static OTEL_LAYER_BUILT: AtomicBool = AtomicBool::new(false);

/// Called by whatever builds an OpenTelemetry layer, before it is installed.
pub(crate) fn note_otel_layer() {
    OTEL_LAYER_BUILT.store(true, Ordering::Relaxed);
}

/// What the consumer loop knows about a delivery, borrowed for the span's attributes.
#[derive(Debug, Clone, Copy)]
pub struct DeliveryMeta<'a> {
    pub queue: &'a str,
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub delivery_tag: u64,
    pub message_id: Option<&'a str>,
    pub correlation_id: Option<&'a str>,
    pub body_size: usize,
    pub server_address: &'a str,
    pub server_port: u16,
    pub headers: Option<&'a FieldTable>,
}

/// The tracing state of one delivery, from receipt to its decision.
///
/// Invariant: `exporting` is true exactly when an OpenTelemetry layer took the process span, so
/// the span's own context is valid; otherwise `remote` is the only context there is.
#[derive(Debug)]
pub struct MessageTrace {
    span: tracing::Span,
    remote: Context,
    exporting: bool,
    trace_id: Option<String>,
}

impl MessageTrace {
    /// Opens the CONSUMER span for a delivery, parented on the producer's context if any.
    pub fn start(meta: &DeliveryMeta<'_>) -> MessageTrace {
        // tracing-opentelemetry turns u64 into a string; a tag never nears i64::MAX.
        let tag = i64::try_from(meta.delivery_tag).ok();
        let span = if OTEL_LAYER_BUILT.load(Ordering::Relaxed) {
            let name = format!("process {}", meta.queue);
            tracing::info_span!(
                "process",
                otel.name = name.as_str(),
                otel.kind = "consumer",
                messaging.destination.name = meta.queue,
                messaging.rabbitmq.message.delivery_tag = tag,
                messaging.message.id = meta.message_id,
                trace_id = Empty,
                "rabbit_sidecar.decision" = Empty,
                "error.type" = Empty,
            )
        } else {
            // No decision or error fields either: the log lines that matter (retry, dead
            // letter, requeue) say what was decided themselves.
            tracing::info_span!(
                "process",
                messaging.destination.name = meta.queue,
                messaging.rabbitmq.message.delivery_tag = tag,
                messaging.message.id = meta.message_id,
                trace_id = Empty,
            )
        };
        let remote = extract_context(meta.headers);
        // set_parent fails exactly when no OpenTelemetry layer took the span, which is the cheap
        // way to learn whether we export at all.
        let exporting = span.set_parent(remote.clone()).is_ok();
        if exporting {
            set_messaging_attributes(&span, meta);
        }
        let mut trace = MessageTrace {
            span,
            remote,
            exporting,
            trace_id: None,
        };
        trace.trace_id =
            valid_span_context(&trace.current_context()).map(|sc| sc.trace_id().to_string());
        if let Some(id) = &trace.trace_id {
            trace.span.record("trace_id", tracing::field::display(id));
        }
        trace
    }

    /// The process span; instrument the delivery's work with a clone of it.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// Whether spans of this delivery reach an OpenTelemetry exporter.
    pub fn exporting(&self) -> bool {
        self.exporting
    }

    /// The trace this delivery belongs to (32 lowercase hex digits), if it has one: always when
    /// exporting, else only when the producer sent a valid traceparent.
    pub fn trace_id(&self) -> Option<&str> {
        self.trace_id.as_deref()
    }

    /// A CLIENT span for the HTTP call to the app, child of the process span. Userinfo in `url`
    /// is dropped from `url.full` so a credential never reaches a span or a log line.
    pub fn dispatch_span(&self, method: &str, url: &hyper::Uri) -> tracing::Span {
        // Without an exporter nobody reads this span, and creating it (the log layer formats
        // its fields) was a measurable share of the per-message cost; the app still gets the
        // producer's context from `inject_http`.
        if !self.exporting {
            return tracing::Span::none();
        }
        let host = url.host().unwrap_or("");
        let port = url.port_u16().unwrap_or(match url.scheme_str() {
            Some("https") => 443,
            _ => 80,
        });
        let full = redacted_url(url);
        tracing::info_span!(
            parent: &self.span,
            "http.client",
            otel.name = method,
            otel.kind = "client",
            http.request.method = method,
            server.address = host,
            server.port = i64::from(port),
            url.full = full.as_str(),
            http.response.status_code = Empty,
            "error.type" = Empty,
        )
    }

    /// Writes `traceparent` (and `tracestate`) for the app: the CLIENT span's context when
    /// exporting, else the producer's context as it came. Stale values are removed first, and
    /// with no context at all nothing is written.
    pub fn inject_http(&self, client_span: &tracing::Span, headers: &mut hyper::HeaderMap) {
        headers.remove(TRACEPARENT);
        headers.remove(TRACESTATE);
        let cx = if self.exporting {
            client_span.context()
        } else {
            self.remote.clone()
        };
        // A disabled client span has no context; the process span is the next best parent.
        let Some(sc) =
            valid_span_context(&cx).or_else(|| valid_span_context(&self.current_context()))
        else {
            return;
        };
        let (parent, state) = encode(&sc);
        if let Ok(value) = hyper::header::HeaderValue::from_str(&parent) {
            headers.insert(TRACEPARENT, value);
        }
        if let Some(value) = state.and_then(|s| hyper::header::HeaderValue::from_str(&s).ok()) {
            headers.insert(TRACESTATE, value);
        }
    }

    /// Writes the current context into the headers of a retried or dead-lettered copy as
    /// `traceparent`/`tracestate` long strings, replacing any older ones (whatever their case or
    /// type), so the next consumer continues this trace.
    pub fn inject_amqp(&self, headers: &mut FieldTable) {
        let mut map = headers.inner().clone();
        map.retain(|k, _| {
            !k.as_str().eq_ignore_ascii_case(TRACEPARENT)
                && !k.as_str().eq_ignore_ascii_case(TRACESTATE)
        });
        if let Some(sc) = valid_span_context(&self.current_context()) {
            let (parent, state) = encode(&sc);
            map.insert(
                ShortString::from(TRACEPARENT),
                AMQPValue::LongString(LongString::from(parent)),
            );
            if let Some(state) = state {
                map.insert(
                    ShortString::from(TRACESTATE),
                    AMQPValue::LongString(LongString::from(state)),
                );
            }
        }
        *headers = FieldTable::from(map);
    }

    /// Records the message's fate (`ack`, `retry`, `dead_letter`, ...) as an attribute, a log
    /// field and a span event, so a trace view shows when it was decided.
    pub fn record_decision(&self, decision: &str) {
        self.span.record(DECISION_KEY, decision);
        if self.exporting {
            self.span.add_event(
                "decision",
                vec![KeyValue::new(DECISION_KEY, decision.to_owned())],
            );
        }
    }

    /// Marks the delivery as failed: `error.type` (a low-cardinality class such as `timeout`)
    /// and an error status.
    pub fn record_error(&self, error_type: &str) {
        mark_error(&self.span, error_type);
    }

    fn current_context(&self) -> Context {
        if self.exporting {
            self.span.context()
        } else {
            self.remote.clone()
        }
    }
}

/// Records the app's HTTP status on a CLIENT span; 4xx and 5xx also mark it failed, with the
/// status code as `error.type`, as the HTTP client conventions ask.
pub fn record_http_status(span: &tracing::Span, status: u16) {
    span.record("http.response.status_code", i64::from(status));
    if status >= 400 {
        mark_error(span, &status.to_string());
    }
}

/// Marks a CLIENT span failed without a response (`timeout`, `connection_refused`, ...).
pub fn record_client_error(span: &tracing::Span, error_type: &str) {
    mark_error(span, error_type);
}

/// `set_status` is a no-op without an OpenTelemetry layer, so there is no need to ask first.
fn mark_error(span: &tracing::Span, error_type: &str) {
    span.record("error.type", error_type);
    span.set_status(Status::error(error_type.to_owned()));
}

fn set_messaging_attributes(span: &tracing::Span, meta: &DeliveryMeta<'_>) {
    span.set_attribute("messaging.system", "rabbitmq");
    span.set_attribute("messaging.operation.type", "process");
    span.set_attribute("messaging.operation.name", "process");
    span.set_attribute(
        "messaging.rabbitmq.destination.routing_key",
        meta.routing_key.to_owned(),
    );
    if !meta.exchange.is_empty() {
        // Not a semconv attribute, but where the message came from is the first question asked
        // about a misrouted message; the default exchange ("") says nothing and is left out.
        span.set_attribute("rabbit_sidecar.exchange", meta.exchange.to_owned());
    }
    if let Some(id) = meta.correlation_id {
        span.set_attribute("messaging.message.conversation_id", id.to_owned());
    }
    span.set_attribute(
        "messaging.message.body.size",
        i64::try_from(meta.body_size).unwrap_or(i64::MAX),
    );
    span.set_attribute("server.address", meta.server_address.to_owned());
    span.set_attribute("server.port", i64::from(meta.server_port));
}

/// The producer's context from AMQP headers, or an empty context (so the span becomes a root)
/// when there is none or it is not a valid W3C traceparent. Never panics.
pub fn extract_context(headers: Option<&FieldTable>) -> Context {
    let Some(headers) = headers else {
        return Context::new();
    };
    let Some((trace_id, span_id, flags)) =
        header_str(headers, TRACEPARENT).and_then(parse_traceparent)
    else {
        return Context::new();
    };
    let state = header_str(headers, TRACESTATE)
        .and_then(|s| TraceState::from_str(s).ok())
        .unwrap_or_default();
    let sc = SpanContext::new(trace_id, span_id, flags & TraceFlags::SAMPLED, true, state);
    Context::new().with_remote_span_context(sc)
}

/// Parses a W3C traceparent strictly: two lowercase hex digits of version (not `ff`), 32 of trace
/// id, 16 of span id, 2 of flags, and for version 00 nothing more; all-zero ids are invalid.
pub fn parse_traceparent(value: &str) -> Option<(TraceId, SpanId, TraceFlags)> {
    let value = value.trim();
    let mut parts = value.splitn(5, '-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let span_id = parts.next()?;
    let flags = parts.next()?;
    let rest = parts.next();
    if !is_lower_hex(version, 2) || version == "ff" || (version == "00" && rest.is_some()) {
        return None;
    }
    if !is_lower_hex(trace_id, 32) || !is_lower_hex(span_id, 16) || !is_lower_hex(flags, 2) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()?);
    (trace_id != TraceId::INVALID && span_id != SpanId::INVALID)
        .then_some((trace_id, span_id, flags))
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A header's text, whatever string-like AMQP type the producer chose; the exact key wins over a
/// differently cased one.
fn header_str<'a>(headers: &'a FieldTable, key: &str) -> Option<&'a str> {
    let map = headers.inner();
    let value = map.get(key).or_else(|| {
        map.iter()
            .find(|(k, _)| k.as_str().eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })?;
    match value {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        AMQPValue::ByteArray(b) => std::str::from_utf8(b.as_slice()).ok(),
        _ => None,
    }
}

fn valid_span_context(cx: &Context) -> Option<SpanContext> {
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

fn encode(sc: &SpanContext) -> (String, Option<String>) {
    let parent = format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    );
    let state = sc.trace_state().header();
    (parent, (!state.is_empty()).then_some(state))
}

fn redacted_url(url: &hyper::Uri) -> String {
    match url.authority() {
        Some(authority) if authority.as_str().contains('@') => {
            let host_port = authority.as_str().rsplit_once('@').map_or("", |(_, hp)| hp);
            let path = url.path_and_query().map_or("", |p| p.as_str());
            format!("{}://{host_port}{path}", url.scheme_str().unwrap_or("http"))
        }
        _ => url.to_string(),
    }
}
