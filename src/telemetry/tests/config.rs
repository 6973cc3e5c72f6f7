//! How `Telemetry` reads its variables: when export is on, which sampler applies, and that a bad
//! value is refused with the variable named, before anything is installed.

use std::collections::HashMap;

use super::{meta, sent_to_app, target};
use crate::telemetry::trace::MessageTrace;
use crate::telemetry::{LogFormat, Telemetry, TelemetryError};
use lapin::types::{AMQPValue, FieldTable, LongString};

/// Nothing listens here: building an exporter connects lazily, and these tests never flush.
const NOWHERE: &str = "http://127.0.0.1:9";

fn env_of<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
    let map: HashMap<&str, &str> = pairs.iter().copied().collect();
    move |k| map.get(k).map(|v| v.to_string())
}

fn build(pairs: &[(&str, &str)]) -> Result<(Telemetry, tracing::Dispatch), TelemetryError> {
    Telemetry::build(LogFormat::Text, &env_of(pairs))
}

fn error_of(pairs: &[(&str, &str)]) -> String {
    match build(pairs) {
        Ok(_) => panic!("{pairs:?} was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn log_format_parses_and_prints() {
    for format in [LogFormat::Text, LogFormat::Json] {
        assert_eq!(format.to_string().parse::<LogFormat>(), Ok(format));
    }
    let err = "yaml".parse::<LogFormat>().unwrap_err();
    assert!(err.contains(r#"expected "text" or "json""#), "{err}");
}

#[test]
fn without_an_endpoint_nothing_is_exported() {
    for pairs in [
        &[][..],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", "")][..],
        &[("OTEL_SERVICE_NAME", "x"), ("RUST_LOG", "debug")][..],
    ] {
        let (telemetry, _) = build(pairs).unwrap();
        assert!(!telemetry.exporting(), "{pairs:?}");
    }
}

#[tokio::test]
async fn an_endpoint_turns_export_on_unless_disabled() {
    for (pairs, exporting) in [
        (&[("OTEL_EXPORTER_OTLP_ENDPOINT", NOWHERE)][..], true),
        (&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", NOWHERE)][..], true),
        (
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", NOWHERE),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ][..],
            true,
        ),
        (
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", NOWHERE),
                ("OTEL_SDK_DISABLED", "true"),
            ][..],
            false,
        ),
        (
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", NOWHERE),
                ("OTEL_TRACES_EXPORTER", "none"),
            ][..],
            false,
        ),
    ] {
        let (telemetry, _) = build(pairs).unwrap();
        assert_eq!(telemetry.exporting(), exporting, "{pairs:?}");
    }
}

#[test]
fn bad_values_name_their_variable() {
    for (pairs, var) in [
        (&[("RUST_LOG", "info,foo=loud")][..], "RUST_LOG"),
        (
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "127.0.0.1:4318")][..],
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
        (
            &[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "not a url")][..],
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ),
        (
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", NOWHERE),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ][..],
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", NOWHERE),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "udp"),
            ][..],
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        ),
        (
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", NOWHERE),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "10s"),
            ][..],
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        ),
        (
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", NOWHERE),
                ("OTEL_TRACES_SAMPLER", "sometimes"),
            ][..],
            "OTEL_TRACES_SAMPLER",
        ),
        (
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", NOWHERE),
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
            ][..],
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        (
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", NOWHERE),
                ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
            ][..],
            "OTEL_BSP_MAX_QUEUE_SIZE",
        ),
        (
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", NOWHERE),
                ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "many"),
            ][..],
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
        ),
        (
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", NOWHERE),
                ("OTEL_BSP_SCHEDULE_DELAY", "5s"),
            ][..],
            "OTEL_BSP_SCHEDULE_DELAY",
        ),
        (
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", NOWHERE),
                ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "authorization"),
            ][..],
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        ),
        (&[("OTEL_SDK_DISABLED", "yes")][..], "OTEL_SDK_DISABLED"),
        (
            &[("OTEL_TRACES_EXPORTER", "jaeger")][..],
            "OTEL_TRACES_EXPORTER",
        ),
    ] {
        let message = error_of(pairs);
        assert!(
            message.starts_with(&format!("{var}: ")),
            "{pairs:?}: {message}"
        );
    }
}

/// The sampling flag the app would receive for a sampled producer context.
fn flags_sent_to_app(sampler: &str) -> String {
    let pairs = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", NOWHERE),
        ("OTEL_TRACES_SAMPLER", sampler),
        ("OTEL_TRACES_SAMPLER_ARG", "0"),
    ];
    let (telemetry, dispatch) = build(&pairs).unwrap();
    assert!(telemetry.exporting());
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(LongString::from(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )),
    );
    let sent = tracing::dispatcher::with_default(&dispatch, || {
        sent_to_app(&MessageTrace::start(&meta(Some(&headers)), &target()))
    });
    let parent = sent["traceparent"].to_str().unwrap().to_owned();
    assert!(
        parent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{parent}"
    );
    parent[parent.len() - 2..].to_owned()
}

#[tokio::test]
async fn the_sampler_variable_decides_what_is_sampled() {
    // Parent-based samplers follow the producer; the others decide for themselves.
    assert_eq!(flags_sent_to_app("parentbased_always_on"), "01");
    assert_eq!(flags_sent_to_app("parentbased_traceidratio"), "01");
    assert_eq!(flags_sent_to_app("always_off"), "00");
    assert_eq!(flags_sent_to_app("traceidratio"), "00");
    assert_eq!(flags_sent_to_app("always_on"), "01");
}

#[test]
fn dropping_without_shutdown_does_not_wedge_a_current_thread_runtime() {
    // Left to the SDK, the last provider reference would block its thread on a batch task only
    // that same thread could run. Run it where a hang can be detected rather than waited out.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (telemetry, dispatch) = build(&[("OTEL_EXPORTER_OTLP_ENDPOINT", NOWHERE)]).unwrap();
            tracing::dispatcher::with_default(&dispatch, || {
                tracing::info_span!("some_span").in_scope(|| {});
            });
            drop(telemetry);
            drop(dispatch);
        });
        let _ = done_tx.send(());
    });
    done_rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("dropping Telemetry blocked the runtime");
}
