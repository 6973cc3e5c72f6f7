//! Every test that talks to a RabbitMQ broker, in one binary (one build of the harness in
//! `tests/common`). The real broker, the real sidecar binary as a child process, an in-process
//! app.
//!
//! The modules whose names start with `disruptive` stop the broker's application, close every
//! connection or raise its alarms: `scripts/test.sh` runs them in a second pass, alone and one at
//! a time (`-E 'test(/^disruptive/)'`, and the `broker-disruptive` group in
//! `.config/nextest.toml` keeps them serial even when run directly).

#[path = "../common/mod.rs"]
mod common;

mod acks;
mod app_faults;
mod bad_input;
mod circuit_breaker;
mod cli;
mod cluster;
mod consume;
mod dead_letters;
mod delivery_limit;
mod disruptive;
mod disruptive_faults;
mod observability;
mod partitions;
mod prometheus_e2e;
mod remediation_loop;
mod subscriptions;
mod tls;
mod trace_e2e;
mod versions;
