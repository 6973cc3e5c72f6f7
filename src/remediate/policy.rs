//! Cooldown and rate limit: the pure decision whether a restart of a target may happen now.
//!
//! The clock is a parameter, so the rules are unit-tested as a table without sleeping. A restart
//! is recorded when it is allowed, not when it finishes: a restart that fails still counts, since
//! a target that cannot be restarted is exactly what should reach a human instead of a loop.
//! Refused requests are not recorded, so Alertmanager resending during a cooldown does not extend
//! it.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub cooldown: Duration,
    pub max_restarts: u32,
    pub window: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead; the restart has been recorded.
    Restart,
    /// The previous restart was too recent; try again after `remaining`.
    Cooldown { remaining: Duration },
    /// `max_restarts` already happened within the window; restarting is not helping.
    RateLimited { restarts: u32 },
}

/// Restart history per target name. Memory is bounded by the configured targets times
/// `max_restarts`, because only allowed restarts of known targets are recorded.
#[derive(Debug)]
pub struct Policy {
    limits: Limits,
    history: HashMap<String, VecDeque<Instant>>,
}

impl Policy {
    pub fn new(limits: Limits) -> Self {
        Policy {
            limits,
            history: HashMap::new(),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Decides for `target` at `now` and records the restart if allowed.
    pub fn check(&mut self, target: &str, now: Instant) -> Verdict {
        let limits = self.limits;
        let history = self.history.entry(target.to_owned()).or_default();
        while let Some(&oldest) = history.front() {
            if now.saturating_duration_since(oldest) >= limits.window {
                history.pop_front();
            } else {
                break;
            }
        }
        if let Some(&last) = history.back() {
            let since = now.saturating_duration_since(last);
            if since < limits.cooldown {
                return Verdict::Cooldown {
                    remaining: limits.cooldown - since,
                };
            }
        }
        let restarts = history.len() as u32;
        if restarts >= limits.max_restarts {
            return Verdict::RateLimited { restarts };
        }
        history.push_back(now);
        Verdict::Restart
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn cooldown_then_rate_limit_then_window_expiry() {
        let limits = Limits {
            cooldown: 60 * S,
            max_restarts: 2,
            window: 600 * S,
        };
        let mut policy = Policy::new(limits);
        let t0 = Instant::now();
        // (seconds after t0, target, expected verdict)
        let table = [
            (0, "app", Verdict::Restart),
            (10, "app", Verdict::Cooldown { remaining: 50 * S }),
            (59, "app", Verdict::Cooldown { remaining: S }),
            (5, "sidecar", Verdict::Restart), // targets are independent
            (60, "app", Verdict::Restart),
            (100, "app", Verdict::Cooldown { remaining: 20 * S }),
            (200, "app", Verdict::RateLimited { restarts: 2 }),
            (599, "app", Verdict::RateLimited { restarts: 2 }),
            // The first restart (t=0) has left the window, one slot is free again.
            (600, "app", Verdict::Restart),
            (650, "app", Verdict::Cooldown { remaining: 10 * S }),
            // t=60 left the window at 660.
            (661, "app", Verdict::Restart),
            (730, "app", Verdict::RateLimited { restarts: 2 }),
            (1199, "app", Verdict::RateLimited { restarts: 2 }),
            // Both t=600 and t=661 have left the window.
            (1261, "app", Verdict::Restart),
        ];
        for (secs, target, want) in table {
            let got = policy.check(target, t0 + secs * S);
            assert_eq!(got, want, "at t={secs}s for {target}");
        }
    }

    #[test]
    fn zero_cooldown_still_rate_limits() {
        let mut policy = Policy::new(Limits {
            cooldown: Duration::ZERO,
            max_restarts: 3,
            window: 60 * S,
        });
        let t0 = Instant::now();
        let verdicts: Vec<_> = (0..5).map(|_| policy.check("app", t0)).collect();
        assert_eq!(
            verdicts,
            [
                Verdict::Restart,
                Verdict::Restart,
                Verdict::Restart,
                Verdict::RateLimited { restarts: 3 },
                Verdict::RateLimited { restarts: 3 },
            ]
        );
    }
}
