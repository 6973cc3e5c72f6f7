//! Alertmanager's webhook payload (version 4) and the pure first step of deciding what an alert
//! asks for.
//!
//! Only the fields we use are modelled; unknown fields are ignored so newer Alertmanagers keep
//! working, but `version` must be "4" because a different shape could mean different semantics.
//! [`classify`] looks at labels only and never at the configuration's actions: it answers "does
//! this alert ask to restart something, and which name does it give?".

use std::collections::BTreeMap;

use serde::Deserialize;

/// Label a restart-driving alert carries, with value [`RESTART_ACTION`].
pub const LABEL_ACTION: &str = "action";
pub const RESTART_ACTION: &str = "restart";
/// Label naming which configured target to restart.
pub const LABEL_RESTART_TARGET: &str = "restart_target";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Webhook {
    pub version: String,
    #[serde(default)]
    pub group_key: String,
    #[serde(default)]
    pub receiver: String,
    pub alerts: Vec<Alert>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    pub status: String,
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub fingerprint: String,
}

impl Alert {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }

    pub fn name(&self) -> &str {
        self.label("alertname").unwrap_or("")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadError {
    #[error("not a webhook payload: {0}")]
    Json(String),
    #[error("unsupported webhook payload version {0:?}, expected \"4\"")]
    Version(String),
}

/// Parses a request body. Nothing is acted on unless this succeeds for the whole payload.
pub fn parse(body: &[u8]) -> Result<Webhook, PayloadError> {
    let webhook: Webhook =
        serde_json::from_slice(body).map_err(|e| PayloadError::Json(e.to_string()))?;
    if webhook.version != "4" {
        return Err(PayloadError::Version(webhook.version));
    }
    Ok(webhook)
}

/// What an alert asks for, judged from its labels alone.
#[derive(Debug, PartialEq, Eq)]
pub enum Ask<'a> {
    /// A firing alert asking to restart the target with this name.
    Restart(&'a str),
    /// Resolved alerts never restart anything.
    Resolved,
    /// Not a restart alert (no `action="restart"`); someone else's business.
    NotRestart,
    /// `action="restart"` but no usable `restart_target`.
    NoTarget,
}

pub fn classify(alert: &Alert) -> Ask<'_> {
    if alert.label(LABEL_ACTION) != Some(RESTART_ACTION) {
        return Ask::NotRestart;
    }
    if alert.status != "firing" {
        return Ask::Resolved;
    }
    match alert.label(LABEL_RESTART_TARGET) {
        Some(target) if !target.is_empty() => Ask::Restart(target),
        _ => Ask::NoTarget,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(status: &str, labels: &[(&str, &str)]) -> Alert {
        Alert {
            status: status.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            fingerprint: String::new(),
        }
    }

    #[test]
    fn classify_table() {
        let restart = [("action", "restart"), ("restart_target", "app")];
        let cases = [
            (alert("firing", &restart), Ask::Restart("app")),
            (alert("resolved", &restart), Ask::Resolved),
            (
                alert("firing", &[("restart_target", "app")]),
                Ask::NotRestart,
            ),
            (
                alert("firing", &[("action", "page"), ("restart_target", "app")]),
                Ask::NotRestart,
            ),
            (alert("firing", &[("action", "restart")]), Ask::NoTarget),
            (
                alert("firing", &[("action", "restart"), ("restart_target", "")]),
                Ask::NoTarget,
            ),
        ];
        for (alert, want) in &cases {
            assert_eq!(&classify(alert), want, "{alert:?}");
        }
    }

    #[test]
    fn parses_alertmanager_payload() {
        let body = br#"{"receiver":"remediate","status":"firing","alerts":[{"status":"firing",
            "labels":{"alertname":"AppDown","action":"restart","restart_target":"app"},
            "annotations":{"summary":"x"},"startsAt":"2024-01-01T00:00:00Z",
            "endsAt":"0001-01-01T00:00:00Z","generatorURL":"http://p","fingerprint":"abc"}],
            "groupLabels":{},"commonLabels":{},"commonAnnotations":{},"externalURL":"http://am",
            "version":"4","groupKey":"{}:{}","truncatedAlerts":0}"#;
        let hook = parse(body).unwrap();
        assert_eq!(hook.alerts.len(), 1);
        assert_eq!(hook.alerts[0].name(), "AppDown");
        assert_eq!(hook.alerts[0].fingerprint, "abc");
    }

    #[test]
    fn rejects_bad_payloads() {
        assert!(matches!(parse(b"{"), Err(PayloadError::Json(_))));
        assert!(matches!(parse(b"[]"), Err(PayloadError::Json(_))));
        assert!(matches!(
            parse(br#"{"version":"4","alerts":[{"labels":{}}]}"#),
            Err(PayloadError::Json(_))
        ));
        assert_eq!(
            parse(br#"{"version":"3","alerts":[]}"#).unwrap_err(),
            PayloadError::Version("3".into())
        );
    }
}
