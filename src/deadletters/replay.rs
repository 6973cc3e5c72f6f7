//! `dead-letters replay`: moves a queue's dead letters back into it.
//!
//! Where to: the queue the message died in (`x-sidecar-original-queue`, or for the broker's dead
//! letters the queue of its latest `x-death`), through the default exchange. Not the original
//! exchange and routing key: the exchange may route the key to other queues as well, whose
//! consumers already handled the message, so re-publishing there would hand each of them a
//! duplicate; bindings may also have changed since. The default exchange reaches exactly the queue
//! the message failed in, the way the consumer's retries return to it. The original exchange and
//! routing key stay in the `x-sidecar-original-*` headers.
//!
//! Only the queue's own dead letters move: a dead-letter queue shared by several queues keeps the
//! others' (replay them with their own `--queue`), and one with no recorded origin stays put.
//!
//! Each message: read (unacknowledged), wait for the rate limit, publish the copy with its history
//! reset ([`replay_properties`]), wait for the broker's confirm, and only then ack the dead
//! letter. Killed at any point, the broker gives back whatever was unacknowledged: a copy
//! confirmed but not yet acked exists twice (a duplicate), nothing exists nowhere. Messages
//! filtered out are held and given back once at the end, in their order; messages beyond
//! `--limit` are never read.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use std::pin::Pin;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::browse::Browser;
use super::letter::{DeadLetter, Source, replay_properties};
use super::report::ReplayReport;
use super::session::Session;
use super::{Failure, Outcome, Target};
use crate::broker::facts::QueueFacts;

/// A rate limit in messages per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate(f64);

impl Rate {
    pub fn per_second(self) -> f64 {
        self.0
    }

    fn period(self) -> Duration {
        Duration::from_secs_f64(1.0 / self.0)
    }
}

impl FromStr for Rate {
    type Err = String;

    /// `20/s`, `20` (per second), `90/m` (per minute), `0.5/s`.
    fn from_str(s: &str) -> Result<Rate, String> {
        let (number, per) = match s.trim().split_once('/') {
            Some((n, "s")) => (n, 1.0),
            Some((n, "m")) => (n, 60.0),
            Some(_) => return Err(format!("{s:?} is not a rate: write it like 20/s or 90/m")),
            None => (s.trim(), 1.0),
        };
        match number.trim().parse::<f64>() {
            Ok(n) if n.is_finite() && n > 0.0 && n / per <= 100_000.0 && n / per >= 0.001 => {
                Ok(Rate(n / per))
            }
            _ => Err(format!(
                "{s:?} is not a rate: write it like 20/s or 90/m, from 0.001/s to 100000/s"
            )),
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/s", self.0)
    }
}

/// Spaces actions `1 / rate` apart; the first goes at once.
pub struct Pacer {
    period: Duration,
    next: Option<Instant>,
}

impl Pacer {
    pub fn new(rate: Rate) -> Pacer {
        Pacer {
            period: rate.period(),
            next: None,
        }
    }

    /// Waits for the next slot; `false` when `stop` was cancelled first.
    pub async fn wait(&mut self, stop: &CancellationToken) -> bool {
        if let Some(at) = self.next {
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = stop.cancelled() => return false,
            }
        }
        // A pause (a slow confirm) is not made up for by a burst afterwards.
        self.next = Some(Instant::now() + self.period);
        true
    }
}

/// What to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub reasons: Vec<String>,
    pub limit: Option<u64>,
    pub dry_run: bool,
    pub rate: Rate,
}

pub async fn run(target: &Target, opts: &ReplayOptions, stop: &CancellationToken) -> Outcome {
    let mut report = ReplayReport {
        queue: target.queue.clone(),
        dead_letter_queue: target.dead_letter_queue.clone(),
        dry_run: opts.dry_run,
        rate_per_second: opts.rate.per_second(),
        ..ReplayReport::default()
    };
    let session = match Session::open(&target.config).await {
        Ok(s) => s,
        Err(f) => return Outcome::failed(f),
    };
    let failure = replay(&session, target, opts, stop, &mut report)
        .await
        .err();
    session.close().await;
    report.error = failure.as_ref().map(|f| f.to_string());
    report.interrupted = matches!(failure, Some(Failure::Interrupted));
    Outcome {
        report: Some(Box::new(report)),
        failure,
    }
}

async fn replay(
    session: &Session,
    target: &Target,
    opts: &ReplayOptions,
    stop: &CancellationToken,
    report: &mut ReplayReport,
) -> Result<(), Failure> {
    let (ready, _) = session
        .queue(&target.dead_letter_queue, "dead-letter queue")
        .await?;
    // Checked before anything is read, so that a missing destination moves nothing.
    session.queue(&target.queue, "queue").await?;
    let (facts, warning) =
        QueueFacts::learn(session.management.clone(), &target.dead_letter_queue).await;
    report.warnings.extend(warning);
    let mut browser =
        Browser::open(session, &target.dead_letter_queue, facts, u64::from(ready)).await?;
    let result = walk(&mut browser, target, opts, stop, report).await;
    report.refreshed = browser.refreshed;
    report.left.not_examined = u64::from(ready).saturating_sub(browser.fetched);
    let finished = browser.finish().await;
    result.and(finished)
}

/// Copies published and not yet confirmed, at most: a persistent copy's confirm waits for the
/// broker's disk sync (about 17 ms on a classic queue here), so one at a time would cap a replay
/// near 60 messages a second whatever `--rate` says. Each dead letter is still removed only after
/// its own copy's confirm; a kill leaves at most this many duplicates.
const IN_FLIGHT: usize = 32;

/// A copy on its way: the dead letter it came from and the broker's answer to come.
type Pending = FuturesOrdered<
    Pin<Box<dyn Future<Output = (Delivery, DeadLetter, Result<(), String>)> + Send>>,
>;

/// Reads the dead letters in order and moves the matching ones until the limit.
async fn walk(
    browser: &mut Browser,
    target: &Target,
    opts: &ReplayOptions,
    stop: &CancellationToken,
    report: &mut ReplayReport,
) -> Result<(), Failure> {
    let mut pacer = Pacer::new(opts.rate);
    let mut moved: BTreeMap<(Source, String), u64> = BTreeMap::new();
    let mut pending: Pending = FuturesOrdered::new();
    // Copies sent, confirmed or not: what --limit counts.
    let mut sent = 0u64;
    let mut result = 'walk: loop {
        // Settle what the broker has answered; wait when the window is full.
        loop {
            let done = if pending.len() >= IN_FLIGHT {
                pending.next().await
            } else {
                pending.next().now_or_never().flatten()
            };
            let Some(done) = done else { break };
            if let Err(f) = settle(browser, done, &mut moved).await {
                break 'walk Err(f);
            }
        }
        if opts.limit.is_some_and(|l| sent >= l) {
            break Ok(());
        }
        if stop.is_cancelled() {
            break Err(Failure::Interrupted);
        }
        let delivery = match browser.next().await {
            Ok(Some(d)) => d,
            Ok(None) => break Ok(()),
            Err(f) => break Err(f),
        };
        let letter = DeadLetter::read(&delivery.properties);
        let skip = match &letter.origin {
            None => Some(&mut report.left.no_origin),
            Some(o) if *o != target.queue => Some(&mut report.left.other_origin),
            Some(_) if !opts.reasons.is_empty() && !opts.reasons.contains(&letter.reason) => {
                Some(&mut report.left.other_reason)
            }
            Some(_) => None,
        };
        if let Some(count) = skip {
            *count += 1;
            if let Err(f) = browser.keep(&delivery).await {
                break Err(f);
            }
            continue;
        }
        if opts.dry_run {
            if let Err(f) = browser.keep(&delivery).await {
                break Err(f);
            }
            sent += 1;
            *moved.entry((letter.source, letter.reason)).or_default() += 1;
            continue;
        }
        if !pacer.wait(stop).await {
            let _ = browser.keep(&delivery).await;
            break Err(Failure::Interrupted);
        }
        let copy = replay_properties(&delivery.properties);
        match browser.send(&target.queue, &delivery.data, copy).await {
            Ok(confirm) => {
                sent += 1;
                pending.push_back(Box::pin(async move { (delivery, letter, confirm.await) }));
            }
            Err(e) => {
                let _ = browser.keep(&delivery).await;
                break Err(copy_failed(e));
            }
        }
    };
    // Every copy sent gets its answer before the browse ends, so that a confirmed copy's dead
    // letter is removed (not left as a duplicate) whatever stopped the replay.
    while let Some(done) = pending.next().await {
        if let Err(f) = settle(browser, done, &mut moved).await {
            result = result.and(Err(f));
        }
    }
    report.set_moved(&moved, &target.queue);
    result
}

/// Removes a dead letter whose copy was confirmed, or keeps it when the copy was not.
async fn settle(
    browser: &mut Browser,
    (delivery, letter, answer): (Delivery, DeadLetter, Result<(), String>),
    moved: &mut BTreeMap<(Source, String), u64>,
) -> Result<(), Failure> {
    if let Err(e) = answer {
        let _ = browser.keep(&delivery).await;
        return Err(copy_failed(e));
    }
    // Confirmed: the copy is safe in the queue, so the dead letter may go.
    *moved.entry((letter.source, letter.reason)).or_default() += 1;
    browser.remove(&delivery).await.map_err(|f| {
        Failure::Unavailable(format!(
            "{f}; a copy reached the queue but its dead letter could not be removed: it stays, a duplicate"
        ))
    })
}

fn copy_failed(e: String) -> Failure {
    Failure::Unavailable(format!("stopped: {e}; the dead letter stays where it was"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_per_second_and_per_minute() {
        assert_eq!(Rate::from_str("20/s").unwrap().per_second(), 20.0);
        assert_eq!(Rate::from_str("20").unwrap().per_second(), 20.0);
        assert_eq!(Rate::from_str("90/m").unwrap().per_second(), 1.5);
        assert_eq!(Rate::from_str("0.5/s").unwrap().per_second(), 0.5);
        for bad in ["0", "-1/s", "fast", "10/h", "1e9/s", "NaN", ""] {
            assert!(Rate::from_str(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn the_pacer_spaces_actions_and_stops_when_told() {
        let stop = CancellationToken::new();
        let mut pacer = Pacer::new(Rate::from_str("50/s").unwrap());
        let start = Instant::now();
        for _ in 0..5 {
            assert!(pacer.wait(&stop).await);
        }
        // The first at once, then four gaps of 20 ms (a lower bound: a busy machine is slower).
        assert!(
            start.elapsed() >= Duration::from_millis(80),
            "{:?}",
            start.elapsed()
        );
        stop.cancel();
        assert!(!pacer.wait(&stop).await, "a wait ends when told to stop");
    }
}
