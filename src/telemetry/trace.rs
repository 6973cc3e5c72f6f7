//! Per-delivery tracing: continue the producer's trace, name the HTTP call to the app, pass the
//! context on.
//!
//! The consumer loop drives one [`MessageTrace`] per delivery, in this order:
//!
//! ```text
//! let trace = MessageTrace::start(&delivery, server);      // CONSUMER span "process {queue}"
//! trace.in_scope(|| tracing::warn!(..));                       // the line names the delivery
//!   let mut call = trace.dispatch_span(&target);              // CLIENT span "POST", child of it
//!   trace.inject_http(&call, request.headers_mut());          // app sees traceparent/tracestate
//!   call.record_http_status(503)  or  call.record_error("timeout");
//!   drop(call);                                               // the CLIENT span ends
//!   trace.record_decision("retry", "HTTP 503: busy");         // attribute + span event
//!   trace.record_error("http_503");                           // error.type + status error
//!   trace.inject_amqp(&mut copy_headers);                     // retried / dead-lettered copy
//! drop(trace);                                                // the CONSUMER span ends
//! ```
//!
//! The process span is a CONSUMER span named `process {queue}` with the OpenTelemetry messaging
//! conventions for RabbitMQ (`messaging.system`, `messaging.operation.{type,name}`,
//! `messaging.destination.name`, `messaging.rabbitmq.destination.routing_key`,
//! `messaging.rabbitmq.message.delivery_tag`, `messaging.message.id`,
//! `messaging.message.conversation_id`, `messaging.message.body.size`, `server.address`,
//! `server.port`, and `error.type` on failure). The fate of the message is
//! `rabbit_sidecar.decision`: our own namespace, because semconv defines no such attribute and an
//! unowned `messaging.rabbitmq.*` name could collide with a future one. The decision is also a
//! span event, with the app's answer or the failure as `rabbit_sidecar.detail` when there is one.
//!
//! Its parent is the W3C `traceparent`/`tracestate` found in the AMQP headers. Producers write
//! those as long strings, short strings or byte arrays; anything else, or a value that is not a
//! strict W3C traceparent (the SDK's own parser accepts wrong lengths), starts a new root instead.
//!
//! Two kinds of span, each built where it is cheapest:
//!
//! - the OpenTelemetry spans are built directly with the SDK's tracer, which the current
//!   `tracing` dispatcher carries in a [`TracerLayer`] when an exporter is configured. Going
//!   through a `tracing`-to-OpenTelemetry bridge instead cost more per message than the rest of
//!   the sidecar's own work (every field visited, formatted and converted, every enter and exit
//!   looked up); see `docs/performance.md`.
//! - a lean `tracing` span (queue, delivery tag, message id, trace id) that the consumer logs its
//!   events about the delivery in, so that those lines name the message and its trace. It is made
//!   when the first such line is logged: a delivery that logs nothing (the healthy path at the
//!   default level) costs the log layer nothing. Log lines are not copied into the OpenTelemetry
//!   spans; what a trace needs from them (the decision, its detail, the error type) is recorded
//!   on the span itself.
//!
//! Without a tracer (no exporter configured) no OpenTelemetry span exists, and the incoming
//! context is handed to the app and to re-published copies unchanged, so the producer's trace
//! still continues through the app.

use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::headers::DeliveryInfo;
use opentelemetry::trace::{
    Span as _, SpanBuilder, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _,
    TraceFlags, TraceId, TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue, StringValue};
use opentelemetry_sdk::trace::{SdkTracer, Span as SdkSpan};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{FilterFn, Filtered, LevelFilter};

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";
/// The same names as HTTP headers, made once: a `&str` key is parsed on every map operation.
const TRACEPARENT_HEADER: hyper::header::HeaderName =
    hyper::header::HeaderName::from_static(TRACEPARENT);
const TRACESTATE_HEADER: hyper::header::HeaderName =
    hyper::header::HeaderName::from_static(TRACESTATE);
const DECISION_KEY: &str = "rabbit_sidecar.decision";
const DETAIL_KEY: &str = "rabbit_sidecar.detail";
const ERROR_TYPE_KEY: &str = "error.type";

/// Carries the OpenTelemetry tracer in a `tracing` dispatcher, so that whoever runs under that
/// dispatcher (the whole process, or one test) traces with it. It sees no span or event itself:
/// its filter rejects them all, which leaves the other layers' filtering untouched.
pub struct TracerLayer {
    tracer: Arc<SdkTracer>,
}

impl<S: tracing::Subscriber> Layer<S> for TracerLayer {}

/// The layer that makes [`MessageTrace`] export with `tracer`.
pub fn tracer_layer<S>(tracer: SdkTracer) -> Filtered<TracerLayer, FilterFn, S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    TracerLayer {
        tracer: Arc::new(tracer),
    }
    // The hint says it wants nothing: without one, the dispatcher's maximum level would be
    // TRACE, and level checks such as `level_enabled!` would pass for every level.
    .with_filter(
        FilterFn::new(reject_all as fn(&tracing::Metadata<'_>) -> bool)
            .with_max_level_hint(LevelFilter::OFF),
    )
}

fn reject_all(_: &tracing::Metadata<'_>) -> bool {
    false
}

/// The tracer of the current dispatcher, if it has one.
fn current_tracer() -> Option<Arc<SdkTracer>> {
    tracing::dispatcher::get_default(|d| d.downcast_ref::<TracerLayer>().map(|l| l.tracer.clone()))
}

/// The broker node a delivery came from, for the span's `server.*` attributes.
#[derive(Debug, Clone, Copy)]
pub struct Server<'a> {
    pub address: &'a str,
    pub port: u16,
}

/// The tracing state of one delivery, from receipt to its decision.
///
/// Invariant: `tracer` is set exactly when spans are built; `cx` then holds the process span
/// (which ends when the last clone of `cx` is dropped), and otherwise only the producer's context.
pub struct MessageTrace<'a> {
    /// The `tracing` span for log lines, made the first time a line is logged in it.
    log_span: OnceLock<tracing::Span>,
    trace_id: OnceLock<Option<String>>,
    queue: &'a str,
    delivery_tag: u64,
    message_id: Option<&'a str>,
    cx: Context,
    tracer: Option<Arc<SdkTracer>>,
}

impl std::fmt::Debug for MessageTrace<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageTrace")
            .field("exporting", &self.exporting())
            .field("trace_id", &self.trace_id())
            .finish()
    }
}

impl<'a> MessageTrace<'a> {
    /// Continues the producer's trace (or starts one) with a process span when exporting.
    pub fn start(delivery: &DeliveryInfo<'a>, target: &ProcessTarget) -> MessageTrace<'a> {
        let props = delivery.properties;
        let remote = extract_context(props.headers().as_ref());
        let tracer = current_tracer();
        let cx = match &tracer {
            Some(tracer) => {
                let span = tracer.build_with_context(process_span(delivery, target), &remote);
                remote.with_span(span)
            }
            None => remote,
        };
        MessageTrace {
            log_span: OnceLock::new(),
            trace_id: OnceLock::new(),
            queue: delivery.queue,
            delivery_tag: delivery.delivery_tag,
            message_id: props.message_id().as_ref().map(|s| s.as_str()),
            cx,
            tracer,
        }
    }

    /// The `tracing` span that names this delivery (queue, delivery tag, message id, trace id)
    /// in log lines written inside it.
    ///
    /// Made on first use, not per delivery: creating it makes the log layer format its fields,
    /// and entering it on every poll of the delivery's task is a lookup per layer, together a
    /// sizeable share of the sidecar's own cost per message (`docs/performance.md`), spent even
    /// when nothing is logged, as on a healthy path at the default level.
    pub fn span(&self) -> &tracing::Span {
        self.log_span.get_or_init(|| {
            // tracing turns u64 into a string for some subscribers; a tag never nears i64::MAX.
            let tag = i64::try_from(self.delivery_tag).ok();
            // All fields at once: recording one later makes the log layer format them again.
            tracing::info_span!(
                "process",
                messaging.destination.name = self.queue,
                messaging.rabbitmq.message.delivery_tag = tag,
                messaging.message.id = self.message_id,
                trace_id = self.trace_id().map(tracing::field::display),
            )
        })
    }

    /// Runs `f`, which logs, inside [`span`](Self::span), so its lines name the delivery.
    pub fn in_scope<R>(&self, f: impl FnOnce() -> R) -> R {
        self.span().in_scope(f)
    }

    /// Whether spans of this delivery are built for an OpenTelemetry exporter (the sampler may
    /// still drop them).
    pub fn exporting(&self) -> bool {
        self.tracer.is_some()
    }

    /// The trace this delivery belongs to (32 lowercase hex digits), if it has one: always when
    /// exporting, else only when the producer sent a valid traceparent.
    pub fn trace_id(&self) -> Option<&str> {
        self.trace_id
            .get_or_init(|| valid_span_context(&self.cx).map(|sc| trace_id_hex(sc.trace_id())))
            .as_deref()
    }

    /// A CLIENT span for an HTTP call to the app, child of the process span; it ends when
    /// dropped.
    pub fn dispatch_span(&self, target: &HttpTarget) -> ClientSpan {
        let Some(tracer) = &self.tracer else {
            return ClientSpan { span: None };
        };
        // Room for the status code and the error type recorded later.
        let attributes = with_room(&target.attributes, 2);
        let builder = SpanBuilder::from_name(target.method)
            .with_kind(SpanKind::Client)
            .with_attributes(attributes);
        ClientSpan {
            span: Some(tracer.build_with_context(builder, &self.cx)),
        }
    }

    /// Writes `traceparent` (and `tracestate`) for the app: the CLIENT span's context when
    /// exporting, else the producer's context as it came. They replace any stale values, and
    /// with no context at all the stale ones are removed and nothing is written.
    pub fn inject_http(&self, client: &ClientSpan, headers: &mut hyper::HeaderMap) {
        let client_sc = client
            .span
            .as_ref()
            .map(|s| s.span_context())
            .filter(|sc| sc.is_valid());
        let own_sc;
        let sc = match client_sc {
            Some(sc) => sc,
            None => match valid_span_context(&self.cx) {
                Some(sc) => {
                    own_sc = sc;
                    &own_sc
                }
                None => {
                    headers.remove(&TRACEPARENT_HEADER);
                    headers.remove(&TRACESTATE_HEADER);
                    return;
                }
            },
        };
        // `insert` replaces every stale value of the name.
        let parent = hyper::header::HeaderValue::from_bytes(&traceparent(sc))
            .expect("a traceparent is ASCII hex and dashes");
        headers.insert(TRACEPARENT_HEADER, parent);
        let state = sc.trace_state().header();
        // Usually empty. Otherwise the string's buffer becomes the value: checked, not copied.
        let state = (!state.is_empty())
            .then(|| hyper::header::HeaderValue::from_maybe_shared(bytes::Bytes::from(state)));
        match state {
            Some(Ok(value)) => {
                headers.insert(TRACESTATE_HEADER, value);
            }
            _ => {
                headers.remove(&TRACESTATE_HEADER);
            }
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
        if let Some(sc) = valid_span_context(&self.cx) {
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

    /// Records the message's fate (`ack`, `retry`, `dead_letter`, ...) as an attribute and as a
    /// span event, so a trace view shows when it was decided; `detail` (the app's error answer,
    /// a timeout, ...) goes with the event when not empty.
    pub fn record_decision(&self, decision: &'static str, detail: &str) {
        if self.tracer.is_none() {
            return;
        }
        let span = self.cx.span();
        span.set_attribute(KeyValue::new(DECISION_KEY, decision));
        let mut attributes = vec![KeyValue::new(DECISION_KEY, decision)];
        if !detail.is_empty() {
            attributes.push(KeyValue::new(DETAIL_KEY, detail.to_owned()));
        }
        span.add_event("decision", attributes);
    }

    /// Records something that went wrong after the decision (a copy the broker did not confirm,
    /// an ack that could not be sent) as a span event.
    pub fn record_event(&self, name: &'static str, detail: &str) {
        if self.tracer.is_some() {
            self.cx
                .span()
                .add_event(name, vec![KeyValue::new(DETAIL_KEY, detail.to_owned())]);
        }
    }

    /// Marks the delivery as failed: `error.type` (a low-cardinality class such as `timeout`)
    /// and an error status.
    pub fn record_error(&self, error_type: &str) {
        if self.tracer.is_some() {
            let span = self.cx.span();
            span.set_attribute(KeyValue::new(ERROR_TYPE_KEY, error_type.to_owned()));
            span.set_status(Status::error(error_type.to_owned()));
        }
    }
}

/// What every CLIENT span to one URL carries, worked out once rather than per message (the
/// attribute strings are shared, not copied). Userinfo in the URL is dropped from `url.full` so a
/// credential never reaches a span.
#[derive(Debug, Clone)]
pub struct HttpTarget {
    method: &'static str,
    attributes: Vec<KeyValue>,
}

impl HttpTarget {
    pub fn new(method: &'static str, url: &hyper::Uri) -> HttpTarget {
        let host = url.host().unwrap_or("");
        let port = url.port_u16().unwrap_or(match url.scheme_str() {
            Some("https") => 443,
            _ => 80,
        });
        let shared = |s: &str| opentelemetry::StringValue::from(Arc::<str>::from(s));
        HttpTarget {
            method,
            attributes: vec![
                KeyValue::new("http.request.method", method),
                KeyValue::new("server.address", shared(host)),
                KeyValue::new("server.port", i64::from(port)),
                KeyValue::new("url.full", shared(&redacted_url(url))),
            ],
        }
    }
}

/// The CLIENT span of one HTTP call to the app; nothing when not exporting. Ends when dropped.
#[derive(Debug)]
pub struct ClientSpan {
    span: Option<SdkSpan>,
}

impl ClientSpan {
    /// Records the app's HTTP status; 4xx and 5xx also mark the span failed, with the status
    /// code as `error.type`, as the HTTP client conventions ask.
    pub fn record_http_status(&mut self, status: u16) {
        if let Some(span) = &mut self.span {
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
        }
        if status >= 400 {
            self.record_error(&status.to_string());
        }
    }

    /// Marks the span failed without a response (`timeout`, `connection_refused`, ...).
    pub fn record_error(&mut self, error_type: &str) {
        if let Some(span) = &mut self.span {
            span.set_attribute(KeyValue::new(ERROR_TYPE_KEY, error_type.to_owned()));
            span.set_status(Status::error(error_type.to_owned()));
        }
    }
}

/// What every CONSUMER span of one queue's deliveries from one broker node carries, worked out
/// once per consumer session rather than per message: the attributes that do not change, with
/// their strings shared, not copied.
#[derive(Debug, Clone)]
pub struct ProcessTarget {
    queue: StringValue,
    attributes: Vec<KeyValue>,
}

impl ProcessTarget {
    pub fn new(queue: &str, server: Server<'_>) -> ProcessTarget {
        let queue = StringValue::from(Arc::<str>::from(queue));
        ProcessTarget {
            attributes: vec![
                KeyValue::new("messaging.system", "rabbitmq"),
                KeyValue::new("messaging.operation.type", "process"),
                KeyValue::new("messaging.operation.name", "process"),
                KeyValue::new("messaging.destination.name", queue.clone()),
                KeyValue::new(
                    "server.address",
                    StringValue::from(Arc::<str>::from(server.address)),
                ),
                KeyValue::new("server.port", i64::from(server.port)),
            ],
            queue,
        }
    }
}

/// A span's attributes: the target's shared ones, with room for `more` pushed later. Pushed into
/// a vector with no room, each would move the span's attributes to a larger one; the builder
/// keeps this vector (collecting a `Vec` into a `Vec` reuses it) and so does the span.
fn with_room(shared: &[KeyValue], more: usize) -> Vec<KeyValue> {
    let mut attributes = Vec::with_capacity(shared.len() + more);
    attributes.extend_from_slice(shared);
    attributes
}

/// The CONSUMER span of a delivery, with the messaging attributes.
fn process_span(meta: &DeliveryInfo<'_>, target: &ProcessTarget) -> SpanBuilder {
    // Room for the six below and, later, the decision and the error type.
    let mut attributes = with_room(&target.attributes, 8);
    // Through the default exchange (the usual way to a queue) the routing key is the queue's
    // name: shared then, not copied.
    let routing_key = if meta.routing_key == target.queue.as_str() {
        target.queue.clone()
    } else {
        StringValue::from(meta.routing_key.to_owned())
    };
    attributes.extend([
        KeyValue::new("messaging.rabbitmq.destination.routing_key", routing_key),
        KeyValue::new(
            "messaging.rabbitmq.message.delivery_tag",
            i64::try_from(meta.delivery_tag).unwrap_or(i64::MAX),
        ),
        KeyValue::new(
            "messaging.message.body.size",
            i64::try_from(meta.body_len).unwrap_or(i64::MAX),
        ),
    ]);
    if let Some(id) = meta.properties.message_id() {
        attributes.push(KeyValue::new("messaging.message.id", id.to_string()));
    }
    if let Some(id) = meta.properties.correlation_id() {
        attributes.push(KeyValue::new(
            "messaging.message.conversation_id",
            id.to_string(),
        ));
    }
    if !meta.exchange.is_empty() {
        // Not a semconv attribute, but where the message came from is the first question asked
        // about a misrouted message; the default exchange ("") says nothing and is left out.
        attributes.push(KeyValue::new(
            "rabbit_sidecar.exchange",
            meta.exchange.to_owned(),
        ));
    }
    let mut name = String::with_capacity(8 + meta.queue.len());
    name.push_str("process ");
    name.push_str(meta.queue);
    SpanBuilder::from_name(name)
        .with_kind(SpanKind::Consumer)
        .with_attributes(attributes)
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
    let parent = String::from_utf8(traceparent(sc).to_vec()).expect("ASCII");
    let state = sc.trace_state().header();
    (parent, (!state.is_empty()).then_some(state))
}

/// The `traceparent` value of `sc` (version 00). Written into a fixed array by hand: this runs
/// for every message, and `format!` with the ids' Display was several times slower.
fn traceparent(sc: &SpanContext) -> [u8; 55] {
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
    hex_into(&mut out[3..35], &sc.trace_id().to_bytes());
    hex_into(&mut out[36..52], &sc.span_id().to_bytes());
    hex_into(&mut out[53..55], &[sc.trace_flags().to_u8()]);
    out
}

/// Lowercase hex of `bytes` into `out` (twice as long), as W3C trace context and OTLP logs
/// want ids.
fn hex_into(out: &mut [u8], bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
}

fn trace_id_hex(id: TraceId) -> String {
    let mut out = [0u8; 32];
    hex_into(&mut out, &id.to_bytes());
    String::from_utf8(out.to_vec()).expect("ASCII")
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
