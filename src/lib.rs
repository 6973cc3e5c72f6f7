//! rabbit-sidecar: consumes a RabbitMQ queue on behalf of an application, hands each message to it
//! over HTTP, and settles the message by the app's answer, with failover and observability.
//!
//! Data flows one way: [`broker`] (connection, nodes, backoff) → [`consumer`] (deliveries, slots)
//! → [`dispatch`] (HTTP to the app) → [`policy`] (the decision) → ack, retry or dead-letter.
//! [`events`], [`metrics`] and [`health`] are leaves every stage may use. [`run`] wires them; the
//! binary in `main.rs` only parses configuration and picks the exit code.
#![forbid(unsafe_code)]

pub mod admin;
pub mod broker;
pub mod check;
pub mod cli;
pub mod config;
pub mod consumer;
pub mod dispatch;
pub mod encode;
pub mod events;
pub mod gate;
pub mod headers;
pub mod health;
pub mod management;
pub mod metrics;
pub mod monitor;
pub mod otlp;
pub mod policy;
pub mod remediate;
pub mod run;
pub mod span_batch;
pub mod telemetry;
pub mod topology;
pub mod trace;
