//! The most verbose level a dispatcher may log at, as `tracing` works it out from the layers.
//!
//! The consumer skips work for lines that cannot be written (a delivery's log span on the
//! healthy path) by asking `tracing` for that level. It is a process-wide value, the maximum over
//! every live dispatcher, so this check has a test binary of its own and makes one dispatcher at
//! a time.

use crate::telemetry::{LogFormat, Telemetry};
use tracing::level_filters::LevelFilter;

/// Nothing listens here: the exporter connects lazily, and nothing is exported.
const NOWHERE: &str = "http://127.0.0.1:9";

#[tokio::test]
async fn exporting_leaves_the_log_level_where_rust_log_puts_it() {
    for (pairs, max) in [
        (&[("RUST_LOG", "info")][..], LevelFilter::INFO),
        (
            &[
                ("RUST_LOG", "info"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", NOWHERE),
            ][..],
            LevelFilter::INFO,
        ),
        (
            &[
                ("RUST_LOG", "warn"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", NOWHERE),
            ][..],
            LevelFilter::WARN,
        ),
        (
            &[
                ("RUST_LOG", "debug"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", NOWHERE),
            ][..],
            LevelFilter::DEBUG,
        ),
    ] {
        let env = |k: &str| {
            pairs
                .iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.to_string())
        };
        let (telemetry, dispatch) = Telemetry::build(LogFormat::Text, &env).unwrap();
        assert_eq!(
            LevelFilter::current(),
            max,
            "{pairs:?}: the dispatcher's layers allow more than RUST_LOG"
        );
        drop((telemetry, dispatch));
    }
}
