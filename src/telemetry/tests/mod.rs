//! Telemetry's own tests: OTLP encoding against the official conversion, the span batcher, the
//! spans a delivery makes, export to a collector on 127.0.0.1, the `OTEL_*` settings and the log
//! level. None needs a broker.

mod config;
mod log_level;
mod otlp_encode;
mod otlp_export;
mod span_batch;
mod trace_spans;
