//! The app behind the sidecar: how a message is handed to it ([`dispatch`], HTTP, knows nothing
//! of AMQP), and whether it can take messages at all ([`gate`]: pause consuming while nothing
//! listens, probe, resume), and whether it is worth calling ([`breaker`]: pause consuming while
//! retryable failures dominate its answers, probe with one message, resume; the state machine
//! itself is [`circuit`], pure).

pub(crate) mod breaker;
pub mod circuit;
pub(crate) mod dispatch;
pub(crate) mod gate;
pub(crate) mod pool;
pub(crate) mod retry_after;

pub(crate) use breaker::Breaker;
pub(crate) use dispatch::{Dispatcher, Prober};
pub(crate) use gate::AppGate;
