//! The app behind the sidecar: how a message is handed to it ([`dispatch`], HTTP, knows nothing
//! of AMQP), and whether it can take messages at all ([`gate`]: pause consuming while nothing
//! listens, probe, resume).

pub(crate) mod dispatch;
pub(crate) mod gate;

pub(crate) use dispatch::{Dispatcher, Prober};
pub(crate) use gate::AppGate;
