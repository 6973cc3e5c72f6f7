//! The receiver's observable events: each method writes one structured log line and moves its
//! metric, so logs and metrics cannot drift apart.
//!
//! Metric names are a user-facing contract (alerts may watch them):
//! - `rabbit_sidecar_remediation_requests_total{result}`: webhook requests by outcome
//!   (`accepted`, `unauthorized`, `bad_request`, `too_large`).
//! - `rabbit_sidecar_remediations_total{target,action,result}`: restarts by outcome
//!   (`success`, `failure`, `dry_run`).
//! - `rabbit_sidecar_remediation_cooldown_skips_total{target}`: restarts skipped by the cooldown.
//! - `rabbit_sidecar_remediation_rate_limited_total{target}`: restarts refused by the rate limit;
//!   any increase means a human is needed.
//! - `rabbit_sidecar_remediation_unknown_target_total`: restart alerts naming no configured target
//!   (no label: the name comes from the alert and is unbounded).
//!
//! `target` values are configured target names, never raw alert data, so cardinality is bounded
//! by the configuration; all series of configured targets are created at zero on start-up.

use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

use super::config::ActionKind;

/// Outcome of a webhook request, a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestResult {
    Accepted,
    Unauthorized,
    BadRequest,
    TooLarge,
}

impl RequestResult {
    const ALL: [RequestResult; 4] = [
        RequestResult::Accepted,
        RequestResult::Unauthorized,
        RequestResult::BadRequest,
        RequestResult::TooLarge,
    ];

    fn as_str(self) -> &'static str {
        match self {
            RequestResult::Accepted => "accepted",
            RequestResult::Unauthorized => "unauthorized",
            RequestResult::BadRequest => "bad_request",
            RequestResult::TooLarge => "too_large",
        }
    }
}

/// Outcome of one remediation, a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemediationResult {
    Success,
    Failure,
    DryRun,
}

impl RemediationResult {
    const ALL: [RemediationResult; 3] = [
        RemediationResult::Success,
        RemediationResult::Failure,
        RemediationResult::DryRun,
    ];

    fn as_str(self) -> &'static str {
        match self {
            RemediationResult::Success => "success",
            RemediationResult::Failure => "failure",
            RemediationResult::DryRun => "dry_run",
        }
    }
}

#[derive(Clone)]
pub struct Metrics {
    requests: IntCounterVec,
    remediations: IntCounterVec,
    cooldown_skips: IntCounterVec,
    rate_limited: IntCounterVec,
    unknown_target: IntCounter,
}

impl Metrics {
    /// Registers the families and creates every series for `targets` (name, action) at zero.
    pub fn register<'a>(
        registry: &Registry,
        targets: impl IntoIterator<Item = (&'a str, ActionKind)>,
    ) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "rabbit_sidecar_remediation_requests_total",
                "Alertmanager webhook requests received, by outcome.",
            ),
            &["result"],
        )?;
        let remediations = IntCounterVec::new(
            Opts::new(
                "rabbit_sidecar_remediations_total",
                "Restarts performed for firing alerts, by target, action and outcome.",
            ),
            &["target", "action", "result"],
        )?;
        let cooldown_skips = IntCounterVec::new(
            Opts::new(
                "rabbit_sidecar_remediation_cooldown_skips_total",
                "Restarts not done because the target was restarted less than the cooldown ago.",
            ),
            &["target"],
        )?;
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "rabbit_sidecar_remediation_rate_limited_total",
                "Restarts refused because the target reached max_restarts within the window; a human is needed.",
            ),
            &["target"],
        )?;
        let unknown_target = IntCounter::new(
            "rabbit_sidecar_remediation_unknown_target_total",
            "Firing restart alerts whose restart_target names no configured target.",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(remediations.clone()))?;
        registry.register(Box::new(cooldown_skips.clone()))?;
        registry.register(Box::new(rate_limited.clone()))?;
        registry.register(Box::new(unknown_target.clone()))?;

        for result in RequestResult::ALL {
            requests.with_label_values(&[result.as_str()]);
        }
        for (target, action) in targets {
            for result in RemediationResult::ALL {
                remediations.with_label_values(&[target, action.as_str(), result.as_str()]);
            }
            cooldown_skips.with_label_values(&[target]);
            rate_limited.with_label_values(&[target]);
        }
        Ok(Metrics {
            requests,
            remediations,
            cooldown_skips,
            rate_limited,
            unknown_target,
        })
    }

    pub fn request_accepted(&self, receiver: &str, group_key: &str, alerts: usize) {
        tracing::debug!(receiver, group_key, alerts, "webhook accepted");
        self.count_request(RequestResult::Accepted);
    }

    pub fn request_rejected(&self, result: RequestResult, reason: &str) {
        tracing::warn!(
            result = result.as_str(),
            reason,
            "webhook request rejected, nothing done"
        );
        self.count_request(result);
    }

    fn count_request(&self, result: RequestResult) {
        self.requests.with_label_values(&[result.as_str()]).inc();
    }

    pub fn unknown_target(&self, alertname: &str, target: Option<&str>) {
        tracing::warn!(
            alertname,
            target = target.unwrap_or(""),
            "restart alert names no configured target, nothing done"
        );
        self.unknown_target.inc();
    }

    pub fn cooldown_skip(&self, alertname: &str, target: &str, remaining: Duration) {
        tracing::info!(
            alertname,
            target,
            remaining = %humantime::format_duration(round_secs(remaining)),
            "restart skipped: target restarted recently (cooldown)"
        );
        self.cooldown_skips.with_label_values(&[target]).inc();
    }

    pub fn rate_limited(&self, alertname: &str, target: &str, restarts: u32, window: Duration) {
        tracing::error!(
            alertname,
            target,
            restarts,
            window = %humantime::format_duration(window),
            "restart refused: limit reached, restarting is not helping; a human is needed"
        );
        self.rate_limited.with_label_values(&[target]).inc();
    }

    pub fn remediation_started(&self, alertname: &str, target: &str, action: ActionKind) {
        tracing::info!(
            alertname,
            target,
            action = action.as_str(),
            "restarting target"
        );
    }

    pub fn remediation_done(
        &self,
        alertname: &str,
        target: &str,
        action: ActionKind,
        result: RemediationResult,
        detail: &str,
    ) {
        match result {
            RemediationResult::Success => tracing::info!(
                alertname,
                target,
                action = action.as_str(),
                detail,
                "target restarted"
            ),
            RemediationResult::DryRun => tracing::info!(
                alertname,
                target,
                action = action.as_str(),
                "dry run: would restart target"
            ),
            RemediationResult::Failure => tracing::error!(
                alertname,
                target,
                action = action.as_str(),
                error = detail,
                "restart failed"
            ),
        }
        self.remediations
            .with_label_values(&[target, action.as_str(), result.as_str()])
            .inc();
    }
}

fn round_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}
