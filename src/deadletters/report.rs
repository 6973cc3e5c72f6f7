//! What the subcommands print: each report is one struct, written as text for people or, with
//! `--json`, as JSON whose shape the README documents (field names are a contract: add, never
//! rename). Times are RFC 3339 in UTC. Nothing here ever holds a URI or a credential.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;

use super::letter::Source;

/// A report a subcommand prints.
pub trait Report {
    fn human(&self) -> String;
    fn json(&self) -> String;
}

/// Unix seconds as RFC 3339 (UTC, whole seconds).
pub fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

/// A short, single-line, printable form of an app's error text for the human report.
fn short(text: &str) -> String {
    const MAX: usize = 100;
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match flat.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &flat[..i]),
        None => flat,
    }
}

#[derive(Debug, Serialize)]
pub struct ListReport {
    pub queue: String,
    pub dead_letter_queue: String,
    /// Ready messages in the dead-letter queue when the list began.
    pub messages: u64,
    pub scanned: u64,
    /// Consumers of the dead-letter queue (the messages they hold are not seen).
    pub consumers: u32,
    pub queue_type: Option<String>,
    pub delivery_limit: LimitReport,
    pub dead_letter_exchange: Option<String>,
    pub oldest: Option<String>,
    pub newest: Option<String>,
    pub reasons: Vec<ReasonGroup>,
    pub origins: Vec<OriginCount>,
    /// The highest `x-delivery-count` seen: returns so far, before this list's own.
    pub highest_delivery_count: u64,
    /// Messages near the delivery limit that were put back at the tail with a fresh count.
    pub refreshed: u64,
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct LimitReport {
    pub limit: Option<u64>,
    /// `management` or `assumed`.
    pub source: &'static str,
}

#[derive(Debug, Serialize)]
pub struct ReasonGroup {
    pub reason: String,
    /// `sidecar`, `broker` or `unknown`.
    pub source: &'static str,
    pub count: u64,
    pub oldest: Option<String>,
    pub newest: Option<String>,
    pub examples: Vec<Example>,
}

#[derive(Debug, Serialize)]
pub struct Example {
    pub message_id: Option<String>,
    pub origin_queue: Option<String>,
    pub attempts: Option<u64>,
    pub last_status: Option<u64>,
    pub last_error: Option<String>,
    pub time: Option<String>,
    pub delivery_count: u64,
}

#[derive(Debug, Serialize)]
pub struct OriginCount {
    /// `null`: nothing says where the message came from.
    pub queue: Option<String>,
    pub count: u64,
}

impl Report for ListReport {
    fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report serializes")
    }

    fn human(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "{:?} (dead letters of {:?}): {} message(s), {} read",
            self.dead_letter_queue, self.queue, self.messages, self.scanned
        );
        let kind = self.queue_type.as_deref().unwrap_or("queue type unknown");
        let limit = match (self.delivery_limit.limit, self.delivery_limit.source) {
            (None, _) => "no delivery limit".to_string(),
            (Some(l), "assumed") => format!(
                "delivery limit assumed to be {l} (RabbitMQ 4's default; --management-url tells)"
            ),
            (Some(l), _) => format!("delivery limit {l}"),
        };
        let _ = writeln!(o, "  {kind}, {limit}");
        if let (Some(old), Some(new)) = (&self.oldest, &self.newest) {
            let _ = writeln!(o, "  oldest {old}, newest {new}");
        }
        if self.reasons.is_empty() {
            let _ = writeln!(o, "no dead letters");
        } else {
            let _ = writeln!(o, "by reason:");
            for g in &self.reasons {
                let _ = writeln!(o, "  {:<16} {:<8} {:>8}", g.reason, g.source, g.count);
            }
            let _ = writeln!(o, "by origin:");
            for origin in &self.origins {
                let name = origin.queue.as_deref().unwrap_or("(not recorded)");
                let _ = writeln!(o, "  {name:<25} {:>8}", origin.count);
            }
            let _ = writeln!(o, "examples:");
            for g in &self.reasons {
                for e in &g.examples {
                    let mut line = format!("  {:<16}", g.reason);
                    let _ = write!(line, " id={}", e.message_id.as_deref().unwrap_or("-"));
                    if let Some(s) = e.last_status {
                        let _ = write!(line, " status={s}");
                    }
                    if let Some(a) = e.attempts {
                        let _ = write!(line, " attempts={a}");
                    }
                    if let Some(t) = &e.time {
                        let _ = write!(line, " time={t}");
                    }
                    if let Some(err) = &e.last_error {
                        let _ = write!(line, " error={:?}", short(err));
                    }
                    let _ = writeln!(o, "{line}");
                }
            }
        }
        footer(&mut o, self.refreshed, &self.warnings);
        o
    }
}

/// What a replay moved (or, in a dry run, would move) and what it left.
#[derive(Debug, Default, Serialize)]
pub struct ReplayReport {
    pub queue: String,
    pub dead_letter_queue: String,
    pub dry_run: bool,
    pub moved: u64,
    pub by_reason: Vec<ReasonCount>,
    pub destinations: Vec<Destination>,
    pub left: Left,
    pub refreshed: u64,
    pub rate_per_second: f64,
    pub interrupted: bool,
    pub error: Option<String>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct ReasonCount {
    pub reason: String,
    pub source: &'static str,
    pub count: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Destination {
    /// Always the default exchange: see the replay module's doc.
    pub exchange: String,
    pub queue: String,
    pub count: u64,
}

/// Dead letters that stayed in the dead-letter queue, by why.
#[derive(Debug, Default, Serialize)]
pub struct Left {
    pub other_reason: u64,
    pub other_origin: u64,
    pub no_origin: u64,
    /// Never read: beyond `--limit`, or the replay stopped first.
    pub not_examined: u64,
}

impl ReplayReport {
    pub fn set_moved(&mut self, moved: &BTreeMap<(Source, String), u64>, queue: &str) {
        self.by_reason = moved
            .iter()
            .map(|((source, reason), count)| ReasonCount {
                reason: reason.clone(),
                source: source.as_str(),
                count: *count,
            })
            .collect();
        self.moved = moved.values().sum();
        self.destinations = if self.moved > 0 {
            vec![Destination {
                exchange: String::new(),
                queue: queue.to_string(),
                count: self.moved,
            }]
        } else {
            Vec::new()
        };
    }
}

impl Report for ReplayReport {
    fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report serializes")
    }

    fn human(&self) -> String {
        let mut o = String::new();
        let verb = if self.dry_run {
            "dry run: would replay"
        } else if self.interrupted || self.error.is_some() {
            "stopped after replaying"
        } else {
            "replayed"
        };
        let _ = writeln!(
            o,
            "{verb} {} dead letter(s) from {:?} to {:?} (default exchange), at most {}/s",
            self.moved, self.dead_letter_queue, self.queue, self.rate_per_second
        );
        for r in &self.by_reason {
            let _ = writeln!(o, "  {:<16} {:<8} {:>8}", r.reason, r.source, r.count);
        }
        let l = &self.left;
        let _ = writeln!(
            o,
            "left in {:?}: {} with another reason, {} from another queue, {} with no recorded origin, {} not read",
            self.dead_letter_queue, l.other_reason, l.other_origin, l.no_origin, l.not_examined
        );
        if l.other_origin > 0 {
            let _ = writeln!(
                o,
                "  (dead letters of other queues: replay them with their own --queue and --dead-letter-queue {:?})",
                self.dead_letter_queue
            );
        }
        footer(&mut o, self.refreshed, &self.warnings);
        o
    }
}

#[derive(Debug, Serialize)]
pub struct PurgeReport {
    pub dead_letter_queue: String,
    pub purged: u64,
}

impl Report for PurgeReport {
    fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report serializes")
    }

    fn human(&self) -> String {
        format!(
            "purged {} dead letter(s) from {:?}\n",
            self.purged, self.dead_letter_queue
        )
    }
}

/// The lines every report ends with: what was refreshed near the delivery limit, and warnings.
fn footer(o: &mut String, refreshed: u64, warnings: &[String]) {
    if refreshed > 0 {
        let _ = writeln!(
            o,
            "refreshed {refreshed} message(s) near the delivery limit: put back at the tail with a fresh count"
        );
    }
    for w in warnings {
        let _ = writeln!(o, "warning: {w}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_error_texts_print_safely() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(short("a\nb\u{1b}[31m"), "a b [31m");
        let long = "é".repeat(150);
        assert_eq!(short(&long).chars().count(), 101);
    }
}
