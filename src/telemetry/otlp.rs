//! OTLP/HTTP (`http/protobuf`) span export, encoded straight from the SDK's span data.
//!
//! The OTLP exporter crate first converts every span into its generated protobuf structs (an
//! owned `String` for every attribute key and value), groups them in a hash map, encodes them and
//! drops them again, twice per message (docs/performance.md has the cost). [`encode_request`] writes the same `ExportTraceServiceRequest` bytes directly, without a
//! copy of any span; the tests check it against the official conversion. gRPC export still goes
//! through the exporter crate.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::Range;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry::trace::{SpanKind, Status};
use opentelemetry::{Array, InstrumentationScope, Key, KeyValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};

/// Exports spans to an OTLP/HTTP endpoint (the full URL of the traces path) as protobuf.
#[derive(Debug)]
pub struct HttpExporter {
    client: Client<HttpConnector, Full<Bytes>>,
    endpoint: Uri,
    headers: HeaderMap,
    timeout: Duration,
    resource: Resource,
}

impl HttpExporter {
    pub fn new(endpoint: Uri, headers: HeaderMap, timeout: Duration) -> HttpExporter {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        HttpExporter {
            client: Client::builder(TokioExecutor::new()).build(connector),
            endpoint,
            headers,
            timeout,
            resource: Resource::builder_empty().build(),
        }
    }
}

impl SpanExporter for HttpExporter {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let body = encode_request(&self.resource, &batch);
        drop(batch);
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(self.endpoint.clone())
            .body(Full::new(Bytes::from(body)))
            .expect("a valid URI and method always build a request");
        *request.headers_mut() = self.headers.clone();
        request.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-protobuf"),
        );
        let client = self.client.clone();
        let timeout = self.timeout;
        async move {
            let call = async {
                let response = client
                    .request(request)
                    .await
                    .map_err(|e| OTelSdkError::InternalFailure(format!("sending spans: {e}")))?;
                let status = response.status();
                // Read the answer to the end so the connection can be reused.
                let _ = response.into_body().collect().await;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(OTelSdkError::InternalFailure(format!(
                        "the collector answered HTTP {status}"
                    )))
                }
            };
            match tokio::time::timeout(timeout, call).await {
                Ok(result) => result,
                Err(_) => Err(OTelSdkError::Timeout(timeout)),
            }
        }
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.resource = resource.clone();
    }
}

/// Parses `OTEL_EXPORTER_OTLP_HEADERS`: `key=value` pairs separated by commas, values
/// percent-encoded. The error names the problem but never repeats a value (it may be a token).
pub fn parse_headers(spec: &str) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    for (i, pair) in spec.split(',').enumerate() {
        if pair.trim().is_empty() {
            continue;
        }
        let n = i + 1;
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("entry {n} has no \"=\" (expected key=value)"))?;
        let name = HeaderName::from_bytes(key.trim().as_bytes())
            .map_err(|_| format!("entry {n}: {:?} is not a valid header name", key.trim()))?;
        // A `%` not followed by two hex digits stays as it is, as in URL decoding generally.
        let value: Vec<u8> = percent_encoding::percent_decode_str(value.trim()).collect();
        let value = HeaderValue::from_bytes(&value)
            .ok()
            .ok_or_else(|| format!("entry {n} ({name}): the value is not a valid header value"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

// Protobuf wire types.
const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

/// `SpanFlags` bits: the parent's remoteness is known, and it was remote.
const CONTEXT_HAS_IS_REMOTE: u32 = 0x100;
const CONTEXT_IS_REMOTE: u32 = 0x200;

/// The OTLP `ExportTraceServiceRequest` for `spans`: one resource, and one scope entry per run
/// of spans from the same instrumentation scope.
pub fn encode_request(resource: &Resource, spans: &[SpanData]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(256 + spans.len() * 512);
    let mut memo = Memo::default();
    message(&mut buf, 1, |b| {
        message(b, 1, |b| {
            for (key, value) in resource.iter() {
                message(b, 1, |b| key_value(b, key, value));
            }
        });
        let mut rest = spans;
        while let Some(first) = rest.first() {
            let scope = &first.instrumentation_scope;
            let run = rest
                .iter()
                .take_while(|s| s.instrumentation_scope == *scope)
                .count();
            let (group, tail) = rest.split_at(run);
            message(b, 2, |b| {
                message(b, 1, |b| instrumentation_scope(b, scope, &mut memo));
                for span in group {
                    message(b, 2, |b| encode_span(b, span, &mut memo));
                }
                string(b, 3, scope.schema_url().unwrap_or(""));
            });
            rest = tail;
        }
        string(b, 3, resource.schema_url().unwrap_or(""));
    });
    buf
}

fn instrumentation_scope(b: &mut Vec<u8>, scope: &InstrumentationScope, memo: &mut Memo) {
    string(b, 1, scope.name());
    string(b, 2, scope.version().unwrap_or(""));
    attributes(b, 3, scope.attributes(), memo);
}

fn encode_span(b: &mut Vec<u8>, span: &SpanData, memo: &mut Memo) {
    let sc = &span.span_context;
    bytes(b, 1, &sc.trace_id().to_bytes());
    bytes(b, 2, &sc.span_id().to_bytes());
    string(b, 3, &sc.trace_state().header());
    if span.parent_span_id != opentelemetry::trace::SpanId::INVALID {
        bytes(b, 4, &span.parent_span_id.to_bytes());
    }
    string(b, 5, &span.name);
    uint(b, 6, span_kind(&span.span_kind));
    fixed64(b, 7, nanos(span.start_time));
    fixed64(b, 8, nanos(span.end_time));
    attributes(b, 9, &span.attributes, memo);
    uint(b, 10, u64::from(span.dropped_attributes_count));
    for event in &span.events.events {
        message(b, 11, |b| {
            fixed64(b, 1, nanos(event.timestamp));
            string(b, 2, &event.name);
            attributes(b, 3, &event.attributes, memo);
            uint(b, 4, u64::from(event.dropped_attributes_count));
        });
    }
    uint(b, 12, u64::from(span.events.dropped_count));
    for link in &span.links.links {
        let lc = &link.span_context;
        message(b, 13, |b| {
            bytes(b, 1, &lc.trace_id().to_bytes());
            bytes(b, 2, &lc.span_id().to_bytes());
            string(b, 3, &lc.trace_state().header());
            attributes(b, 4, &link.attributes, memo);
            uint(b, 5, u64::from(link.dropped_attributes_count));
            fixed32(b, 6, span_flags(lc.is_remote(), lc.trace_flags().to_u8()));
        });
    }
    uint(b, 14, u64::from(span.links.dropped_count));
    message(b, 15, |b| match &span.status {
        Status::Unset => {}
        Status::Ok => uint(b, 3, 1),
        Status::Error { description } => {
            string(b, 2, description);
            uint(b, 3, 2);
        }
    });
    fixed32(
        b,
        16,
        span_flags(span.parent_span_is_remote, sc.trace_flags().to_u8()),
    );
}

fn span_flags(parent_is_remote: bool, trace_flags: u8) -> u32 {
    let mut flags = u32::from(trace_flags) | CONTEXT_HAS_IS_REMOTE;
    if parent_is_remote {
        flags |= CONTEXT_IS_REMOTE;
    }
    flags
}

fn span_kind(kind: &SpanKind) -> u64 {
    match kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// String attributes already encoded for one request (as `KeyValue` messages, without the field
/// and length around them), by where their key's and value's bytes live.
///
/// Every span of a request is alive while it is written, so two attributes whose key and value
/// are at the same addresses with the same lengths are the same text: the second is a copy of
/// the first one's encoding. The attributes every span of a subscription shares (the queue, the node,
/// the operation: one string each, shared) are then written once per request rather than once per
/// span, which was about 275 instructions each.
#[derive(Default)]
struct Memo {
    written: HashMap<AttributeAt, Range<usize>, BuildHasherDefault<AddressHasher>>,
    /// The encodings of every attribute in `written`, one after the other.
    bytes: Vec<u8>,
}

/// The key's and the value's address and length.
type AttributeAt = (usize, usize, usize, usize);

/// For a few addresses and lengths: a multiply and a rotate per word, not SipHash.
#[derive(Default)]
struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

fn attributes<'a>(
    b: &mut Vec<u8>,
    field: u32,
    attributes: impl IntoIterator<Item = &'a KeyValue>,
    memo: &mut Memo,
) {
    for kv in attributes {
        let Value::String(value) = &kv.value else {
            message(b, field, |b| key_value(b, &kv.key, &kv.value));
            continue;
        };
        let (k, v) = (kv.key.as_str(), value.as_str());
        let id = (k.as_ptr() as usize, k.len(), v.as_ptr() as usize, v.len());
        let encoded = match memo.written.get(&id) {
            Some(range) => range.clone(),
            None => {
                let at = memo.bytes.len();
                key_value(&mut memo.bytes, &kv.key, &kv.value);
                let range = at..memo.bytes.len();
                memo.written.insert(id, range.clone());
                range
            }
        };
        bytes(b, field, &memo.bytes[encoded]);
    }
}

fn key_value(b: &mut Vec<u8>, key: &Key, value: &Value) {
    string(b, 1, key.as_str());
    message(b, 2, |b| any_value(b, value));
}

/// An `AnyValue`: a oneof, so even a default value (0, false, "") is written.
fn any_value(b: &mut Vec<u8>, value: &Value) {
    match value {
        Value::String(s) => always_string(b, 1, s.as_str()),
        Value::Bool(v) => {
            tag(b, 2, VARINT);
            varint(b, u64::from(*v));
        }
        Value::I64(v) => {
            tag(b, 3, VARINT);
            // int64 is written as its two's complement.
            varint(b, *v as u64);
        }
        Value::F64(v) => {
            tag(b, 4, FIXED64);
            b.extend_from_slice(&v.to_bits().to_le_bytes());
        }
        Value::Array(array) => message(b, 5, |b| match array {
            Array::Bool(vs) => vs.iter().for_each(|v| array_item(b, &Value::Bool(*v))),
            Array::I64(vs) => vs.iter().for_each(|v| array_item(b, &Value::I64(*v))),
            Array::F64(vs) => vs.iter().for_each(|v| array_item(b, &Value::F64(*v))),
            Array::String(vs) => vs
                .iter()
                .for_each(|v| message(b, 1, |b| always_string(b, 1, v.as_str()))),
            // A future array kind: written as its text rather than lost.
            other => message(b, 1, |b| always_string(b, 1, &other.to_string())),
        }),
        // A future value kind: written as its text rather than lost.
        other => always_string(b, 1, &other.to_string()),
    }
}

fn array_item(b: &mut Vec<u8>, value: &Value) {
    message(b, 1, |b| any_value(b, value));
}

/// A length-delimited field holding a message that `f` writes. The length is written first as
/// one byte and widened afterwards in the rare case the message turns out longer than 127 bytes.
fn message(b: &mut Vec<u8>, field: u32, f: impl FnOnce(&mut Vec<u8>)) {
    tag(b, field, LEN);
    let at = b.len();
    b.push(0);
    f(b);
    let len = b.len() - at - 1;
    let width = varint_len(len as u64);
    if width > 1 {
        let end = b.len();
        b.resize(end + width - 1, 0);
        b.copy_within(at + 1..end, at + width);
    }
    let mut slot = &mut b[at..at + width];
    let mut v = len as u64;
    while v >= 0x80 {
        slot[0] = (v as u8 & 0x7f) | 0x80;
        slot = &mut slot[1..];
        v >>= 7;
    }
    slot[0] = v as u8;
}

/// A `string` field, left out when empty (the proto3 default).
fn string(b: &mut Vec<u8>, field: u32, s: &str) {
    if !s.is_empty() {
        always_string(b, field, s);
    }
}

fn always_string(b: &mut Vec<u8>, field: u32, s: &str) {
    tag(b, field, LEN);
    varint(b, s.len() as u64);
    b.extend_from_slice(s.as_bytes());
}

fn bytes(b: &mut Vec<u8>, field: u32, v: &[u8]) {
    tag(b, field, LEN);
    varint(b, v.len() as u64);
    b.extend_from_slice(v);
}

/// An unsigned or enum field, left out when zero.
fn uint(b: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        tag(b, field, VARINT);
        varint(b, v);
    }
}

fn fixed64(b: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        tag(b, field, FIXED64);
        b.extend_from_slice(&v.to_le_bytes());
    }
}

fn fixed32(b: &mut Vec<u8>, field: u32, v: u32) {
    if v != 0 {
        tag(b, field, FIXED32);
        b.extend_from_slice(&v.to_le_bytes());
    }
}

fn tag(b: &mut Vec<u8>, field: u32, wire_type: u32) {
    varint(b, u64::from(field << 3 | wire_type));
}

fn varint(b: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        b.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    b.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    // One byte per started group of 7 bits, at least one.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_len_matches_what_varint_writes() {
        for v in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut b = Vec::new();
            varint(&mut b, v);
            assert_eq!(varint_len(v), b.len(), "{v}");
        }
    }

    #[test]
    fn long_messages_get_a_wide_length() {
        let mut b = Vec::new();
        message(&mut b, 1, |b| b.extend(std::iter::repeat_n(7u8, 300)));
        // tag, then 300 as a two-byte varint, then the content.
        assert_eq!(&b[..3], &[0x0a, 0xac, 0x02]);
        assert_eq!(b.len(), 3 + 300);
        assert!(b[3..].iter().all(|&x| x == 7));
    }

    #[test]
    fn headers_are_parsed_and_decoded() {
        let h = parse_headers("api-key=abc%20def, x-team = core ,").unwrap();
        assert_eq!(h["api-key"], "abc def");
        assert_eq!(h["x-team"], "core");
        let h = parse_headers("k=v%2C%20%C3%BC,odd=50%,x=%zz").unwrap();
        assert_eq!(h["k"].as_bytes(), "v, ü".as_bytes());
        assert_eq!(h["odd"], "50%");
        assert_eq!(h["x"], "%zz");
        let err = parse_headers("api-key").unwrap_err();
        assert!(err.contains("entry 1"), "{err}");
        let err = parse_headers("ok=1,bad name=secret-token").unwrap_err();
        assert!(
            err.contains("entry 2") && !err.contains("secret-token"),
            "{err}"
        );
    }
}
