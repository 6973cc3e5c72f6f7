//! Which acks of one channel to send, and how: a pure bookkeeper, no broker, no clock of its own
//! (the caller passes the time), unit-tested below. [`super::acks`] drives it.
//!
//! The invariant: one `basic.ack(multiple=true)` up to tag *t* is sent only when every tag at or
//! below *t* that is still unsettled on the channel was accepted. So the tracker knows every tag
//! delivered on the channel ([`Tracker::delivered`]), in order, until it is settled; an accepted
//! tag ([`Tracker::ack`]) waits until the run of accepted tags at the front of that list is
//! [`max`](Tracker::new) long (one frame covers the run) or the oldest accepted tag has waited
//! `wait`. Then the run goes out as one frame, and each accepted tag behind a still-undecided
//! one that has itself waited `wait` goes out alone (`multiple=false`); the younger ones keep
//! waiting, with their own clocks, for the gap to close (with many calls in flight, answers come
//! back out of order, and the gap usually closes within the window). A tag given back or
//! rejected is sent by the caller on its own and then [`settled`](Tracker::settled); until then
//! it stays in the list and blocks any multiple ack from covering it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What is known of one unsettled delivery tag.
#[derive(Debug)]
enum Slot<W> {
    /// Not decided yet, or decided otherwise than ack and not sent yet.
    Open,
    /// Accepted at `at`; `waiter` hears when the ack was sent.
    Ack { at: Instant, waiter: W },
}

/// Acks to send now, in this order.
#[derive(Debug)]
pub(super) struct Flush<W> {
    /// One ack frame up to `tag`, covering every waiter's tag (`multiple` when more than one).
    pub run: Option<Run<W>>,
    /// Accepted tags behind a still-undecided one: one `multiple=false` ack each.
    pub singles: Vec<(u64, W)>,
}

#[derive(Debug)]
pub(super) struct Run<W> {
    pub tag: u64,
    pub waiters: Vec<W>,
}

impl<W> Run<W> {
    pub fn multiple(&self) -> bool {
        self.waiters.len() > 1
    }
}

#[cfg(test)]
impl<W> Flush<W> {
    pub fn is_empty(&self) -> bool {
        self.run.is_none() && self.singles.is_empty()
    }
}

/// The unsettled tags of one channel.
#[derive(Debug)]
pub(super) struct Tracker<W> {
    max: usize,
    wait: Duration,
    /// Unsettled tags, ascending.
    tags: VecDeque<(u64, Slot<W>)>,
    /// How many of `tags`, from the front, are accepted: what one multiple ack may cover.
    ready: usize,
    /// Accepted tags in `tags`, in the ready run or not.
    accepted: usize,
    /// When the longest-waiting accepted tag was accepted.
    oldest: Option<Instant>,
    /// The channel is gone: nothing is tracked any more.
    closed: bool,
}

impl<W> Tracker<W> {
    /// `max`: the run length that is sent at once (at least 1); `wait`: how long an accepted tag
    /// may wait for others.
    pub fn new(max: usize, wait: Duration) -> Self {
        Tracker {
            max: max.max(1),
            wait,
            tags: VecDeque::new(),
            ready: 0,
            accepted: 0,
            oldest: None,
            closed: false,
        }
    }

    /// A delivery arrived. Tags on a channel only grow; one that does not is ignored (it could
    /// never be covered safely, and the caller acks it alone: see [`Tracker::ack`]).
    pub fn delivered(&mut self, tag: u64) {
        if self.closed || self.tags.back().is_some_and(|(last, _)| *last >= tag) {
            return;
        }
        self.tags.push_back((tag, Slot::Open));
    }

    fn index(&self, tag: u64) -> Option<usize> {
        self.tags.binary_search_by_key(&tag, |(t, _)| *t).ok()
    }

    /// `tag` was accepted at `at`. `Err(waiter)` when the tracker does not know the tag as open
    /// (never delivered here, already decided, or the channel is gone): the caller acks it alone.
    pub fn ack(&mut self, tag: u64, at: Instant, waiter: W) -> Result<(), W> {
        let Some(i) = self.index(tag).filter(|_| !self.closed) else {
            return Err(waiter);
        };
        let slot = &mut self.tags[i].1;
        if !matches!(slot, Slot::Open) {
            return Err(waiter);
        }
        *slot = Slot::Ack { at, waiter };
        self.accepted += 1;
        self.oldest = Some(self.oldest.map_or(at, |o| o.min(at)));
        if i == self.ready {
            self.extend_ready();
        }
        Ok(())
    }

    fn extend_ready(&mut self) {
        while let Some((_, Slot::Ack { .. })) = self.tags.get(self.ready) {
            self.ready += 1;
        }
    }

    /// `tag` was given back or rejected on its own (sent already): it no longer blocks the
    /// accepted tags above it.
    pub fn settled(&mut self, tag: u64) {
        let Some(i) = self.index(tag) else { return };
        if !matches!(self.tags[i].1, Slot::Open) {
            return;
        }
        self.tags.remove(i);
        if i == self.ready {
            self.extend_ready();
        }
    }

    /// Whether [`Tracker::take`] without `force` would send something at `now`.
    pub fn due(&self, now: Instant) -> bool {
        self.ready >= self.max || self.overdue(now)
    }

    fn overdue(&self, now: Instant) -> bool {
        self.oldest.is_some_and(|o| now >= o + self.wait)
    }

    /// What to send now: the ready run once it is `max` long or once the oldest accepted tag
    /// has waited `wait`, then with it every accepted tag that has waited `wait`; everything
    /// accepted when `force`d (shutdown, closing the channel).
    pub fn take(&mut self, now: Instant, force: bool) -> Flush<W> {
        let overdue = self.overdue(now);
        let mut flush = Flush {
            run: None,
            singles: Vec::new(),
        };
        if !force && !overdue && self.ready < self.max {
            return flush;
        }
        if self.ready > 0 {
            let mut tag = 0;
            let waiters: Vec<W> = self
                .tags
                .drain(..self.ready)
                .map(|(t, slot)| {
                    tag = t;
                    match slot {
                        Slot::Ack { waiter, .. } => waiter,
                        Slot::Open => unreachable!("the ready run holds accepted tags only"),
                    }
                })
                .collect();
            self.accepted -= waiters.len();
            self.ready = 0;
            flush.run = Some(Run { tag, waiters });
        }
        if (force || overdue) && self.accepted > 0 {
            // Accepted tags whose time is up (all of them when forced): out now, alone.
            let wait = self.wait;
            let tags = std::mem::take(&mut self.tags);
            for (tag, slot) in tags {
                match slot {
                    Slot::Ack { at, waiter } if force || at + wait <= now => {
                        flush.singles.push((tag, waiter));
                        self.accepted -= 1;
                    }
                    slot => self.tags.push_back((tag, slot)),
                }
            }
        }
        self.oldest = self
            .tags
            .iter()
            .filter_map(|(_, s)| match s {
                Slot::Ack { at, .. } => Some(*at),
                Slot::Open => None,
            })
            .min();
        flush
    }

    /// The channel is gone: hands back every waiter (their acks can no longer be sent; the broker
    /// requeued the messages) and tracks nothing more.
    pub fn abandon(&mut self) -> Vec<W> {
        self.closed = true;
        self.ready = 0;
        self.accepted = 0;
        self.oldest = None;
        std::mem::take(&mut self.tags)
            .into_iter()
            .filter_map(|(_, s)| match s {
                Slot::Ack { waiter, .. } => Some(waiter),
                Slot::Open => None,
            })
            .collect()
    }

    /// Accepted tags not sent yet.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.accepted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_millis(5);

    fn tracker(max: usize, delivered: std::ops::RangeInclusive<u64>) -> Tracker<u64> {
        let mut t = Tracker::new(max, WAIT);
        for tag in delivered {
            t.delivered(tag);
        }
        t
    }

    /// Accepts `tag` (its waiter is the tag itself).
    fn ack(t: &mut Tracker<u64>, tag: u64, at: Instant) {
        t.ack(tag, at, tag).expect("an open tag");
    }

    /// (the run's tag and waiters, the singles' tags)
    fn sent(f: Flush<u64>) -> (Option<(u64, Vec<u64>)>, Vec<u64>) {
        (
            f.run.map(|r| (r.tag, r.waiters)),
            f.singles.into_iter().map(|(t, _)| t).collect(),
        )
    }

    #[test]
    fn a_full_run_in_tag_order_goes_out_as_one_frame() {
        let now = Instant::now();
        let mut t = tracker(4, 1..=10);
        for tag in 1..=3 {
            ack(&mut t, tag, now);
            assert!(!t.due(now), "three of four");
        }
        ack(&mut t, 4, now);
        assert!(t.due(now));
        let f = t.take(now, false);
        assert!(f.run.as_ref().unwrap().multiple());
        assert_eq!(sent(f), (Some((4, vec![1, 2, 3, 4])), vec![]));
        assert_eq!(t.pending(), 0);
        assert!(t.take(now + WAIT, false).is_empty(), "nothing left");
    }

    #[test]
    fn out_of_order_completion_waits_for_the_lowest_tag() {
        let now = Instant::now();
        let mut t = tracker(3, 1..=5);
        ack(&mut t, 3, now);
        ack(&mut t, 2, now);
        ack(&mut t, 4, now);
        assert!(!t.due(now), "tag 1 is open: nothing may be covered yet");
        assert!(t.take(now, false).is_empty());
        ack(&mut t, 1, now);
        assert!(t.due(now));
        assert_eq!(
            sent(t.take(now, false)),
            (Some((4, vec![1, 2, 3, 4])), vec![])
        );
    }

    #[test]
    fn a_gap_is_never_covered_and_what_waits_behind_it_goes_out_alone_when_the_time_is_up() {
        let now = Instant::now();
        let mut t = tracker(8, 1..=6);
        ack(&mut t, 1, now);
        ack(&mut t, 2, now);
        // 3 stays with the app.
        ack(&mut t, 4, now);
        ack(&mut t, 6, now);
        assert!(!t.due(now + WAIT / 2));
        assert!(t.due(now + WAIT));
        assert_eq!(
            sent(t.take(now + WAIT, false)),
            (Some((2, vec![1, 2])), vec![4, 6]),
            "the run below the gap as one frame, the rest one by one"
        );
        // 3 and 5 are still open: accepting them later starts afresh.
        let later = now + WAIT * 3;
        ack(&mut t, 5, later);
        assert!(!t.due(later), "3 still open");
        ack(&mut t, 3, later);
        assert_eq!(
            sent(t.take(later + WAIT, false)),
            (Some((5, vec![3, 5])), vec![])
        );
    }

    #[test]
    fn a_nack_in_the_middle_blocks_coverage_until_it_is_settled() {
        let now = Instant::now();
        let mut t = tracker(4, 1..=6);
        ack(&mut t, 1, now);
        ack(&mut t, 3, now);
        ack(&mut t, 4, now);
        ack(&mut t, 5, now);
        // 2 is to be given back: until its nack went out it must not be covered.
        assert!(!t.due(now));
        assert_eq!(t.ready, 1);
        t.settled(2);
        assert!(t.due(now), "1, 3, 4, 5 are now a run of four");
        assert_eq!(
            sent(t.take(now, false)),
            (Some((5, vec![1, 3, 4, 5])), vec![])
        );
        // An unknown or already settled tag changes nothing.
        t.settled(2);
        t.settled(99);
        assert!(t.take(now + WAIT, true).is_empty());
    }

    #[test]
    fn the_time_limit_counts_from_the_oldest_accepted_tag() {
        let now = Instant::now();
        let mut t = tracker(32, 1..=3);
        ack(&mut t, 1, now);
        ack(&mut t, 2, now + WAIT / 2);
        assert!(!t.due(now + WAIT - Duration::from_micros(1)));
        assert!(t.due(now + WAIT));
        assert_eq!(
            sent(t.take(now + WAIT, false)),
            (Some((2, vec![1, 2])), vec![])
        );
        // The next window starts with the next accepted tag.
        ack(&mut t, 3, now + WAIT * 2);
        assert!(!t.due(now + WAIT * 2));
        let f = t.take(now + WAIT * 3, false);
        assert!(
            !f.run.as_ref().unwrap().multiple(),
            "one tag: multiple=false"
        );
        assert_eq!(sent(f), (Some((3, vec![3])), vec![]));
    }

    #[test]
    fn a_count_flush_leaves_what_waits_behind_a_gap_with_its_own_clock() {
        let now = Instant::now();
        let mut t = tracker(2, 1..=5);
        ack(&mut t, 4, now);
        ack(&mut t, 1, now + WAIT / 2);
        ack(&mut t, 2, now + WAIT / 2);
        assert_eq!(
            sent(t.take(now + WAIT / 2, false)),
            (Some((2, vec![1, 2])), vec![])
        );
        assert_eq!(t.pending(), 1);
        assert!(t.due(now + WAIT), "4 was accepted first and its time is up");
        assert_eq!(sent(t.take(now + WAIT, false)), (None, vec![4]));
    }

    #[test]
    fn behind_a_gap_only_the_tags_whose_time_is_up_go_out_alone() {
        let now = Instant::now();
        let mut t = tracker(32, 1..=6);
        ack(&mut t, 1, now);
        // 2 stays with the app; 3 was accepted with 1, 4 and 5 a little later.
        ack(&mut t, 3, now);
        ack(&mut t, 4, now + WAIT / 2);
        ack(&mut t, 5, now + WAIT / 2);
        assert_eq!(
            sent(t.take(now + WAIT, false)),
            (Some((1, vec![1])), vec![3]),
            "4 and 5 have waited half their time: they wait on for 2"
        );
        assert_eq!(t.pending(), 2);
        assert!(!t.due(now + WAIT), "nothing else is due yet");
        ack(&mut t, 2, now + WAIT);
        ack(&mut t, 6, now + WAIT);
        assert!(
            !t.due(now + WAIT),
            "a run of four, not 32, and no time is up"
        );
        assert_eq!(
            sent(t.take(now + WAIT + WAIT / 2, false)),
            (Some((6, vec![2, 4, 5, 6])), vec![]),
            "the gap closed: one frame for the four"
        );
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn force_sends_everything_accepted_and_nothing_open() {
        let now = Instant::now();
        let mut t = tracker(32, 1..=4);
        ack(&mut t, 2, now);
        ack(&mut t, 3, now);
        assert_eq!(sent(t.take(now, true)), (None, vec![2, 3]));
        ack(&mut t, 1, now);
        assert_eq!(sent(t.take(now, true)), (Some((1, vec![1])), vec![]));
        assert!(t.take(now, true).is_empty(), "4 is open");
    }

    #[test]
    fn max_one_sends_every_ack_at_once_and_alone() {
        let now = Instant::now();
        let mut t = tracker(1, 1..=2);
        ack(&mut t, 1, now);
        assert!(t.due(now));
        let f = t.take(now, false);
        assert!(!f.run.as_ref().unwrap().multiple());
        assert_eq!(sent(f), (Some((1, vec![1])), vec![]));
    }

    #[test]
    fn tags_it_cannot_vouch_for_are_handed_back_to_be_sent_alone() {
        let now = Instant::now();
        let mut t = tracker(4, 5..=6);
        assert_eq!(t.ack(4, now, 4), Err(4), "never delivered here");
        ack(&mut t, 5, now);
        assert_eq!(t.ack(5, now, 5), Err(5), "decided already");
        t.delivered(3);
        assert_eq!(t.ack(3, now, 3), Err(3), "tags only grow");
        assert_eq!(
            t.abandon(),
            vec![5],
            "the channel went: the waiters hear of it"
        );
        t.delivered(7);
        assert_eq!(t.ack(7, now, 7), Err(7), "nothing is tracked after that");
        assert!(t.take(now + WAIT, true).is_empty());
    }
}
