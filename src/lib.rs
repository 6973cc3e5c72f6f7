//! rabbit-sidecar: a RabbitMQ consumer sidecar with failover and observability.
#![forbid(unsafe_code)]

pub mod telemetry;
pub mod trace;
