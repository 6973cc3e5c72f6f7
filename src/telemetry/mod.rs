//! What the sidecar tells the outside about itself: logs, metrics and traces.
//!
//! - [`events`]: one type per observable event; emitting one writes its log line and moves its
//!   metrics in the same call. Pipeline code reports through these and nothing else.
//! - [`metrics`]: the Prometheus families, the user-facing contract dashboards and alerts read.
//! - [`trace`]: a delivery's spans, continuing the producer's W3C context and passing it on.
//! - [`setup`]: the process-wide subscriber and OTLP export, set up once and flushed at exit;
//!   [`span_batch`] batches finished spans and [`otlp`] encodes and sends them over HTTP.
//!
//! The OTLP encoder and the span batcher are hand-written because the SDK's batch processor
//! and prost encoder cost more per span than the rest of a delivery (docs/performance.md has
//! the measurements). The price: a field OTLP adds is ours to encode. `otlp`'s tests compare
//! every span against the official conversion (`opentelemetry-proto`), so a new field must be
//! added to [`otlp::encode_request`] and to that comparison in the same change.

pub(crate) mod events;
pub mod metrics;
pub(crate) mod otlp;
pub(crate) mod setup;
pub(crate) mod span_batch;
pub(crate) mod trace;

pub use setup::{LogFormat, Telemetry, TelemetryError};

#[cfg(test)]
mod tests;
