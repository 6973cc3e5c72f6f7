//! What a dead letter says about itself, read from its headers, and the copies made of it.
//!
//! Two kinds of dead letters meet in a dead-letter queue. The sidecar's own carry
//! `x-sidecar-dead-letter-reason` (`rejected`, `max_deliveries`) and the queue they came from in
//! `x-sidecar-original-queue`. The broker's (a queue whose `x-dead-letter-exchange` leads here)
//! carry `x-death`, whose first entry is the latest death: its `reason` (`rejected`, `expired`,
//! `maxlen`, `delivery_limit`), `queue` and `time`. The sidecar's headers win when both are there:
//! a message that waited in the retry queue has an `x-death` entry (`expired`, from the retry
//! queue) that says nothing about why it was dead-lettered.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};

use crate::headers::{self, int_header, scalar_text};
use crate::pipeline::copies::copy_properties;
use crate::policy::DeadLetterReason;

/// Who dead-lettered a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    Sidecar,
    Broker,
    /// Neither header: published here by hand, or by another tool.
    Unknown,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Sidecar => "sidecar",
            Source::Broker => "broker",
            Source::Unknown => "unknown",
        }
    }
}

/// The reasons RabbitMQ writes into `x-death`.
pub const BROKER_REASONS: [&str; 4] = ["rejected", "expired", "maxlen", "delivery_limit"];

/// Whether `reason` is one a dead letter can carry: the sidecar's or the broker's.
pub fn is_known_reason(reason: &str) -> bool {
    DeadLetterReason::ALL.iter().any(|r| r.as_str() == reason) || BROKER_REASONS.contains(&reason)
}

/// The broker's headers about earlier deaths. A replayed message starts without them; the broker
/// writes them afresh if it dead-letters the message again.
const DEATH_HEADERS: [&str; 7] = [
    "x-death",
    "x-first-death-reason",
    "x-first-death-queue",
    "x-first-death-exchange",
    "x-last-death-reason",
    "x-last-death-queue",
    "x-last-death-exchange",
];

/// One dead letter as the tooling sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub source: Source,
    /// `unknown` when the source is unknown.
    pub reason: String,
    /// The queue the message was consumed from when it died; where a replay takes it.
    pub origin: Option<String>,
    pub message_id: Option<String>,
    pub attempts: Option<u64>,
    pub last_status: Option<u64>,
    pub last_error: Option<String>,
    /// Unix seconds: the message's timestamp property, else the time of its latest `x-death`.
    pub time: Option<u64>,
    /// Times the broker has returned this copy to a quorum queue (`x-delivery-count`).
    pub delivery_count: u64,
}

impl DeadLetter {
    pub fn read(props: &BasicProperties) -> DeadLetter {
        let table = props.headers().as_ref();
        let text = |name: &str| {
            table
                .and_then(|t| t.inner().get(name))
                .and_then(scalar_text)
        };
        let death = latest_death(table);
        let death_text = |name: &str| {
            death
                .and_then(|d| d.inner().get(name))
                .and_then(scalar_text)
        };
        let (source, reason, origin) = match text(headers::DL_REASON) {
            Some(reason) => (Source::Sidecar, reason, text(headers::ORIGINAL_QUEUE)),
            None => match death_text("reason") {
                Some(reason) => (
                    Source::Broker,
                    reason,
                    text("x-last-death-queue").or_else(|| death_text("queue")),
                ),
                None => (Source::Unknown, "unknown".to_string(), None),
            },
        };
        let death_time = death.and_then(|d| match d.inner().get("time") {
            Some(AMQPValue::Timestamp(t)) => Some(*t),
            _ => None,
        });
        DeadLetter {
            source,
            reason,
            origin: origin.filter(|o| !o.is_empty()),
            message_id: props.message_id().as_ref().map(|s| s.to_string()),
            attempts: int_header(table, headers::ATTEMPTS),
            last_status: int_header(table, headers::LAST_STATUS),
            last_error: text(headers::LAST_ERROR),
            time: props.timestamp().or(death_time),
            delivery_count: int_header(table, headers::DELIVERY_COUNT).unwrap_or(0),
        }
    }
}

/// The first `x-death` entry: RabbitMQ keeps the latest death first.
fn latest_death(table: Option<&FieldTable>) -> Option<&FieldTable> {
    match table?.inner().get("x-death")? {
        AMQPValue::FieldArray(deaths) => match deaths.as_slice().first()? {
            AMQPValue::FieldTable(t) => Some(t),
            _ => None,
        },
        _ => None,
    }
}

/// The properties of a replayed copy: everything the message had (message id, correlation id,
/// timestamp, priority, the producer's headers, the trace context), persistent, without its
/// history of attempts and deaths (so the consumer counts its attempts from one again) and without
/// an expiration (a copy must not expire out of the queue it is meant for).
pub fn replay_properties(props: &BasicProperties) -> BasicProperties {
    let reset: [&str; 5] = [
        headers::ATTEMPTS,
        headers::LAST_STATUS,
        headers::LAST_ERROR,
        headers::DL_REASON,
        headers::DELIVERY_COUNT,
    ];
    without(props, reset.iter().chain(DEATH_HEADERS.iter()))
}

/// The properties of a refreshed copy (put back at the tail of the dead-letter queue with a fresh
/// delivery count): the dead letter exactly as it was, less the broker's count of returns.
pub fn refresh_properties(props: &BasicProperties) -> BasicProperties {
    without(props, [headers::DELIVERY_COUNT].iter())
}

/// A copy of a message with `props`, less the headers `names`, built as the consumer builds its
/// copies (persistent, no expiration, no `x-delivery-count`).
fn without<'a>(
    props: &BasicProperties,
    names: impl Iterator<Item = &'a &'a str>,
) -> BasicProperties {
    let mut fields = props
        .headers()
        .as_ref()
        .map(|t| t.inner().clone())
        .unwrap_or_default();
    for name in names {
        fields.remove(&ShortString::from(*name));
    }
    let original = props.clone().with_headers(FieldTable::from(fields));
    copy_properties(&original, FieldTable::default(), None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString};

    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(v))
    }

    fn death(reason: &str, queue: &str, time: u64) -> AMQPValue {
        let mut d = FieldTable::default();
        d.insert("reason".into(), s(reason));
        d.insert("queue".into(), s(queue));
        d.insert("time".into(), AMQPValue::Timestamp(time));
        d.insert("count".into(), AMQPValue::LongLongInt(1));
        AMQPValue::FieldTable(d)
    }

    fn with(pairs: Vec<(&str, AMQPValue)>) -> BasicProperties {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert(k.into(), v);
        }
        BasicProperties::default()
            .with_headers(t)
            .with_message_id("m-1".into())
    }

    #[test]
    fn the_sidecars_headers_win_over_an_x_death_from_the_retry_queue() {
        let p = with(vec![
            (headers::DL_REASON, s("max_deliveries")),
            (headers::ORIGINAL_QUEUE, s("orders")),
            (headers::ATTEMPTS, AMQPValue::LongLongInt(5)),
            (headers::LAST_STATUS, AMQPValue::LongInt(503)),
            (headers::LAST_ERROR, s("HTTP 503: down")),
            (
                "x-death",
                AMQPValue::FieldArray(FieldArray::from(vec![death(
                    "expired",
                    "orders.retry",
                    1_700_000_000,
                )])),
            ),
            (headers::DELIVERY_COUNT, AMQPValue::LongInt(2)),
        ]);
        let l = DeadLetter::read(&p);
        assert_eq!(l.source, Source::Sidecar);
        assert_eq!(l.reason, "max_deliveries");
        assert_eq!(l.origin.as_deref(), Some("orders"));
        assert_eq!(
            (l.attempts, l.last_status, l.delivery_count),
            (Some(5), Some(503), 2)
        );
        assert_eq!(l.last_error.as_deref(), Some("HTTP 503: down"));
        assert_eq!(
            l.time,
            Some(1_700_000_000),
            "x-death time without a timestamp"
        );
        assert_eq!(l.message_id.as_deref(), Some("m-1"));
    }

    #[test]
    fn a_broker_dead_letter_is_read_from_its_latest_death() {
        let p = with(vec![(
            "x-death",
            AMQPValue::FieldArray(FieldArray::from(vec![
                death("delivery_limit", "orders", 1_700_000_100),
                death("expired", "orders.retry", 1_700_000_000),
            ])),
        )])
        .with_timestamp(1_600_000_000);
        let l = DeadLetter::read(&p);
        assert_eq!(l.source, Source::Broker);
        assert_eq!(l.reason, "delivery_limit");
        assert_eq!(l.origin.as_deref(), Some("orders"));
        assert_eq!(l.time, Some(1_600_000_000), "the timestamp property first");
        let l = DeadLetter::read(&BasicProperties::default());
        assert_eq!(
            (l.source, l.reason.as_str(), l.origin),
            (Source::Unknown, "unknown", None)
        );
    }

    #[test]
    fn a_replayed_copy_loses_its_history_and_keeps_the_rest() {
        let p = with(vec![
            (headers::DL_REASON, s("rejected")),
            (headers::ORIGINAL_QUEUE, s("orders")),
            (headers::ATTEMPTS, AMQPValue::LongLongInt(1)),
            (headers::LAST_STATUS, AMQPValue::LongInt(400)),
            (headers::LAST_ERROR, s("bad")),
            (headers::DELIVERY_COUNT, AMQPValue::LongInt(3)),
            (
                "x-death",
                AMQPValue::FieldArray(FieldArray::from(vec![death("expired", "q.retry", 1)])),
            ),
            ("x-first-death-reason", s("expired")),
            (
                "traceparent",
                s("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            ),
            ("tenant", s("acme")),
        ])
        .with_correlation_id("c-1".into())
        .with_timestamp(42)
        .with_priority(3)
        .with_expiration("1000".into());
        let r = replay_properties(&p);
        let h = r.headers().as_ref().unwrap().inner();
        for gone in [
            headers::DL_REASON,
            headers::ATTEMPTS,
            headers::LAST_STATUS,
            headers::LAST_ERROR,
            headers::DELIVERY_COUNT,
            "x-death",
            "x-first-death-reason",
        ] {
            assert!(!h.contains_key(gone), "{gone} removed");
        }
        for kept in ["traceparent", "tenant", headers::ORIGINAL_QUEUE] {
            assert!(h.contains_key(kept), "{kept} kept");
        }
        assert_eq!(r.message_id().as_ref().unwrap().as_str(), "m-1");
        assert_eq!(r.correlation_id().as_ref().unwrap().as_str(), "c-1");
        assert_eq!((*r.timestamp(), *r.priority()), (Some(42), Some(3)));
        assert_eq!(*r.delivery_mode(), Some(2));
        assert!(r.expiration().is_none());

        let f = refresh_properties(&p);
        let h = f.headers().as_ref().unwrap().inner();
        assert!(!h.contains_key(headers::DELIVERY_COUNT));
        assert!(h.contains_key(headers::DL_REASON) && h.contains_key("x-death"));
    }

    #[test]
    fn known_reasons() {
        for r in [
            "rejected",
            "max_deliveries",
            "delivery_limit",
            "expired",
            "maxlen",
        ] {
            assert!(is_known_reason(r), "{r}");
        }
        assert!(!is_known_reason("reject"));
        assert!(!is_known_reason("unknown"));
    }
}
