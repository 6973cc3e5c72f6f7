//! Everything that talks to the broker itself, apart from the consuming: the connection
//! ([`session`]: nodes, backoff, loss and recovery), the queues a subscription needs
//! ([`topology`]), the periodic polls of queue depth and consumers ([`monitor`]), and the
//! management API ([`management`]).

pub(crate) mod confirm;
pub(crate) mod facts;
pub(crate) mod management;
pub(crate) mod monitor;
pub(crate) mod session;
pub(crate) mod topology;

pub(crate) use session::{Session, Sessions, backoff, connect, hostname, tls_config};
