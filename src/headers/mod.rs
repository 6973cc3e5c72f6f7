//! The one mapping between AMQP message properties and HTTP request headers, and the headers the
//! sidecar itself writes on messages it republishes (retries and dead letters).
//!
//! | AMQP                          | HTTP header                       |
//! |-------------------------------|-----------------------------------|
//! | content-type                  | `Content-Type` (default `application/octet-stream`) |
//! | content-encoding              | `Content-Encoding`                |
//! | message-id                    | `X-Amqp-Message-Id`               |
//! | correlation-id                | `X-Amqp-Correlation-Id`           |
//! | reply-to                      | `X-Amqp-Reply-To`                 |
//! | type                          | `X-Amqp-Type`                     |
//! | app-id                        | `X-Amqp-App-Id`                   |
//! | user-id                       | `X-Amqp-User-Id`                  |
//! | timestamp                     | `X-Amqp-Timestamp` (unix seconds) |
//! | priority                      | `X-Amqp-Priority`                 |
//! | exchange, routing key         | `X-Amqp-Exchange`, `X-Amqp-Routing-Key` |
//! | consumed queue                | `X-Amqp-Queue`                    |
//! | redelivered flag              | `X-Amqp-Redelivered` (`true`/`false`) |
//! | attempt number (1-based)      | `X-Amqp-Attempt`                  |
//! | body length                   | `Content-Length`                  |
//! | header `name` (string, number, boolean, timestamp) | `X-Amqp-Header-name` |
//!
//! A user header whose name is not a valid HTTP token or whose value cannot be an HTTP header value
//! (tables, arrays, byte arrays, control characters, over 8 KiB) is left out rather than mangled;
//! the body and the message are untouched either way. `traceparent`/`tracestate` are not copied:
//! the trace module writes the app's own context.

use hyper::header::{CONTENT_LENGTH, HeaderMap, HeaderName, HeaderValue};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};

/// Header names the sidecar writes on republished copies.
pub const ATTEMPTS: &str = "x-sidecar-attempts";
pub const LAST_STATUS: &str = "x-sidecar-last-status";
pub const LAST_ERROR: &str = "x-sidecar-last-error";
pub const DL_REASON: &str = "x-sidecar-dead-letter-reason";
pub const ORIGINAL_EXCHANGE: &str = "x-sidecar-original-exchange";
pub const ORIGINAL_ROUTING_KEY: &str = "x-sidecar-original-routing-key";
pub const ORIGINAL_QUEUE: &str = "x-sidecar-original-queue";
/// Set by quorum queues on redelivery.
pub const DELIVERY_COUNT: &str = "x-delivery-count";

const MAX_VALUE_LEN: usize = 8 * 1024;

/// What the consumer knows about a delivery, borrowed: what the app sees of it (its headers) and
/// what its trace records (the process span's attributes).
#[derive(Debug, Clone, Copy)]
pub struct DeliveryInfo<'a> {
    pub queue: &'a str,
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub delivery_tag: u64,
    pub redelivered: bool,
    pub attempt: u32,
    pub properties: &'a BasicProperties,
    /// The length of the body the request carries.
    pub body_len: usize,
}

/// The names of the headers [`to_http`] writes, built at compile time.
mod name {
    use hyper::header::HeaderName;
    pub const MESSAGE_ID: HeaderName = HeaderName::from_static("x-amqp-message-id");
    pub const CORRELATION_ID: HeaderName = HeaderName::from_static("x-amqp-correlation-id");
    pub const REPLY_TO: HeaderName = HeaderName::from_static("x-amqp-reply-to");
    pub const TYPE: HeaderName = HeaderName::from_static("x-amqp-type");
    pub const APP_ID: HeaderName = HeaderName::from_static("x-amqp-app-id");
    pub const USER_ID: HeaderName = HeaderName::from_static("x-amqp-user-id");
    pub const TIMESTAMP: HeaderName = HeaderName::from_static("x-amqp-timestamp");
    pub const PRIORITY: HeaderName = HeaderName::from_static("x-amqp-priority");
    pub const EXCHANGE: HeaderName = HeaderName::from_static("x-amqp-exchange");
    pub const ROUTING_KEY: HeaderName = HeaderName::from_static("x-amqp-routing-key");
    pub const QUEUE: HeaderName = HeaderName::from_static("x-amqp-queue");
    pub const REDELIVERED: HeaderName = HeaderName::from_static("x-amqp-redelivered");
    pub const ATTEMPT: HeaderName = HeaderName::from_static("x-amqp-attempt");
}

/// The prefix of a user header's HTTP name.
const USER_HEADER_PREFIX: &str = "x-amqp-header-";

#[cfg(test)]
/// Builds the HTTP headers for a delivery. Never fails: what cannot be mapped is left out.
///
/// A consumer builds its [`QueueHeaders`] once and calls [`QueueHeaders::for_delivery`] instead;
/// this is the same mapping for a single message.
pub fn to_http(info: &DeliveryInfo<'_>) -> HeaderMap {
    QueueHeaders::new(info.queue).for_delivery(info)
}

/// The headers every delivery from one queue carries, made once per consumer: each message's
/// header map starts as a copy of this one, with the values filled in where they stand.
///
/// Why: inserting the six headers every message has (content type, exchange, routing key, queue,
/// redelivered, attempt) hashes each of them per message; a copy of a finished map hashes
/// nothing, and the queue's value is checked once (docs/performance.md has the cost). `Content-Length` has its place in the template too: a copy is exactly
/// as long as its entries, so the HTTP client inserting it would grow every copy.
#[derive(Debug, Clone)]
pub struct QueueHeaders {
    base: HeaderMap,
    #[cfg(debug_assertions)]
    queue: String,
}

impl QueueHeaders {
    pub fn new(queue: &str) -> QueueHeaders {
        // Sized for the optional properties and the trace headers too, so that filling a copy in
        // rarely grows it.
        let mut base = HeaderMap::with_capacity(16);
        base.insert(
            hyper::header::CONTENT_TYPE,
            HeaderValue::from_static(DEFAULT_CONTENT_TYPE),
        );
        base.insert(name::EXCHANGE, HeaderValue::from_static(""));
        base.insert(name::ROUTING_KEY, HeaderValue::from_static(""));
        // A queue name that is no valid header value is left out, as any other value would be.
        if let Some(v) = header_value(queue) {
            base.insert(name::QUEUE, v);
        }
        base.insert(name::REDELIVERED, HeaderValue::from_static("false"));
        base.insert(name::ATTEMPT, HeaderValue::from_static("1"));
        // Written by the HTTP client otherwise, which would grow every copy by one entry (a copy
        // has no spare room: the clone of a map is as long as its entries).
        base.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
        QueueHeaders {
            base,
            #[cfg(debug_assertions)]
            queue: queue.to_string(),
        }
    }

    /// Adds a header every request from this consumer carries whatever the message, such as
    /// `Host`: set here once, it is copied with the rest instead of being inserted (and the map
    /// grown) for each message.
    pub fn with_fixed(mut self, name: HeaderName, value: HeaderValue) -> QueueHeaders {
        self.base.insert(name, value);
        self
    }

    /// The HTTP headers for one delivery from this queue. Never fails: what cannot be mapped is
    /// left out.
    pub fn for_delivery(&self, info: &DeliveryInfo<'_>) -> HeaderMap {
        #[cfg(debug_assertions)]
        debug_assert_eq!(info.queue, self.queue, "a delivery from another queue");
        let p = info.properties;
        let mut h = self.base.clone();
        let mut exchange = header_value(info.exchange);
        let mut routing_key = header_value(info.routing_key);
        // Rare: an exchange or routing key that is no valid header value is left out.
        let (drop_exchange, drop_routing_key) = (exchange.is_none(), routing_key.is_none());
        let mut content_type = p
            .content_type()
            .as_ref()
            .and_then(|ct| header_value(ct.as_str()));
        // The seven headers every message has, filled in where they stand in the copy: no hashing.
        for (name, value) in h.iter_mut() {
            let filled = if name == hyper::header::CONTENT_TYPE {
                content_type.take()
            } else if name == name::EXCHANGE {
                exchange.take()
            } else if name == name::ROUTING_KEY {
                routing_key.take()
            } else if name == name::REDELIVERED && info.redelivered {
                Some(HeaderValue::from_static("true"))
            } else if name == name::ATTEMPT && info.attempt != 1 {
                Some(HeaderValue::from(info.attempt))
            } else if name == CONTENT_LENGTH && info.body_len != 0 {
                Some(HeaderValue::from(info.body_len))
            } else {
                None
            };
            if let Some(v) = filled {
                *value = v;
            }
        }
        if drop_exchange {
            h.remove(name::EXCHANGE);
        }
        if drop_routing_key {
            h.remove(name::ROUTING_KEY);
        }
        let mut put = |name: HeaderName, value: Option<&str>| {
            if let Some(v) = value.and_then(header_value) {
                h.insert(name, v);
            }
        };
        put(
            hyper::header::CONTENT_ENCODING,
            p.content_encoding().as_ref().map(|s| s.as_str()),
        );
        put(
            name::MESSAGE_ID,
            p.message_id().as_ref().map(|s| s.as_str()),
        );
        put(
            name::CORRELATION_ID,
            p.correlation_id().as_ref().map(|s| s.as_str()),
        );
        put(name::REPLY_TO, p.reply_to().as_ref().map(|s| s.as_str()));
        put(name::TYPE, p.kind().as_ref().map(|s| s.as_str()));
        put(name::APP_ID, p.app_id().as_ref().map(|s| s.as_str()));
        put(name::USER_ID, p.user_id().as_ref().map(|s| s.as_str()));
        // Numbers need no validation.
        if let Some(t) = p.timestamp() {
            h.insert(name::TIMESTAMP, HeaderValue::from(*t));
        }
        if let Some(v) = p.priority() {
            h.insert(name::PRIORITY, HeaderValue::from(u16::from(*v)));
        }
        if let Some(table) = p.headers() {
            let mut full = String::new();
            for (key, value) in table.inner() {
                let key = key.as_str();
                if key.is_empty()
                    || key.eq_ignore_ascii_case("traceparent")
                    || key.eq_ignore_ascii_case("tracestate")
                {
                    continue;
                }
                full.clear();
                full.push_str(USER_HEADER_PREFIX);
                full.push_str(key);
                let Ok(header) = HeaderName::from_bytes(full.as_bytes()) else {
                    continue;
                };
                if let Some(v) = scalar_text(value).as_deref().and_then(header_value) {
                    h.append(header, v);
                }
            }
        }
        h
    }
}

const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

fn header_value(s: &str) -> Option<HeaderValue> {
    if s.len() > MAX_VALUE_LEN {
        return None;
    }
    // HeaderValue::from_str refuses control characters; obs-text (non-ASCII) is refused too, to
    // keep what the app sees unambiguous UTF-8-free ASCII.
    if !s.is_ascii() {
        return None;
    }
    HeaderValue::from_str(s).ok()
}

/// The text of a scalar AMQP value; `None` for tables, arrays, bytes and void.
pub fn scalar_text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(v) => v.to_string(),
        AMQPValue::ShortShortUInt(v) => v.to_string(),
        AMQPValue::ShortInt(v) => v.to_string(),
        AMQPValue::ShortUInt(v) => v.to_string(),
        AMQPValue::LongInt(v) => v.to_string(),
        AMQPValue::LongUInt(v) => v.to_string(),
        AMQPValue::LongLongInt(v) => v.to_string(),
        AMQPValue::Float(v) => v.to_string(),
        AMQPValue::Double(v) => v.to_string(),
        AMQPValue::Timestamp(v) => v.to_string(),
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.to_string(),
        _ => return None,
    })
}

/// An integer header value of any AMQP integer type.
pub fn int_header(headers: Option<&FieldTable>, name: &str) -> Option<u64> {
    let value = headers?.inner().get(name)?;
    match value {
        AMQPValue::ShortShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some(u64::from(*v)),
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::Timestamp(v) => Some(*v),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.trim().parse().ok(),
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok(),
        _ => None,
    }
}

/// Attempts already spent on this message before this delivery: the failed attempts the sidecar
/// recorded on a retried copy, plus the broker's redeliveries of this copy (quorum queues count them
/// in `x-delivery-count`; a redelivery means a consumer died or lost its channel while holding it).
pub fn prior_attempts(headers: Option<&FieldTable>) -> u32 {
    let recorded = int_header(headers, ATTEMPTS).unwrap_or(0);
    let redelivered = int_header(headers, DELIVERY_COUNT).unwrap_or(0);
    recorded.saturating_add(redelivered).min(u32::MAX as u64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{ByteArray, FieldArray, LongString, ShortString};

    fn info(props: &BasicProperties) -> DeliveryInfo<'_> {
        DeliveryInfo {
            queue: "orders",
            exchange: "shop",
            routing_key: "order.created",
            delivery_tag: 1,
            redelivered: true,
            attempt: 2,
            properties: props,
            body_len: 3,
        }
    }

    #[test]
    fn through_the_default_exchange_key_and_queue_are_both_named() {
        let props = BasicProperties::default();
        let h = to_http(&DeliveryInfo {
            queue: "orders",
            exchange: "",
            routing_key: "orders",
            delivery_tag: 1,
            redelivered: false,
            attempt: 1,
            properties: &props,
            body_len: 3,
        });
        assert_eq!(h["x-amqp-routing-key"], "orders");
        assert_eq!(h["x-amqp-queue"], "orders");
        assert_eq!(h["x-amqp-exchange"], "");
        // A name that is no valid header value is left out of both.
        let h = to_http(&DeliveryInfo {
            queue: "bad\nname",
            exchange: "",
            routing_key: "bad\nname",
            delivery_tag: 1,
            redelivered: false,
            attempt: 1,
            properties: &props,
            body_len: 3,
        });
        assert!(!h.contains_key("x-amqp-routing-key"));
        assert!(!h.contains_key("x-amqp-queue"));
    }

    #[test]
    fn a_queue_template_carries_nothing_from_one_message_to_the_next() {
        let template = QueueHeaders::new("orders");
        let first = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id("m-1".into());
        let h = template.for_delivery(&DeliveryInfo {
            queue: "orders",
            exchange: "bad\nexchange",
            routing_key: "order.created",
            delivery_tag: 1,
            redelivered: true,
            attempt: 3,
            properties: &first,
            body_len: 16_384,
        });
        assert_eq!(h["content-length"], "16384");
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["x-amqp-message-id"], "m-1");
        assert!(!h.contains_key("x-amqp-exchange"));
        assert_eq!(h["x-amqp-redelivered"], "true");
        assert_eq!(h["x-amqp-attempt"], "3");

        let plain = BasicProperties::default();
        let info = DeliveryInfo {
            queue: "orders",
            exchange: "shop",
            routing_key: "order.paid",
            delivery_tag: 1,
            redelivered: false,
            attempt: 1,
            properties: &plain,
            body_len: 0,
        };
        let h = template.for_delivery(&info);
        assert_eq!(h["content-length"], "0");
        assert_eq!(h["content-type"], "application/octet-stream");
        assert!(!h.contains_key("x-amqp-message-id"));
        assert_eq!(h["x-amqp-exchange"], "shop");
        assert_eq!(h["x-amqp-routing-key"], "order.paid");
        assert_eq!(h["x-amqp-queue"], "orders");
        assert_eq!(h["x-amqp-redelivered"], "false");
        assert_eq!(h["x-amqp-attempt"], "1");
        // One value per header, as a map built afresh has.
        assert_eq!(h, to_http(&info));
        assert_eq!(h.len(), h.keys_len());
    }

    #[test]
    fn properties_and_string_headers_become_http_headers() {
        let mut table = FieldTable::default();
        table.insert("tenant".into(), AMQPValue::LongString("acme".into()));
        table.insert("retries".into(), AMQPValue::LongInt(3));
        table.insert("flag".into(), AMQPValue::Boolean(true));
        table.insert("traceparent".into(), AMQPValue::LongString("00-x".into()));
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id("m-1".into())
            .with_correlation_id("c-1".into())
            .with_timestamp(1_700_000_000)
            .with_headers(table);
        let h = to_http(&info(&props));
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["x-amqp-message-id"], "m-1");
        assert_eq!(h["x-amqp-correlation-id"], "c-1");
        assert_eq!(h["x-amqp-timestamp"], "1700000000");
        assert_eq!(h["x-amqp-exchange"], "shop");
        assert_eq!(h["x-amqp-routing-key"], "order.created");
        assert_eq!(h["x-amqp-queue"], "orders");
        assert_eq!(h["x-amqp-redelivered"], "true");
        assert_eq!(h["x-amqp-attempt"], "2");
        assert_eq!(h["x-amqp-header-tenant"], "acme");
        assert_eq!(h["x-amqp-header-retries"], "3");
        assert_eq!(h["x-amqp-header-flag"], "true");
        assert!(h.get("x-amqp-header-traceparent").is_none());
    }

    #[test]
    fn unmappable_headers_are_left_out_not_fatal() {
        let mut nested = FieldTable::default();
        nested.insert("a".into(), AMQPValue::LongInt(1));
        let mut table = FieldTable::default();
        table.insert("nested".into(), AMQPValue::FieldTable(nested));
        table.insert(
            "list".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Boolean(true)])),
        );
        table.insert(
            "bytes".into(),
            AMQPValue::ByteArray(ByteArray::from(vec![0u8, 255])),
        );
        table.insert("bad name".into(), AMQPValue::LongString("x".into()));
        table.insert(
            "ctl".into(),
            AMQPValue::LongString("a\r\nInjected: 1".into()),
        );
        table.insert(
            "latin1".into(),
            AMQPValue::LongString(LongString::from(vec![0xe9u8, 0xff])),
        );
        table.insert(
            "huge".into(),
            AMQPValue::LongString("x".repeat(100_000).into()),
        );
        table.insert(
            ShortString::from("ok"),
            AMQPValue::ShortString("fine".into()),
        );
        let props = BasicProperties::default()
            .with_content_type("not a\nvalid type".into())
            .with_headers(table);
        let h = to_http(&info(&props));
        assert_eq!(h["content-type"], "application/octet-stream");
        assert_eq!(h["x-amqp-header-ok"], "fine");
        for gone in ["nested", "list", "bytes", "ctl", "latin1", "huge"] {
            assert!(h.get(format!("x-amqp-header-{gone}")).is_none(), "{gone}");
        }
        assert!(h.get("injected").is_none());
    }

    #[test]
    fn attempts_count_sidecar_retries_and_broker_redeliveries() {
        assert_eq!(prior_attempts(None), 0);
        let mut t = FieldTable::default();
        t.insert(ATTEMPTS.into(), AMQPValue::LongInt(2));
        assert_eq!(prior_attempts(Some(&t)), 2);
        t.insert(DELIVERY_COUNT.into(), AMQPValue::LongLongInt(3));
        assert_eq!(prior_attempts(Some(&t)), 5);
        t.insert(ATTEMPTS.into(), AMQPValue::LongString("garbage".into()));
        assert_eq!(prior_attempts(Some(&t)), 3);
        t.insert(DELIVERY_COUNT.into(), AMQPValue::LongInt(-7));
        assert_eq!(prior_attempts(Some(&t)), 0);
    }
}

#[cfg(test)]
mod props;
