//! Sending the acks and nacks of one consuming channel, coalescing acks of consecutive accepted
//! tags into one `basic.ack(multiple=true)` (`--ack-batch-max`, `--ack-batch-wait`). The decision
//! stays per message; only the sending is batched. The [tracker](super::ack_tracker) decides what
//! may be covered; this is the thin async part around it.
//!
//! A message's task waits in [`Acks::ack`] until its ack went out (or could not), so its log
//! span, health and counters see the ack as they would a single one, and the message counts as
//! unacked (oldest-unacked age, delivery-ack timeout warning) until it is acked. The task gives
//! up its `--concurrency` slot before it waits. Whoever makes a run `max` long sends it; a task
//! whose window is over sends every accepted tag whose window is over (so every ack leaves
//! within about `wait`); on shutdown everything accepted leaves at once.
//!
//! Frames leave in order: every send happens under one lock, and the tracker is read under it,
//! so a multiple ack never overtakes the nack of a tag below it. Nacks are always single
//! (`multiple=false`). A send that fails means the channel is gone, and the broker has requeued
//! every unacked message with it: every waiting ack then fails at once (counted in
//! `settle_failures_total`, never as acked). A crash inside the window loses the pending acks:
//! the broker redelivers those messages (duplicates, never a loss).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use prometheus::Histogram;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::ack_tracker::{Flush, Tracker};

/// How long one frame may take to be handed to the connection.
pub(super) const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// The configured coalescing of one subscription.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AckBatching {
    /// Most accepted tags one frame covers before it is sent; 1: no coalescing.
    pub max: usize,
    /// Longest an accepted tag waits for others.
    pub wait: Duration,
}

impl AckBatching {
    pub fn is_on(&self) -> bool {
        self.max > 1
    }
}

/// What a waiting ack hears: sent, or why not.
type Outcome = Result<(), String>;
type Waiter = oneshot::Sender<Outcome>;

/// The acks and nacks of one consuming channel.
pub(super) struct Acks {
    channel: Channel,
    batching: AckBatching,
    tracker: Mutex<Tracker<Waiter>>,
    /// Held while frames are sent, so they leave in the order the tracker decided them.
    sending: tokio::sync::Mutex<()>,
    /// Tags per ack frame.
    frames: Histogram,
    shutdown: CancellationToken,
}

impl Acks {
    pub fn new(
        channel: Channel,
        batching: AckBatching,
        frames: Histogram,
        shutdown: CancellationToken,
    ) -> Self {
        Acks {
            channel,
            batching,
            tracker: Mutex::new(Tracker::new(batching.max, batching.wait)),
            sending: tokio::sync::Mutex::new(()),
            frames,
            shutdown,
        }
    }

    pub fn batching(&self) -> AckBatching {
        self.batching
    }

    fn tracker(&self) -> std::sync::MutexGuard<'_, Tracker<Waiter>> {
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A delivery arrived on the channel (called in tag order, before its task starts).
    pub fn delivered(&self, tag: u64) {
        if self.batching.is_on() {
            self.tracker().delivered(tag);
        }
    }

    /// Acks `tag`, coalesced with others when coalescing is on; returns once the frame that
    /// covers it was handed to the connection, or with why it could not be.
    pub async fn ack(&self, tag: u64) -> Outcome {
        if !self.batching.is_on() {
            return self.send_ack(tag, false, 1).await;
        }
        let (tx, mut rx) = oneshot::channel();
        let accepted = Instant::now();
        let registered = self.tracker().ack(tag, accepted, tx);
        if registered.is_err() {
            // Not a tag the tracker can vouch for: alone, in order with the others.
            let _sending = self.sending.lock().await;
            return self.send_ack(tag, false, 1).await;
        }
        if self.due() {
            self.flush(false, None).await;
        }
        let deadline = tokio::time::Instant::from_std(accepted + self.batching.wait);
        tokio::select! {
            sent = &mut rx => return sent.unwrap_or_else(|_| Err(dropped())),
            _ = tokio::time::sleep_until(deadline) => {}
            _ = self.shutdown.cancelled() => {}
        }
        // This tag's window is over: send it with every other accepted tag whose window is over
        // (or someone else is sending it right now, under the lock this waits for).
        self.flush(false, Some(accepted + self.batching.wait)).await;
        rx.await.unwrap_or_else(|_| Err(dropped()))
    }

    /// Gives `tag` back to the queue (`basic.nack`, `multiple=false`, with `requeue`).
    pub async fn nack(&self, tag: u64, requeue: bool) -> Outcome {
        let nack = self.channel.basic_nack(
            tag,
            BasicNackOptions {
                multiple: false,
                requeue,
            },
        );
        if !self.batching.is_on() {
            return within_timeout(nack).await;
        }
        let sending = self.sending.lock().await;
        let sent = within_timeout(nack).await;
        if sent.is_err() {
            self.abandon(sent.clone());
        } else {
            self.tracker().settled(tag);
        }
        drop(sending);
        // What waited behind this tag may make a full run now.
        if self.due() {
            self.flush(false, None).await;
        }
        sent
    }

    /// Sends everything accepted now (before the channel is closed on purpose).
    pub async fn flush_all(&self) {
        if self.batching.is_on() {
            self.flush(true, None).await;
        }
    }

    /// The channel is gone: every ack waiting to be coalesced fails now.
    pub fn abandon_all(&self) {
        if self.batching.is_on() {
            self.abandon(Err(gone()));
        }
    }

    fn due(&self) -> bool {
        self.shutdown.is_cancelled() || self.tracker().due(Instant::now())
    }

    /// Sends what the tracker says is due; `expired`: a deadline known to have passed (the clock
    /// read here is never taken to be before it).
    async fn flush(&self, force: bool, expired: Option<Instant>) {
        let _sending = self.sending.lock().await;
        let force = force || self.shutdown.is_cancelled();
        let now = expired.map_or_else(Instant::now, |e| Instant::now().max(e));
        let Flush { run, singles } = self.tracker().take(now, force);
        if let Some(run) = run {
            let sent = self
                .send_ack(run.tag, run.multiple(), run.waiters.len())
                .await;
            for waiter in run.waiters {
                let _ = waiter.send(sent.clone());
            }
            if sent.is_err() {
                self.abandon(sent);
                for (_, waiter) in singles {
                    let _ = waiter.send(Err(gone()));
                }
                return;
            }
        }
        let mut singles = singles.into_iter();
        for (tag, waiter) in singles.by_ref() {
            let sent = self.send_ack(tag, false, 1).await;
            let failed = sent.is_err();
            let _ = waiter.send(sent.clone());
            if failed {
                self.abandon(sent);
                break;
            }
        }
        for (_, waiter) in singles {
            let _ = waiter.send(Err(gone()));
        }
    }

    /// The channel is gone: every waiting ack fails with `why`.
    fn abandon(&self, why: Outcome) {
        let why = why.err().unwrap_or_else(gone);
        for waiter in self.tracker().abandon() {
            let _ = waiter.send(Err(why.clone()));
        }
    }

    async fn send_ack(&self, tag: u64, multiple: bool, tags: usize) -> Outcome {
        let sent = within_timeout(self.channel.basic_ack(tag, BasicAckOptions { multiple })).await;
        if sent.is_ok() {
            self.frames.observe(tags as f64);
        }
        sent
    }
}

/// Waits for lapin to hand a frame over, at most [`SEND_TIMEOUT`]: on a connection that died
/// meanwhile the promise may never resolve.
async fn within_timeout(op: impl std::future::Future<Output = lapin::Result<()>>) -> Outcome {
    match tokio::time::timeout(SEND_TIMEOUT, op).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "not sent within {SEND_TIMEOUT:?} (connection gone?)"
        )),
    }
}

fn gone() -> String {
    "the channel closed before the ack was sent".to_string()
}

fn dropped() -> String {
    "the ack was dropped unsent".to_string()
}
