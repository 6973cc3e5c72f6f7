//! `dead-letters list`: what is in a queue's dead-letter queue, by reason and origin, how old,
//! and a few examples. Reads each message once and gives it back (see [`super::browse`]): the
//! queue is left as it was, apart from messages near a delivery limit, which are refreshed
//! rather than risked.

use std::collections::BTreeMap;

use super::browse::Browser;
use super::letter::{DeadLetter, Source};
use super::report::{Example, LimitReport, ListReport, OriginCount, ReasonGroup, rfc3339};
use super::session::Session;
use super::{Failure, Outcome, Target};
use crate::broker::facts::{LimitSource, QueueFacts};

/// Examples kept per reason.
pub const EXAMPLES: usize = 3;

/// Counts and examples, gathered one dead letter at a time.
#[derive(Debug, Default)]
pub struct Summary {
    groups: BTreeMap<(Source, String), Group>,
    origins: BTreeMap<Option<String>, u64>,
    oldest: Option<u64>,
    newest: Option<u64>,
    highest_delivery_count: u64,
    scanned: u64,
}

#[derive(Debug, Default)]
struct Group {
    count: u64,
    oldest: Option<u64>,
    newest: Option<u64>,
    examples: Vec<DeadLetter>,
}

fn widen(range: (&mut Option<u64>, &mut Option<u64>), time: Option<u64>) {
    if let Some(t) = time {
        *range.0 = Some(range.0.map_or(t, |o| o.min(t)));
        *range.1 = Some(range.1.map_or(t, |n| n.max(t)));
    }
}

impl Summary {
    pub fn add(&mut self, letter: &DeadLetter) {
        self.scanned += 1;
        self.highest_delivery_count = self.highest_delivery_count.max(letter.delivery_count);
        widen((&mut self.oldest, &mut self.newest), letter.time);
        *self.origins.entry(letter.origin.clone()).or_default() += 1;
        let group = self
            .groups
            .entry((letter.source, letter.reason.clone()))
            .or_default();
        group.count += 1;
        widen((&mut group.oldest, &mut group.newest), letter.time);
        if group.examples.len() < EXAMPLES {
            group.examples.push(letter.clone());
        }
    }

    /// The report: reasons and origins most frequent first.
    pub fn report(
        self,
        target: &Target,
        messages: u64,
        consumers: u32,
        facts: &QueueFacts,
    ) -> ListReport {
        let mut reasons: Vec<ReasonGroup> = self
            .groups
            .into_iter()
            .map(|((source, reason), g)| ReasonGroup {
                reason,
                source: source.as_str(),
                count: g.count,
                oldest: g.oldest.map(rfc3339),
                newest: g.newest.map(rfc3339),
                examples: g
                    .examples
                    .into_iter()
                    .map(|l| Example {
                        message_id: l.message_id,
                        origin_queue: l.origin,
                        attempts: l.attempts,
                        last_status: l.last_status,
                        last_error: l.last_error,
                        time: l.time.map(rfc3339),
                        delivery_count: l.delivery_count,
                    })
                    .collect(),
            })
            .collect();
        reasons.sort_by_key(|g| std::cmp::Reverse(g.count));
        let mut origins: Vec<OriginCount> = self
            .origins
            .into_iter()
            .map(|(queue, count)| OriginCount { queue, count })
            .collect();
        origins.sort_by_key(|o| std::cmp::Reverse(o.count));
        let mut warnings = Vec::new();
        if consumers > 0 {
            warnings.push(format!(
                "{consumers} consumer(s) on {:?}: the messages they hold were not seen",
                target.dead_letter_queue
            ));
        }
        if self.scanned < messages {
            warnings.push(format!(
                "read {} of {messages} message(s) (--max-scan): the counts cover those",
                self.scanned
            ));
        }
        if facts.source == LimitSource::Assumed && self.highest_delivery_count > 0 {
            warnings.push(format!(
                "dead letters have been returned to {:?} up to {} time(s); its delivery limit is unknown without --management-url (assumed {})",
                target.dead_letter_queue,
                self.highest_delivery_count,
                facts.limit.unwrap_or_default()
            ));
        }
        ListReport {
            queue: target.queue.clone(),
            dead_letter_queue: target.dead_letter_queue.clone(),
            messages,
            scanned: self.scanned,
            consumers,
            queue_type: facts.queue_type.clone(),
            delivery_limit: LimitReport {
                limit: facts.limit,
                source: facts.source.as_str(),
            },
            dead_letter_exchange: facts.dead_letter_exchange.clone(),
            oldest: self.oldest.map(rfc3339),
            newest: self.newest.map(rfc3339),
            reasons,
            origins,
            highest_delivery_count: self.highest_delivery_count,
            refreshed: 0,
            warnings,
        }
    }
}

pub async fn run(target: &Target, max_scan: u64) -> Outcome {
    let session = match Session::open(&target.config).await {
        Ok(s) => s,
        Err(f) => return Outcome::failed(f),
    };
    let result = list(&session, target, max_scan).await;
    session.close().await;
    match result {
        Ok(report) => Outcome {
            report: Some(Box::new(report)),
            failure: None,
        },
        Err(f) => Outcome::failed(f),
    }
}

async fn list(session: &Session, target: &Target, max_scan: u64) -> Result<ListReport, Failure> {
    let (ready, consumers) = session
        .queue(&target.dead_letter_queue, "dead-letter queue")
        .await?;
    let (facts, warning) =
        QueueFacts::learn(session.management.clone(), &target.dead_letter_queue).await;
    let mut browser = Browser::open(
        session,
        &target.dead_letter_queue,
        facts.clone(),
        u64::from(ready).min(max_scan),
    )
    .await?;
    let mut summary = Summary::default();
    let walked = async {
        while let Some(delivery) = browser.next().await? {
            summary.add(&DeadLetter::read(&delivery.properties));
            browser.keep(&delivery).await?;
        }
        Ok::<(), Failure>(())
    }
    .await;
    let refreshed = browser.refreshed;
    let finished = browser.finish().await;
    walked.and(finished)?;
    let mut report = summary.report(target, u64::from(ready), consumers, &facts);
    report.refreshed = refreshed;
    report.warnings.extend(warning);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Layers;

    fn letter(source: Source, reason: &str, time: Option<u64>, id: &str) -> DeadLetter {
        DeadLetter {
            source,
            reason: reason.into(),
            origin: (source != Source::Unknown).then(|| "orders".to_string()),
            message_id: Some(id.into()),
            attempts: Some(1),
            last_status: Some(400),
            last_error: Some("no".into()),
            time,
            delivery_count: 0,
        }
    }

    #[test]
    fn the_summary_groups_by_source_and_reason_and_keeps_a_few_examples() {
        let mut s = Summary::default();
        for i in 0..5 {
            s.add(&letter(
                Source::Sidecar,
                "rejected",
                Some(100 + i),
                &format!("r{i}"),
            ));
        }
        s.add(&letter(Source::Broker, "rejected", Some(50), "b"));
        s.add(&letter(Source::Unknown, "unknown", None, "u"));
        let mut flags = std::collections::BTreeMap::new();
        flags.insert("queue".to_string(), "orders".to_string());
        let target = Target {
            config: Layers::collect(flags, &|_: &str| None)
                .unwrap()
                .build()
                .unwrap(),
            queue: "orders".into(),
            dead_letter_queue: "orders.dead-letter".into(),
        };
        let r = s.report(&target, 7, 0, &QueueFacts::assumed());
        assert_eq!(r.scanned, 7);
        assert_eq!(r.reasons[0].reason, "rejected");
        assert_eq!((r.reasons[0].source, r.reasons[0].count), ("sidecar", 5));
        assert_eq!(r.reasons[0].examples.len(), EXAMPLES);
        assert_eq!(r.reasons[0].examples[0].message_id.as_deref(), Some("r0"));
        assert_eq!(r.reasons[0].oldest.as_deref(), Some("1970-01-01T00:01:40Z"));
        assert_eq!(r.reasons[0].newest.as_deref(), Some("1970-01-01T00:01:44Z"));
        assert_eq!(r.reasons.len(), 3, "broker-rejected is its own group");
        assert_eq!(r.oldest.as_deref(), Some("1970-01-01T00:00:50Z"));
        assert_eq!(r.origins[0].queue.as_deref(), Some("orders"));
        assert_eq!(r.origins[0].count, 6);
        assert_eq!(r.origins[1].queue, None);
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    }
}
