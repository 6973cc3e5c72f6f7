//! The copies the sidecar publishes in place of a message: a retry copy (to the retry queue, with
//! a TTL equal to the backoff) and a dead letter (to the dead-letter queue, with the reasons).
//! Pure: what a copy carries is decided here, from the original's properties and the failure,
//! and publishing it is [`super::settle`]'s business.
//!
//! A copy is a new message with the original's body and properties, persistent, plus the
//! sidecar's headers (see [`crate::headers`]). It drops what belongs to the original only: the
//! broker's `x-delivery-count` (the copy's deliveries are counted afresh) and the `expiration`
//! (a dead letter must not expire because its original had a TTL; a retry copy gets the backoff
//! as its own).

use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::headers;
use crate::policy::DeadLetterReason;

/// How the last attempt failed, as far as the app said.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Failure<'a> {
    pub status: Option<u16>,
    /// A short, single-line description: the start of the app's error body, or what went wrong
    /// on the wire. Empty when there is nothing to say.
    pub detail: &'a str,
}

/// Where the original came from, recorded on a dead letter so it can be replayed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Origin<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub queue: &'a str,
}

/// The headers a retry copy adds: the attempts so far and how the last one failed.
pub(crate) fn retry_stamp(attempts: u32, failure: Failure<'_>) -> FieldTable {
    let mut extra = FieldTable::default();
    extra.insert(
        headers::ATTEMPTS.into(),
        AMQPValue::LongLongInt(i64::from(attempts)),
    );
    put_failure(&mut extra, failure);
    extra
}

/// The headers a copy that returns a message to its own queue adds: the attempts spent so far
/// (the broker's count of returns included, since the copy starts without it).
pub(crate) fn return_stamp(attempts: u32) -> FieldTable {
    let mut extra = FieldTable::default();
    extra.insert(
        headers::ATTEMPTS.into(),
        AMQPValue::LongLongInt(i64::from(attempts)),
    );
    extra
}

/// The headers a dead letter adds: why, after how many attempts, how the last one failed, and
/// where the original came from.
pub(crate) fn dead_letter_stamp(
    reason: DeadLetterReason,
    attempts: u32,
    failure: Failure<'_>,
    origin: Origin<'_>,
) -> FieldTable {
    let mut extra = FieldTable::default();
    extra.insert(
        headers::DL_REASON.into(),
        AMQPValue::LongString(reason.as_str().into()),
    );
    extra.insert(
        headers::ATTEMPTS.into(),
        AMQPValue::LongLongInt(i64::from(attempts)),
    );
    extra.insert(
        headers::ORIGINAL_EXCHANGE.into(),
        AMQPValue::LongString(origin.exchange.into()),
    );
    extra.insert(
        headers::ORIGINAL_ROUTING_KEY.into(),
        AMQPValue::LongString(origin.routing_key.into()),
    );
    extra.insert(
        headers::ORIGINAL_QUEUE.into(),
        AMQPValue::LongString(origin.queue.into()),
    );
    put_failure(&mut extra, failure);
    extra
}

fn put_failure(extra: &mut FieldTable, failure: Failure<'_>) {
    if let Some(status) = failure.status {
        extra.insert(
            headers::LAST_STATUS.into(),
            AMQPValue::LongInt(i32::from(status)),
        );
    }
    if !failure.detail.is_empty() {
        extra.insert(
            headers::LAST_ERROR.into(),
            AMQPValue::LongString(LongString::from(failure.detail)),
        );
    }
}

/// The properties of a copy of a message with `original` properties: the same, persistent,
/// without the original's expiration, with `stamp` over the original's headers (minus the
/// broker's delivery count), and `expiration` as its own TTL when given.
pub(crate) fn copy_properties(
    original: &BasicProperties,
    stamp: FieldTable,
    expiration: Option<Duration>,
) -> BasicProperties {
    let mut fields = original
        .headers()
        .as_ref()
        .map(|t| t.inner().clone())
        .unwrap_or_default();
    fields.remove(&ShortString::from(headers::DELIVERY_COUNT));
    fields.extend(stamp.inner().iter().map(|(k, v)| (k.clone(), v.clone())));
    let props = without_expiration(original)
        .with_headers(FieldTable::from(fields))
        .with_delivery_mode(2);
    match expiration {
        Some(d) => props.with_expiration(d.as_millis().max(1).to_string().into()),
        None => props,
    }
}

/// `props` without an expiration. lapin's properties can only be added to, so the others are
/// copied over one by one.
fn without_expiration(props: &BasicProperties) -> BasicProperties {
    let mut out = BasicProperties::default();
    if let Some(v) = props.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = props.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = props.delivery_mode() {
        out = out.with_delivery_mode(*v);
    }
    if let Some(v) = props.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = props.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = props.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = props.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = props.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = props.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = props.user_id() {
        out = out.with_user_id(v.clone());
    }
    if let Some(v) = props.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(v) = props.cluster_id() {
        out = out.with_cluster_id(v.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header<'a>(props: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
        props
            .headers()
            .as_ref()
            .and_then(|t| t.inner().get(&ShortString::from(name)))
    }

    fn original() -> BasicProperties {
        let mut h = FieldTable::default();
        h.insert("tenant".into(), AMQPValue::LongString("acme".into()));
        h.insert(headers::DELIVERY_COUNT.into(), AMQPValue::LongLongInt(3));
        h.insert(headers::ATTEMPTS.into(), AMQPValue::LongLongInt(1));
        h.insert(
            "traceparent".into(),
            AMQPValue::LongString("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        );
        BasicProperties::default()
            .with_message_id("m-1".into())
            .with_correlation_id("c-1".into())
            .with_content_type("application/json".into())
            .with_priority(7)
            .with_timestamp(1_700_000_000)
            .with_app_id("shop".into())
            .with_delivery_mode(1)
            .with_expiration("60000".into())
            .with_headers(h)
    }

    #[test]
    fn a_retry_copy_keeps_the_message_and_carries_the_attempts_and_its_ttl() {
        let stamp = retry_stamp(
            2,
            Failure {
                status: Some(503),
                detail: "busy",
            },
        );
        let copy = copy_properties(&original(), stamp, Some(Duration::from_millis(1500)));
        assert_eq!(copy.message_id().as_ref().unwrap().as_str(), "m-1");
        assert_eq!(copy.correlation_id().as_ref().unwrap().as_str(), "c-1");
        assert_eq!(
            copy.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(*copy.priority(), Some(7));
        assert_eq!(*copy.timestamp(), Some(1_700_000_000));
        assert_eq!(copy.app_id().as_ref().unwrap().as_str(), "shop");
        assert_eq!(*copy.delivery_mode(), Some(2), "copies are persistent");
        assert_eq!(copy.expiration().as_ref().unwrap().as_str(), "1500");
        assert_eq!(
            header(&copy, "tenant"),
            Some(&AMQPValue::LongString("acme".into()))
        );
        assert!(header(&copy, "traceparent").is_some());
        assert_eq!(header(&copy, headers::DELIVERY_COUNT), None);
        assert_eq!(
            header(&copy, headers::ATTEMPTS),
            Some(&AMQPValue::LongLongInt(2)),
            "the stamp's count replaces the original's"
        );
        assert_eq!(
            header(&copy, headers::LAST_STATUS),
            Some(&AMQPValue::LongInt(503))
        );
        assert_eq!(
            header(&copy, headers::LAST_ERROR),
            Some(&AMQPValue::LongString("busy".into()))
        );
    }

    #[test]
    fn a_dead_letter_says_why_and_where_from_and_never_expires() {
        let stamp = dead_letter_stamp(
            DeadLetterReason::Rejected,
            1,
            Failure {
                status: Some(422),
                detail: "",
            },
            Origin {
                exchange: "shop",
                routing_key: "order.created",
                queue: "orders",
            },
        );
        let copy = copy_properties(&original(), stamp, None);
        assert_eq!(copy.expiration(), &None);
        let text = |name| match header(&copy, name) {
            Some(AMQPValue::LongString(s)) => s.to_string(),
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(text(headers::DL_REASON), "rejected");
        assert_eq!(text(headers::ORIGINAL_EXCHANGE), "shop");
        assert_eq!(text(headers::ORIGINAL_ROUTING_KEY), "order.created");
        assert_eq!(text(headers::ORIGINAL_QUEUE), "orders");
        assert_eq!(
            header(&copy, headers::LAST_STATUS),
            Some(&AMQPValue::LongInt(422))
        );
        assert_eq!(
            header(&copy, headers::LAST_ERROR),
            None,
            "an empty detail is left out"
        );
        assert_eq!(header(&copy, headers::DELIVERY_COUNT), None);
    }

    #[test]
    fn a_message_without_headers_or_properties_still_copies() {
        let copy = copy_properties(
            &BasicProperties::default(),
            retry_stamp(
                1,
                Failure {
                    status: None,
                    detail: "no answer within 30s",
                },
            ),
            Some(Duration::ZERO),
        );
        assert_eq!(
            copy.expiration().as_ref().unwrap().as_str(),
            "1",
            "the TTL is at least 1 ms"
        );
        assert_eq!(header(&copy, headers::LAST_STATUS), None);
        assert_eq!(*copy.delivery_mode(), Some(2));
        assert_eq!(copy.message_id(), &None);
    }
}
