//! What the broker says about a queue: its type, delivery limit and dead-letter exchange, and how
//! often a message may still be returned to it before the broker drops it.
//!
//! Reading a queue without removing anything means taking messages unacknowledged and giving
//! them back, and on a quorum queue every return counts: RabbitMQ (3.10, and 4.0–4.2 measured)
//! raises the message's `x-delivery-count`, and once a return would take it past the queue's
//! delivery limit the message is dead-lettered, or without a dead-letter exchange dropped. Quorum
//! queues have no limit on 3.x unless an argument or policy sets one; on 4.x the default is 20.
//! A message seen with `x-delivery-count` *c* on a queue with limit *L* survives *L − c* more
//! returns (measured: limit 3, the fourth return dropped it).
//!
//! The tooling gives each message it reads back at most once, and a message whose return would
//! leave it fewer than [`SPARE_RETURNS`] is not given back at all: it is refreshed, i.e. a copy
//! with a fresh count is published to the tail of the same queue (confirmed) and the original is
//! acked. The spare return is for a browse that dies (kill -9) before it can refresh: the broker
//! then returns what it held, and that return must still be survivable.
//!
//! What the limit is comes from the management API when `--management-url` is set (queue type,
//! the lowest of the `x-delivery-limit` argument and the policies' `delivery-limit`, the broker's
//! version for the default). Without it the limit is assumed to be RabbitMQ 4's default of 20 for
//! every queue: lapin does not expose the broker's version, and assuming a limit where there is
//! none costs only that a message browsed 19 times moves to the tail of its queue.

use std::time::Duration;

use serde_json::Value;

use crate::broker::management::Management;

/// Returns a message must have left after the one a browse makes.
pub const SPARE_RETURNS: u64 = 1;

/// RabbitMQ 4's delivery limit for quorum queues that set none.
pub const DEFAULT_LIMIT_4X: u64 = 20;

/// Where the limit came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitSource {
    Management,
    Assumed,
}

impl LimitSource {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitSource::Management => "management",
            LimitSource::Assumed => "assumed",
        }
    }
}

/// What the tooling knows about the dead-letter queue's delivery limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueFacts {
    /// `None`: returns are unlimited (classic queues; quorum queues without a limit).
    pub limit: Option<u64>,
    pub source: LimitSource,
    /// `quorum`, `classic` or `stream`; known only from the management API.
    pub queue_type: Option<String>,
    pub dead_letter_exchange: Option<String>,
    pub broker_version: Option<String>,
    /// The queue's own delivery-acknowledgement timeout (`x-consumer-timeout` argument or
    /// `consumer-timeout` policy, RabbitMQ 3.12+; the lower when both are set), over the broker's
    /// global one.
    pub consumer_timeout: Option<Duration>,
}

impl QueueFacts {
    /// What is assumed without the management API.
    pub fn assumed() -> QueueFacts {
        QueueFacts {
            limit: Some(DEFAULT_LIMIT_4X),
            source: LimitSource::Assumed,
            queue_type: None,
            dead_letter_exchange: None,
            broker_version: None,
            consumer_timeout: None,
        }
    }

    /// Reads the facts from `GET /api/queues/{vhost}/{queue}` and the broker's version.
    pub fn from_management(queue: &Value, version: Option<&str>) -> Option<QueueFacts> {
        let queue_type = queue.get("type")?.as_str()?.to_string();
        let arg = |name: &str| queue.get("arguments").and_then(|a| a.get(name));
        let policy = |name: &str| {
            queue
                .get("effective_policy_definition")
                .and_then(|p| p.get(name))
        };
        let limit = match queue_type.as_str() {
            "quorum" => {
                // The lowest wins, as in RabbitMQ; a negative limit is "unlimited" (4.x).
                let set: Vec<i64> = [arg("x-delivery-limit"), policy("delivery-limit")]
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_i64)
                    .collect();
                match set.iter().min() {
                    Some(l) if *l < 0 => None,
                    Some(l) => Some(*l as u64),
                    None if major(version).is_some_and(|m| m >= 4) => Some(DEFAULT_LIMIT_4X),
                    // 3.x has no default; an unknown version is taken as the safer 4.x.
                    None if version.is_none() => Some(DEFAULT_LIMIT_4X),
                    None => None,
                }
            }
            _ => None,
        };
        let dead_letter_exchange = arg("x-dead-letter-exchange")
            .or_else(|| policy("dead-letter-exchange"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let consumer_timeout = [arg("x-consumer-timeout"), policy("consumer-timeout")]
            .into_iter()
            .flatten()
            .filter_map(Value::as_u64)
            .min()
            .map(Duration::from_millis);
        Some(QueueFacts {
            consumer_timeout,
            limit,
            source: LimitSource::Management,
            queue_type: Some(queue_type),
            dead_letter_exchange,
            broker_version: version.map(str::to_string),
        })
    }

    /// Asks the management API, falling back to [`QueueFacts::assumed`] when it cannot answer.
    /// Returns a warning to show in that case.
    pub async fn learn(
        management: Option<Management>,
        queue: &str,
    ) -> (QueueFacts, Option<String>) {
        let Some(api) = management else {
            return (QueueFacts::assumed(), None);
        };
        let overview = api.overview().await;
        let version = overview.as_ref().and_then(|o| {
            o.get("rabbitmq_version")
                .or_else(|| o.get("management_version"))
                .and_then(Value::as_str)
        });
        match api.queue(queue).await {
            Some(q) => match QueueFacts::from_management(&q, version) {
                Some(facts) => (facts, None),
                None => (
                    QueueFacts::assumed(),
                    Some("the management API's answer about the queue had no type".into()),
                ),
            },
            None => (
                QueueFacts::assumed(),
                Some(format!(
                    "the management API did not answer about {queue:?}; delivery limit assumed to be {DEFAULT_LIMIT_4X}"
                )),
            ),
        }
    }

    /// Whether a message returned `count` times already must not be given back once more: after
    /// that return it would have fewer than [`SPARE_RETURNS`] left.
    pub fn at_risk(&self, count: u64) -> bool {
        match self.limit {
            Some(limit) => count + 1 + SPARE_RETURNS > limit,
            None => false,
        }
    }
}

impl QueueFacts {
    /// What is wrong with consuming `queue` under these facts, one sentence each: a quorum queue
    /// with a delivery limit and no dead-letter exchange drops a message returned past the limit;
    /// a `--max-deliveries` above the limit is never reached on returns. Nothing when the facts
    /// are assumed rather than read.
    pub fn warnings(
        &self,
        queue: &str,
        dead_letter_queue: &str,
        max_deliveries: u32,
    ) -> Vec<String> {
        let mut out = Vec::new();
        let Some(limit) = self.limit else {
            return out;
        };
        if self.source != LimitSource::Management {
            return out;
        }
        if self.dead_letter_exchange.is_none() {
            out.push(format!(
                "queue {queue:?} is a quorum queue with a delivery limit of {limit} and no dead-letter exchange: the broker drops a message returned more often (crashes, lost connections); give it one by policy: {}",
                crate::broker::topology::dead_letter_policy_command(queue, dead_letter_queue)
            ));
        }
        if u64::from(max_deliveries) > limit {
            out.push(format!(
                "--max-deliveries {max_deliveries} is above queue {queue:?}'s delivery limit of {limit}: a message the broker returns that often is removed first (the sidecar dead-letters it on arrival at the limit, reason delivery_limit)"
            ));
        }
        out
    }
}

fn major(version: Option<&str>) -> Option<u32> {
    version?.split('.').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_limit_is_the_lowest_set_or_the_versions_default() {
        let q = json!({"type": "quorum", "arguments": {"x-delivery-limit": 9},
                       "effective_policy_definition": {"delivery-limit": 5, "dead-letter-exchange": "dlx"}});
        let f = QueueFacts::from_management(&q, Some("3.10.8")).unwrap();
        assert_eq!(f.limit, Some(5));
        assert_eq!(f.dead_letter_exchange.as_deref(), Some("dlx"));

        let bare = json!({"type": "quorum", "arguments": {}, "effective_policy_definition": null});
        let f = QueueFacts::from_management(&bare, Some("3.10.8")).unwrap();
        assert_eq!(f.limit, None, "3.x sets no default");
        let f = QueueFacts::from_management(&bare, Some("4.0.5")).unwrap();
        assert_eq!(f.limit, Some(20));
        let f = QueueFacts::from_management(&bare, None).unwrap();
        assert_eq!(f.limit, Some(20), "unknown version: the safer default");

        let unlimited = json!({"type": "quorum", "arguments": {"x-delivery-limit": -1}});
        assert_eq!(
            QueueFacts::from_management(&unlimited, Some("4.1.0"))
                .unwrap()
                .limit,
            None
        );
        let classic = json!({"type": "classic", "arguments": {"x-delivery-limit": 3}});
        assert_eq!(
            QueueFacts::from_management(&classic, Some("4.1.0"))
                .unwrap()
                .limit,
            None,
            "classic queues count no returns"
        );
        assert!(QueueFacts::from_management(&json!({}), None).is_none());

        let timed = json!({"type": "classic", "arguments": {"x-consumer-timeout": 60000},
                           "effective_policy_definition": {"consumer-timeout": 90000}});
        let f = QueueFacts::from_management(&timed, Some("4.0.5")).unwrap();
        assert_eq!(f.consumer_timeout, Some(Duration::from_secs(60)));
        assert_eq!(
            QueueFacts::from_management(&bare, None)
                .unwrap()
                .consumer_timeout,
            None
        );
    }

    #[test]
    fn a_limit_without_a_dead_letter_exchange_or_below_max_deliveries_is_reported() {
        let bare = json!({"type": "quorum", "arguments": {}});
        let f = QueueFacts::from_management(&bare, Some("4.0.5")).unwrap();
        let w = f.warnings("orders", "orders.dead-letter", 5);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("\"orders\"") && w[0].contains("limit of 20"),
            "{w:?}"
        );
        assert!(w[0].contains("set_policy"), "{w:?}");
        let w = f.warnings("orders", "orders.dead-letter", 30);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[1].contains("--max-deliveries 30"), "{w:?}");

        let dlx = json!({"type": "quorum", "arguments": {"x-delivery-limit": 10},
                         "effective_policy_definition": {"dead-letter-exchange": ""}});
        let f = QueueFacts::from_management(&dlx, Some("3.10.8")).unwrap();
        assert!(f.warnings("q", "q.dead-letter", 5).is_empty());
        assert_eq!(f.warnings("q", "q.dead-letter", 11).len(), 1);

        let old = QueueFacts::from_management(&bare, Some("3.10.8")).unwrap();
        assert!(
            old.warnings("q", "q.dead-letter", 50).is_empty(),
            "3.x: no limit"
        );
        assert!(
            QueueFacts::assumed()
                .warnings("q", "q.dead-letter", 50)
                .is_empty()
        );
    }

    #[test]
    fn a_message_is_at_risk_when_its_return_would_leave_no_spare() {
        // Limit 3: a message seen with count 3 is dropped by its next return; one seen with 2
        // survives it but has none to spare; one seen with 1 keeps one in reserve.
        let f = QueueFacts {
            limit: Some(3),
            ..QueueFacts::assumed()
        };
        assert!(!f.at_risk(0));
        assert!(!f.at_risk(1));
        assert!(f.at_risk(2));
        assert!(f.at_risk(3));
        assert!(f.at_risk(7));
        let none = QueueFacts {
            limit: None,
            ..QueueFacts::assumed()
        };
        assert!(!none.at_risk(1_000));
        assert!(!QueueFacts::assumed().at_risk(18));
        assert!(QueueFacts::assumed().at_risk(19));
    }
}
