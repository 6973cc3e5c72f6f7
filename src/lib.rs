//! rabbit-sidecar: consumes a RabbitMQ queue on behalf of an application, hands each message to it
//! over HTTP, and settles the message by the app's answer, with failover and observability.
//!
//! The parts, by folder:
//!
//! - [`config`] and [`cli`]: every setting, from flags, `RABBIT_SIDECAR_*` variables and a TOML
//!   file, validated into one [`config::Config`].
//! - `broker`: the connection (nodes, backoff, loss and recovery), the queues a subscription
//!   needs, and the periodic polls of queue depth and consumers.
//! - `pipeline`: one consumer loop per subscription, the only place where the broker, the app
//!   and the policy meet. A message goes intake → dispatch → decide → settle.
//! - `app`: HTTP to the app (knows nothing of AMQP), and the gate that pauses consuming while
//!   the app is unreachable.
//! - `policy`: the decision, a pure function from the app's answer and the attempts so far.
//! - [`telemetry`]: logs, metrics and traces; every observable event is one type whose `emit`
//!   logs and counts.
//! - `admin`: `/metrics`, `/healthz`, `/readyz`, `/status` on a thread of their own, and the
//!   shared health state behind them.
//! - [`check`], [`deadletters`], [`remediate`]: the other subcommands.
//!
//! Data flows one way: broker → pipeline → app → policy → settle. Telemetry and health are
//! leaves every stage may use. [`run()`] wires the parts; the binary only parses configuration
//! and picks the exit code.
#![forbid(unsafe_code)]

mod admin;
mod app;
mod broker;
pub mod check;
pub mod cli;
pub mod config;
pub mod deadletters;
mod encode;
mod env;
mod headers;
mod pipeline;
mod policy;
pub mod remediate;
mod run;
mod signals;
pub mod telemetry;

pub use run::{RunError, run, run_until_signalled};
