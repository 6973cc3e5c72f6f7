//! Per-message tracing (placeholder until the OpenTelemetry propagation lands).

use hyper::{HeaderMap, Uri};
use lapin::types::FieldTable;

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

#[derive(Debug)]
pub struct MessageTrace {
    span: tracing::Span,
}

impl MessageTrace {
    pub fn start(meta: &DeliveryMeta<'_>) -> MessageTrace {
        MessageTrace {
            span: tracing::info_span!(
                "process",
                queue = meta.queue,
                delivery_tag = meta.delivery_tag
            ),
        }
    }
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }
    pub fn dispatch_span(&self, method: &str, url: &Uri) -> tracing::Span {
        tracing::info_span!(parent: &self.span, "POST", method, url = %url)
    }
    pub fn inject_http(&self, _client_span: &tracing::Span, _headers: &mut HeaderMap) {}
    pub fn inject_amqp(&self, _headers: &mut FieldTable) {}
    pub fn record_decision(&self, _decision: &str) {}
    pub fn record_error(&self, _error_type: &str) {}
}

pub fn record_http_status(_span: &tracing::Span, _status: u16) {}
