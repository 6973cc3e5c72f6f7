//! The connection the tooling works on: the consumer's own [`broker::connect`] tried on each
//! configured node in turn (the first that answers wins), and the consumer's passive declare
//! ([`topology::inspect`]): whether a queue exists and how many messages are ready in it.

use lapin::Connection;

use super::Failure;
use crate::broker::{self, management::Management, topology};
use crate::config::Config;

/// A connection, and the management API beside it.
pub struct Session {
    pub connection: Connection,
    /// The management API for the connection's virtual host, when `--management-url` is set.
    pub management: Option<Management>,
}

impl Session {
    /// Connects to the first node that answers; 69 when none does.
    pub async fn open(config: &Config) -> Result<Session, Failure> {
        let tls = broker::tls_config(config).map_err(|e| Failure::Usage(format!("TLS: {e}")))?;
        let mut errors = Vec::new();
        for node in &config.nodes {
            match broker::connect(node, config, tls.clone()).await {
                Ok(connection) => {
                    let management = config
                        .management_url
                        .as_ref()
                        .map(|u| Management::new(u.0.clone()).with_vhost(&node.uri.vhost));
                    return Ok(Session {
                        connection,
                        management,
                    });
                }
                // The error names the node as host:port; lapin's texts carry no URI.
                Err(e) => errors.push(e.to_string()),
            }
        }
        Err(Failure::Unavailable(format!(
            "no broker node could be reached ({})",
            errors.join("; ")
        )))
    }

    /// Ready messages and consumers of `queue` (the consumer's passive declare); 69 when it
    /// does not exist.
    pub async fn queue(&self, queue: &str, what: &str) -> Result<(u32, u32), Failure> {
        match topology::inspect(&self.connection, queue).await {
            Ok(counts) => Ok(counts),
            Err(e) if is_not_found(&e) => Err(Failure::Unavailable(format!(
                "{what} {queue:?} does not exist"
            ))),
            Err(e) if self.connection.status().connected() => Err(Failure::Unavailable(format!(
                "{what} {queue:?} cannot be used: {e}"
            ))),
            Err(e) => Err(lost(e)),
        }
    }

    pub async fn close(self) {
        if self.connection.status().connected() {
            let _ = self.connection.close(200, "done".into()).await;
        }
    }
}

fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if p.get_id() == 404)
}

/// The connection or channel went away under the tooling.
pub fn lost(e: lapin::Error) -> Failure {
    Failure::Unavailable(format!("the broker connection failed: {e}"))
}
